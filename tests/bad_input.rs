//! Bad input over HTTP: every case gets a clear JSON error and the next request is served.
//! And a fuzzer across the wasi-nn host boundary.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use support::server::{plugin, start, TestServer};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn server() -> TestServer {
    start(
        vec![tiny_manifest("tiny")],
        &[
            plugin("openai", "openai", Some("routes = [\"/v1/\"]\n")),
            plugin("hostile", "hostile", Some("deadline_ms = 60000\nmax_contexts = 4\n")),
        ],
        |c| {
            c.server.max_body_bytes = 1 << 20;
            c.server.body_timeout_ms = 600;
        },
    )
    .await
}

const GOOD: &str = r#"{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}"#;

/// The error is JSON with a message mentioning `needle`, and a good request works after it.
async fn expect_error(s: &TestServer, status: u16, body: Bytes, path: &str, needle: &str) {
    let req = http::Request::post(format!("{}{path}", s.url))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap();
    let r = s.send(req).await;
    assert_eq!(r.status, status, "{path} {needle}: {}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap_or_else(|| panic!("no message in {}", r.text())).to_string();
    assert!(msg.contains(needle), "expected {needle:?} in {msg:?}");
    let ok = s.post("/v1/chat/completions", GOOD).await;
    assert_eq!(ok.status, 200, "the server stopped serving after {needle}: {}", ok.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_a_clear_json_error() {
    let s = server().await;
    let chat = "/v1/chat/completions";
    let b = |s: &str| Bytes::from(s.to_string());
    let hi = r#"[{"role": "user", "content": "hi"}]"#;
    // (body, what the error message names)
    let cases = [
        ("{\"model\": \"tiny\", \"messages\": [".to_string(), "invalid JSON"),
        (String::new(), "empty"),
        // A value of the wrong type names its field.
        (r#"{"model": "tiny", "messages": "hi"}"#.to_string(), "invalid value for messages"),
        (format!(r#"{{"model": "tiny", "messages": {hi}, "max_tokens": "ten"}}"#), "invalid value for max_tokens"),
        (r#"{"model": "tiny", "messages": [{"role": 7}]}"#.to_string(), "invalid value for messages[0].role"),
        (r#"["not", "an", "object"]"#.to_string(), "invalid JSON"),
        (format!(r#"{{"model": "tiny", "messages": {hi}, "max_tokens": -5}}"#), "max_tokens"),
        (format!(r#"{{"model": "tiny", "messages": {hi}, "max_tokens": 1000000000000}}"#), "max_tokens"),
        (r#"{"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}"#.to_string(), "role"),
        (r#"{"model": "tiny", "messages": []}"#.to_string(), "messages"),
    ];
    for (body, needle) in cases {
        expect_error(&s, 400, Bytes::from(body), chat, needle).await;
    }
    let long = "once upon a time ".repeat(100);
    expect_error(
        &s,
        400,
        b(&format!(r#"{{"model": "tiny", "messages": [{{"role": "user", "content": "{long}"}}]}}"#)),
        chat,
        "tokens",
    )
    .await;
    expect_error(
        &s,
        400,
        Bytes::from_static(b"{\"model\": \"tiny\", \"prompt\": \"\xff\xfe\"}"),
        "/v1/completions",
        "UTF-8",
    )
    .await;
    // 10 MB: the server reads a bounded amount past the limit, answers 413 and stops reading;
    // a raw connection that keeps reading after its writes fail (as curl does) sees it.
    let response = raw_post(&s, chat, &vec![b' '; 10 << 20]).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("larger than the limit"), "{response}");
    assert_eq!(s.post(chat, GOOD).await.status, 200);
    expect_error(&s, 404, b(GOOD), "/fn/nope", "no plugin named").await;
    expect_error(&s, 404, b(r#"{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}"#), chat, "nope")
        .await;
    expect_error(&s, 404, b("{}"), "/nowhere", "nothing is served").await;
    expect_error(&s, 405, b(""), "/v1/models", "not allowed").await;
    s.shutdown().await;
}

/// POST over a plain TCP connection; returns whatever the server answered.
async fn raw_post(s: &TestServer, path: &str, body: &[u8]) -> String {
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let _ = conn.write_all(body).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut response)).await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_times_out_with_408() {
    let s = server().await;
    let addr = s.url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", GOOD.len());
    conn.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    // A byte every 200 ms: the whole body would take far longer than the 600 ms allowed.
    let mut sent = 0;
    let mut response = Vec::new();
    while sent < GOOD.len() {
        conn.write_all(&GOOD.as_bytes()[sent..sent + 1]).await.unwrap_or(());
        sent += 1;
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(200), conn.read(&mut buf)).await {
            response.extend_from_slice(&buf[..n]);
            if n == 0 || response.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("did not arrive within 600 ms"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(s.post("/v1/chat/completions", GOOD).await.status, 200);
    s.shutdown().await;
}

/// Random tensor names, types, shapes and values, random context opens and drops, random
/// tokenizer calls, all from inside a guest so they cross the real canonical ABI. Runs for
/// `FLYWHEEL_FUZZ_SECS` (default 15) seconds. Every guest run must finish normally (a host
/// panic or trap would end it with an error status), and afterwards no sequence is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_the_wasi_nn_host_boundary() {
    let secs: u64 = std::env::var("FLYWHEEL_FUZZ_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    let s = server().await;
    let until = Instant::now() + Duration::from_secs(secs);
    let mut totals: std::collections::BTreeMap<String, u64> = Default::default();
    let mut seed = 0u64;
    while Instant::now() < until {
        seed += 1;
        let r = s.post(&format!("/fn/hostile/fuzz?seed={seed}&iters=400"), "").await;
        assert_eq!(r.status, 200, "seed {seed}: {}", r.text());
        for (k, v) in r.json()["outcomes"].as_object().unwrap() {
            *totals.entry(k.clone()).or_default() += v.as_u64().unwrap();
        }
        assert!(s.wait_idle(Duration::from_secs(2)).await, "seed {seed} leaked a sequence");
    }
    let calls: u64 = totals.values().sum();
    println!("fuzz: {seed} runs, {calls} calls in {secs} s: {totals:?}");
    for key in [
        "compute:ok",
        "compute:ErrorCode::InvalidArgument",
        "compute:ErrorCode::TooLarge",
        "open:ok",
        "load:ErrorCode::NotFound",
        "llm:ok",
    ] {
        assert!(totals.contains_key(key), "the fuzzer never reached {key}: {totals:?}");
    }
    assert_eq!(s.post("/v1/chat/completions", GOOD).await.status, 200);
    s.shutdown().await;
}
