//! `flywheel bench http`: a load generator for any OpenAI-compatible endpoint.
//!
//! Each of N workers sends streaming `/v1/completions` requests one after another; every
//! request has its own prompt (so no prefix cache helps). Reports aggregate generated
//! tokens per second, time to first token and whole-request latency (p50/p95), time per
//! output token, and errors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{median, percentile, synthetic_prompts, LoadStats, Row};

#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub concurrency: Vec<usize>,
    /// Requests per worker at each concurrency.
    pub rounds: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    /// Vocabulary size, for synthetic token-id prompts.
    pub vocab: usize,
}

struct Outcome {
    ttft: Duration,
    latency: Duration,
    tokens: usize,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub async fn run(cfg: &LoadConfig, mut on_row: impl FnMut(&Row)) -> anyhow::Result<Vec<Row>> {
    let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(256).build_http();
    let cfg = Arc::new(cfg.clone());
    // Warm up: one short request.
    let warm = synthetic_prompts(1, cfg.prompt_tokens, 0, cfg.vocab, None, 1).remove(0);
    one_request(&client, &cfg, &warm, 4).await.map_err(|e| anyhow::anyhow!("warm-up request failed: {e}"))?;
    let mut rows = Vec::new();
    let mut seed = 1000;
    for &c in &cfg.concurrency {
        let total = c * cfg.rounds.max(1);
        seed += 1;
        let prompts = synthetic_prompts(total, cfg.prompt_tokens, 0, cfg.vocab, None, seed);
        let queue = Arc::new(std::sync::Mutex::new(prompts));
        let start = Instant::now();
        let mut workers = Vec::new();
        for _ in 0..c {
            let (client, cfg, queue) = (client.clone(), cfg.clone(), queue.clone());
            workers.push(tokio::spawn(async move {
                let mut results = Vec::new();
                loop {
                    let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
                    let Some(prompt) = next else { break };
                    results.push(one_request(&client, &cfg, &prompt, cfg.max_tokens).await);
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
        let tokens: usize = outcomes.iter().map(|o| o.tokens).sum();
        let mut ttft: Vec<f64> = outcomes.iter().map(|o| o.ttft.as_secs_f64() * 1e3).collect();
        let mut latency: Vec<f64> = outcomes.iter().map(|o| o.latency.as_secs_f64() * 1e3).collect();
        let mut tpot: Vec<f64> = outcomes
            .iter()
            .filter(|o| o.tokens > 1)
            .map(|o| (o.latency - o.ttft).as_secs_f64() * 1e3 / (o.tokens - 1) as f64)
            .collect();
        let row = Row {
            bench: "http",
            mode: "http".into(),
            n: c,
            prompt: cfg.prompt_tokens,
            gen: cfg.max_tokens,
            tok_s: tokens as f64 / wall.as_secs_f64(),
            step_ms: median(&mut tpot),
            ttft_ms: median(&mut ttft),
            prefill_tokens: (outcomes.len() * cfg.prompt_tokens) as u64,
            p50_us: None,
            load: Some(LoadStats {
                ttft_p95_ms: percentile(&mut ttft, 95.0),
                latency_p50_ms: median(&mut latency),
                latency_p95_ms: percentile(&mut latency, 95.0),
                requests: outcomes.len() + errors.len(),
                errors: errors.len(),
            }),
        };
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// One streaming completion; counts tokens from the final usage chunk.
async fn one_request(
    client: &HttpClient,
    cfg: &LoadConfig,
    prompt: &[i32],
    max_tokens: usize,
) -> Result<Outcome, String> {
    let body = serde_json::json!({
        "model": cfg.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "ignore_eos": true,
        "stream_options": { "include_usage": true },
    });
    let mut req = hyper::Request::post(format!("{}/v1/completions", cfg.url.trim_end_matches('/')))
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
            let v: serde_json::Value = serde_json::from_str(payload).map_err(|e| format!("bad chunk: {e}"))?;
            if v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) {
                chunks += 1;
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
    })
}
