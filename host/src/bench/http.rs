//! `flywheel bench http`: a load generator for any OpenAI-compatible endpoint.
//!
//! N workers each run jobs one after another: a job is one streaming request, or for the
//! chat workload a whole conversation whose every turn resends the history plus the last
//! answer. Prompts are fresh for every run, so no cache left by an earlier run helps.
//! Reports aggregate generated tokens per second, time to first token and whole-request
//! latency (p50/p95), time per output token, and errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use super::{median, percentile, synthetic_prompts, LoadStats, Row};

/// The request pattern of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Every request its own random token-id prompt of `prompt_tokens`.
    Distinct,
    /// A system prompt of `shared_tokens` common to the run's requests, then a distinct
    /// question of `prompt_tokens`.
    Shared,
    /// Conversations of `turns` chat turns (`/v1/chat/completions`); each turn sends the
    /// whole history, the last answer and a new question of about `prompt_tokens`.
    Chat,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Distinct => "distinct",
            Workload::Shared => "shared",
            Workload::Chat => "chat",
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub concurrency: Vec<usize>,
    /// Jobs per worker at each concurrency (requests, or conversations for `chat`).
    pub rounds: usize,
    pub workload: Workload,
    pub prompt_tokens: usize,
    /// Shared system prompt length (`shared`).
    pub shared_tokens: usize,
    /// Turns per conversation (`chat`).
    pub turns: usize,
    pub max_tokens: usize,
    /// Vocabulary size, for synthetic token-id prompts.
    pub vocab: usize,
    /// Seed of the first run's prompts; each later run takes the next.
    pub seed: u64,
    /// Sent with every chat request (constrained decoding).
    pub response_format: Option<Value>,
}

/// What a worker sends: a single request, or a conversation of several.
enum Job {
    Tokens(Vec<i32>),
    Conversation(Vec<String>),
}

struct Outcome {
    ttft: Duration,
    latency: Duration,
    tokens: usize,
    text: String,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub async fn run(cfg: &LoadConfig, mut on_row: impl FnMut(&Row)) -> anyhow::Result<Vec<Row>> {
    // A fresh connection per request: servers close idle keep-alive connections on their own
    // schedules (llama-server after 5 s), and a request sent on one just closed fails.
    let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http();
    let cfg = Arc::new(cfg.clone());
    // Warm up: one short request.
    let warm = synthetic_prompts(1, cfg.prompt_tokens.min(64), 0, cfg.vocab, None, 1).remove(0);
    completion(&client, &cfg, Prompt::Tokens(&warm), 4)
        .await
        .map_err(|e| anyhow::anyhow!("warm-up request failed: {e}"))?;
    let mut rows = Vec::new();
    let mut seed = cfg.seed;
    for &c in &cfg.concurrency {
        seed += 1;
        let jobs = jobs(&cfg, c * cfg.rounds.max(1), seed);
        let queue = Arc::new(std::sync::Mutex::new(jobs));
        let start = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..c {
            let (client, cfg, queue) = (client.clone(), cfg.clone(), queue.clone());
            workers.push(tokio::spawn(async move {
                let mut results = Vec::new();
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    let Some(job) = next else { break };
                    run_job(&client, &cfg, job, &mut results).await;
                }
                results
            }));
        }
        let mut outcomes = Vec::new();
        let mut errors = Vec::new();
        for w in workers {
            for r in w.await? {
                match r {
                    Ok(o) => outcomes.push(o),
                    Err(e) => errors.push(e),
                }
            }
        }
        let wall = start.elapsed();
        if let Some(e) = errors.first() {
            tracing::warn!(concurrency = c, errors = errors.len(), first = %e, "requests failed");
        }
        let row = summarize(&cfg, c, &outcomes, errors.len(), wall);
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

fn summarize(cfg: &LoadConfig, c: usize, outcomes: &[Outcome], errors: usize, wall: Duration) -> Row {
    let tokens: usize = outcomes.iter().map(|o| o.tokens).sum();
    let mut ttft: Vec<f64> = outcomes.iter().map(|o| o.ttft.as_secs_f64() * 1e3).collect();
    let mut latency: Vec<f64> = outcomes.iter().map(|o| o.latency.as_secs_f64() * 1e3).collect();
    let mut tpot: Vec<f64> = outcomes
        .iter()
        .filter(|o| o.tokens > 1)
        .map(|o| (o.latency - o.ttft).as_secs_f64() * 1e3 / (o.tokens - 1) as f64)
        .collect();
    let prompt = match cfg.workload {
        Workload::Shared => cfg.shared_tokens + cfg.prompt_tokens,
        _ => cfg.prompt_tokens,
    };
    Row {
        bench: "http",
        mode: cfg.workload.name().into(),
        n: c,
        prompt,
        gen: cfg.max_tokens,
        tok_s: tokens as f64 / wall.as_secs_f64(),
        step_ms: median(&mut tpot),
        ttft_ms: median(&mut ttft),
        prefill_tokens: (outcomes.len() * prompt) as u64,
        load: Some(LoadStats {
            ttft_p95_ms: percentile(&mut ttft, 95.0),
            latency_p50_ms: median(&mut latency),
            latency_p95_ms: percentile(&mut latency, 95.0),
            requests: outcomes.len() + errors,
            errors,
        }),
        ..Row::default()
    }
}

/// The run's jobs, fresh for `seed`.
fn jobs(cfg: &LoadConfig, count: usize, seed: u64) -> Vec<Job> {
    match cfg.workload {
        Workload::Distinct => {
            synthetic_prompts(count, cfg.prompt_tokens, 0, cfg.vocab, None, seed).into_iter().map(Job::Tokens).collect()
        }
        Workload::Shared => {
            let len = cfg.shared_tokens + cfg.prompt_tokens;
            synthetic_prompts(count, len, cfg.shared_tokens, cfg.vocab, None, seed)
                .into_iter()
                .map(Job::Tokens)
                .collect()
        }
        Workload::Chat => {
            // About 1.3 tokens per word with these words.
            let words = (cfg.prompt_tokens * 3 / 4).max(1);
            let mut text = Words::new(seed);
            (0..count)
                .map(|_| Job::Conversation((0..cfg.turns.max(1)).map(|_| text.sentence(words)).collect()))
                .collect()
        }
    }
}

async fn run_job(client: &HttpClient, cfg: &LoadConfig, job: Job, results: &mut Vec<Result<Outcome, String>>) {
    match job {
        Job::Tokens(prompt) => results.push(completion(client, cfg, Prompt::Tokens(&prompt), cfg.max_tokens).await),
        Job::Conversation(questions) => {
            let mut messages = Vec::new();
            for q in questions {
                messages.push(json!({ "role": "user", "content": q }));
                let r = completion(client, cfg, Prompt::Chat(&messages), cfg.max_tokens).await;
                let answer = r.as_ref().map(|o| o.text.clone()).map_err(|_| ());
                results.push(r);
                // A failed turn ends the conversation: its history is gone.
                let Ok(answer) = answer else { break };
                messages.push(json!({ "role": "assistant", "content": answer }));
            }
        }
    }
}

enum Prompt<'a> {
    Tokens(&'a [i32]),
    Chat(&'a [Value]),
}

/// One streaming request; counts tokens from the final usage chunk.
async fn completion(
    client: &HttpClient,
    cfg: &LoadConfig,
    prompt: Prompt<'_>,
    max_tokens: usize,
) -> Result<Outcome, String> {
    let mut body = json!({
        "model": cfg.model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "ignore_eos": true,
        "stream_options": { "include_usage": true },
    });
    let path = match prompt {
        Prompt::Tokens(p) => {
            body["prompt"] = json!(p);
            "completions"
        }
        Prompt::Chat(m) => {
            body["messages"] = json!(m);
            if let Some(format) = &cfg.response_format {
                body["response_format"] = format.clone();
            }
            "chat/completions"
        }
    };
    let mut req = hyper::Request::post(format!("{}/v1/{path}", cfg.url.trim_end_matches('/')))
        .header("content-type", "application/json");
    if let Some(k) = &cfg.api_key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req.body(Full::new(Bytes::from(body.to_string()))).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let resp = client.request(req).await.map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(format!("status {status}: {}", String::from_utf8_lossy(&text)));
    }
    let mut ttft = None;
    let mut tokens = None;
    let mut chunks = 0usize;
    let mut text = String::new();
    let mut buf = String::new();
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("stream broke: {e}"))?;
        let Some(data) = frame.data_ref() else { continue };
        buf.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(payload) = event.trim().strip_prefix("data: ") else { continue };
            if payload == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value = serde_json::from_str(payload).map_err(|e| format!("bad chunk: {e}"))?;
            if v.get("error").is_some() {
                return Err(format!("error event: {payload}"));
            }
            let choice = &v["choices"][0];
            let piece = choice["text"].as_str().or_else(|| choice["delta"]["content"].as_str());
            if let Some(piece) = piece.filter(|t| !t.is_empty()) {
                chunks += 1;
                text.push_str(piece);
                ttft.get_or_insert_with(|| started.elapsed());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = Some(n as usize);
            }
        }
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    Ok(Outcome {
        ttft: ttft.ok_or("no tokens were streamed")?,
        latency: started.elapsed(),
        tokens: tokens.unwrap_or(chunks),
        text,
    })
}

/// Deterministic plain-English questions for chat prompts.
struct Words(u64);

impl Words {
    const LIST: [&'static str; 64] = [
        "river", "garden", "engine", "market", "winter", "signal", "forest", "window", "letter", "silver", "bridge",
        "harbor", "planet", "candle", "meadow", "ticket", "castle", "copper", "valley", "rocket", "pencil", "island",
        "mirror", "basket", "thunder", "orchard", "lantern", "compass", "violin", "glacier", "pepper", "saddle",
        "tunnel", "feather", "cabinet", "desert", "anchor", "blanket", "canyon", "marble", "village", "helmet",
        "journal", "kettle", "ladder", "magnet", "needle", "oyster", "parrot", "quarry", "ribbon", "shadow", "tailor",
        "umbrella", "velvet", "walnut", "yogurt", "zipper", "harvest", "circuit", "dolphin", "falcon", "granite",
        "horizon",
    ];

    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % Self::LIST.len() as u64) as usize
    }

    fn sentence(&mut self, words: usize) -> String {
        let body: Vec<&str> = (0..words).map(|_| Self::LIST[self.next()]).collect();
        format!("Tell me about the {}?", body.join(" "))
    }
}
