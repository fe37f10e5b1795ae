//! Plugins end to end: real components over real HTTP against the tiny model, including
//! guests that misbehave on purpose.

mod support;

use std::time::{Duration, Instant};

use support::server::{plugin, read_events, start, TestServer};
use support::*;

fn models() -> Vec<flywheel::engine::ModelManifest> {
    vec![tiny_manifest("tiny"), tiny_manifest("other")]
}

const HOSTILE: &str = r#"
models = ["tiny"]
deadline_ms = 1500
memory_limit_mb = 32
max_contexts = 4
"#;

async fn examples_server() -> TestServer {
    start(
        models(),
        &[
            plugin("complete", "complete", None),
            plugin("json", "json", None),
            plugin("hostile", "hostile", Some(HOSTILE)),
        ],
        |_| {},
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_answers_json_and_streams_sse() {
    let s = examples_server().await;
    let body = r#"{"model": "tiny", "prompt": "once upon a time", "max_tokens": 12, "temperature": 0}"#;
    let a = s.post("/fn/complete", body).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let a = a.json();
    assert_eq!(a["usage"]["completion_tokens"], 12);
    assert_eq!(a["finish_reason"], "length");
    assert!(a["usage"]["prompt_tokens"].as_u64().unwrap() > 1);
    // Greedy is deterministic.
    let b = s.post("/fn/complete", body).await.json();
    assert_eq!(a["text"], b["text"]);

    // The same request streamed yields the same text, event by event.
    let mut resp = s.open("/fn/complete", &body.replace("}", r#", "stream": true}"#)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = read_events(&mut resp, 100).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let streamed: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<serde_json::Value>(e).ok())
        .filter_map(|v| v["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, a["text"].as_str().unwrap());
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 12);

    // Seeded sampling is reproducible; different seeds differ.
    let seeded = |seed: u32| {
        format!(r#"{{"model": "tiny", "prompt": "hello", "max_tokens": 16, "temperature": 1.5, "seed": {seed}}}"#)
    };
    let x = s.post("/fn/complete", &seeded(1)).await.json();
    let y = s.post("/fn/complete", &seeded(1)).await.json();
    let z = s.post("/fn/complete", &seeded(2)).await.json();
    assert_eq!(x["text"], y["text"]);
    assert_ne!(x["text"], z["text"]);

    // Stop sequences end the text before them.
    let full = a["text"].as_str().unwrap().to_string();
    let stop: String = full.chars().skip(3).take(2).collect();
    let body = format!(
        r#"{{"model": "tiny", "prompt": "once upon a time", "max_tokens": 12, "temperature": 0, "stop": [{}]}}"#,
        serde_json::json!(stop)
    );
    let c = s.post("/fn/complete", &body).await.json();
    assert_eq!(c["finish_reason"], "stop");
    assert!(full.starts_with(c["text"].as_str().unwrap()));
    assert!(!c["text"].as_str().unwrap().contains(&stop));
    assert!(s.wait_idle(Duration::from_secs(2)).await);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complete_rejects_bad_requests_clearly() {
    let s = examples_server().await;
    for (body, needle) in [
        ("{not json", "invalid JSON"),
        (r#"{"prompt": 5}"#, "invalid value for prompt"),
        (r#"{"prompt": "x", "max_tokens": 0}"#, "max_tokens"),
        (r#"{"prompt": "x", "max_tokens": 100000000}"#, "max_tokens"),
        (r#"{"prompt": "x", "temperature": 9}"#, "temperature"),
        (r#"{"prompt": "x", "logit_bias": {"999999": 5}}"#, "logit_bias"),
        (r#"{"prompt": "x", "model": "nope"}"#, "nope"),
    ] {
        let r = s.post("/fn/complete", body).await;
        assert!(r.status == 400 || r.status == 404, "{body}: {} {}", r.status, r.text());
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_plugin_always_yields_valid_json() {
    let s = examples_server().await;
    for (seed, max_tokens) in [(1, 60), (2, 8), (3, 30), (4, 3)] {
        let body = format!(
            r#"{{"model": "tiny", "prompt": "a json object about a cat", "max_tokens": {max_tokens}, "temperature": 1.0, "seed": {seed}}}"#
        );
        let r = s.post("/fn/json", &body).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert!(v["json"].is_object(), "{v}");
        let reparsed: serde_json::Value = serde_json::from_str(v["text"].as_str().unwrap()).unwrap();
        assert_eq!(reparsed, v["json"]);
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_hits_its_deadline_frees_kv_and_others_are_served() {
    let s = examples_server().await;
    let started = Instant::now();
    let looping = s.post("/fn/hostile/loop-holding-context", "");
    let others = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The engine holds the looping guest's sequence meanwhile.
        assert_eq!(s.active_sequences(), 1);
        let ok = s.post("/fn/hostile/ok", "").await;
        assert_eq!(ok.status, 200);
        let c = s.post("/fn/complete", r#"{"model": "tiny", "prompt": "hi", "max_tokens": 4}"#).await;
        assert_eq!(c.status, 200, "{}", c.text());
        Instant::now()
    };
    let (r, others_done) = tokio::join!(looping, others);
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("deadline"));
    assert!(others_done < started + Duration::from_millis(1400), "other requests waited for the loop");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(s.wait_idle(Duration::from_millis(500)).await, "KV not freed after the deadline");
    assert!(s.metrics.encode().contains(r#"flywheel_guest_traps_total{plugin="hostile",kind="deadline"} 1"#));
    // A pure CPU loop is interrupted the same way.
    let r = s.post("/fn/hostile/loop", "").await;
    assert_eq!(r.status, 504);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_traps_at_its_limit() {
    let s = examples_server().await;
    let r = s.post("/fn/hostile/bomb", "").await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("memory limit"));
    assert!(s.metrics.encode().contains(r#"kind="memory_limit""#));
    assert_eq!(s.post("/fn/hostile/ok", "").await.status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_held_in_host_memory_count_against_the_limit() {
    let s = examples_server().await;
    let r = s.post("/fn/hostile/tensor-hoard", "").await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("memory limit"), "{}", r.text());
    assert!(s.metrics.encode().contains(r#"flywheel_guest_traps_total{plugin="hostile",kind="memory_limit"} 1"#));
    assert_eq!(s.post("/fn/hostile/ok", "").await.status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_hoarding_host_handles_traps_at_the_table_limit() {
    let s = examples_server().await;
    let r = s.post("/fn/hostile/handle-hoard", "").await;
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(s.metrics.encode().contains(r#"flywheel_guest_traps_total{plugin="hostile",kind="other"} 1"#));
    assert_eq!(s.post("/fn/hostile/ok", "").await.status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_sockets_and_outgoing_http_are_denied() {
    let s = examples_server().await;
    // A real listener, so only the sandbox can stop the connection.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    let f = s.post("/fn/hostile/read-file", "").await.json();
    assert_eq!(f["file"], false, "{f}");
    assert_eq!(f["dir"], false, "{f}");
    let n = s.post(&format!("/fn/hostile/socket?port={port}"), "").await.json();
    assert_eq!(n["connected"], false, "{n}");
    let h = s.post(&format!("/fn/hostile/http-out?authority=127.0.0.1:{port}"), "").await.json();
    assert_eq!(h["sent"], false, "{h}");
    assert!(h["result"].as_str().unwrap().contains("HttpRequestDenied"), "{h}");
    s.shutdown().await;

    // With the host on the manifest's allowlist, the same call goes out.
    let allowing = format!("allowed_hosts = [\"127.0.0.1:{port}\"]\n");
    let s = start(models(), &[plugin("hostile", "hostile", Some(&allowing))], |_| {}).await;
    let accept = std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 1024];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
        }
    });
    let h = s.post(&format!("/fn/hostile/http-out?authority=127.0.0.1:{port}"), "").await.json();
    assert_eq!(h["sent"], true, "{h}");
    assert_eq!(h["result"], "204");
    accept.join().unwrap();
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_mid_generation_ends_the_stream_and_frees_the_sequence() {
    let s = examples_server().await;
    let mut resp = s.open("/fn/hostile/trap-mid", "").await;
    assert_eq!(resp.status(), 200);
    let events = read_events(&mut resp, 4).await;
    // Three parts, then the host's error event; the body ends in an error, not cleanly.
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(!events.contains(&"[DONE]".to_string()));
    let error: serde_json::Value = serde_json::from_str(&events[3]).expect("error event JSON");
    assert_eq!(error["error"]["type"], "plugin_error", "{error}");
    let end = http_body_util::BodyExt::frame(resp.body_mut()).await;
    assert!(end.is_some_and(|f| f.is_err()), "the cut stream ended cleanly");
    assert!(s.wait_idle(Duration::from_secs(2)).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let metrics = s.metrics.encode();
    assert!(metrics.contains(r#"flywheel_guest_traps_total{plugin="hostile",kind="panic"} 1"#));
    assert!(metrics.contains(r#"flywheel_http_responses_cut_total{plugin="hostile",reason="panic"} 1"#), "{metrics}");
    assert_eq!(s.post("/fn/complete", r#"{"model": "tiny", "prompt": "hi", "max_tokens": 4}"#).await.status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execution_contexts_per_instance_are_bounded() {
    let s = examples_server().await;
    let r = s.post("/fn/hostile/contexts", "").await.json();
    assert_eq!(r["opened"], 4, "{r}");
    assert!(r["error"].as_str().unwrap().contains("at most 4 execution contexts"), "{r}");
    assert!(s.wait_idle(Duration::from_secs(1)).await);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_nn_misuse_returns_errors_with_the_right_codes() {
    let s = examples_server().await;
    let r = s.post("/fn/hostile/nn-misuse?other=other", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    let expect = [
        ("unknown_model", "NotFound"),
        ("disallowed_model", "Security"),
        ("load_bytes", "UnsupportedOperation"),
        ("wrong_type", "InvalidArgument"),
        ("wrong_shape", "InvalidArgument"),
        ("short_data", "InvalidArgument"),
        ("token_out_of_range", "InvalidArgument"),
        ("unknown_input", "InvalidArgument"),
        ("missing_input_ids", "InvalidArgument"),
        ("top_k_zero", "InvalidArgument"),
        ("context_full", "TooLarge"),
        ("valid_after_errors", "ok"),
    ];
    for (case, code) in expect {
        let got = r[case].as_str().unwrap_or_else(|| panic!("{case} missing in {r}"));
        assert!(got.trim_start_matches("ErrorCode::").starts_with(code), "{case}: expected {code}, got {got}");
    }
    assert!(s.wait_idle(Duration::from_secs(1)).await);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_plugin_files_are_skipped_and_listed() {
    let s = start(models(), &[plugin("complete", "complete", None)], |c| c.auth.admin_key = Some("admin".into())).await;
    std::fs::write(s.plugin_dir.join("garbage.wasm"), b"\0asm\x0d\0\x01\0 this is not a component").unwrap();
    std::fs::write(s.plugin_dir.join("module.wasm"), b"\0asm\x01\0\0\0").unwrap();
    std::fs::copy(guest_path("hostile"), s.plugin_dir.join("badmanifest.wasm")).unwrap();
    std::fs::write(s.plugin_dir.join("badmanifest.toml"), "deadline_ms = \"soon\"\n").unwrap();
    let listing = wait_for(&s, |v| v["failed"].as_array().is_some_and(|f| f.len() == 3)).await;
    let failed = listing["failed"].as_array().unwrap();
    let reason = |name: &str| failed.iter().find(|f| f["name"] == name).unwrap()["error"].as_str().unwrap().to_string();
    assert!(reason("garbage").contains("invalid or incompatible component"), "{}", reason("garbage"));
    assert!(reason("module").contains("not a WebAssembly component"), "{}", reason("module"));
    assert!(reason("badmanifest").contains("deadline_ms"), "{}", reason("badmanifest"));
    assert_eq!(listing["plugins"][0]["name"], "complete");
    let r = s.post("/fn/complete", r#"{"model": "tiny", "prompt": "hi", "max_tokens": 2}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(s.post("/fn/garbage", "{}").await.status, 404);
    s.shutdown().await;
}

fn guest_path(name: &str) -> std::path::PathBuf {
    support::server::guest_wasm(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_the_host_cannot_link_or_hold_are_refused_at_load_with_the_reason() {
    let s = start(models(), &[plugin("complete", "complete", None)], |c| c.auth.admin_key = Some("admin".into())).await;
    let unlinkable = r#"(component (import "example:missing/thing@1.0.0" (instance (export "f" (func)))))"#;
    std::fs::write(s.plugin_dir.join("unlinkable.wasm"), wat::parse_str(unlinkable).unwrap()).unwrap();
    // 33 instances of an empty module: more than one plugin may take from the pool.
    let instances: String = (0..33).map(|i| format!("(core instance $i{i} (instantiate $m))")).collect();
    let greedy = format!("(component (core module $m) {instances})");
    std::fs::write(s.plugin_dir.join("greedy.wasm"), wat::parse_str(&greedy).unwrap()).unwrap();
    let listing = wait_for(&s, |v| v["failed"].as_array().is_some_and(|f| f.len() == 2)).await;
    let failed = listing["failed"].as_array().unwrap();
    let reason = |name: &str| failed.iter().find(|f| f["name"] == name).unwrap()["error"].as_str().unwrap().to_string();
    let why = reason("unlinkable");
    assert!(why.contains("cannot link") && why.contains("example:missing/thing"), "{why}");
    let why = reason("greedy");
    assert!(why.contains("33 core") && why.contains("32"), "{why}");
    // The plugin that loads reports what an instance of it takes from the pool.
    let needs = &listing["plugins"][0]["pool_needs"];
    assert!(needs["core_instances"].as_u64().is_some_and(|n| (1..=8).contains(&n)), "{needs}");
    assert_eq!(s.post("/fn/complete", r#"{"model": "tiny", "prompt": "hi", "max_tokens": 2}"#).await.status, 200);
    s.shutdown().await;
}

async fn wait_for(s: &TestServer, ready: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let req = http::Request::get(format!("{}/admin/plugins", s.url))
            .header("authorization", "Bearer admin")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let v = s.send(req).await.json();
        if ready(&v) || Instant::now() > until {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_swaps_plugins_while_requests_finish_on_the_old_version() {
    let v1 = "[config]\nVERSION = \"1\"\n";
    let s = start(models(), &[plugin("swap", "hostile", Some(v1))], |c| c.auth.admin_key = Some("admin".into())).await;
    // Requests in flight on version 1 ...
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let c = s.client();
            tokio::spawn(async move { c.post("/fn/swap/sleep?ms=800", "").await })
        })
        .collect();
    let reload = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        std::fs::write(s.plugin_dir.join("swap.toml"), "[config]\nVERSION = \"2\"\n").unwrap();
        wait_for(&s, |v| v["plugins"][0]["sha256"].is_string() && s.plugins_version_is("2")).await;
    };
    reload.await;
    for r in in_flight {
        let r = r.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["version"], "1", "an in-flight request saw the new version");
    }
    // ... and new requests get version 2.
    assert_eq!(s.post("/fn/swap/ok", "").await.json()["version"], "2");
    // Replacing the component itself works the same way.
    std::fs::copy(guest_path("complete"), s.plugin_dir.join("swap.wasm")).unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let r = s.post("/fn/swap", r#"{"model": "tiny", "prompt": "hi", "max_tokens": 2}"#).await;
        if r.status == 200 && r.json()["usage"].is_object() {
            break;
        }
        assert!(Instant::now() < until, "the new component never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.shutdown().await;
}

trait VersionProbe {
    fn plugins_version_is(&self, v: &str) -> bool;
}

impl VersionProbe for TestServer {
    fn plugins_version_is(&self, v: &str) -> bool {
        let set = self.server.as_ref().unwrap().state.runtime.plugins();
        set.plugins.get("swap").is_some_and(|p| p.manifest.config.get("VERSION").map(String::as_str) == Some(v))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_plugins_are_cached_on_disk() {
    let s = start(models(), &[plugin("complete", "complete", None)], |_| {}).await;
    let first = s.server.as_ref().unwrap().state.runtime.plugins();
    assert!(!first.plugins["complete"].from_cache);
    let cache = s.plugin_dir.parent().unwrap().join("cache");
    let plugin_dir = s.plugin_dir.clone();
    s.shutdown().await;
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
    let s = start(models(), &[], |c| {
        c.plugins.dir = plugin_dir.clone();
        c.plugins.cache_dir = cache.clone();
    })
    .await;
    let second = s.server.as_ref().unwrap().state.runtime.plugins();
    assert!(second.plugins["complete"].from_cache);
    let r = s.post("/fn/complete", r#"{"model": "tiny", "prompt": "hi", "max_tokens": 2}"#).await;
    assert_eq!(r.status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_thirty_line_streaming_plugin_streams() {
    let s = start(models(), &[plugin("stream", "stream", None)], |_| {}).await;
    let mut resp = s.open("/fn/stream", r#"{"prompt": "once upon a time"}"#).await;
    assert_eq!(resp.status(), 200);
    let events = read_events(&mut resp, 1000).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events.len() > 2, "{events:?}");
    let bad = s.post("/fn/stream", r#"{"text": "no prompt"}"#).await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"]["message"].as_str().unwrap().contains("prompt"));
    s.shutdown().await;
}
