//! Benchmarks kept with the project: `flywheel bench engine|plugin|http`.
//!
//! Every bench prints a table and, with `--json`, one JSON object per row.

pub mod engine;
pub mod http;
pub mod plugin;

use serde::Serialize;

/// One measured configuration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Row {
    pub bench: &'static str,
    pub mode: String,
    /// Concurrent sequences.
    pub n: usize,
    /// Prompt tokens per sequence.
    pub prompt: usize,
    /// Generated tokens per sequence.
    pub gen: usize,
    /// Generated tokens per second, all sequences together, open to last token.
    pub tok_s: f64,
    /// Mean wall time of one generation step once every sequence is decoding.
    pub step_ms: f64,
    /// Median time from a sequence's open to its first generated token.
    pub ttft_ms: f64,
    /// Prompt tokens actually computed (shared prefixes count once).
    pub prefill_tokens: u64,
    /// Median latency of a single operation, for rows that measure one (instantiation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_us: Option<f64>,
    /// A single measured latency (a restart's first answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub once_ms: Option<f64>,
    /// Peak resident memory added per concurrent instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_per_instance_mib: Option<f64>,
    /// Load-generator rows: tails, whole-request latency, counts.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub load: Option<LoadStats>,
}

/// What `bench http` adds to a row.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadStats {
    pub ttft_p95_ms: f64,
    pub latency_p50_ms: f64,
    pub latency_p95_ms: f64,
    pub requests: usize,
    pub errors: usize,
}

pub fn print_table(title: &str, rows: &[Row], json: bool) {
    if json {
        for r in rows {
            match serde_json::to_string(r) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("cannot encode row: {e}"),
            }
        }
        return;
    }
    println!("{title}");
    let is_run = |r: &Row| r.p50_us.is_none() && r.load.is_none() && r.once_ms.is_none();
    if rows.iter().any(is_run) {
        println!(
            "{:<22} {:>4} {:>7} {:>5} {:>10} {:>9} {:>9} {:>9}",
            "mode", "n", "prompt", "gen", "tok/s", "step ms", "ttft ms", "prefill"
        );
    }
    for r in rows.iter().filter(|r| is_run(r)) {
        print!(
            "{:<22} {:>4} {:>7} {:>5} {:>10.1} {:>9.2} {:>9.1} {:>9}",
            r.mode, r.n, r.prompt, r.gen, r.tok_s, r.step_ms, r.ttft_ms, r.prefill_tokens
        );
        match r.rss_per_instance_mib {
            Some(mib) => println!("  peak RSS +{mib:.2} MiB per instance"),
            None => println!(),
        }
    }
    let load: Vec<_> = rows.iter().filter_map(|r| r.load.as_ref().map(|l| (r, l))).collect();
    if !load.is_empty() {
        println!(
            "{:<6} {:>7} {:>5} {:>9} {:>10} {:>9} {:>9} {:>10} {:>10} {:>8} {:>6}",
            "conc",
            "prompt",
            "gen",
            "requests",
            "tok/s",
            "ttft p50",
            "ttft p95",
            "lat p50",
            "lat p95",
            "tpot ms",
            "errors"
        );
        for (r, l) in load {
            println!(
                "{:<6} {:>7} {:>5} {:>9} {:>10.1} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>8.2} {:>6}",
                r.n,
                r.prompt,
                r.gen,
                l.requests,
                r.tok_s,
                r.ttft_ms,
                l.ttft_p95_ms,
                l.latency_p50_ms,
                l.latency_p95_ms,
                r.step_ms,
                l.errors
            );
        }
    }
    for r in rows.iter().filter(|r| r.p50_us.is_some()) {
        print!("{:<22} p50 {:>8.1} µs", r.mode, r.p50_us.unwrap_or(0.0));
        if let Some(p99) = r.p99_us {
            print!("  p99 {p99:>8.1} µs");
        }
        println!(" over {} requests", r.n);
    }
    for r in rows.iter().filter(|r| r.once_ms.is_some()) {
        println!("{:<32} {:>8.1} ms", r.mode, r.once_ms.unwrap_or(0.0));
    }
}

/// Median of a list of values.
pub fn median(values: &mut [f64]) -> f64 {
    percentile(values, 50.0)
}

/// The `p`th percentile (nearest rank, interpolated between neighbours).
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = (p / 100.0) * (values.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    values[lo] + (values[hi] - values[lo]) * (rank - lo as f64)
}

/// Deterministic prompts of ordinary vocabulary tokens (BOS first), distinct from the
/// second token on, so no two share a reusable prefix unless asked to.
pub fn synthetic_prompts(
    n: usize,
    len: usize,
    shared_prefix: usize,
    vocab: usize,
    bos: Option<i32>,
    seed: u64,
) -> Vec<Vec<i32>> {
    // Skip the low ids, where vocabularies keep their special tokens.
    let lo = 1000.min(vocab / 4) as u64;
    let hi = (vocab as u64).min(40_000).max(lo + 1);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (lo + state % (hi - lo)) as i32
    };
    let head: Vec<i32> = bos.into_iter().collect();
    let prefix: Vec<i32> = (0..shared_prefix.saturating_sub(head.len())).map(|_| next()).collect();
    (0..n)
        .map(|_| {
            let mut p = head.clone();
            if shared_prefix > 0 {
                p.extend(&prefix);
            }
            while p.len() < len {
                p.push(next());
            }
            p.truncate(len);
            p
        })
        .collect()
}
