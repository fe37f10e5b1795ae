//! One API key's quotas: requests per minute and tokens per minute (each a bucket of that
//! size refilled evenly over the minute, by `governor`), and requests in flight at once.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::config::KeyConfig;

pub const REQUESTS_PER_MINUTE: &str = "requests_per_minute";
pub const TOKENS_PER_MINUTE: &str = "tokens_per_minute";
pub const MAX_CONCURRENT: &str = "max_concurrent";

/// A quota that said no: which, its limit, and when to come back (`None`: never, the
/// request is larger than the whole quota).
#[derive(Clone, Debug)]
pub struct Refused {
    pub quota: &'static str,
    pub limit: u64,
    pub retry_after: Option<Duration>,
}

impl Refused {
    /// The refusal as the engine and clients see it, for the key named `key`.
    pub fn for_key(&self, key: &str) -> crate::engine::QuotaExceeded {
        crate::engine::QuotaExceeded {
            key: key.to_string(),
            quota: self.quota.to_string(),
            limit: self.limit,
            retry_after: self.retry_after,
        }
    }
}

struct Bucket {
    limit: u32,
    limiter: DefaultDirectRateLimiter,
}

impl Bucket {
    fn per_minute(limit: u32) -> Option<Self> {
        let n = NonZeroU32::new(limit)?;
        Some(Self { limit, limiter: RateLimiter::direct(Quota::per_minute(n)) })
    }

    fn take(&self, n: u32, quota: &'static str) -> Result<(), Refused> {
        let Some(n) = NonZeroU32::new(n) else { return Ok(()) };
        let refused = |retry_after| Refused { quota, limit: u64::from(self.limit), retry_after };
        match self.limiter.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(refused(Some(not_until.wait_time_from(DefaultClock::default().now())))),
            Err(_insufficient) => Err(refused(None)),
        }
    }
}

/// The quotas of one key; absent ones do not limit.
pub struct Limits {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    max_concurrent: Option<u32>,
    in_flight: Arc<AtomicU32>,
}

/// A request counted against `max_concurrent` until it is dropped (its response is done).
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Limits {
    pub fn none() -> Self {
        Self { requests: None, tokens: None, max_concurrent: None, in_flight: Arc::new(AtomicU32::new(0)) }
    }

    pub fn of(key: &KeyConfig) -> Self {
        Self {
            requests: key.requests_per_minute.and_then(Bucket::per_minute),
            tokens: key.tokens_per_minute.and_then(Bucket::per_minute),
            max_concurrent: key.max_concurrent,
            in_flight: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Let a new request in: a place among `max_concurrent`, one request from its bucket, and
    /// one token from its bucket (a key with no tokens left gets no new request; the token
    /// is the request's first, see `Account`).
    pub fn admit(&self) -> Result<InFlight, Refused> {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        let guard = InFlight(self.in_flight.clone());
        if let Some(max) = self.max_concurrent {
            if now > max {
                // Nothing to compute: a place frees when a response ends.
                return Err(Refused {
                    quota: MAX_CONCURRENT,
                    limit: u64::from(max),
                    retry_after: Some(Duration::from_secs(1)),
                });
            }
        }
        if let Some(b) = &self.requests {
            b.take(1, REQUESTS_PER_MINUTE)?;
        }
        if let Some(b) = &self.tokens {
            b.take(1, TOKENS_PER_MINUTE)?;
        }
        Ok(guard)
    }

    /// Take `n` tokens from the key's token bucket.
    pub fn take_tokens(&self, n: u64) -> Result<(), Refused> {
        let Some(b) = &self.tokens else { return Ok(()) };
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        b.take(n, TOKENS_PER_MINUTE)
    }

    /// Whether this key has a token quota (and so paid a token at admission).
    pub fn charges_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rpm: Option<u32>, tpm: Option<u32>, conc: Option<u32>) -> KeyConfig {
        KeyConfig {
            name: "k".into(),
            key: Some("secret".into()),
            key_env: None,
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            max_concurrent: conc,
        }
    }

    #[test]
    fn each_quota_refuses_past_its_limit() {
        let l = Limits::of(&key(Some(2), None, None));
        let (_a, _b) = (l.admit().unwrap(), l.admit().unwrap());
        let e = l.admit().err().unwrap();
        assert_eq!((e.quota, e.limit), (REQUESTS_PER_MINUTE, 2));
        assert!(e.retry_after.is_some_and(|d| d > Duration::from_secs(20) && d <= Duration::from_secs(30)));

        let l = Limits::of(&key(None, None, Some(1)));
        let held = l.admit().unwrap();
        assert_eq!(l.admit().err().unwrap().quota, MAX_CONCURRENT);
        drop(held);
        assert!(l.admit().is_ok());

        let l = Limits::of(&key(None, Some(100), None));
        l.admit().unwrap();
        l.take_tokens(90).unwrap();
        let e = l.take_tokens(20).unwrap_err();
        assert_eq!(e.quota, TOKENS_PER_MINUTE);
        assert!(e.retry_after.is_some());
        assert!(l.take_tokens(500).unwrap_err().retry_after.is_none(), "more than the whole quota never fits");
    }
}
