//! `flywheel:llm/quota`: which quota refused a call, for guests to answer with 429.

use wasmtime::component::Resource;

use super::bindings::flywheel::llm::quota::{self, QuotaExceeded};
use super::{NnError, NnView};

impl quota::Host for NnView<'_> {
    fn exceeded(&mut self, e: Resource<NnError>) -> wasmtime::Result<Option<QuotaExceeded>> {
        let error = self.table.get(&e)?;
        Ok(error.quota.as_ref().map(|q| QuotaExceeded {
            key: q.key.clone(),
            quota: q.quota.clone(),
            limit: q.limit,
            retry_after_ms: q.retry_after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }))
    }
}
