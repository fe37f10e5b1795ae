//! Prometheus metrics, in the text exposition format at `/metrics`.
//!
//! Request-side metrics are recorded by the HTTP layer and the plugin runtime; engine-side
//! ones come from the scheduler's step observer and, for gauges, from the engine's live
//! counters at scrape time.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::engine::{Engine, StepInfo, StepObserver, UnloadReason};
use crate::nn::NnObserver;
use crate::plugins::{PluginObserver, TrapKind};
use crate::tenants::Ledger;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub plugin: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabel {
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabel {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnloadLabels {
    pub model: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelPlaceLabels {
    pub model: String,
    /// `gpu` or `cpu`.
    pub place: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageLabels {
    pub key: String,
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CutLabels {
    pub plugin: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrapLabels {
    pub plugin: String,
    pub kind: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn micro_histogram() -> Histogram {
    // 1 µs .. ~32 ms
    Histogram::new(exponential_buckets(1e-6, 2.0, 16))
}

fn load_histogram() -> Histogram {
    // 10 ms .. ~160 s
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

fn batch_histogram() -> Histogram {
    // 1 .. 1024 entries
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<PluginLabel, Histogram>,
    pub time_to_first_token: Family<PluginLabel, Histogram>,
    pub generated_tokens: Family<ModelLabel, Counter>,
    pub prefill_tokens: Family<ModelLabel, Counter>,
    pub batch_tokens: Family<ModelLabel, Histogram>,
    pub batch_sequences: Family<ModelLabel, Histogram>,
    pub step_duration: Family<ModelLabel, Histogram>,
    pub instantiation: Family<PluginLabel, Histogram>,
    /// Time requests waited for instance-pool slots.
    pub slot_wait: Family<PluginLabel, Histogram>,
    pub guest_traps: Family<TrapLabels, Counter>,
    /// Responses whose body ended before it was complete, by why.
    pub cut_responses: Family<CutLabels, Counter>,
    pub open_connections: Gauge,
    /// Connections the server closed or refused, by why.
    pub connections_closed: Family<ReasonLabel, Counter>,
    /// Requests waiting for a slot in the global queue.
    pub queued_requests: Gauge,
    pub in_flight_requests: Gauge,
    /// Cold loads: from the start of a model's load to its context being ready.
    pub model_load_duration: Family<ModelLabel, Histogram>,
    pub model_load_failures: Family<ModelLabel, Counter>,
    pub model_unloads: Family<UnloadLabels, Counter>,
    /// CPU time guests ran on the host's threads, by plugin.
    pub guest_cpu: Family<PluginLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    engine: Arc<EngineGauges>,
    usage: Arc<UsageCounters>,
}

/// Engine gauges read at scrape time.
#[derive(Debug, Default)]
struct EngineGauges {
    engine: OnceLock<Weak<Engine>>,
}

/// Per-key usage, read from the ledger at scrape time.
#[derive(Default)]
struct UsageCounters {
    ledger: OnceLock<Weak<Ledger>>,
}

impl std::fmt::Debug for UsageCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageCounters")
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("flywheel_http_requests", "HTTP requests by plugin and status", requests.clone());
        let request_duration =
            Family::<PluginLabel, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "flywheel_http_request_duration_seconds",
            "Time from request to the end of the response body",
            request_duration.clone(),
        );
        let time_to_first_token =
            Family::<PluginLabel, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "flywheel_time_to_first_token_seconds",
            "Time from the start of a plugin instance to the first logits row it receives (its first token)",
            time_to_first_token.clone(),
        );
        let generated_tokens = Family::<ModelLabel, Counter>::default();
        registry.register("flywheel_generated_tokens", "Generated tokens decoded", generated_tokens.clone());
        let prefill_tokens = Family::<ModelLabel, Counter>::default();
        registry.register("flywheel_prefill_tokens", "Prompt tokens computed", prefill_tokens.clone());
        let batch_tokens = Family::<ModelLabel, Histogram>::new_with_constructor(batch_histogram as fn() -> Histogram);
        registry.register("flywheel_batch_tokens", "Tokens per llama.cpp batch", batch_tokens.clone());
        let batch_sequences =
            Family::<ModelLabel, Histogram>::new_with_constructor(batch_histogram as fn() -> Histogram);
        registry.register(
            "flywheel_batch_sequences",
            "Sequences advanced per llama.cpp batch",
            batch_sequences.clone(),
        );
        let step_duration =
            Family::<ModelLabel, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register("flywheel_batch_duration_seconds", "Wall time of one batch step", step_duration.clone());
        let instantiation =
            Family::<PluginLabel, Histogram>::new_with_constructor(micro_histogram as fn() -> Histogram);
        registry.register(
            "flywheel_plugin_instantiation_seconds",
            "Time to instantiate a plugin for a request",
            instantiation.clone(),
        );
        let slot_wait = Family::<PluginLabel, Histogram>::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "flywheel_plugin_slot_wait_seconds",
            "Time a request waited for instance-pool slots (the pool is full when this grows)",
            slot_wait.clone(),
        );
        let guest_traps = Family::<TrapLabels, Counter>::default();
        registry.register("flywheel_guest_traps", "Guests stopped by a trap, by kind", guest_traps.clone());
        let cut_responses = Family::<CutLabels, Counter>::default();
        registry.register(
            "flywheel_http_responses_cut",
            "Responses that ended before their body was complete (the client saw a cut stream), by reason",
            cut_responses.clone(),
        );
        let open_connections = Gauge::default();
        registry.register("flywheel_http_open_connections", "Client connections open", open_connections.clone());
        let connections_closed = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "flywheel_http_connections_closed",
            "Client connections the server refused or closed, by reason (over_capacity, header_timeout, idle, write_stall)",
            connections_closed.clone(),
        );
        let queued_requests = Gauge::default();
        registry.register("flywheel_queued_requests", "Requests waiting in the global queue", queued_requests.clone());
        let in_flight_requests = Gauge::default();
        registry.register("flywheel_in_flight_requests", "Requests being served", in_flight_requests.clone());
        let model_load_duration =
            Family::<ModelLabel, Histogram>::new_with_constructor(load_histogram as fn() -> Histogram);
        registry.register(
            "flywheel_model_load_duration_seconds",
            "Cold loads: time from the start of a model's load (file check, weights, context) to ready; requests for an unloaded model wait this long",
            model_load_duration.clone(),
        );
        let model_load_failures = Family::<ModelLabel, Counter>::default();
        registry.register("flywheel_model_load_failures", "Model loads that failed", model_load_failures.clone());
        let model_unloads = Family::<UnloadLabels, Counter>::default();
        registry.register(
            "flywheel_model_unloads",
            "Models unloaded, by reason (idle: keep_alive ran out; evicted: room for another model; admin)",
            model_unloads.clone(),
        );
        let guest_cpu = Family::<PluginLabel, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "flywheel_guest_cpu_seconds",
            "CPU time plugin instances ran on the host's threads",
            guest_cpu.clone(),
        );
        let engine = Arc::new(EngineGauges::default());
        registry.register_collector(Box::new(engine.clone()));
        let usage = Arc::new(UsageCounters::default());
        registry.register_collector(Box::new(usage.clone()));
        Arc::new(Self {
            registry,
            requests,
            request_duration,
            time_to_first_token,
            generated_tokens,
            prefill_tokens,
            batch_tokens,
            batch_sequences,
            step_duration,
            instantiation,
            slot_wait,
            guest_traps,
            cut_responses,
            open_connections,
            connections_closed,
            queued_requests,
            in_flight_requests,
            model_load_duration,
            model_load_failures,
            model_unloads,
            guest_cpu,
            engine,
            usage,
        })
    }

    /// Report each API key's usage (from the ledger) at each scrape.
    pub fn watch_usage(&self, ledger: &Arc<Ledger>) {
        let _ = self.usage.ledger.set(Arc::downgrade(ledger));
    }

    /// Report the engine's live state (sequences, KV use, queues) at each scrape.
    pub fn watch_engine(&self, engine: &Arc<Engine>) {
        let _ = self.engine.engine.set(Arc::downgrade(engine));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }

    pub fn record_request(&self, plugin: &str, status: u16, took: Duration) {
        self.requests.get_or_create(&RequestLabels { plugin: plugin.to_string(), status }).inc();
        self.request_duration.get_or_create(&PluginLabel { plugin: plugin.to_string() }).observe(took.as_secs_f64());
    }
}

impl Metrics {
    pub fn record_connection_closed(&self, reason: &str) {
        self.connections_closed.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
    }

    pub fn record_cut(&self, plugin: &str, reason: &str) {
        self.cut_responses.get_or_create(&CutLabels { plugin: plugin.to_string(), reason: reason.to_string() }).inc();
    }
}

impl Collector for EngineGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(engine) = self.engine.get().and_then(Weak::upgrade) else { return Ok(()) };
        use std::sync::atomic::Ordering::Relaxed;
        type Read = fn(&crate::engine::EngineStats) -> i64;
        let gauges: [(&str, &str, Read); 6] = [
            ("flywheel_active_sequences", "Sequences open now", |s| s.active_sequences.load(Relaxed) as i64),
            ("flywheel_sequence_queue_depth", "Opens waiting for a free sequence", |s| {
                s.waiting_opens.load(Relaxed) as i64
            }),
            ("flywheel_kv_tokens", "Tokens held in KV cells by open sequences", |s| s.kv_tokens.load(Relaxed) as i64),
            (
                "flywheel_kv_retained_tokens",
                "Tokens closed sequences left in KV cells until their slot is needed",
                |s| s.retained_tokens.load(Relaxed) as i64,
            ),
            ("flywheel_prefix_cache_entries", "Closed sequences cached for prefix reuse", |s| {
                s.cached_prefixes.load(Relaxed) as i64
            }),
            ("flywheel_prefix_cache_bytes", "Host memory used by the prefix cache", |s| {
                s.cached_bytes.load(Relaxed) as i64
            }),
        ];
        for (name, help, read) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for model in engine.models() {
                let labels = ModelLabel { model: model.name().to_string() };
                ConstGauge::new(read(model.stats())).encode(metric.encode_family(&labels)?)?;
            }
        }
        // One status per model per scrape, read by every lifecycle gauge.
        let statuses: Vec<(ModelLabel, crate::engine::ModelStatus)> =
            engine.models().map(|m| (ModelLabel { model: m.name().to_string() }, m.status())).collect();
        type State = fn(&crate::engine::ModelStatus) -> i64;
        let lifecycle: [(&str, &str, State); 6] = [
            ("flywheel_model_loaded", "1 while the model is loaded, 0 while it is not (it loads on first use)", |s| {
                i64::from(s.state == crate::engine::ModelState::Loaded)
            }),
            (
                "flywheel_model_pinned",
                "1 while the model is kept loaded (keep_alive -1 or pinned by the admin API)",
                |s| i64::from(s.pinned),
            ),
            ("flywheel_model_leases", "Requests and sequences using the model now (it is idle at 0)", |s| {
                s.users as i64
            }),
            (
                "flywheel_model_weights_bytes",
                "Bytes of the model's weights while it is loaded (0 while it is not)",
                |s| match (&s.info, s.state) {
                    (Some(info), crate::engine::ModelState::Loaded) => {
                        i64::try_from(info.weights_bytes).unwrap_or(i64::MAX)
                    }
                    _ => 0,
                },
            ),
            (
                "flywheel_model_offloaded_layers",
                "Layers of the loaded model on the GPUs (0 on a node without GPUs, and while not loaded)",
                |s| match (&s.info, s.state) {
                    (Some(info), crate::engine::ModelState::Loaded) => i64::from(info.offloaded_layers),
                    _ => 0,
                },
            ),
            (
                "flywheel_model_batch_tokens",
                "Tokens per llama.cpp batch of the loaded model: the manifest's batch_size, or less where its \
                 compute buffers did not fit in memory (0 while not loaded)",
                |s| match (&s.info, s.state) {
                    (Some(info), crate::engine::ModelState::Loaded) => info.batch_size as i64,
                    _ => 0,
                },
            ),
        ];
        for (name, help, read) in lifecycle {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (labels, status) in &statuses {
                ConstGauge::new(read(status)).encode(metric.encode_family(labels)?)?;
            }
        }
        let mut kv = encoder.encode_descriptor(
            "flywheel_model_kv_bytes",
            "KV cache bytes of the loaded model's cells on its GPUs and in host memory, estimated from its shape \
             (0 while not loaded)",
            None,
            MetricType::Gauge,
        )?;
        for (labels, status) in &statuses {
            let loaded = status.state == crate::engine::ModelState::Loaded;
            let (gpu, cpu) = match &status.info {
                Some(info) if loaded => (info.kv_bytes_gpu, info.kv_bytes_cpu),
                _ => (0, 0),
            };
            for (place, bytes) in [("gpu", gpu), ("cpu", cpu)] {
                let labels = ModelPlaceLabels { model: labels.model.clone(), place: place.to_string() };
                ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX)).encode(kv.encode_family(&labels)?)?;
            }
        }
        let mut memory = encoder.encode_descriptor(
            "flywheel_device_memory_bytes",
            "Memory of each compute device llama.cpp sees (the CPU's is the system's), total and free",
            None,
            MetricType::Gauge,
        )?;
        for device in crate::engine::devices() {
            for (kind, bytes) in [("total", device.memory_total_bytes), ("free", device.memory_free_bytes)] {
                let labels = DeviceLabels { device: device.name.clone(), kind: kind.to_string() };
                ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX)).encode(memory.encode_family(&labels)?)?;
            }
        }
        let mut loads =
            encoder.encode_descriptor("flywheel_model_loads", "Times the model loaded", None, MetricType::Counter)?;
        for model in engine.models() {
            let labels = ModelLabel { model: model.name().to_string() };
            ConstCounter::new(model.load_count() as u64).encode(loads.encode_family(&labels)?)?;
        }
        type Count = fn(&crate::engine::EngineStats) -> u64;
        let counters: [(&str, &str, Count); 3] = [
            ("flywheel_embedding_tokens", "Input tokens computed for embeddings", |s| s.embedded_tokens.load(Relaxed)),
            ("flywheel_prefix_reused_tokens", "Prompt tokens taken from KV state another sequence computed", |s| {
                s.reused_tokens.load(Relaxed)
            }),
            ("flywheel_preemptions", "Sequences whose KV cells were taken away because the pool ran out", |s| {
                s.preemptions.load(Relaxed)
            }),
        ];
        for (name, help, read) in counters {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for model in engine.models() {
                let labels = ModelLabel { model: model.name().to_string() };
                ConstCounter::new(read(model.stats())).encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for UsageCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(ledger) = self.ledger.get().and_then(Weak::upgrade) else { return Ok(()) };
        let totals = ledger.totals();
        type Read = fn(&crate::tenants::Counts) -> u64;
        let counters: [(&str, &str, Read); 5] = [
            ("flywheel_key_requests", "Requests admitted, by API key name and plugin", |c| c.requests),
            ("flywheel_key_rejected_requests", "Requests refused with 429 by a quota of the key", |c| {
                c.rejected_requests
            }),
            ("flywheel_key_prompt_tokens", "Prompt tokens fed for the key, by plugin", |c| c.prompt_tokens),
            ("flywheel_key_generated_tokens", "Tokens generated for the key, by plugin", |c| c.generated_tokens),
            ("flywheel_key_quota_stops", "Generations the engine stopped because the key's token quota ran out", |c| {
                c.quota_stops
            }),
        ];
        for (name, help, read) in counters {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for ((key, plugin), counts) in &totals {
                let labels = UsageLabels { key: key.clone(), plugin: plugin.clone() };
                ConstCounter::new(read(counts)).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut cpu = encoder.encode_descriptor(
            "flywheel_key_guest_cpu_seconds",
            "CPU time the plugin's instances ran for the key",
            None,
            MetricType::Counter,
        )?;
        for ((key, plugin), counts) in &totals {
            let labels = UsageLabels { key: key.clone(), plugin: plugin.clone() };
            ConstCounter::new(counts.guest_cpu_seconds).encode(cpu.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl StepObserver for Metrics {
    fn model_loaded(&self, model: &str, took: Duration) {
        self.model_load_duration.get_or_create(&ModelLabel { model: model.to_string() }).observe(took.as_secs_f64());
    }

    fn model_load_failed(&self, model: &str) {
        self.model_load_failures.get_or_create(&ModelLabel { model: model.to_string() }).inc();
    }

    fn model_unloaded(&self, model: &str, reason: UnloadReason) {
        let labels = UnloadLabels { model: model.to_string(), reason: reason.as_str().to_string() };
        self.model_unloads.get_or_create(&labels).inc();
    }

    fn on_step(&self, model: &str, step: &StepInfo) {
        let labels = ModelLabel { model: model.to_string() };
        self.generated_tokens.get_or_create(&labels).inc_by(step.decode_tokens as u64);
        self.prefill_tokens.get_or_create(&labels).inc_by(step.prefill_tokens as u64);
        self.batch_tokens.get_or_create(&labels).observe(step.tokens as f64);
        self.batch_sequences.get_or_create(&labels).observe(step.sequences as f64);
        self.step_duration.get_or_create(&labels).observe(step.duration.as_secs_f64());
    }
}

impl PluginObserver for Metrics {
    fn instantiated(&self, plugin: &str, took: Duration) {
        self.instantiation.get_or_create(&PluginLabel { plugin: plugin.to_string() }).observe(took.as_secs_f64());
    }

    fn slots_acquired(&self, plugin: &str, waited: Duration) {
        self.slot_wait.get_or_create(&PluginLabel { plugin: plugin.to_string() }).observe(waited.as_secs_f64());
    }

    fn guest_cpu(&self, plugin: &str, spent: Duration) {
        self.guest_cpu.get_or_create(&PluginLabel { plugin: plugin.to_string() }).inc_by(spent.as_secs_f64());
    }

    fn trapped(&self, plugin: &str, kind: &TrapKind) {
        self.guest_traps
            .get_or_create(&TrapLabels { plugin: plugin.to_string(), kind: kind.label().to_string() })
            .inc();
    }
}

impl NnObserver for Metrics {
    fn first_output(&self, plugin: &str, since_start: Duration) {
        self.time_to_first_token
            .get_or_create(&PluginLabel { plugin: plugin.to_string() })
            .observe(since_start.as_secs_f64());
    }
}
