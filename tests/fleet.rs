//! Several nodes behind a real nginx, a node killed mid-run; and the soak.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::node::{nginx_binary, spawn_nginx_on_a_free_port, spawn_node, Node};

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

#[derive(Debug, PartialEq)]
enum Outcome {
    /// 200 and a stream that ended with `[DONE]`.
    Completed,
    /// A JSON error with a status.
    Refused(u16),
    /// The connection broke (the node died under the stream).
    Broken(String),
}

async fn stream_once(client: &HttpClient, url: &str, max_tokens: usize) -> Outcome {
    let body = format!(
        r#"{{"model": "tiny", "prompt": "once upon a time", "max_tokens": {max_tokens}, "ignore_eos": true, "stream": true}}"#
    );
    let req = http::Request::post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => return Outcome::Broken(e.to_string()),
    };
    let status = resp.status().as_u16();
    let bytes = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Outcome::Broken(e.to_string()),
    };
    let text = String::from_utf8_lossy(&bytes);
    if status != 200 {
        // A refusal must be a JSON error, never an empty or garbled body.
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("status {status} without a JSON body ({e}): {text}"));
        assert!(v["error"]["message"].is_string(), "{text}");
        return Outcome::Refused(status);
    }
    if text.trim_end().ends_with("data: [DONE]") {
        Outcome::Completed
    } else {
        Outcome::Broken(format!("stream ended early after {} bytes", text.len()))
    }
}

async fn assert_idle(node: &Node) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let m = node.models().await;
        let model = &m["models"][0];
        if model["active_sequences"] == 0 && model["kv_tokens"] == 0 {
            return;
        }
        assert!(Instant::now() < until, "node on port {} still holds sequences: {m}", node.port);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_balances_two_nodes_and_survives_one_dying() {
    let Some(nginx) = nginx_binary() else {
        assert!(std::env::var_os("FLYWHEEL_REQUIRE_NGINX").is_none(), "nginx is required but not installed");
        eprintln!("skipped: nginx is not installed (scripts/test.sh installs it)");
        return;
    };
    let a = spawn_node("a", 16, "");
    let mut b = spawn_node("b", 16, "");
    a.wait_ready().await;
    b.wait_ready().await;
    let (mut proxy, port) = spawn_nginx_on_a_free_port(&nginx, &[a.port, b.port]);
    let url = format!("http://127.0.0.1:{port}");
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let until = Instant::now() + Duration::from_secs(20);
    while !matches!(stream_once(&client, &url, 2).await, Outcome::Completed) {
        assert!(Instant::now() < until, "nginx never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 200 streaming requests from 16 clients; node b dies after 60 have finished.
    let total = 200;
    let next = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let killed_at = Arc::new(std::sync::Mutex::new(None::<usize>));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (client, url, next, finished) = (client.clone(), url.clone(), next.clone(), finished.clone());
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return results;
                }
                let outcome = tokio::time::timeout(Duration::from_secs(60), stream_once(&client, &url, 48))
                    .await
                    .unwrap_or_else(|_| panic!("request {i} hung"));
                finished.fetch_add(1, Ordering::Relaxed);
                results.push((i, outcome));
            }
        }));
    }
    while finished.load(Ordering::Relaxed) < 60 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    *killed_at.lock().unwrap() = Some(next.load(Ordering::Relaxed));
    b.kill();
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.unwrap());
    }
    let started_before_kill = killed_at.lock().unwrap().unwrap();
    assert_eq!(outcomes.len(), total);
    let completed = outcomes.iter().filter(|(_, o)| *o == Outcome::Completed).count();
    let failed: Vec<_> = outcomes.iter().filter(|(_, o)| *o != Outcome::Completed).collect();
    // Only streams already running on b when it died may fail, and they fail cleanly.
    assert!(failed.len() <= 16, "{} requests failed: {failed:?}", failed.len());
    for (i, o) in &failed {
        assert!(*i < started_before_kill + 16, "request {i}, started well after the kill, failed: {o:?}");
    }
    eprintln!("fleet: {completed} completed, {} failed when node b died: {failed:?}", failed.len());
    // Everything after the kill goes to a: the balancer took b out.
    for _ in 0..5 {
        assert_eq!(stream_once(&client, &url, 4).await, Outcome::Completed);
    }
    assert_idle(&a).await;
    let _ = proxy.kill();
    let _ = proxy.wait();
}

/// The soak: `n` streaming requests at concurrency 64 through the openai plugin on the tiny
/// model. Reports resident memory from request 2,000 (or a third of a shorter soak) and at
/// the end, each the median of five readings.
async fn soak(n: usize) -> (Vec<Outcome>, u64, u64, Node) {
    let node = spawn_node(&format!("soak-{n}"), 64, "");
    node.wait_ready().await;
    let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(128).build_http();
    let url = node.url();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..64 {
        let (client, url, next, done) = (client.clone(), url.clone(), next.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < n {
                outcomes.push(stream_once(&client, &url, 8).await);
                done.fetch_add(1, Ordering::Relaxed);
            }
            outcomes
        }));
    }
    let checkpoint = checkpoint(n);
    while done.load(Ordering::Relaxed) < checkpoint {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Readings every 1/40th of the run from the checkpoint on; one reading moves by a few
    // percent with whatever the allocator holds at that instant, so the baseline and the
    // end are each the median of five.
    let trace = std::env::var_os("FLYWHEEL_SOAK_TRACE").is_some();
    let mut readings = vec![node.rss_kib()];
    let mut mark = checkpoint;
    while mark < n {
        mark = (mark + (n / 40).max(1)).min(n);
        while done.load(Ordering::Relaxed) < mark {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        readings.push(node.rss_kib());
        if trace {
            println!("soak: {} requests, RSS {} KiB", done.load(Ordering::Relaxed), readings[readings.len() - 1]);
        }
    }
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.unwrap());
    }
    readings.push(node.rss_kib());
    let five = readings.len().min(5);
    let rss_early = median(&readings[..five]);
    let rss_late = median(&readings[readings.len() - five..]);
    (outcomes, rss_early, rss_late, node)
}

fn median(readings: &[u64]) -> u64 {
    let mut sorted = readings.to_vec();
    sorted.sort_unstable();
    sorted[sorted.len() / 2]
}

/// Where the memory baseline is taken: request 2,000, or a third of a shorter soak (after
/// the warm-up that fills pools and caches).
fn checkpoint(n: usize) -> usize {
    (n / 3).min(2000)
}

async fn check_soak(n: usize) {
    let started = Instant::now();
    let (outcomes, early, late, node) = soak(n).await;
    let errors: Vec<_> = outcomes.iter().filter(|o| **o != Outcome::Completed).collect();
    let growth = (late as f64 - early as f64) / early as f64 * 100.0;
    println!(
        "soak: {} requests at concurrency 64 in {:.1} s, {} errors, RSS {} KiB from request {} -> {} KiB at the end, medians of five readings ({growth:+.2}%)",
        outcomes.len(),
        started.elapsed().as_secs_f64(),
        errors.len(),
        early,
        checkpoint(n),
        late
    );
    assert_eq!(outcomes.len(), n);
    assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(5)]);
    // The allocator settles only after ~17,000 requests (a 60,000-request run levels off
    // there), so a 3,000-request soak from request 1,000 reads -1% to +7% on this machine
    // with no leak; it guards against gross leaks (a request's KV cells kept would double
    // RSS), the 10,000-request soak holds 5%.
    let limit = if n >= 10_000 { 5.0 } else { 10.0 };
    assert!(growth < limit, "resident memory grew {growth:.2}% (limit {limit}%)");
    assert_idle(&node).await;
}

/// A short soak in every test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_3000_requests() {
    check_soak(3000).await;
}

/// The full soak: `cargo test --release --test fleet -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run explicitly"]
async fn soak_10000_requests() {
    check_soak(std::env::var("FLYWHEEL_SOAK_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)).await;
}

/// One completion through `url`: its status and the plugin version that served it.
async fn served_version(client: &HttpClient, url: &str) -> (u16, String) {
    let req = http::Request::post(format!("{url}/fn/complete"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"model": "tiny", "prompt": "hi", "max_tokens": 3}"#)))
        .expect("request");
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let version = resp
                .headers()
                .get("x-flywheel-plugin-version")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_string();
            let _ = resp.into_body().collect().await;
            (status, version)
        }
        Err(e) => (0, format!("broken: {e}")),
    }
}

/// `flywheel deploy …` as a user runs it; returns its table.
async fn deploy_cli(args: Vec<String>) -> String {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_flywheel")).arg("deploy").args(&args).output()
    })
    .await
    .unwrap()
    .expect("run flywheel deploy");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "flywheel deploy failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_deploy_and_rollback_under_load_fail_no_request() {
    let Some(nginx) = nginx_binary() else {
        assert!(std::env::var_os("FLYWHEEL_REQUIRE_NGINX").is_none(), "nginx is required but not installed");
        eprintln!("skipped: nginx is not installed (scripts/test.sh installs it)");
        return;
    };
    let nodes = [spawn_node("deploy-a", 8, ""), spawn_node("deploy-b", 8, "")];
    for n in &nodes {
        n.wait_ready().await;
    }
    let (mut proxy, port) = spawn_nginx_on_a_free_port(&nginx, &[nodes[0].port, nodes[1].port]);
    let url = format!("http://127.0.0.1:{port}");
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let until = Instant::now() + Duration::from_secs(20);
    while served_version(&client, &url).await.0 != 200 {
        assert!(Instant::now() < until, "nginx never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Steady load through nginx: (sent at, status, version) for every request.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let load: Vec<_> = (0..3)
        .map(|_| {
            let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = t0.elapsed();
                    let (status, version) = served_version(&client, &url).await;
                    seen.push((sent, t0.elapsed(), status, version));
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let dir = support::scratch_dir("fleet-deploy");
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("complete-v2.toml");
    std::fs::write(&manifest, "max_concurrency = 512\n[config]\nRELEASE = \"2\"\n").unwrap();
    let to = format!("{},{}", nodes[0].url(), nodes[1].url());
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--to".into(), to.clone(), "--admin-key".into(), "admin".into(), "--name".into(), "complete".into()]);
        v
    };
    let wasm = support::server::guest_wasm("complete").display().to_string();
    let deploy_started = t0.elapsed();
    let table = deploy_cli(common(&[&wasm, "--manifest", &manifest.display().to_string(), "--json"])).await;
    let deploy_done = t0.elapsed();
    for line in table.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            (v["status"].as_u64(), v["version"].as_u64(), v["previous"].as_u64()),
            (Some(201), Some(2), Some(1)),
            "{v}"
        );
    }
    assert_eq!(table.lines().count(), 2, "{table}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let rollback_started = t0.elapsed();
    let table = deploy_cli(common(&["complete", "--rollback", "1"])).await;
    let rollback_done = t0.elapsed();
    assert!(table.lines().skip(1).all(|l| l.split_whitespace().nth(2) == Some("1")), "{table}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut seen = Vec::new();
    for l in load {
        seen.extend(l.await.unwrap());
    }
    let failed: Vec<_> = seen.iter().filter(|(_, _, status, _)| *status != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        seen.len(),
        &failed[..failed.len().min(5)]
    );
    // Each phase served by its version; requests that overlapped a switch may see either.
    let phase = |from: Duration, to: Duration| -> Vec<&str> {
        seen.iter().filter(|(sent, done, _, _)| *sent >= from && *done <= to).map(|(_, _, _, v)| v.as_str()).collect()
    };
    let before = phase(Duration::ZERO, deploy_started);
    let during_v2 = phase(deploy_done, rollback_started);
    let after = phase(rollback_done, Duration::MAX);
    for (name, versions, want) in [("before", &before, "1"), ("v2", &during_v2, "2"), ("after", &after, "1")] {
        assert!(versions.len() >= 3, "too few requests {name}: {}", versions.len());
        assert!(versions.iter().all(|v| *v == want), "{name}: {versions:?}");
    }
    eprintln!(
        "fleet deploy: {} requests, 0 failed; v1 {} before, v2 {} between, v1 {} after; deploy {:?}, rollback {:?}",
        seen.len(),
        before.len(),
        during_v2.len(),
        after.len(),
        deploy_done - deploy_started,
        rollback_done - rollback_started
    );
    // And each node directly serves what the fleet was rolled back to.
    for n in &nodes {
        assert_eq!(served_version(&client, &n.url()).await, (200, "1".into()));
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
}
