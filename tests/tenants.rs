//! Metered tenants: per-key usage in `/metrics` and `/admin/usage`, quotas enforced by the
//! host (429 with Retry-After) and by the engine mid-generation, keys never shown.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flywheel::config::KeyConfig;
use support::server::{plugin, read_events, start, TestServer};
use support::*;

const OPENAI: &str = "routes = [\"/v1/\"]\nmax_concurrency = 64\n";

fn key(name: &str, secret: &str, rpm: Option<u32>, tpm: Option<u32>, concurrent: Option<u32>) -> KeyConfig {
    KeyConfig {
        name: name.into(),
        key: Some(secret.into()),
        key_env: None,
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
        max_concurrent: concurrent,
    }
}

/// Everything the servers of this test process log, to check no key appears in it.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn server(keys: Vec<KeyConfig>) -> TestServer {
    captured_logs();
    start(
        vec![tiny_manifest("tiny")],
        &[
            plugin("openai", "openai", Some(OPENAI)),
            plugin("complete", "complete", None),
            plugin("hostile", "hostile", None),
        ],
        move |c| {
            c.auth.admin_key = Some("admin".into());
            c.auth.keys = keys;
        },
    )
    .await
}

fn completion(max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": "tiny", "prompt": "Once upon a time", "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": true, "stream": stream,
    })
    .to_string()
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_metered_per_key_and_plugin_and_keys_are_never_shown() {
    let s = server(vec![
        key("team-a", "sk-secret-alpha", None, None, None),
        key("team-b", "sk-secret-beta", None, None, None),
    ])
    .await;
    let started = unix_now();
    let (mut prompt, mut completion_tokens) = (0, 0);
    for _ in 0..2 {
        let r = s.post_as("sk-secret-alpha", "/v1/completions", &completion(6, false)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let usage = &r.json()["usage"];
        prompt += usage["prompt_tokens"].as_u64().unwrap();
        completion_tokens += usage["completion_tokens"].as_u64().unwrap();
    }
    let r =
        s.post_as("sk-secret-beta", "/fn/complete", r#"{"prompt": "Hello", "max_tokens": 4, "temperature": 0}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        s.post("/v1/completions", &completion(2, false)).await.status,
        401,
        "keys are configured: none is refused"
    );
    assert_eq!(s.post_as("sk-wrong", "/v1/completions", &completion(2, false)).await.status, 401);

    let report = s.admin("GET", "/admin/usage").await;
    assert_eq!(report.status, 200, "{}", report.text());
    let report = report.json();
    let row = |k: &str, p: &str| {
        report["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["key"] == k && r["plugin"] == p)
            .cloned()
            .unwrap_or_default()
    };
    let a = row("team-a", "openai");
    assert_eq!(a["requests"], 2, "{report}");
    assert_eq!(
        a["prompt_tokens"].as_u64(),
        Some(prompt),
        "the engine's count matches the usage the API reported: {report}"
    );
    assert_eq!(a["generated_tokens"].as_u64(), Some(completion_tokens), "{report}");
    assert!(a["guest_cpu_seconds"].as_f64().unwrap() > 0.0, "{report}");
    let b = row("team-b", "complete");
    assert_eq!(b["requests"], 1, "{report}");
    assert_eq!(b["generated_tokens"], 4, "{report}");
    assert_eq!(report["keys"]["team-a"]["requests"], 2);

    // Filters and times.
    let only_b = s.admin("GET", "/admin/usage?key=team-b").await.json();
    assert_eq!(only_b["rows"].as_array().unwrap().len(), 1, "{only_b}");
    let future = s.admin("GET", &format!("/admin/usage?since={}", unix_now() + 3600)).await.json();
    assert!(future["rows"].as_array().unwrap().is_empty(), "{future}");
    let hour_ago = humantime::format_rfc3339_seconds(SystemTime::now() - Duration::from_secs(3600)).to_string();
    let since = s.admin("GET", &format!("/admin/usage?since={hour_ago}")).await.json();
    assert_eq!(since["keys"]["team-a"]["requests"], 2, "{since}");
    assert!(since["since"].as_u64().unwrap() <= started);
    assert_eq!(s.admin("GET", "/admin/usage?since=yesterday-ish").await.status, 400);
    assert_eq!(s.admin("GET", "/admin/usage?nope=1").await.status, 400);

    let metrics = s.get("/metrics").await.text();
    assert!(metrics.contains("flywheel_key_requests_total{key=\"team-a\",plugin=\"openai\"} 2"), "{metrics}");
    assert!(metrics.contains("flywheel_key_generated_tokens_total{key=\"team-b\",plugin=\"complete\"} 4"), "{metrics}");
    assert!(metrics.contains("flywheel_key_guest_cpu_seconds_total{key=\"team-a\""), "{metrics}");
    assert!(metrics.contains("flywheel_guest_cpu_seconds_total{plugin=\"openai\"}"), "{metrics}");
    let logs = String::from_utf8_lossy(&captured_logs().lock().unwrap()).into_owned();
    let responses: Vec<&str> = logs.lines().filter(|l| l.contains("response")).collect();
    assert!(logs.contains("key=team-a"), "requests are logged with their key's name: {responses:?}");
    for shown in [&metrics, &report.to_string(), &logs] {
        assert!(!shown.contains("sk-secret"), "a key leaked: {shown}");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_a_request_or_concurrency_quota_new_requests_get_429_with_retry_after() {
    let s =
        server(vec![key("rpm", "sk-rpm", Some(2), None, None), key("one-at-a-time", "sk-conc", None, None, Some(1))])
            .await;
    for _ in 0..2 {
        assert_eq!(s.post_as("sk-rpm", "/v1/completions", &completion(2, false)).await.status, 200);
    }
    let r = s.post_as("sk-rpm", "/v1/completions", &completion(2, false)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((20..=31).contains(&after), "2 per minute: the next one is due in about 30 s, got {after}");
    let e = r.json();
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert!(e["error"]["message"].as_str().unwrap().contains("requests_per_minute"), "{e}");

    // One request at a time: a second one while the first sleeps is refused, then let in.
    let c = s.clone_client_as("sk-conc");
    let first = tokio::spawn(async move { c.post("/fn/hostile/sleep?ms=800", "{}").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = s.post_as("sk-conc", "/fn/complete", r#"{"prompt": "Hi", "max_tokens": 2}"#).await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    assert!(r.text().contains("max_concurrent"), "{}", r.text());
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(s.post_as("sk-conc", "/fn/complete", r#"{"prompt": "Hi", "max_tokens": 2}"#).await.status, 200);

    let report = s.admin("GET", "/admin/usage").await.json();
    assert_eq!(report["keys"]["rpm"]["rejected_requests"], 1, "{report}");
    assert_eq!(report["keys"]["one-at-a-time"]["rejected_requests"], 1, "{report}");
    let metrics = s.get("/metrics").await.text();
    assert!(metrics.contains("flywheel_key_rejected_requests_total{key=\"rpm\",plugin=\"openai\"} 1"), "{metrics}");
    s.shutdown().await;
}

/// A generation that crosses its key's token quota is stopped by the engine: a stream ends
/// with an OpenAI error event and no `[DONE]`, a plain request gets 429, and the next
/// request is refused until the bucket refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_crossing_its_token_quota_is_stopped_mid_stream() {
    let s =
        server(vec![key("stream", "sk-stream", None, Some(40), None), key("whole", "sk-whole", None, Some(30), None)])
            .await;
    let mut resp = s.open_as("sk-stream", "/v1/completions", &completion(200, true)).await;
    assert_eq!(resp.status(), 200);
    let events = read_events(&mut resp, 1000).await;
    let last = events.last().expect("events");
    assert_ne!(last, "[DONE]", "a stream stopped by its quota must not look complete");
    let error: serde_json::Value = serde_json::from_str(last).expect("an error event ends the stream");
    assert_eq!(error["error"]["type"], "rate_limit_error", "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("tokens_per_minute"), "{error}");
    let tokens = events.iter().filter(|e| e.contains("\"text\"")).count();
    assert!((10..45).contains(&tokens), "about 40 tokens (less the prompt) before the stop, got {tokens}");

    let r = s.post_as("sk-stream", "/v1/completions", &completion(4, false)).await;
    assert_eq!(r.status, 429, "the bucket is empty: {}", r.text());
    assert!(r.headers.contains_key("retry-after"));

    let r = s.post_as("sk-whole", "/v1/completions", &completion(200, false)).await;
    assert_eq!(r.status, 429, "{}", r.text());
    let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(after >= 1, "{after}");
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");

    assert!(s.wait_idle(Duration::from_secs(5)).await, "stopped generations free their sequences");
    let report = s.admin("GET", "/admin/usage").await.json();
    assert_eq!(report["keys"]["stream"]["quota_stops"], 1, "{report}");
    let generated = report["keys"]["stream"]["generated_tokens"].as_u64().unwrap();
    assert!(generated < 60, "{report}");
    s.shutdown().await;
}
