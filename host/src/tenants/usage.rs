//! The usage ledger: what each API key used of each plugin, as running totals (for
//! `/metrics`) and per minute (for `/admin/usage?since=…`), kept for a retention period.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// What one key used of one plugin.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Requests admitted.
    pub requests: u64,
    /// Requests refused with 429 because a quota was spent.
    pub rejected_requests: u64,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    /// CPU time the plugin's instances ran on the host's threads.
    pub guest_cpu_seconds: f64,
    /// Generations the engine stopped because the key's token quota ran out.
    pub quota_stops: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.rejected_requests += other.rejected_requests;
        self.prompt_tokens += other.prompt_tokens;
        self.generated_tokens += other.generated_tokens;
        self.guest_cpu_seconds += other.guest_cpu_seconds;
        self.quota_stops += other.quota_stops;
    }
}

/// (key name, plugin)
pub type UsageKey = (String, String);

pub struct Ledger {
    retention: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    totals: BTreeMap<UsageKey, Counts>,
    /// Oldest first: (unix minute, counts in that minute).
    minutes: VecDeque<(u64, BTreeMap<UsageKey, Counts>)>,
}

/// One row of a usage report.
#[derive(Clone, Debug, Serialize)]
pub struct UsageRow {
    pub key: String,
    pub plugin: String,
    #[serde(flatten)]
    pub counts: Counts,
}

/// What `/admin/usage` answers.
#[derive(Clone, Debug, Serialize)]
pub struct UsageReport {
    /// Unix seconds: the start of the first minute counted (the minute `since` falls in,
    /// or the oldest minute kept).
    pub since: u64,
    /// Unix seconds: now.
    pub until: u64,
    pub rows: Vec<UsageRow>,
    /// Every row added up, per key.
    pub keys: BTreeMap<String, Counts>,
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

impl Ledger {
    pub fn new(retention: Duration) -> Self {
        Self { retention, inner: Mutex::new(Inner::default()) }
    }

    /// Add to what `key` used of `plugin`, now.
    pub fn record(&self, key: &str, plugin: &str, update: impl Fn(&mut Counts)) {
        let minute = unix_now().as_secs() / 60;
        let keep = (self.retention.as_secs() / 60).max(1);
        let id = (key.to_string(), plugin.to_string());
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        update(inner.totals.entry(id.clone()).or_default());
        if inner.minutes.back().is_none_or(|(m, _)| *m < minute) {
            inner.minutes.push_back((minute, BTreeMap::new()));
        }
        while inner.minutes.front().is_some_and(|(m, _)| *m + keep <= minute) {
            inner.minutes.pop_front();
        }
        if let Some((_, bucket)) = inner.minutes.back_mut() {
            update(bucket.entry(id).or_default());
        }
    }

    /// Running totals since the server started (what `/metrics` shows).
    pub fn totals(&self) -> Vec<(UsageKey, Counts)> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.totals.iter().map(|(k, c)| (k.clone(), c.clone())).collect()
    }

    /// Usage from the minute `since` (unix seconds) falls in until now, optionally of one
    /// key or one plugin.
    pub fn report(&self, since: u64, key: Option<&str>, plugin: Option<&str>) -> UsageReport {
        let now = unix_now().as_secs();
        let first = since / 60;
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let oldest_kept = inner.minutes.front().map_or(now / 60, |(m, _)| *m);
        let mut sums: BTreeMap<UsageKey, Counts> = BTreeMap::new();
        for (_, bucket) in inner.minutes.iter().filter(|(m, _)| *m >= first) {
            for ((k, p), c) in bucket {
                if key.is_some_and(|want| want != k) || plugin.is_some_and(|want| want != p) {
                    continue;
                }
                sums.entry((k.clone(), p.clone())).or_default().add(c);
            }
        }
        let mut keys: BTreeMap<String, Counts> = BTreeMap::new();
        for ((k, _), c) in &sums {
            keys.entry(k.clone()).or_default().add(c);
        }
        let rows = sums.into_iter().map(|((key, plugin), counts)| UsageRow { key, plugin, counts }).collect();
        UsageReport { since: first.max(oldest_kept) * 60, until: now, rows, keys }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_and_reports_add_up_per_key_and_plugin() {
        let ledger = Ledger::new(Duration::from_secs(3600));
        ledger.record("a", "openai", |c| c.requests += 1);
        ledger.record("a", "openai", |c| c.prompt_tokens += 10);
        ledger.record("a", "complete", |c| c.generated_tokens += 3);
        ledger.record("b", "openai", |c| c.rejected_requests += 1);
        let totals = ledger.totals();
        assert_eq!(totals.len(), 3);
        let report = ledger.report(0, None, None);
        assert_eq!(report.keys["a"].prompt_tokens, 10);
        assert_eq!(report.keys["a"].generated_tokens, 3);
        assert_eq!(report.keys["b"].rejected_requests, 1);
        let only_a = ledger.report(0, Some("a"), Some("openai"));
        assert_eq!(only_a.rows.len(), 1);
        assert_eq!(only_a.rows[0].counts.requests, 1);
        // A report from the future counts nothing.
        let later = ledger.report(unix_now().as_secs() + 120, None, None);
        assert!(later.rows.is_empty());
    }
}
