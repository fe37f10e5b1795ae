//! Models that scale to zero: loaded on first use, unloaded after `keep_alive` idle,
//! `max_loaded_models` with least-recently-used eviction, and the admin endpoints.

mod support;

use std::time::{Duration, Instant};

use support::node::spawn_node_serving;
use support::server::{plugin, start, TestServer};
use support::*;

const OPENAI: &str = "routes = [\"/v1/\"]\nmax_concurrency = 64\n";

fn completion(model: &str, prompt: &str) -> String {
    serde_json::json!({ "model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0 }).to_string()
}

async fn model_state(s: &TestServer, name: &str) -> serde_json::Value {
    let r = s.admin("GET", &format!("/admin/models/{name}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

async fn wait_state(s: &TestServer, name: &str, want: &str, within: Duration) -> serde_json::Value {
    let until = Instant::now() + within;
    loop {
        let m = model_state(s, name).await;
        if m["state"] == want {
            return m;
        }
        assert!(Instant::now() < until, "model {name} did not become {want} within {within:?}: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(labels) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// SmolLM2 in a real `flywheel serve` process: unloaded at start (ready all the same),
/// loaded by the first request, unloaded after `keep_alive`, which gives its memory back,
/// and loaded again by the next request, which answers the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_model_unloads_gives_its_memory_back_and_reloads_on_the_next_request() {
    let Some(smollm2) = default_model_manifest() else {
        panic!("the default model is missing: run python3 models/fetch.py smollm2 (scripts/test.sh does)");
    };
    let manifest = format!(
        "name = \"smollm2\"\nfile = \"{}\"\nsha256 = \"{}\"\nthreads = 2\ncontext_length = 2048\nmax_sequences = 16\nkeep_alive = \"2s\"\n",
        smollm2.file.display(),
        smollm2.sha256.clone().unwrap_or_default()
    );
    let node = spawn_node_serving("lifecycle", &[("smollm2", &manifest)], "");
    node.wait_ready().await;
    let client = reqwest::Client::new();
    let admin = |path: &str| client.get(format!("{}{path}", node.url())).bearer_auth("admin").send();
    let state = |v: &serde_json::Value| v["models"][0]["state"].as_str().unwrap_or("").to_string();
    let models = admin("/admin/models").await.unwrap().json::<serde_json::Value>().await.unwrap();
    assert_eq!(state(&models), "unloaded", "{models}");
    let ready = client.get(format!("{}/readyz", node.url())).send().await.unwrap();
    assert_eq!(ready.status(), 200, "a node whose models are merely unloaded is ready");
    let idle_rss = node.rss_kib();

    let ask = || async {
        let r = client
            .post(format!("{}/v1/completions", node.url()))
            .header("content-type", "application/json")
            .body(completion("smollm2", "The capital of France is"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let first = ask().await;
    let loaded_rss = node.rss_kib();
    let models = admin("/admin/models").await.unwrap().json::<serde_json::Value>().await.unwrap();
    assert_eq!(state(&models), "loaded", "{models}");
    assert!(models["models"][0]["last_load_ms"].as_u64().is_some(), "{models}");

    // keep_alive is 2 s: it unloads by itself.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let models = admin("/admin/models").await.unwrap().json::<serde_json::Value>().await.unwrap();
        if state(&models) == "unloaded" {
            break;
        }
        assert!(Instant::now() < until, "smollm2 never unloaded: {models}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The decode thread frees the context and weights just after the state changes.
    let until = Instant::now() + Duration::from_secs(5);
    let mut unloaded_rss = node.rss_kib();
    while unloaded_rss >= idle_rss + 96 * 1024 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        unloaded_rss = node.rss_kib();
    }
    eprintln!("RSS KiB: idle at start {idle_rss}, loaded {loaded_rss}, after unload {unloaded_rss}");
    assert!(loaded_rss > idle_rss + 256 * 1024, "loading SmolLM2 (16 x 2048 KV cells) takes memory");
    assert!(
        unloaded_rss < idle_rss + 96 * 1024,
        "after the unload the process is back near its idle size ({unloaded_rss} KiB vs {idle_rss} KiB idle)"
    );

    let again = ask().await;
    assert_eq!(again, first, "the reloaded model answers as before (greedy)");
    let metrics = client.get(format!("{}/metrics", node.url())).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&metrics, "flywheel_model_loads_total", "model=\"smollm2\""), 2.0, "{metrics}");
    assert_eq!(metric(&metrics, "flywheel_model_unloads_total", "reason=\"idle\""), 1.0);
    assert_eq!(metric(&metrics, "flywheel_model_load_duration_seconds_count", "model=\"smollm2\""), 2.0);
}

/// Requests that arrive while a model loads wait for that one load and all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_a_load_wait_for_it_and_all_succeed() {
    let Some(mut m) = default_model_manifest() else {
        panic!("the default model is missing: run python3 models/fetch.py smollm2 (scripts/test.sh does)");
    };
    // Hashing and reading SmolLM2 take long enough for the requests to overlap the load.
    m.max_sequences = 8;
    m.context_length = 256;
    m.batch_size = 256;
    m.keep_alive = Some(flywheel::engine::KeepAlive::For(Duration::from_secs(60)));
    let s =
        start(vec![m], &[plugin("openai", "openai", Some(OPENAI))], |c| c.auth.admin_key = Some("admin".into())).await;
    assert_eq!(model_state(&s, "smollm2").await["state"], "unloaded");
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let c = s.client();
            tokio::spawn(
                async move { c.post("/v1/completions", &completion("smollm2", &format!("Count to {i}:"))).await },
            )
        })
        .collect();
    // At least one of them sees the model loading.
    let until = Instant::now() + Duration::from_secs(5);
    let mut saw_loading = false;
    while Instant::now() < until {
        let st = model_state(&s, "smollm2").await;
        if st["state"] == "loading" {
            saw_loading = true;
            break;
        }
        if st["state"] == "loaded" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let st = model_state(&s, "smollm2").await;
    assert_eq!((st["state"].as_str(), st["loads"].as_u64()), (Some("loaded"), Some(1)), "one load served all: {st}");
    assert!(saw_loading, "the admin API showed the model loading while requests waited");
    s.shutdown().await;
}

/// Two models under `max_loaded_models = 1` take turns: each request for the other model
/// unloads the idle one first, and every answer is the same as the first time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_under_a_cap_of_one_alternate() {
    let s =
        start(vec![tiny_manifest("alpha"), tiny_manifest("beta")], &[plugin("openai", "openai", Some(OPENAI))], |c| {
            c.auth.admin_key = Some("admin".into());
            c.models.keep_alive = flywheel::engine::KeepAlive::For(Duration::from_secs(300));
            c.models.max_loaded_models = Some(1);
        })
        .await;
    let mut answers = std::collections::HashMap::new();
    for round in 0..3 {
        for name in ["alpha", "beta"] {
            let r = s.post("/v1/completions", &completion(name, "Once upon a time")).await;
            assert_eq!(r.status, 200, "{}", r.text());
            let text = r.json()["choices"][0]["text"].as_str().unwrap().to_string();
            let first = answers.entry(name).or_insert_with(|| text.clone());
            assert_eq!(*first, text, "round {round}: {name} answers as it did the first time");
            let other = if name == "alpha" { "beta" } else { "alpha" };
            assert_eq!(model_state(&s, name).await["state"], "loaded");
            assert_eq!(model_state(&s, other).await["state"], "unloaded", "the cap is one model");
        }
    }
    let metrics = s.get("/metrics").await.text();
    assert_eq!(metric(&metrics, "flywheel_model_loads_total", "model=\"alpha\""), 3.0, "{metrics}");
    assert_eq!(metric(&metrics, "flywheel_model_unloads_total", "model=\"alpha\",reason=\"evicted\""), 3.0);
    assert_eq!(metric(&metrics, "flywheel_model_loaded", "model=\"beta\""), 1.0);
    s.shutdown().await;
}

/// A model in use is never evicted: a request for the other model waits for it to become
/// idle, and gets a clear 503 if that takes longer than its model's queue timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_model_is_not_evicted_the_other_waits_for_it() {
    let mut beta = tiny_manifest("beta");
    beta.queue_timeout_ms = 400;
    let s = start(vec![tiny_manifest("alpha"), beta], &[plugin("openai", "openai", Some(OPENAI))], |c| {
        c.auth.admin_key = Some("admin".into());
        c.models.keep_alive = flywheel::engine::KeepAlive::For(Duration::from_secs(300));
        c.models.max_loaded_models = Some(1);
    })
    .await;
    // Hold alpha as a long request would.
    let held = s.engine.acquire("alpha").await.unwrap();
    let r = s.post("/v1/completions", &completion("beta", "Hello")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("max_loaded_models"), "{}", r.text());
    assert_eq!(model_state(&s, "alpha").await["state"], "loaded");

    // Released while beta waits: beta loads and answers.
    let c = s.client();
    let waiting = tokio::spawn(async move { c.post("/v1/completions", &completion("beta", "Hello")).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!waiting.is_finished(), "beta waits while alpha is in use");
    drop(held);
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(model_state(&s, "alpha").await["state"], "unloaded");
    s.shutdown().await;
}

/// `keep_alive = 0` unloads after each use; the admin API loads, pins, unpins and unloads,
/// and refuses to unload a model in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_zero_pins_and_the_admin_endpoints() {
    let s = start(vec![tiny_manifest("tiny")], &[plugin("openai", "openai", Some(OPENAI))], |c| {
        c.auth.admin_key = Some("admin".into());
        c.models.keep_alive = flywheel::engine::KeepAlive::For(Duration::ZERO);
    })
    .await;
    let r = s.post("/v1/completions", &completion("tiny", "Hi")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    wait_state(&s, "tiny", "unloaded", Duration::from_secs(5)).await;

    let r = s.admin("POST", "/admin/models/tiny/load").await;
    assert_eq!((r.status, r.json()["state"].as_str()), (200, Some("loaded")), "{}", r.text());
    // keep_alive 0: loaded by the admin API and idle, so it goes again.
    wait_state(&s, "tiny", "unloaded", Duration::from_secs(5)).await;

    let r = s.admin("POST", "/admin/models/tiny/pin").await;
    assert_eq!((r.status, r.json()["pinned"].as_bool()), (200, Some(true)), "{}", r.text());
    let r = s.post("/v1/completions", &completion("tiny", "Hi")).await;
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(model_state(&s, "tiny").await["state"], "loaded", "pinned: stays loaded");

    let lease = s.engine.acquire("tiny").await.unwrap();
    let r = s.admin("POST", "/admin/models/tiny/unload").await;
    assert_eq!(r.status, 409, "in use: {}", r.text());
    drop(lease);
    let r = s.admin("POST", "/admin/models/tiny/unload").await;
    assert_eq!((r.status, r.json()["state"].as_str()), (200, Some("unloaded")), "{}", r.text());

    let r = s.admin("POST", "/admin/models/tiny/unpin").await;
    assert_eq!((r.status, r.json()["pinned"].as_bool()), (200, Some(false)));
    let r = s.admin("POST", "/admin/models/nope/load").await;
    assert_eq!(r.status, 404);
    let r = s.admin("POST", "/admin/models/tiny/explode").await;
    assert_eq!(r.status, 404);
    let metrics = s.get("/metrics").await.text();
    assert!(metric(&metrics, "flywheel_model_unloads_total", "reason=\"admin\"") >= 1.0, "{metrics}");
    s.shutdown().await;
}

/// Counts failed loads.
#[derive(Default)]
struct LoadFailures(std::sync::atomic::AtomicUsize);

impl flywheel::engine::StepObserver for LoadFailures {
    fn on_step(&self, _: &str, _: &flywheel::engine::StepInfo) {}
    fn model_load_failed(&self, _: &str) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A model whose file turns out corrupt at its first load: every request waiting for that
/// load gets its error (naming the file), and the load is tried once, not once per waiter;
/// a later request tries again. The server goes on serving its other model.
#[tokio::test]
async fn requests_waiting_for_a_load_that_fails_share_its_error() {
    let mut broken = tiny_manifest("broken");
    broken.sha256 = Some("0".repeat(64));
    broken.keep_alive = Some(flywheel::engine::KeepAlive::For(Duration::from_secs(60)));
    let failures = std::sync::Arc::new(LoadFailures::default());
    let lifecycle = flywheel::engine::Lifecycle::default();
    let engine =
        flywheel::engine::Engine::start(vec![tiny_manifest("fine"), broken], failures.clone(), lifecycle).unwrap();
    // All five are waiting before the first load runs (this test's runtime has one thread).
    let results = futures_join(vec![
        engine.acquire("broken"),
        engine.acquire("broken"),
        engine.acquire("broken"),
        engine.acquire("broken"),
        engine.acquire("broken"),
    ])
    .await;
    for r in &results {
        let e = r.as_ref().err().expect("a corrupt file does not load").to_string();
        assert!(e.contains("sha256") || e.contains("corrupt"), "{e}");
    }
    assert_eq!(failures.0.load(std::sync::atomic::Ordering::Relaxed), 1, "one attempt served every waiter");
    let status = engine.model("broken").unwrap().status();
    assert_eq!(status.state, flywheel::engine::ModelState::Unloaded);
    assert!(status.last_error.is_some_and(|e| e.contains("corrupt")));
    assert!(engine.acquire("broken").await.is_err());
    assert_eq!(failures.0.load(std::sync::atomic::Ordering::Relaxed), 2, "a later request tries again");
    let fine = engine.acquire("fine").await.expect("the other model serves");
    let mut seq = fine.open().await.unwrap();
    seq.feed(&[1, 2, 3], flywheel::engine::Want::top(1)).await.unwrap();
}

/// A batch whose compute buffers cannot be allocated is halved at load until they can, and
/// the model serves; the admin API and `/metrics` show the batch it runs. Without flash
/// attention the tiny model's buffers take about 16 bytes x context x batch, so a batch as
/// long as a context sized to this node's memory asks for twice the memory it has. The same
/// manifest's `tensor_split` and `n_gpu_layers` (ignored on a node without GPUs) are
/// accepted, and where the model sits is shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_too_large_for_memory_is_halved_at_load_and_shown() {
    // Linux refuses an allocation larger than RAM and swap only in its default overcommit
    // mode (0), the mode of the machines this suite runs on.
    let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory").unwrap_or_default();
    if overcommit.trim() != "0" {
        eprintln!("skipped: vm.overcommit_memory is {overcommit:?}, so no allocation is refused for its size");
        return;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib = |key: &str| -> u64 {
        let line = meminfo.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in /proc/meminfo"));
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap()
    };
    let memory = (kib("MemTotal:") + kib("SwapTotal:")) * 1024;
    let mut context = 1usize << 14;
    while (16 * context * context) as u64 <= 2 * memory {
        context *= 2;
    }
    let mut big = tiny_manifest("big-batch");
    big.flash_attention = flywheel::engine::FlashAttention::Off;
    big.max_sequences = 1;
    big.context_length = context;
    big.batch_size = context;
    // GPU settings a node without GPUs accepts and ignores (where there are GPUs, the
    // placement checks below do not apply).
    let gpus = flywheel::engine::devices().iter().any(|d| matches!(d.kind, "gpu" | "igpu"));
    if !gpus {
        big.tensor_split = vec![3.0, 1.0];
        big.n_gpu_layers = 99;
    }
    let s = start(vec![big], &[plugin("openai", "openai", Some(OPENAI))], |c| {
        c.auth.admin_key = Some("admin".into());
        c.models.keep_alive = flywheel::engine::KeepAlive::Forever;
    })
    .await;
    let r = s.post("/v1/completions", &completion("big-batch", "Once upon a time")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 8, "{}", r.text());

    let m = model_state(&s, "big-batch").await;
    let batch = m["batch_size"].as_u64().expect("batch_size") as usize;
    assert!(batch < context && batch >= 32 && context.is_multiple_of(batch), "a halving of {context}: {m}");
    let metrics = s.get("/metrics").await.text();
    assert_eq!(metric(&metrics, "flywheel_model_batch_tokens", "model=\"big-batch\""), batch as f64, "{metrics}");
    if gpus {
        s.shutdown().await;
        return;
    }
    assert_eq!(m["gpu"]["tensor_split"], serde_json::json!([3.0, 1.0]), "{m}");
    // Where it sits: every layer and its KV cache (one sequence of `context` cells) in host memory.
    assert_eq!((m["offloaded_layers"].as_u64(), m["kv_bytes"]["gpu"].as_u64()), (Some(0), Some(0)), "{m}");
    let kv_cpu = m["kv_bytes"]["cpu"].as_u64().expect("kv_bytes.cpu");
    assert_eq!(Some(kv_cpu), m["kv_bytes_per_sequence"].as_u64(), "{m}");
    assert_eq!(metric(&metrics, "flywheel_model_kv_bytes", "model=\"big-batch\",place=\"cpu\""), kv_cpu as f64);
    assert_eq!(metric(&metrics, "flywheel_model_kv_bytes", "model=\"big-batch\",place=\"gpu\""), 0.0);
    assert_eq!(metric(&metrics, "flywheel_model_offloaded_layers", "model=\"big-batch\""), 0.0);
    s.shutdown().await;
}

/// Polls every future to completion on this task (all of them start before any finishes).
async fn futures_join<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (f, o) in pinned.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
                    *o = Some(v);
                }
            }
        }
        if out.iter().all(Option::is_some) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}
