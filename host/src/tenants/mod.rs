//! API keys as tenants: who a request runs for, whether its key's quotas let it in, and
//! what each key used of each plugin (the ledger behind `/metrics` and `/admin/usage`).
//!
//! Keys are compared in constant time and never logged or shown: everything outside this
//! module knows a key by its name (`[[auth.keys]]`) or, for unnamed keys, by where it is
//! configured (`key-2`: the second of `auth.api_keys`; `openai-key-1`: the first of the
//! openai plugin's `api_keys`). Nothing derived from a key's value is shown, so `/metrics`
//! gives nobody a way to check guesses at a key.

mod quota;
mod usage;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{AuthConfig, UsageConfig};
use crate::engine::{QuotaExceeded, TokenAccount};
use crate::plugins::RequestAccount;
pub use quota::{Refused, MAX_CONCURRENT, REQUESTS_PER_MINUTE, TOKENS_PER_MINUTE};
pub use usage::{Counts, Ledger, UsageReport, UsageRow};

use quota::{InFlight, Limits};

/// The name of requests made where no key is needed.
pub const ANONYMOUS: &str = "anonymous";

/// One API key: its name and quotas.
pub struct Tenant {
    name: String,
    limits: Limits,
}

impl Tenant {
    fn new(name: String, limits: Limits) -> Arc<Self> {
        Arc::new(Self { name, limits })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests of this key in flight now.
    pub fn in_flight(&self) -> u32 {
        self.limits.in_flight()
    }
}

/// Why a request's key was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing API key: send Authorization: Bearer <key>")]
    Missing,
    #[error("invalid API key")]
    Invalid,
}

pub struct Tenants {
    /// Keys accepted for every plugin.
    keys: Vec<(String, Arc<Tenant>)>,
    /// Tenants of keys that plugin manifests list, by name (created on first use).
    plugin_keys: Mutex<HashMap<String, Arc<Tenant>>>,
    anonymous: Arc<Tenant>,
    ledger: Arc<Ledger>,
}

/// Compare without leaking where the first difference is.
pub fn same_key(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tenants {
    pub fn new(auth: &AuthConfig, usage: &UsageConfig) -> Result<Self, String> {
        let mut keys = Vec::new();
        for (i, key) in auth.api_keys.iter().enumerate() {
            keys.push((key.clone(), Tenant::new(format!("key-{}", i + 1), Limits::none())));
        }
        for k in &auth.keys {
            keys.push((k.secret()?, Tenant::new(k.name.clone(), Limits::of(k))));
        }
        Ok(Self {
            keys,
            plugin_keys: Mutex::new(HashMap::new()),
            anonymous: Tenant::new(ANONYMOUS.into(), Limits::none()),
            ledger: Arc::new(Ledger::new(Duration::from_secs(usage.retention_hours.saturating_mul(3600)))),
        })
    }

    /// Who requests run for where no key is needed.
    pub fn anonymous(&self) -> Arc<Tenant> {
        self.anonymous.clone()
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// Every named and unnamed key's tenant (not those of plugin manifests).
    pub fn tenants(&self) -> impl Iterator<Item = &Arc<Tenant>> {
        self.keys.iter().map(|(_, t)| t)
    }

    /// Who a request with these headers runs for, calling `plugin` (whose manifest lists
    /// `plugin_keys`). With no key configured for the server or the plugin, every request
    /// is let in as `anonymous`.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        plugin: &str,
        plugin_keys: &[String],
    ) -> Result<Arc<Tenant>, AuthError> {
        if self.keys.is_empty() && plugin_keys.is_empty() {
            return Ok(self.anonymous.clone());
        }
        let token = bearer(headers).ok_or(AuthError::Missing)?;
        // Every key is compared, so the time taken does not tell which one matched.
        let mut found = None;
        for (key, tenant) in &self.keys {
            if same_key(key, token) && found.is_none() {
                found = Some(tenant.clone());
            }
        }
        if let Some(tenant) = found {
            return Ok(tenant);
        }
        let mut index = None;
        for (i, key) in plugin_keys.iter().enumerate() {
            if same_key(key, token) && index.is_none() {
                index = Some(i);
            }
        }
        let Some(i) = index else { return Err(AuthError::Invalid) };
        let name = format!("{plugin}-key-{}", i + 1);
        let mut known = self.plugin_keys.lock().unwrap_or_else(|p| p.into_inner());
        let tenant = known.entry(name.clone()).or_insert_with(|| Tenant::new(name, Limits::none()));
        Ok(tenant.clone())
    }

    /// Let a request of `tenant` for `plugin` in, if its key's quotas allow; the admission
    /// holds its place among the key's concurrent requests until dropped.
    pub fn admit(&self, tenant: &Arc<Tenant>, plugin: &str) -> Result<Admission, Refused> {
        match tenant.limits.admit() {
            Ok(in_flight) => {
                self.ledger.record(&tenant.name, plugin, |c| c.requests += 1);
                let account = Arc::new(Account {
                    tenant: tenant.clone(),
                    plugin: plugin.to_string(),
                    ledger: self.ledger.clone(),
                    prepaid: AtomicU64::new(u64::from(tenant.limits.charges_tokens())),
                    stopped: AtomicBool::new(false),
                });
                Ok(Admission { account, _in_flight: in_flight })
            }
            Err(refused) => {
                self.ledger.record(&tenant.name, plugin, |c| c.rejected_requests += 1);
                Err(refused)
            }
        }
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A request let in: what it is charged to, and its place among its key's concurrent
/// requests (given back when this is dropped, when the response ends).
pub struct Admission {
    pub account: Arc<Account>,
    _in_flight: InFlight,
}

/// What one request is charged to: its key's token quota and the ledger.
pub struct Account {
    tenant: Arc<Tenant>,
    plugin: String,
    ledger: Arc<Ledger>,
    /// Tokens taken from the key's bucket at admission, counted against the first charge.
    prepaid: AtomicU64,
    /// The quota already stopped this request once (counted once).
    stopped: AtomicBool,
}

impl Account {
    pub fn key(&self) -> &str {
        &self.tenant.name
    }
}

impl TokenAccount for Account {
    fn charge(&self, prompt: u64, generated: u64) -> Result<(), QuotaExceeded> {
        let cost = prompt + generated;
        // The token taken at admission pays for the first token charged.
        let prepaid = self.prepaid.swap(0, Ordering::Relaxed);
        if let Err(refused) = self.tenant.limits.take_tokens(cost.saturating_sub(prepaid)) {
            self.prepaid.fetch_add(prepaid, Ordering::Relaxed);
            if !self.stopped.swap(true, Ordering::Relaxed) {
                self.ledger.record(&self.tenant.name, &self.plugin, |c| c.quota_stops += 1);
            }
            tracing::info!(key = %self.tenant.name, plugin = %self.plugin, quota = refused.quota, "token quota reached");
            return Err(refused.for_key(&self.tenant.name));
        }
        self.prepaid.fetch_add(prepaid.saturating_sub(cost), Ordering::Relaxed);
        self.ledger.record(&self.tenant.name, &self.plugin, |c| {
            c.prompt_tokens += prompt;
            c.generated_tokens += generated;
        });
        Ok(())
    }
}

impl RequestAccount for Account {
    fn guest_cpu(&self, spent: Duration) {
        self.ledger.record(&self.tenant.name, &self.plugin, |c| c.guest_cpu_seconds += spent.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeyConfig;

    fn headers(key: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, format!("Bearer {key}").parse().unwrap());
        h
    }

    #[test]
    fn keys_resolve_to_names_and_quotas_charge_tokens() {
        let auth = AuthConfig {
            api_keys: vec!["plain-key".into()],
            admin_key: None,
            keys: vec![KeyConfig {
                name: "team-a".into(),
                key: Some("secret-a".into()),
                key_env: None,
                requests_per_minute: None,
                tokens_per_minute: Some(10),
                max_concurrent: None,
            }],
        };
        let tenants = Tenants::new(&auth, &UsageConfig::default()).unwrap();
        let a = tenants.authenticate(&headers("secret-a"), "openai", &[]).unwrap();
        assert_eq!(a.name(), "team-a");
        let plain = tenants.authenticate(&headers("plain-key"), "openai", &[]).unwrap();
        assert_eq!(plain.name(), "key-1");
        assert!(matches!(tenants.authenticate(&headers("nope"), "openai", &[]), Err(AuthError::Invalid)));
        assert!(matches!(tenants.authenticate(&http::HeaderMap::new(), "openai", &[]), Err(AuthError::Missing)));
        let keys = ["other".to_string(), "plugin-only".to_string()];
        let p = tenants.authenticate(&headers("plugin-only"), "complete", &keys).unwrap();
        assert_eq!(p.name(), "complete-key-2");

        // Admission took one token; a prompt of 5 and a generated token cost 5 more.
        let admission = tenants.admit(&a, "openai").unwrap();
        admission.account.charge(5, 1).unwrap();
        admission.account.charge(0, 1).unwrap();
        admission.account.charge(0, 1).unwrap();
        admission.account.charge(0, 1).unwrap();
        // 1 + 5 + 3 = 9 taken: one more fits, the next does not.
        admission.account.charge(0, 1).unwrap();
        let e = admission.account.charge(0, 1).unwrap_err();
        assert_eq!((e.key.as_str(), e.quota.as_str(), e.limit), ("team-a", TOKENS_PER_MINUTE, 10));
        let report = tenants.ledger().report(0, Some("team-a"), None);
        let c = &report.keys["team-a"];
        assert_eq!((c.requests, c.prompt_tokens, c.generated_tokens, c.quota_stops), (1, 5, 5, 1));
    }
}
