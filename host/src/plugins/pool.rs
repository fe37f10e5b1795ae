//! The pooling allocator's slots, shared between plugins by what each component needs.
//!
//! The pool is sized once, when the runtime starts, generously enough for components as
//! large as a snapshotted Python runtime (14 core instances). Each plugin's needs are counted
//! from its component when it loads, and each request takes that many slots of every kind
//! before it instantiates, waiting in line (first come, first served) when the pool is full,
//! so instantiation never fails on an exhausted pool and a big component cannot starve small
//! ones: the line is one line for all of them.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::Component;
use wasmtime::PoolingAllocationConfig;

/// The most of each kind one component may use.
pub const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 32;
pub const MAX_MEMORIES_PER_COMPONENT: u32 = 4;
pub const MAX_TABLES_PER_COMPONENT: u32 = 32;

/// Slots of each kind per instance the pool can hold at once (`plugins.max_instances`): a
/// Python component needs 14 core instances, a Rust one 1 to 3.
const CORE_INSTANCES_PER_INSTANCE: u32 = 16;
const MEMORIES_PER_INSTANCE: u32 = 2;
const TABLES_PER_INSTANCE: u32 = 8;

/// What instantiating one component takes from the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ComponentNeeds {
    pub core_instances: u32,
    pub memories: u32,
    pub tables: u32,
}

impl ComponentNeeds {
    /// Count a compiled component's needs: its core module instantiations (from the binary;
    /// wit-component and componentize tools instantiate each nested component once) and the
    /// memories and tables those modules define (from wasmtime).
    pub fn of(bytes: &[u8], component: &Component) -> Result<Self, String> {
        let required = component
            .resources_required()
            .ok_or("the component imports core modules, so its needs cannot be known before it runs")?;
        let mut core_instances = 0u32;
        for payload in wasmparser::Parser::new(0).parse_all(bytes) {
            let payload = payload.map_err(|e| format!("cannot read the component: {e}"))?;
            if let wasmparser::Payload::InstanceSection(section) = payload {
                for instance in section {
                    let instance = instance.map_err(|e| format!("cannot read the component: {e}"))?;
                    if matches!(instance, wasmparser::Instance::Instantiate { .. }) {
                        core_instances += 1;
                    }
                }
            }
        }
        Ok(Self { core_instances, memories: required.num_memories, tables: required.num_tables })
    }

    /// Why a pool of `pool`'s size can never hold this component, if it cannot.
    pub fn check_fits(&self, pool: &PoolSize) -> Result<(), String> {
        let over = |what: &str, n: u32, max: u32| {
            (n > max).then(|| format!("the component needs {n} {what}; the host allows at most {max} per plugin"))
        };
        let per_plugin = over("core instances", self.core_instances, MAX_CORE_INSTANCES_PER_COMPONENT)
            .or_else(|| over("linear memories", self.memories, MAX_MEMORIES_PER_COMPONENT))
            .or_else(|| over("tables", self.tables, MAX_TABLES_PER_COMPONENT));
        if let Some(e) = per_plugin {
            return Err(e);
        }
        if self.core_instances > pool.core_instances || self.memories > pool.memories || self.tables > pool.tables {
            return Err(format!(
                "the component needs {self:?}, more than the whole pool holds ({pool:?}); raise plugins.max_instances"
            ));
        }
        Ok(())
    }
}

/// The pool's totals, for `max_instances` instances at once.
#[derive(Clone, Copy, Debug)]
pub struct PoolSize {
    pub component_instances: u32,
    pub core_instances: u32,
    pub memories: u32,
    pub tables: u32,
}

impl PoolSize {
    pub fn for_instances(max_instances: u32) -> Self {
        Self {
            component_instances: max_instances,
            core_instances: max_instances.saturating_mul(CORE_INSTANCES_PER_INSTANCE),
            memories: max_instances.saturating_mul(MEMORIES_PER_INSTANCE),
            tables: max_instances.saturating_mul(TABLES_PER_INSTANCE),
        }
    }

    /// The pooling allocator configuration for these totals.
    pub fn pooling_config(&self, max_memory_bytes: usize) -> PoolingAllocationConfig {
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(self.component_instances)
            .total_core_instances(self.core_instances)
            .total_memories(self.memories)
            .total_tables(self.tables)
            .total_stacks(self.component_instances)
            .max_memory_size(max_memory_bytes)
            .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
            .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
            // Keep recently used slots' first pages mapped: instantiation then skips page faults.
            .linear_memory_keep_resident(1 << 20)
            .table_keep_resident(1 << 16)
            .async_stack_keep_resident(1 << 16);
        pool
    }
}

/// The free slots of each kind; requests take what their component needs.
pub(crate) struct SlotBudget {
    // Taken in this order by every request, so two waiting requests never hold what the
    // other waits for.
    component_instances: Arc<Semaphore>,
    core_instances: Arc<Semaphore>,
    memories: Arc<Semaphore>,
    tables: Arc<Semaphore>,
}

/// Slots held by one instance; returned when dropped (after its store is gone).
pub(crate) struct Slots {
    _permits: [OwnedSemaphorePermit; 4],
}

impl SlotBudget {
    pub(crate) fn new(size: PoolSize) -> Self {
        let sem = |n: u32| Arc::new(Semaphore::new(n as usize));
        Self {
            component_instances: sem(size.component_instances),
            core_instances: sem(size.core_instances),
            memories: sem(size.memories),
            tables: sem(size.tables),
        }
    }

    /// Wait for the slots `needs` takes (cancel-safe: dropping the future gives back what it
    /// had taken).
    pub(crate) async fn acquire(&self, needs: ComponentNeeds) -> Slots {
        // The semaphores are never closed, so acquiring cannot fail; a closed one would
        // only mean the runtime is going away, and then waiting forever is harmless.
        async fn take(sem: &Arc<Semaphore>, n: u32) -> OwnedSemaphorePermit {
            match sem.clone().acquire_many_owned(n).await {
                Ok(p) => p,
                Err(_) => std::future::pending().await,
            }
        }
        let a = take(&self.component_instances, 1).await;
        let b = take(&self.core_instances, needs.core_instances).await;
        let c = take(&self.memories, needs.memories).await;
        let d = take(&self.tables, needs.tables).await;
        Slots { _permits: [a, b, c, d] }
    }
}
