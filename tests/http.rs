//! The HTTP server: OpenAI API (with the official Python client), streaming and
//! disconnects, operations endpoints, protection, graceful shutdown.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flywheel::metrics::CutLabels;
use http_body_util::{BodyExt, Full};
use support::server::{plugin, read_events, start, TestServer};
use support::*;

/// As `examples/openai/openai.toml` sets it up: up to 4 choices (`n`) per request.
const OPENAI: &str = "routes = [\"/v1/\"]\nmax_contexts = 4\n[config]\nOPENAI_MAX_N = \"4\"\n";

async fn openai_server(configure: impl FnOnce(&mut flywheel::config::Config)) -> TestServer {
    start(
        vec![tiny_manifest("tiny")],
        &[
            plugin("openai", "openai", Some(OPENAI)),
            plugin("complete", "complete", None),
            plugin("hostile", "hostile", Some("deadline_ms = 20000\n")),
        ],
        configure,
    )
    .await
}

fn python_client(url: &str, key: Option<&str>) -> serde_json::Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/openai_client.py");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(script).arg(format!("{url}/v1")).arg("tiny");
    if let Some(k) = key {
        cmd.arg(k);
    }
    let out = cmd.output().expect("run python3");
    assert!(
        out.status.success(),
        "openai client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client prints JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_field_of_the_openai_clients_requests_is_honoured_or_refused() {
    // Tool descriptions take a few hundred of the tiny model's byte-sized tokens.
    let mut tiny = tiny_manifest("tiny");
    tiny.context_length = 1024;
    let s = start(vec![tiny], &[plugin("openai", "openai", Some(OPENAI))], |_| {}).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/openai_surface.py");
    let url = format!("{}/v1", s.url);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3").arg(script).arg(url).arg("tiny").output().expect("run python3")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "the walk over the client's fields failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the walk prints JSON");
    // Both endpoints were walked, field by field.
    assert!(report["checked"]["chat"].as_object().unwrap().len() > 40, "{report}");
    assert!(report["checked"]["completions"].as_object().unwrap().len() > 20, "{report}");
    assert_eq!(report["checked"]["embeddings"].as_object().unwrap().len(), 6, "{report}");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_python_client_works_unmodified() {
    let s = openai_server(|_| {}).await;
    let url = s.url.clone();
    let r = tokio::task::spawn_blocking(move || python_client(&url, None)).await.unwrap();
    assert_eq!(r["models"], serde_json::json!(["tiny"]));

    let chat = &r["chat"];
    assert_eq!(chat["role"], "assistant");
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(
        chat["usage"]["completion_tokens"].as_u64().unwrap() + chat["usage"]["prompt_tokens"].as_u64().unwrap(),
        chat["usage"]["total_tokens"].as_u64().unwrap()
    );
    assert!(["stop", "length"].contains(&chat["finish_reason"].as_str().unwrap()));
    // Streaming gives the same greedy text, in several chunks, with usage at the end.
    let stream = &r["chat_stream"];
    assert_eq!(stream["content"], chat["content"]);
    assert_eq!(stream["finish_reason"], chat["finish_reason"]);
    assert_eq!(stream["usage"], chat["usage"]);
    assert!(stream["chunks"].as_u64().unwrap() >= 3);

    let completion = &r["completion"];
    assert_eq!(completion["usage"]["completion_tokens"], 6);
    assert_eq!(completion["finish_reason"], "length");
    assert_eq!(r["completion_stream"]["text"], completion["text"]);
    let stopped = &r["completion_stop"];
    assert_eq!(stopped["finish_reason"], "stop");
    assert!(completion["text"].as_str().unwrap().starts_with(stopped["text"].as_str().unwrap()));

    assert!(r["json_mode"]["parsed"].is_object(), "{}", r["json_mode"]);
    assert_eq!(r["unknown_model"]["status"], 404);
    assert!(r["unknown_model"]["message"].as_str().unwrap().contains("no-such-model"));
    assert_eq!(r["bad_temperature"]["status"], 400);
    assert!(r["bad_temperature"]["message"].as_str().unwrap().contains("temperature"));
    assert!(s.wait_idle(Duration::from_secs(2)).await);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_endpoints_speak_openais_format() {
    let s = openai_server(|_| {}).await;
    let models = s.get("/v1/models").await.json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny");
    assert_eq!(s.get("/v1/models/tiny").await.json()["id"], "tiny");
    assert_eq!(s.get("/v1/models/nope").await.status, 404);
    // Also reachable under /fn/openai.
    assert_eq!(s.get("/fn/openai/v1/models").await.json()["data"][0]["id"], "tiny");

    let mut resp = s
        .open(
            "/v1/chat/completions",
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": true}"#,
        )
        .await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let events = read_events(&mut resp, 100).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first: serde_json::Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");

    // Token-id prompts, logit_bias bans, max_tokens validation, errors in OpenAI's shape.
    let model = s.model("tiny");
    let ids = model.tokenize("once upon a time", true, false).unwrap();
    let mut seq = model.open().await.unwrap();
    let first_id = top1(&seq.feed(&ids, greedy_want()).await.unwrap());
    drop(seq);
    let greedy = s
        .post(
            "/v1/completions",
            &format!(r#"{{"model": "tiny", "prompt": {ids:?}, "max_tokens": 1, "temperature": 0}}"#),
        )
        .await
        .json();
    let piece = String::from_utf8_lossy(&model.token_bytes(&[first_id], false).unwrap()[0]).into_owned();
    assert_eq!(greedy["choices"][0]["text"], piece);
    let banned = s
        .post("/v1/completions", &format!(r#"{{"model": "tiny", "prompt": {ids:?}, "max_tokens": 1, "temperature": 0, "logit_bias": {{"{first_id}": -100}}}}"#))
        .await
        .json();
    assert_ne!(banned["choices"][0]["text"], greedy["choices"][0]["text"]);
    for (body, status, param) in [
        (r#"{"model": "tiny", "prompt": "x", "max_tokens": -1}"#, 400, "max_tokens"),
        (r#"{"model": "tiny", "prompt": "x", "max_tokens": 99999999}"#, 400, "max_tokens"),
        (r#"{"model": "tiny", "prompt": "x", "n": 5}"#, 400, "n"),
        (r#"{"model": "ghost", "prompt": "x"}"#, 404, "model"),
    ] {
        let r = s.post("/v1/completions", body).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let e = r.json();
        assert_eq!(e["error"]["param"], param, "{e}");
        assert!(e["error"]["message"].is_string() && e["error"]["type"].is_string());
    }
    let long_prompt = "once upon a time ".repeat(200);
    let r = s.post("/v1/completions", &format!(r#"{{"model": "tiny", "prompt": "{long_prompt}"}}"#)).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("tokens"));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_its_sequence_within_a_step() {
    let s = openai_server(|_| {}).await;
    let model = s.model("tiny");
    let body =
        r#"{"model": "tiny", "prompt": "once upon a time", "max_tokens": 200, "ignore_eos": true, "stream": true}"#;
    let mut resp = s.open("/v1/completions", body).await;
    let events = read_events(&mut resp, 5).await;
    assert_eq!(events.len(), 5);
    assert_eq!(s.active_sequences(), 1);
    drop(resp);
    let dropped = Instant::now();
    // How soon the host learns of a closed socket depends on the network stack; from then
    // on, the sequence must not grow by more than the step already running.
    let gone = CutLabels { plugin: "openai".into(), reason: "client_gone".into() };
    while s.metrics.cut_responses.get_or_create(&gone).get() == 0 {
        assert!(dropped.elapsed() < Duration::from_millis(500), "the host never noticed the client left");
        tokio::task::yield_now().await;
    }
    let decoded_at_notice = model.stats().decode_tokens.load(Ordering::Relaxed);
    assert!(s.wait_idle(Duration::from_secs(2)).await, "the sequence outlived its client");
    let after = model.stats().decode_tokens.load(Ordering::Relaxed) - decoded_at_notice;
    // The step running when the host noticed, and at most one feed that had just passed the check.
    assert!(after <= 2, "{after} tokens were decoded after the host saw the client leave");
    assert!(dropped.elapsed() < Duration::from_millis(500));
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_response_starts_stops_its_guest() {
    let s = openai_server(|_| {}).await;
    let c = s.client();
    // Holds a sequence and never answers (its deadline here is 20 s).
    let slow = tokio::spawn(async move { c.post("/fn/hostile/loop-holding-context", "").await });
    let until = Instant::now() + Duration::from_secs(5);
    while s.active_sequences() == 0 {
        assert!(Instant::now() < until, "the request never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    slow.abort();
    assert!(s.wait_idle(Duration::from_millis(500)).await, "the guest kept its sequence after the client left");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_leave_the_queue_free_their_place() {
    let s = start(vec![tiny_manifest("tiny")], &[plugin("hostile", "hostile", None)], |c| {
        c.server.max_in_flight = 1;
        c.server.max_queue = 1;
        c.server.queue_timeout_ms = 5_000;
    })
    .await;
    let c = s.client();
    let busy = tokio::spawn(async move { c.post("/fn/hostile/sleep?ms=700", "").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Queue, then leave.
    let c = s.client();
    let leaving = tokio::spawn(async move { c.post("/fn/hostile/ok", "").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    leaving.abort();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The place it held is free again: this request queues instead of getting 503.
    let queued = s.post("/fn/hostile/ok", "").await;
    assert_eq!(queued.status, 200, "{}", queued.text());
    assert_eq!(busy.await.unwrap().status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_and_request_ids() {
    let s = openai_server(|_| {}).await;
    let h = s.get("/healthz").await;
    assert_eq!((h.status, h.json()["status"].clone()), (200, "ok".into()));
    let r = s.get("/readyz").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["models"][0], "tiny");
    let c = s.post("/fn/complete", r#"{"model": "tiny", "prompt": "hi", "max_tokens": 3}"#).await;
    assert_eq!(c.status, 200);
    assert!(c.headers.contains_key("x-request-id"));
    let given = http::Request::get(format!("{}/healthz", s.url))
        .header("x-request-id", "trace-42")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(s.send(given).await.headers["x-request-id"], "trace-42");
    let m = s.get("/metrics").await.text();
    for series in [
        r#"flywheel_http_requests_total{plugin="complete",status="200"} 1"#,
        "flywheel_http_request_duration_seconds_bucket",
        "flywheel_time_to_first_token_seconds_bucket",
        r#"flywheel_generated_tokens_total{model="tiny"}"#,
        "flywheel_batch_tokens_bucket",
        "flywheel_batch_sequences_bucket",
        "flywheel_batch_duration_seconds_bucket",
        r#"flywheel_prefill_tokens_total{model="tiny"}"#,
        r#"flywheel_prefix_reused_tokens_total{model="tiny"}"#,
        r#"flywheel_preemptions_total{model="tiny"} 0"#,
        r#"flywheel_sequence_queue_depth{model="tiny"}"#,
        r#"flywheel_active_sequences{model="tiny"}"#,
        r#"flywheel_kv_tokens{model="tiny"}"#,
        "flywheel_plugin_instantiation_seconds_bucket",
        "flywheel_queued_requests 0",
        "flywheel_in_flight_requests 0",
    ] {
        assert!(m.contains(series), "missing {series} in\n{m}");
    }
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_without_plugins() {
    let s = start(vec![tiny_manifest("tiny")], &[], |_| {}).await;
    let r = s.get("/readyz").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["reason"], "no plugin loaded");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_global_and_per_plugin() {
    let s = start(
        vec![tiny_manifest("tiny")],
        &[plugin("complete", "complete", None), plugin("hostile", "hostile", Some("api_keys = [\"only-hostile\"]\n"))],
        |c| c.auth.api_keys = vec!["global-key".into()],
    )
    .await;
    let call = |path: &str, key: Option<&str>| {
        let mut b = http::Request::post(format!("{}{path}", s.url));
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        b.body(Full::new(Bytes::from_static(br#"{"model": "tiny", "prompt": "hi", "max_tokens": 1}"#))).unwrap()
    };
    let missing = s.send(call("/fn/complete", None)).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.headers["www-authenticate"], "Bearer");
    assert_eq!(missing.json()["error"]["type"], "authentication_error");
    assert_eq!(s.send(call("/fn/complete", Some("wrong"))).await.status, 401);
    assert_eq!(s.send(call("/fn/complete", Some("global-key"))).await.status, 200);
    assert_eq!(s.send(call("/fn/complete", Some("only-hostile"))).await.status, 401);
    assert_eq!(s.send(call("/fn/hostile/ok", Some("only-hostile"))).await.status, 200);
    assert_eq!(s.send(call("/fn/hostile/ok", Some("global-key"))).await.status, 200);
    // Operations endpoints stay open for probes.
    assert_eq!(s.get("/healthz").await.status, 200);
    s.shutdown().await;

    // The official client with keys.
    let s = openai_server(|c| c.auth.api_keys = vec!["sk-test".into()]).await;
    let url = s.url.clone();
    let r = tokio::task::spawn_blocking(move || python_client(&url, Some("sk-test"))).await.unwrap();
    assert_eq!(r["models"][0], "tiny");
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413() {
    let s = openai_server(|c| c.server.max_body_bytes = 64 * 1024).await;
    let big = vec![b'a'; 200 * 1024];
    let declared =
        http::Request::post(format!("{}/fn/complete", s.url)).body(Full::new(Bytes::from(big.clone()))).unwrap();
    let r = s.send(declared).await;
    assert_eq!(r.status, 413);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("65536"));
    // Without a content-length (chunked), the limit holds while reading.
    let req = http::Request::post(format!("{}/fn/complete", s.url)).body(Chunks { data: big, at: 0 }).unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 413);
    s.shutdown().await;
}

/// A body sent in 16 KiB chunks with no declared length.
struct Chunks {
    data: Vec<u8>,
    at: usize,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if self.at >= self.data.len() {
            return std::task::Poll::Ready(None);
        }
        let end = (self.at + 16 * 1024).min(self.data.len());
        let chunk = Bytes::copy_from_slice(&self.data[self.at..end]);
        self.at = end;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_concurrency_limit_gives_429_and_the_global_queue_503() {
    let s = start(
        vec![tiny_manifest("tiny")],
        &[plugin("one", "hostile", Some("max_concurrency = 1\n")), plugin("other", "hostile", None)],
        |c| {
            c.server.max_in_flight = 2;
            c.server.max_queue = 1;
            c.server.queue_timeout_ms = 300;
        },
    )
    .await;
    let c = s.client();
    let busy = tokio::spawn(async move { c.post("/fn/one/sleep?ms=1500", "").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = s.post("/fn/one/ok", "").await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");

    // Two slots: one is busy above, take the other; the next request queues, then times out.
    let c = s.client();
    let second = tokio::spawn(async move { c.post("/fn/other/sleep?ms=1200", "").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = s.client();
    let queued = tokio::spawn(async move { c.post("/fn/other/ok", "").await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The queue holds one: this one is refused at once.
    let full = s.post("/fn/other/ok", "").await;
    assert_eq!(full.status, 503, "{}", full.text());
    assert!(full.headers.contains_key("retry-after"));
    let queued = queued.await.unwrap();
    assert_eq!(queued.status, 503, "{}", queued.text());
    assert!(queued.json()["error"]["message"].as_str().unwrap().contains("no slot"));
    assert_eq!(busy.await.unwrap().status, 200);
    assert_eq!(second.await.unwrap().status, 200);
    // With slots free again, requests go through.
    assert_eq!(s.post("/fn/other/ok", "").await.status, 200);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_lists_and_reloads_behind_its_key() {
    let s = openai_server(|c| c.auth.admin_key = Some("root".into())).await;
    let admin = |method: &str, path: &str, key: &str| {
        http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", s.url))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(s.send(admin("GET", "/admin/plugins", "nope")).await.status, 401);
    let plugins = s.send(admin("GET", "/admin/plugins", "root")).await.json();
    let names: Vec<_> = plugins["plugins"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["complete", "hostile", "openai"]);
    let openai = &plugins["plugins"][2];
    assert_eq!(openai["routes"], serde_json::json!(["/fn/openai/", "/v1/"]));
    assert_eq!(openai["state"], "loaded");
    let models = s.send(admin("GET", "/admin/models", "root")).await.json();
    assert_eq!(models["models"][0]["name"], "tiny");
    assert_eq!(models["models"][0]["active_sequences"], 0);
    let reload = s.send(admin("POST", "/admin/plugins/openai/reload", "root")).await;
    assert_eq!(reload.status, 200, "{}", reload.text());
    assert_eq!(s.send(admin("POST", "/admin/plugins/ghost/reload", "root")).await.status, 404);
    s.shutdown().await;

    let s = openai_server(|_| {}).await;
    assert_eq!(s.get("/admin/plugins").await.status, 404);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cleartext_is_served() {
    let s = openai_server(|_| {}).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = http::Request::post(format!("{}/v1/completions", s.url))
        // ignore_eos: a sampled end-of-generation token would end it before 3 tokens.
        .body(Full::new(Bytes::from_static(
            br#"{"model": "tiny", "prompt": "hi", "max_tokens": 3, "ignore_eos": true}"#,
        )))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
    s.shutdown().await;
}

/// The real binary, a config file, and SIGTERM while a stream is in flight: the stream
/// finishes, readiness turns off, the process exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits() {
    let dir = scratch_dir("sigterm");
    let models = dir.join("models");
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(&models).unwrap();
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(tiny_model_path(), models.join("tiny.gguf")).unwrap();
    std::fs::write(
        models.join("tiny.toml"),
        "name = \"tiny\"\nfile = \"tiny.gguf\"\nthreads = 1\ncontext_length = 512\n",
    )
    .unwrap();
    support::server::install(&plugins, &plugin("complete", "complete", None));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.join("flywheel.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_ms = 10000\n[models]\ndir = \"models\"\nload = [\"tiny\"]\n[plugins]\ndir = \"plugins\"\ncache_dir = \"cache\"\n[log]\nformat = \"json\"\n"
        ),
    )
    .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["serve", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready =
            client.request(http::Request::get(format!("{url}/readyz")).body(Full::new(Bytes::new())).unwrap()).await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < until, "server never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A slow stream: many tokens, one event each.
    let req = http::Request::post(format!("{url}/fn/complete"))
        .body(Full::new(Bytes::from_static(
            br#"{"model": "tiny", "prompt": "hi", "max_tokens": 300, "ignore_eos": true, "stream": true}"#,
        )))
        .unwrap();
    let mut resp = client.request(req).await.unwrap();
    let first = read_events(&mut resp, 2).await;
    assert_eq!(first.len(), 2);
    let kill = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let rest = read_events(&mut resp, 10_000).await;
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"), "the in-flight stream was cut");
    let status = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert!(status.status.success(), "exit status {:?}", status.status);
    let log = String::from_utf8_lossy(&status.stderr);
    assert!(log.contains("\"request_id\""), "logs are not JSON with request ids:\n{log}");
    assert!(log.contains("SIGTERM"));
    // The listener is closed.
    let after =
        client.request(http::Request::get(format!("{url}/healthz")).body(Full::new(Bytes::new())).unwrap()).await;
    assert!(after.is_err());
}

/// Every metric the Grafana dashboard (deploy/grafana) queries is one the server exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_metrics_the_server_exports() {
    let s = openai_server(|c| c.auth.admin_key = Some("admin".into())).await;
    // One request, so per-plugin and per-key series exist too.
    let r = s.post("/fn/complete", r#"{"prompt": "Hi", "max_tokens": 2}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let metrics = s.get("/metrics").await.text();
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/flywheel-dashboard.json"),
    )
    .unwrap();
    let mut names: Vec<String> = Vec::new();
    for (i, _) in dashboard.match_indices("flywheel_") {
        let name: String = dashboard[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        names.push(name);
    }
    names.sort();
    names.dedup();
    assert!(names.len() >= 15, "{names:?}");
    // A family with no series yet (no trap so far, say) is not in the text: it must then be
    // one that host/src/metrics.rs registers.
    let registered =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/metrics.rs")).unwrap();
    for name in names {
        let family = ["_bucket", "_sum", "_count"].iter().fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
        let family = family.strip_suffix("_total").unwrap_or(family);
        assert!(
            metrics.contains(&format!("# TYPE {family} ")) || registered.contains(&format!("\"{family}\"")),
            "the dashboard queries {name}, which the server does not export"
        );
    }
    s.shutdown().await;
}
