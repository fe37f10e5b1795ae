//! `flywheel bench plugin`: the `complete` plugin's decode loop through wasi-nn against the
//! engine's own sequence API, plus the cost of instantiating a plugin.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use super::engine::{engine_run, gather, median_row};
use super::{median, percentile, synthetic_prompts, Row};
use crate::engine::Model;
use crate::nn::NnObserver;
use crate::plugins::{Plugin, PluginObserver, PluginRuntime};

/// Collects per-request timings from the plugin runtime.
#[derive(Default)]
pub struct Probes {
    instantiate: Mutex<Vec<Duration>>,
    first_host_call: Mutex<Vec<Duration>>,
}

impl Probes {
    fn take(list: &Mutex<Vec<Duration>>) -> Vec<Duration> {
        std::mem::take(&mut *list.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn clear(&self) {
        Self::take(&self.instantiate);
        Self::take(&self.first_host_call);
    }
}

impl PluginObserver for Probes {
    fn instantiated(&self, _plugin: &str, took: Duration) {
        self.instantiate.lock().unwrap_or_else(|p| p.into_inner()).push(took);
    }

    fn first_host_call(&self, _plugin: &str, since_start: Duration) {
        self.first_host_call.lock().unwrap_or_else(|p| p.into_inner()).push(since_start);
    }
}

impl NnObserver for Probes {}

pub struct PluginBench {
    pub ns: Vec<usize>,
    pub prompt: usize,
    pub gen: usize,
    pub repeat: usize,
    /// Sequential one-token requests for the instantiation figures.
    pub instantiations: usize,
    /// Skip the decode runs (measure instantiation of any plugin).
    pub instantiate_only: bool,
    /// Concurrent requests for the peak-memory run (0: skip it); each generates `instance_gen`.
    pub instances: usize,
    pub instance_gen: usize,
}

impl Default for PluginBench {
    fn default() -> Self {
        Self {
            ns: vec![1, 16],
            prompt: 64,
            gen: 128,
            repeat: 3,
            instantiations: 300,
            instantiate_only: false,
            instances: 0,
            instance_gen: 32,
        }
    }
}

fn request(model: &str, prompt: &[i32], gen: usize, stream: bool, full_logits: bool) -> hyper::Request<Full<Bytes>> {
    let body = serde_json::json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": gen,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
        "full_logits": full_logits,
    });
    let mut req = hyper::Request::new(Full::new(Bytes::from(body.to_string())));
    *req.method_mut() = hyper::Method::POST;
    *req.uri_mut() = hyper::Uri::from_static("http://localhost/fn/complete");
    req
}

impl PluginBench {
    pub async fn run(
        &self,
        runtime: &Arc<PluginRuntime>,
        plugin: &Arc<Plugin>,
        model: &Arc<Model>,
        probes: &Probes,
        mut on_row: impl FnMut(&Row),
    ) -> anyhow::Result<Vec<Row>> {
        let info = model.info().clone();
        let mut seed = 500;
        let mut prompts = |n: usize| {
            seed += 1;
            synthetic_prompts(n, self.prompt, 0, info.vocab_size, info.bos, seed)
        };
        let mut rows = Vec::new();
        let repeat = self.repeat.max(1);
        let mut push = |mut r: Row, rows: &mut Vec<Row>| {
            r.bench = "plugin";
            on_row(&r);
            rows.push(r);
        };
        let decode_ns = if self.instantiate_only { &[][..] } else { &self.ns[..] };
        if !self.instantiate_only {
            // Warm both paths.
            plugin_run(runtime, plugin, model, &prompts(2), 8, false).await?;
            engine_run(model, &prompts(2), 8).await?;
        }
        for &n in decode_ns {
            let (mut plugin_runs, mut engine_runs) = (Vec::new(), Vec::new());
            for _ in 0..repeat {
                // Separate prompts per mode: a prompt served once sits in the prefix cache.
                plugin_runs.push(plugin_run(runtime, plugin, model, &prompts(n), self.gen, false).await?);
                engine_runs.push(engine_run(model, &prompts(n), self.gen).await?);
                let (a, b) = (&plugin_runs[plugin_runs.len() - 1], &engine_runs[engine_runs.len() - 1]);
                tracing::info!(n, plugin = a.tok_s, engine = b.tok_s, ratio = a.tok_s / b.tok_s, "run");
            }
            push(median_row(plugin_runs), &mut rows);
            push(median_row(engine_runs), &mut rows);
        }
        // The same decode loop with a full logits row copied into the guest every step.
        for &n in decode_ns {
            let mut runs = Vec::new();
            for _ in 0..repeat {
                runs.push(plugin_run(runtime, plugin, model, &prompts(n), self.gen, true).await?);
            }
            let mut r = median_row(runs);
            r.mode = "plugin-full-logits".into();
            push(r, &mut rows);
        }
        if self.instances > 0 && !self.instantiate_only {
            // Many live instances at once: every request streams, so all stay instantiated
            // until they finish; peak RSS over the idle baseline, per instance.
            let baseline = resident_bytes();
            let sampler = PeakSampler::start();
            let mut r = plugin_run(runtime, plugin, model, &prompts(self.instances), self.instance_gen, false).await?;
            let peak = sampler.stop();
            r.mode = "concurrent-instances".into();
            r.rss_per_instance_mib =
                Some(peak.saturating_sub(baseline) as f64 / self.instances as f64 / f64::from(1u32 << 20));
            push(r, &mut rows);
        }
        // Instantiation, one request at a time.
        probes.clear();
        // An empty JSON object: the plugin starts, reads it, answers 400; no model work.
        for _ in 0..self.instantiations {
            empty_request(runtime, plugin).await?;
        }
        let measured = [
            ("instantiate", Probes::take(&probes.instantiate)),
            ("instantiate+first-call", Probes::take(&probes.first_host_call)),
        ];
        for (mode, samples) in measured {
            let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
            let n = us.len();
            let p50 = median(&mut us);
            let p99 = percentile(&mut us, 99.0);
            push(Row { mode: mode.into(), n, p50_us: Some(p50), p99_us: Some(p99), ..Row::default() }, &mut rows);
        }
        Ok(rows)
    }
}

/// N concurrent streaming requests to the plugin; timing as in `engine_run`.
async fn plugin_run(
    runtime: &Arc<PluginRuntime>,
    plugin: &Arc<Plugin>,
    model: &Arc<Model>,
    prompts: &[Vec<i32>],
    gen: usize,
    full_logits: bool,
) -> anyhow::Result<Row> {
    let prefill_before = model.stats().prefill_tokens.load(std::sync::atomic::Ordering::Relaxed);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in prompts {
        let (runtime, plugin, name, p) = (runtime.clone(), plugin.clone(), model.name().to_string(), p.clone());
        tasks.push(tokio::spawn(async move {
            let opened = Instant::now();
            let resp = runtime.invoke(&plugin, request(&name, &p, gen, true, full_logits), None).await?;
            anyhow::ensure!(resp.status() == 200, "plugin answered {}", resp.status());
            let mut body = resp.into_body();
            let mut first: Option<(Duration, Instant)> = None;
            let mut tail = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| anyhow::anyhow!("{e}"))?;
                if let Some(data) = frame.data_ref() {
                    if first.is_none() {
                        first = Some((opened.elapsed(), Instant::now()));
                    }
                    tail = data.to_vec();
                }
            }
            anyhow::ensure!(tail.ends_with(b"data: [DONE]\n\n"), "stream did not finish");
            first.ok_or_else(|| anyhow::anyhow!("no events"))
        }));
    }
    gather("plugin", tasks, start, model, prefill_before, prompts, gen).await
}

/// One request that instantiates the plugin and gets its 400 for an empty object.
pub async fn empty_request(runtime: &Arc<PluginRuntime>, plugin: &Arc<Plugin>) -> anyhow::Result<()> {
    let mut req = hyper::Request::new(Full::new(Bytes::from_static(b"{}")));
    *req.method_mut() = hyper::Method::POST;
    *req.uri_mut() = hyper::Uri::from_static("http://localhost/fn/complete");
    let resp = runtime.invoke(plugin, req, None).await?;
    anyhow::ensure!(resp.status() == 400, "an empty request got {}, not 400", resp.status());
    resp.into_body().collect().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// This process's resident memory now.
fn resident_bytes() -> u64 {
    // statm: size resident shared ... in pages.
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// Samples resident memory every millisecond on its own thread, keeping the peak.
struct PeakSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PeakSampler {
    fn start() -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = resident_bytes();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(resident_bytes());
                std::thread::sleep(Duration::from_millis(1));
            }
            peak.max(resident_bytes())
        });
        Self { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}
