//! The `flywheel` command line.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use flywheel::bench;
use flywheel::config::{Config, LogFormat};
use flywheel::engine::{Engine, Model, ModelManifest, NoObserver, Output, Want};
use flywheel::plugins::{PluginRuntime, RuntimeConfig};
use flywheel::server::Server;

mod fleet;
use fleet::DeployArgs;

#[derive(Parser)]
#[command(name = "flywheel", version, about = "Serverless WebAssembly runtime for LLM inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve(ServeArgs),
    /// Generate text once with a model and print it (greedy).
    Generate(GenerateArgs),
    /// Inspect model manifests.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Benchmarks that print a table (or JSON rows).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Work with plugin components.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Deploy a plugin to nodes through their admin API, or roll them back.
    Deploy(DeployArgs),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Check a plugin file as the server would load it (its manifest beside it, the pool's
    /// limits, linking against the host's imports) and print what one instance needs.
    Check {
        /// The component (`<name>.wasm`, with `<name>.toml` beside it if it has a manifest).
        wasm: PathBuf,
        /// Configuration file whose `[plugins]` limits apply (defaults without one).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Compile cache to use and fill (the server's `plugins.cache_dir`).
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Push a plugin to an OCI registry as a Wasm artifact (the layout `wkg` and Spin use),
    /// its manifest as an annotation; prints the reference pinned by digest.
    Push {
        /// The component (`<name>.wasm`, with `<name>.toml` beside it if it has a manifest).
        wasm: PathBuf,
        /// Where to: `<registry>/<repository>:<tag>` (`oci://` optional).
        reference: String,
        /// Manifest to push instead of the `.toml` beside the component.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Configuration file whose `[[registries]]` give auth and transport (default:
        /// ./flywheel.toml if present).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (see flywheel.example.toml); defaults apply without one.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override the listen address.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

#[derive(Args)]
struct ModelArgs {
    /// Folder of model manifests.
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    /// Model name (default: smollm2).
    #[arg(long, default_value = "smollm2")]
    model: String,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (a user message, rendered with the model's chat template unless --raw).
    prompt: String,
    /// Use the prompt as-is, without the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// List manifests and whether their weights are present.
    List {
        #[arg(long, default_value = "models")]
        models_dir: PathBuf,
    },
    /// Write a random-weight GGUF model of a real llama shape (for benchmarks where real
    /// weights cannot go), with a manifest beside it.
    Synth(SynthArgs),
}

#[derive(Args)]
struct SynthArgs {
    /// The GGUF file to write; its manifest goes beside it as `<name>.toml`.
    out: PathBuf,
    /// `tiny` (what the tests load) or `llama-1b` (TinyLlama 1.1B's shape).
    #[arg(long, default_value = "llama-1b")]
    shape: String,
    /// How weight matrices are stored: `f32`, `f16` or `q8_0`.
    #[arg(long, default_value = "f16")]
    r#type: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The manifest's per-sequence context.
    #[arg(long, default_value_t = 2048)]
    context_length: u32,
    /// The manifest's `n_gpu_layers` (a large number offloads every layer).
    #[arg(long, default_value_t = 0)]
    n_gpu_layers: u32,
    /// The manifest's `max_sequences`.
    #[arg(long, default_value_t = 16)]
    max_sequences: usize,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The engine's continuous batching against a native llama-cpp-2 lockstep loop.
    Engine(EngineBenchArgs),
    /// The `complete` plugin's decode loop through wasi-nn against the engine.
    Plugin(PluginBenchArgs),
    /// Load generator for any OpenAI-compatible endpoint (streaming completions).
    Http(HttpBenchArgs),
}

#[derive(Args)]
struct HttpBenchArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, default_value = "smollm2")]
    model: String,
    #[arg(long, env = "OPENAI_API_KEY")]
    api_key: Option<String>,
    /// Concurrent clients, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Jobs each client runs per concurrency: requests, or conversations for `chat`.
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// The request pattern.
    #[arg(long, value_enum, default_value = "distinct")]
    workload: bench::http::Workload,
    /// Prompt length in tokens (random ids, distinct per request); for `shared` the part
    /// after the system prompt, for `chat` the approximate length of each question.
    #[arg(long, default_value_t = 64)]
    prompt_tokens: usize,
    /// Length of the system prompt common to a run's requests (`shared`).
    #[arg(long, default_value_t = 300)]
    shared_tokens: usize,
    /// Turns per conversation (`chat`).
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Seed of the prompts; give each run of a comparison its own, so no cache from an
    /// earlier run helps.
    #[arg(long, default_value_t = 1000)]
    seed: u64,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Vocabulary size of the model, for the random prompt ids.
    #[arg(long, default_value_t = 49152)]
    vocab: usize,
    /// A `response_format` object (JSON) for every request of the `chat` workload, to
    /// measure constrained decoding.
    #[arg(long, value_parser = parse_json)]
    response_format: Option<serde_json::Value>,
    #[arg(long)]
    json: bool,
}

fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

/// Workload and output settings shared by the engine and plugin benchmarks.
#[derive(Args)]
struct BenchRunArgs {
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 64)]
    prompt: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// Override the manifest's thread count.
    #[arg(long)]
    threads: Option<i32>,
    /// Alternating runs per configuration (rows report the median).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// One JSON object per row instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct PluginBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The compiled `complete` plugin.
    #[arg(long, default_value = "target/wasm32-wasip2/guest/complete.wasm")]
    plugin: PathBuf,
    /// Concurrent sequences to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    n: Vec<usize>,
    /// Only measure instantiation (works with any plugin, not just `complete`).
    #[arg(long)]
    instantiate_only: bool,
    /// Also run this many requests at once (32 tokens each) and report peak RSS per instance.
    #[arg(long, default_value_t = 0)]
    instances: usize,
    #[command(flatten)]
    run: BenchRunArgs,
}

#[derive(Args)]
struct EngineBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Concurrent sequences to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    n: Vec<usize>,
    #[command(flatten)]
    run: BenchRunArgs,
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn load_manifest(args: &ModelArgs) -> anyhow::Result<ModelManifest> {
    let path = args.models_dir.join(format!("{}.toml", args.model));
    if path.exists() {
        return Ok(ModelManifest::from_file(&path)?);
    }
    let all = ModelManifest::load_dir(&args.models_dir)?;
    all.into_iter()
        .find(|m| m.name == args.model)
        .with_context(|| format!("no manifest in {} names model {:?}", args.models_dir.display(), args.model))
}

fn load_model(manifest: ModelManifest) -> anyhow::Result<Arc<Model>> {
    let engine = Engine::load(vec![manifest], Arc::new(NoObserver))?;
    let model = engine.models().next().and_then(|h| h.loaded());
    model.context("no model loaded")
}

fn main() -> anyhow::Result<()> {
    if let Err(e) = flywheel::sys::limit_openmp_spinning() {
        eprintln!("warning: cannot set GOMP_SPINCOUNT ({e}); llama.cpp's threads keep spinning longer between steps");
    }
    let cli = Cli::parse();
    if let Command::Serve(args) = cli.command {
        return serve(args);
    }
    init_logging("warn,flywheel=info,llama-cpp-2=warn", LogFormat::Text);
    match cli.command {
        Command::Serve(_) => unreachable!("handled above"),
        Command::Generate(args) => small_runtime()?.block_on(generate(args)),
        Command::Models(ModelsCommand::List { models_dir }) => list_models(&models_dir),
        Command::Models(ModelsCommand::Synth(args)) => synth_model(&args),
        // One thread for the callers: the decode threads get the cores, as in the native loop.
        Command::Bench(BenchCommand::Engine(args)) => small_runtime()?.block_on(bench_engine(args)),
        // Guests run on the server's runtime (a worker per core), as they would when serving.
        Command::Bench(BenchCommand::Plugin(args)) => server_runtime()?.block_on(bench_plugin(args)),
        Command::Bench(BenchCommand::Http(args)) => small_runtime()?.block_on(bench_http(args)),
        Command::Deploy(args) => small_runtime()?.block_on(fleet::deploy(args)),
        Command::Plugin(PluginCommand::Check { wasm, config, cache_dir, json }) => {
            small_runtime()?.block_on(check_plugin(&wasm, config.as_deref(), cache_dir, json))
        }
        Command::Plugin(PluginCommand::Push { wasm, reference, manifest, config }) => {
            small_runtime()?.block_on(fleet::push_plugin(&wasm, &reference, manifest.as_deref(), config.as_deref()))
        }
    }
}

/// The config a command names, else ./flywheel.toml if present, else the defaults.
pub(crate) fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::from_file(path)?,
        None if Path::new("flywheel.toml").exists() => Config::from_file(Path::new("flywheel.toml"))?,
        None => Config::default(),
    })
}

async fn check_plugin(
    wasm: &Path,
    config: Option<&Path>,
    cache_dir: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let config = match config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let mut runtime = RuntimeConfig::new(wasm.parent().unwrap_or(Path::new(".")));
    runtime.max_instances = config.plugins.max_instances;
    runtime.max_memory_mb = config.plugins.max_memory_mb;
    runtime.cache_dir = cache_dir;
    let check = flywheel::plugins::check_plugin(wasm, &runtime)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", wasm.display()))?;
    if json {
        println!("{}", serde_json::to_string(&check)?);
    } else {
        println!(
            "{}: ok ({:.1} MB, sha256 {}, loaded in {:.0} ms{}); one instance takes {} core instances, {} memories, {} tables",
            check.name,
            check.bytes as f64 / 1e6,
            &check.sha256[..12],
            check.load_ms,
            if check.from_cache { " from the compile cache" } else { "" },
            check.needs.core_instances,
            check.needs.memories,
            check.needs.tables
        );
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = load_config(args.config.as_deref())?;
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    init_logging(&config.log.level, config.log.format);
    match flywheel::sys::raise_open_file_limit() {
        Ok(limit) => tracing::info!(open_files = limit, connections = config.server.connection_limit(), "file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    server_runtime()?.block_on(async {
        let server = Server::start(config).await?;
        server.run_until_signal().await
    })
}

/// The server's runtime: one worker thread per core.
fn server_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// A single-threaded runtime for commands whose async work is light.
fn small_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

async fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let model = load_model(load_manifest(&args.model)?)?;
    let text = if args.raw {
        args.prompt.clone()
    } else {
        model.apply_chat_template(&[("user".into(), args.prompt.clone())], true)?
    };
    let prompt = model.tokenize(&text, true, true)?;
    let mut seq = model.open().await?;
    let want = Want::top(1);
    let mut input = prompt;
    let mut pending: Vec<u8> = Vec::new();
    let mut stdout = std::io::stdout().lock();
    for _ in 0..args.max_tokens {
        let Output::TopK { ids, .. } = seq.feed(&input, want.clone()).await? else {
            anyhow::bail!("unexpected output kind");
        };
        let next = *ids.first().context("no candidate")?;
        if model.is_end_of_generation(next) {
            break;
        }
        // Print whole UTF-8 characters only; a character may span tokens.
        pending.extend(model.token_bytes(&[next], false)?.concat());
        let valid = match std::str::from_utf8(&pending) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        stdout.write_all(&pending[..valid])?;
        stdout.flush()?;
        pending.drain(..valid);
        input = vec![next];
    }
    writeln!(stdout)?;
    Ok(())
}

fn list_models(dir: &Path) -> anyhow::Result<()> {
    for m in ModelManifest::load_dir(dir)? {
        let state = if m.file.exists() { "present" } else { "not fetched" };
        println!("{:<14} {:<12} {}  {}", m.name, state, m.file.display(), m.description);
    }
    Ok(())
}

fn synth_model(args: &SynthArgs) -> anyhow::Result<()> {
    use flywheel::synthetic::{Shape, SyntheticModel, WeightType};
    let shape = Shape::by_name(&args.shape).with_context(|| format!("no shape {:?} (tiny, llama-1b)", args.shape))?;
    let weights =
        WeightType::by_name(&args.r#type).with_context(|| format!("no type {:?} (f32, f16, q8_0)", args.r#type))?;
    let name = args
        .out
        .file_stem()
        .and_then(|s| s.to_str())
        .context("the output needs a file name, such as llama-1b.gguf")?
        .to_string();
    let model =
        SyntheticModel { shape, weights, seed: args.seed, context_length: args.context_length, ..Default::default() };
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let started = std::time::Instant::now();
    model.write_to(&args.out)?;
    let file = args.out.file_name().and_then(|f| f.to_str()).unwrap_or_default();
    let manifest = format!(
        "# Random weights of the {shape} shape ({weights}), written by `flywheel models synth`.\n\
         name = {name:?}\ndescription = \"synthetic {shape} {weights}, seed {seed}\"\nfile = {file:?}\n\
         context_length = {ctx}\nn_gpu_layers = {ngl}\nmax_sequences = {seqs}\n",
        shape = args.shape,
        weights = args.r#type,
        seed = args.seed,
        ctx = args.context_length,
        ngl = args.n_gpu_layers,
        seqs = args.max_sequences,
    );
    let manifest_path = args.out.with_extension("toml");
    std::fs::write(&manifest_path, manifest).with_context(|| format!("writing {}", manifest_path.display()))?;
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({:.1} MiB, {} tokens of vocabulary, {:.1} s) and {}",
        args.out.display(),
        bytes as f64 / (1 << 20) as f64,
        model.n_vocab(),
        started.elapsed().as_secs_f64(),
        manifest_path.display()
    );
    Ok(())
}

async fn bench_engine(args: EngineBenchArgs) -> anyhow::Result<()> {
    let max_n = args.n.iter().copied().max().unwrap_or(1);
    let manifest = bench_manifest(&args.model, &args.run, max_n)?;
    let title = format!(
        "bench engine: model {} threads {} (prompt {}, gen {}, greedy)",
        manifest.name, manifest.threads, args.run.prompt, args.run.gen
    );
    let model = load_model(manifest)?;
    let b = bench::engine::EngineBench {
        ns: args.n,
        prompt: args.run.prompt,
        gen: args.run.gen,
        repeat: args.run.repeat,
        ..Default::default()
    };
    let json = args.run.json;
    let rows = b
        .run(&model, |r| {
            if !json {
                eprintln!("  measured {} n={}: {:.1} tok/s", r.mode, r.n, r.tok_s);
            }
        })
        .await?;
    bench::print_table(&title, &rows, json);
    if !json {
        print_engine_ratios(&rows);
    }
    Ok(())
}

async fn bench_http(args: HttpBenchArgs) -> anyhow::Result<()> {
    let cfg = bench::http::LoadConfig {
        url: args.url.clone(),
        model: args.model.clone(),
        api_key: args.api_key.clone(),
        concurrency: args.concurrency.clone(),
        rounds: args.rounds,
        workload: args.workload,
        prompt_tokens: args.prompt_tokens,
        shared_tokens: args.shared_tokens,
        turns: args.turns,
        max_tokens: args.max_tokens,
        vocab: args.vocab,
        seed: args.seed,
        response_format: args.response_format.clone(),
    };
    if cfg.response_format.is_some() && cfg.workload != bench::http::Workload::Chat {
        anyhow::bail!("--response-format needs --workload chat (completions take no response_format)");
    }
    let json = args.json;
    let rows = bench::http::run(&cfg, |r| {
        if !json {
            eprintln!("  measured concurrency {}: {:.1} tok/s", r.n, r.tok_s);
        }
    })
    .await?;
    let title = format!(
        "bench http: {} model {} ({} workload, prompt {} tokens, {} generated, streamed, {} jobs per client)",
        args.url,
        args.model,
        args.workload.name(),
        args.prompt_tokens,
        args.max_tokens,
        args.rounds
    );
    bench::print_table(&title, &rows, json);
    Ok(())
}

/// The manifest a bench uses: the named model, sized for the runs.
fn bench_manifest(args: &ModelArgs, run: &BenchRunArgs, max_n: usize) -> anyhow::Result<ModelManifest> {
    let mut manifest = load_manifest(args)?;
    if let Some(t) = run.threads {
        manifest.threads = t;
    }
    manifest.max_sequences = manifest.max_sequences.max(max_n);
    manifest.context_length = manifest.context_length.min((run.prompt + run.gen).next_power_of_two().max(256));
    manifest.validate().map_err(|e| anyhow::anyhow!("model {} with these bench settings: {e}", manifest.name))?;
    Ok(manifest)
}

async fn bench_plugin(args: PluginBenchArgs) -> anyhow::Result<()> {
    let max_n = args.n.iter().copied().max().unwrap_or(1).max(args.instances);
    let manifest = bench_manifest(&args.model, &args.run, max_n)?;
    let title = format!(
        "bench plugin: model {} threads {} (prompt {}, gen {}, greedy, streamed)",
        manifest.name, manifest.threads, args.run.prompt, args.run.gen
    );
    let model_name = manifest.name.clone();
    let engine = Arc::new(Engine::load(vec![manifest], Arc::new(NoObserver))?);
    let model = engine.model(&model_name)?.loaded().context("the model did not load")?;
    // A private plugin directory holding just the `complete` plugin.
    let dir = std::env::temp_dir().join(format!("flywheel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(&args.plugin, dir.join("complete.wasm"))
        .with_context(|| format!("cannot read {}; build it with scripts/build-plugins.sh", args.plugin.display()))?;
    std::fs::write(
        dir.join("complete.toml"),
        "max_concurrency = 256
deadline_ms = 600000
",
    )?;
    let mut config = RuntimeConfig::new(&dir);
    config.reload_interval = None;
    config.probe_first_host_call = true;
    config.cache_dir = Some(dir.join("cache"));
    let probes = Arc::new(bench::plugin::Probes::default());
    // A restart's first answer: with an empty compile cache (the plugin changed), then with
    // the cache the first start filled.
    let mut restart_rows = Vec::new();
    for mode in ["restart-to-first-answer-cold-cache", "restart-to-first-answer-warm-cache"] {
        let started = std::time::Instant::now();
        let runtime = PluginRuntime::start(engine.clone(), config.clone(), probes.clone(), probes.clone()).await?;
        let plugin = loaded_bench_plugin(&runtime)?;
        bench::plugin::empty_request(&runtime, &plugin).await?;
        let once_ms = Some(started.elapsed().as_secs_f64() * 1e3);
        let from_cache = plugin.from_cache;
        anyhow::ensure!(from_cache == mode.ends_with("warm-cache"), "{mode}: from_cache = {from_cache}");
        restart_rows.push(bench::Row { bench: "plugin", mode: mode.into(), n: 1, once_ms, ..Default::default() });
    }
    let runtime = PluginRuntime::start(engine, config, probes.clone(), probes.clone()).await?;
    let plugin = loaded_bench_plugin(&runtime)?;
    let b = bench::plugin::PluginBench {
        ns: args.n,
        prompt: args.run.prompt,
        gen: args.run.gen,
        repeat: args.run.repeat,
        instantiate_only: args.instantiate_only,
        instances: args.instances,
        ..Default::default()
    };
    let json = args.run.json;
    let mut rows = b
        .run(&runtime, &plugin, &model, &probes, |r| {
            if !json && r.p50_us.is_none() {
                eprintln!("  measured {} n={}: {:.1} tok/s", r.mode, r.n, r.tok_s);
            }
        })
        .await?;
    let _ = std::fs::remove_dir_all(&dir);
    rows.extend(restart_rows);
    bench::print_table(&title, &rows, json);
    if !json {
        println!(
            "
plugin / engine tok/s:"
        );
        for r in rows.iter().filter(|r| r.mode == "plugin") {
            if let Some(e) = rows.iter().find(|x| x.mode == "engine" && x.n == r.n) {
                println!("  n={:<3} {:.3}", r.n, r.tok_s / e.tok_s);
            }
        }
        for r in rows.iter().filter(|r| r.mode == "plugin-full-logits") {
            if let Some(p) = rows.iter().find(|x| x.mode == "plugin" && x.n == r.n) {
                println!("  n={:<3} full logits costs {:+.2} ms per step over top-k", r.n, r.step_ms - p.step_ms);
            }
        }
    }
    Ok(())
}

fn loaded_bench_plugin(runtime: &PluginRuntime) -> anyhow::Result<Arc<flywheel::plugins::Plugin>> {
    let set = runtime.plugins();
    set.plugins.get("complete").cloned().with_context(|| {
        let why: Vec<_> = set.failures.iter().map(|f| f.error.clone()).collect();
        format!("the complete plugin did not load: {why:?}")
    })
}

fn print_engine_ratios(rows: &[bench::Row]) {
    println!("\nengine / native tok/s:");
    for r in rows.iter().filter(|r| r.mode == "engine") {
        if let Some(native) = rows.iter().find(|x| x.mode == "native" && x.n == r.n) {
            println!("  n={:<3} {:.3}", r.n, r.tok_s / native.tok_s);
        }
    }
    let distinct = rows.iter().filter(|r| r.mode == "engine").max_by_key(|r| r.n);
    let shared = rows.iter().find(|r| r.mode == "engine-shared-prefix");
    if let (Some(d), Some(s)) = (distinct, shared) {
        println!(
            "shared prefix at n={}: prefill {:.2}x, ttft {:.2}x, tok/s {:.2}x of distinct prompts",
            s.n,
            s.prefill_tokens as f64 / d.prefill_tokens.max(1) as f64,
            s.ttft_ms / d.ttft_ms.max(1e-9),
            s.tok_s / d.tok_s.max(1e-9)
        );
    }
}
