//! Who pays for a sequence's tokens. The engine charges the account before it computes a
//! feed and refuses the feed when the account says no, so a token quota stops a generation
//! mid-stream, between two tokens, not only at admission.

use std::time::Duration;

/// Charged by the engine for every feed of a sequence opened with it, and for embeddings.
pub trait TokenAccount: Send + Sync {
    /// Take `prompt` tokens fed and `generated` tokens about to be produced (one per output
    /// row). `Err` refuses the feed: nothing is computed.
    fn charge(&self, prompt: u64, generated: u64) -> Result<(), QuotaExceeded>;
}

/// A quota that refused a charge.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct QuotaExceeded {
    /// Whose quota: the API key's name (never the key).
    pub key: String,
    /// Which quota, as configured: `tokens_per_minute`, `requests_per_minute`, `max_concurrent`.
    pub quota: String,
    pub limit: u64,
    /// When a retry can succeed; `None` when this request can never fit the quota.
    pub retry_after: Option<Duration>,
}

impl QuotaExceeded {
    fn describe(&self) -> String {
        let when = match self.retry_after {
            Some(d) => format!("retry after {:.1} s", d.as_secs_f64()),
            None => "this request needs more than the whole quota".into(),
        };
        format!("rate limit: API key {:?} reached its {} quota of {}; {when}", self.key, self.quota, self.limit)
    }
}
