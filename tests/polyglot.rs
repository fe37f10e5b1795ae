//! Python and JavaScript plugins (the SDKs in guest/python and guest/js, built by
//! scripts/build-plugin.sh) serving real requests with the default model, beside the Rust
//! plugin they mirror; and the pool they share with Rust plugins.

mod support;

use std::time::Duration;

use support::server::{plugin, read_events, start_with_examples, TestServer};

const GREEDY: &str = r#"{"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0, "ignore_eos": true"#;

async fn server(
    examples: &[(&str, &str)],
    configure: impl FnOnce(&mut flywheel::config::Config),
) -> Option<TestServer> {
    let Some(model) = support::default_model_manifest() else {
        eprintln!("skipped: the default model is not fetched (python3 models/fetch.py)");
        return None;
    };
    Some(start_with_examples(vec![model], &[plugin("complete", "complete", None)], examples, configure).await)
}

/// The text of a streamed answer (`text` or `delta` events) and its last JSON event.
async fn streamed(s: &TestServer, path: &str, body: &str) -> (String, serde_json::Value) {
    let mut resp = s.open(path, body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = read_events(&mut resp, 10_000).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{path}: {events:?}");
    let json: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).expect("JSON event")).collect();
    let text = json.iter().filter_map(|e| e.get("text").or_else(|| e.get("delta"))?.as_str()).collect();
    (text, json.last().cloned().unwrap_or_default())
}

fn assert_error(r: &support::server::Resp, status: u16, param: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.text());
    let e = &r.json()["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_generate_what_the_rust_plugin_generates() {
    let Some(s) = server(&[("py-complete", ""), ("js-complete", "")], |_| {}).await else { return };
    let rust = s.post("/fn/complete", &format!("{GREEDY}}}")).await;
    assert_eq!(rust.status, 200, "{}", rust.text());
    let rust = rust.json();
    assert_eq!(rust["usage"]["completion_tokens"], 24);
    for name in ["py-complete", "js-complete"] {
        let path = format!("/fn/{name}");
        let r = s.post(&path, &format!("{GREEDY}}}")).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let r = r.json();
        assert_eq!(r["text"], rust["text"], "{name}");
        assert_eq!(r["finish_reason"], "length", "{name}");
        assert_eq!(r["usage"], rust["usage"], "{name}");
        let (text, last) = streamed(&s, &path, &format!("{GREEDY}, \"stream\": true}}")).await;
        assert_eq!(text, rust["text"].as_str().unwrap(), "{name} streamed");
        assert_eq!(last["finish_reason"], "length", "{name}");
        // Sampling in the guest: a seed makes it repeatable, a stop string ends it.
        let seeded =
            r#"{"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 7}"#;
        let (a, b) = (s.post(&path, seeded).await.json(), s.post(&path, seeded).await.json());
        assert_eq!(a["text"], b["text"], "{name}: same seed, same text");
        let cut = rust["text"].as_str().unwrap().split_whitespace().nth(2).unwrap().to_string();
        let stopped =
            s.post(&path, &format!("{GREEDY}, \"stop\": [{}]}}", serde_json::Value::from(cut.clone()))).await.json();
        assert_eq!(stopped["finish_reason"], "stop", "{name}: {stopped}");
        assert!(!stopped["text"].as_str().unwrap().contains(&cut), "{name}: {stopped}");
        // Bad input gets the SDK's JSON errors.
        assert_error(&s.post(&path, "{").await, 400, None);
        assert_error(&s.post(&path, r#"{"prompt": 5}"#).await, 400, Some("prompt"));
        assert_error(&s.post(&path, r#"{"prompt": "x", "temperature": 9}"#).await, 400, Some("temperature"));
        assert_error(&s.post(&path, r#"{"prompt": "x", "max_tokens": 0}"#).await, 400, Some("max_tokens"));
        assert_error(&s.post(&path, r#"{"prompt": "x", "model": "nope"}"#).await, 404, None);
        assert_error(&s.get(&path).await, 405, None);
        assert_error(&s.post(&format!("{path}/elsewhere"), "{}").await, 404, None);
    }
    assert!(s.wait_idle(Duration::from_secs(2)).await, "every session was freed");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_chat_samples_in_the_guest_and_streams() {
    let Some(s) = server(&[("py-chat", "")], |_| {}).await else { return };
    let ask = r#""messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 24"#;
    let greedy = s.post("/fn/py-chat", &format!("{{{ask}, \"temperature\": 0}}")).await;
    assert_eq!(greedy.status, 200, "{}", greedy.text());
    let greedy = greedy.json();
    let content = greedy["message"]["content"].as_str().unwrap().to_string();
    assert!(!content.trim().is_empty(), "{greedy}");
    assert_eq!(greedy["message"]["role"], "assistant");
    let usage = &greedy["usage"];
    assert_eq!(
        usage["total_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
    let (text, last) = streamed(&s, "/fn/py-chat", &format!("{{{ask}, \"temperature\": 0, \"stream\": true}}")).await;
    assert_eq!(text, content, "streamed greedy equals the whole answer");
    assert!(matches!(last["finish_reason"].as_str(), Some("stop" | "length")), "{last}");
    let sampled = format!("{{{ask}, \"temperature\": 1.0, \"min_p\": 0.1, \"seed\": 42}}");
    let (a, b) = (s.post("/fn/py-chat", &sampled).await.json(), s.post("/fn/py-chat", &sampled).await.json());
    assert_eq!(a["message"], b["message"], "the guest's RNG follows the seed");
    assert_error(&s.post("/fn/py-chat", r#"{"messages": []}"#).await, 400, Some("messages"));
    assert_error(&s.post("/fn/py-chat", &format!("{{{ask}, \"min_p\": 2}}")).await, 400, Some("min_p"));
    assert_error(&s.post("/fn/py-chat", &format!("{{{ask}, \"seed\": -1}}")).await, 400, Some("seed"));
    assert!(s.wait_idle(Duration::from_secs(2)).await);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_classifier_answers_only_with_one_of_its_labels() {
    let Some(s) = server(&[("py-classify", "")], |_| {}).await else { return };
    let r = s.post("/fn/py-classify", r#"{"text": "I love this phone, it is wonderful!"}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    assert!(["positive", "negative", "neutral"].contains(&r["label"].as_str().unwrap()), "{r}");
    let p = r["probability"].as_f64().unwrap();
    assert!(p > 0.0 && p <= 1.0, "{r}");
    // Labels the model would never say unprompted, one a prefix of another.
    for labels in [r#"["zebra crossing", "purple elephant"]"#, r#"["yes", "yes sir", "no"]"#] {
        let body = format!(r#"{{"text": "Pick one.", "labels": {labels}}}"#);
        let r = s.post("/fn/py-classify", &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = r.json();
        let allowed: Vec<String> = serde_json::from_str(labels).unwrap();
        assert!(allowed.iter().any(|l| r["label"] == l.as_str()), "{labels}: {r}");
        assert!(r["probability"].as_f64().is_some_and(|p| p > 0.0 && p <= 1.0), "{r}");
        assert_eq!(r["usage"]["completion_tokens"], r["tokens"].as_array().unwrap().len());
    }
    assert_error(&s.post("/fn/py-classify", r#"{"text": "x", "labels": []}"#).await, 400, Some("labels"));
    assert_error(&s.post("/fn/py-classify", r#"{"text": "x", "labels": ["a", "a"]}"#).await, 400, Some("labels"));
    assert_error(&s.post("/fn/py-classify", r#"{"labels": ["a"]}"#).await, 400, Some("text"));
    assert!(s.wait_idle(Duration::from_secs(2)).await);
    s.shutdown().await;
}

/// Requests through a plugin, at once; their statuses.
async fn burst(s: &TestServer, path: &str, count: usize, body: &'static str) -> Vec<(u16, String)> {
    let mut tasks = Vec::new();
    for _ in 0..count {
        let (client, path) = (s.client(), path.to_string());
        tasks.push(tokio::spawn(async move {
            let r = client.post(&path, body).await;
            (r.status, r.text())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_makes_requests_wait_their_turn_instead_of_failing() {
    // Room for 4 instances: 4 × 16 core-instance slots, and a Python instance takes 14.
    let Some(s) = server(&[("py-complete", "")], |c| c.plugins.max_instances = 4).await else { return };
    const BODY: &str = r#"{"prompt": "Hello", "max_tokens": 8, "temperature": 0, "ignore_eos": true}"#;
    let (py, rust) = tokio::join!(burst(&s, "/fn/py-complete", 10, BODY), burst(&s, "/fn/complete", 10, BODY));
    for (status, body) in py.iter().chain(&rust) {
        assert_eq!(*status, 200, "{body}");
    }
    // Every request's wait for its slots is measured.
    let metrics = s.get("/metrics").await.text();
    assert!(metrics.contains("flywheel_plugin_slot_wait_seconds_count{plugin=\"py-complete\"} 10"), "{metrics}");
    assert!(s.wait_idle(Duration::from_secs(2)).await);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_python_instances_run_at_once_with_the_default_limits() {
    let Some(s) = server(&[("py-complete", "")], |_| {}).await else { return };
    // All 64 are instantiated at once; those beyond the model's 16 sequences wait for one.
    const BODY: &str = r#"{"prompt": "Hi", "max_tokens": 16, "ignore_eos": true, "stream": true}"#;
    for (status, body) in burst(&s, "/fn/py-complete", 64, BODY).await {
        assert_eq!(status, 200, "{body}");
        assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    }
    assert!(s.wait_idle(Duration::from_secs(5)).await);
    s.shutdown().await;
}

/// A key's token quota stops Python and JavaScript generations too: the SDKs read the
/// refusal through `flywheel:llm/quota`, a stream ends with a `rate_limit_error` event and no
/// `[DONE]`, a plain answer is a 429 with `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_quota_stops_python_and_javascript_generations_with_a_rate_limit_error() {
    let key = |name: &str, tokens: u32| flywheel::config::KeyConfig {
        name: name.into(),
        key: Some(format!("sk-{name}")),
        key_env: None,
        requests_per_minute: None,
        tokens_per_minute: Some(tokens),
        max_concurrent: None,
    };
    let keys = vec![key("py-stream", 40), key("js-stream", 40), key("py-whole", 30), key("js-whole", 30)];
    let Some(s) = server(&[("py-complete", ""), ("js-complete", "")], |c| c.auth.keys = keys).await else { return };
    const LONG: &str = r#"{"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": true"#;
    for lang in ["py", "js"] {
        let path = format!("/fn/{lang}-complete");
        let mut resp = s.open_as(&format!("sk-{lang}-stream"), &path, &format!("{LONG}, \"stream\": true}}")).await;
        assert_eq!(resp.status(), 200);
        let events = read_events(&mut resp, 1000).await;
        let last = events.last().expect("events");
        assert_ne!(last, "[DONE]", "{lang}: a stream stopped by its quota must not look complete");
        let error: serde_json::Value = serde_json::from_str(last).expect("an error event ends the stream");
        assert_eq!(error["error"]["type"], "rate_limit_error", "{lang}: {error}");
        let texts = events.iter().filter(|e| e.contains("\"text\"")).count();
        assert!((5..45).contains(&texts), "{lang}: {texts} pieces before the stop");

        let r = s.post_as(&format!("sk-{lang}-whole"), &path, &format!("{LONG}}}")).await;
        assert_eq!(r.status, 429, "{lang}: {}", r.text());
        assert_eq!(r.json()["error"]["type"], "rate_limit_error", "{lang}");
        let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(after >= 1, "{lang}: {after}");
    }
    assert!(s.wait_idle(Duration::from_secs(5)).await);
    s.shutdown().await;
}
