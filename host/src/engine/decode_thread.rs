//! The decode thread: one OS thread owns every model's llama.cpp context and runs their
//! batch steps in turn.
//!
//! One thread for all models, not one per model: libgomp throttles its spin-waiting once
//! it manages more threads than there are CPUs, and two decoding thread teams on a small
//! machine fight over the same cores anyway. Measured on 2 cores: once a second model had
//! decoded, SmolLM2 dropped from 83 to 56 tok/s with a thread per model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::model::LlamaModel;

use super::backend::{backend, CONTEXT_CREATION};
use super::embedder::{EmbedJob, Embedder};
use super::kv::{context_params, sliding_window};
use super::model::EngineStats;
use super::scheduler::{Command, Scheduler};
use super::{EngineError, ModelManifest, StepObserver};

pub(crate) enum Message {
    /// A command for the model at this index.
    Model(usize, Command),
    /// Inputs to embed with the model at this index.
    Embed(usize, EmbedJob),
    /// Work that must run on the decode thread between steps (the native bench loop).
    Exclusive(Box<dyn FnOnce() + Send>),
}

/// A model's way to its scheduler.
#[derive(Clone)]
pub(crate) struct Link {
    index: usize,
    tx: Sender<Message>,
    alive: Arc<AtomicBool>,
}

impl Link {
    /// False when the decode thread is gone.
    pub(crate) fn send(&self, cmd: Command) -> bool {
        self.tx.send(Message::Model(self.index, cmd)).is_ok()
    }

    /// False when the decode thread is gone.
    pub(crate) fn embed(&self, job: EmbedJob) -> bool {
        self.tx.send(Message::Embed(self.index, job)).is_ok()
    }

    pub(crate) fn run_exclusive(&self, work: Box<dyn FnOnce() + Send>) -> bool {
        self.tx.send(Message::Exclusive(work)).is_ok()
    }

    /// False once the decode thread has died (a panic in llama.cpp's binding, say).
    pub(crate) fn alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }
}

/// What the decode thread needs to serve one model.
pub(crate) struct ModelSetup {
    pub manifest: ModelManifest,
    pub llama: Arc<LlamaModel>,
    pub n_vocab: usize,
    pub stats: Arc<EngineStats>,
}

/// Start the decode thread; returns one link per model once every context exists.
pub(crate) fn start(models: Vec<ModelSetup>, observer: Arc<dyn StepObserver>) -> Result<Vec<Link>, EngineError> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    let count = models.len();
    let alive = Arc::new(AtomicBool::new(true));
    let thread_alive = alive.clone();
    std::thread::Builder::new()
        .name("decode".into())
        .spawn(move || {
            let mut workers = Vec::with_capacity(models.len());
            for m in &models {
                let ctx = {
                    let _guard = CONTEXT_CREATION.lock().unwrap_or_else(|p| p.into_inner());
                    backend().and_then(|b| {
                        m.llama.new_context(b, context_params(&m.manifest)).map_err(|e| EngineError::ContextCreate {
                            model: m.manifest.name.clone(),
                            message: format!(
                                "{e} (is kv cells = context_length x max_sequences too large for memory?)"
                            ),
                        })
                    })
                };
                match ctx {
                    Ok(ctx) => {
                        let n_swa = sliding_window(&m.llama);
                        workers.push(Worker {
                            scheduler: Scheduler::new(
                                &m.manifest,
                                ctx,
                                m.n_vocab,
                                n_swa,
                                m.stats.clone(),
                                observer.clone(),
                            ),
                            embedder: Embedder::new(&m.manifest, &m.llama, m.stats.clone()),
                        })
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
            }
            let _ = ready_tx.send(Ok(()));
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut workers, &rx)));
            if outcome.is_err() {
                // Health checks report it, so the process gets restarted.
                thread_alive.store(false, Ordering::Relaxed);
                tracing::error!("the decode thread panicked; no model can be served");
            }
            tracing::debug!("decode thread stopped");
        })
        .map_err(|e| EngineError::ContextCreate {
            model: "*".into(),
            message: format!("cannot spawn the decode thread: {e}"),
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((0..count).map(|index| Link { index, tx: tx.clone(), alive: alive.clone() }).collect()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(EngineError::ContextCreate { model: "*".into(), message: "the decode thread died".into() }),
    }
}

/// What the decode thread runs for one model: its generation batches and its embeddings.
struct Worker<'m> {
    scheduler: Scheduler<'m>,
    embedder: Embedder<'m>,
}

impl Worker<'_> {
    fn has_work(&self) -> bool {
        self.scheduler.has_work() || self.embedder.has_work()
    }
}

fn dispatch(workers: &mut [Worker<'_>], msg: Message) {
    match msg {
        Message::Model(i, cmd) => {
            if let Some(w) = workers.get_mut(i) {
                w.scheduler.handle(cmd);
            }
        }
        Message::Embed(i, job) => match workers.get_mut(i) {
            Some(w) => w.embedder.push(job),
            None => drop(job),
        },
        Message::Exclusive(work) => work(),
    }
}

/// Steps every model with work, in turn, until every link is dropped.
fn run(workers: &mut [Worker<'_>], rx: &Receiver<Message>) {
    loop {
        if !workers.iter().any(Worker::has_work) {
            // Nothing to compute: sleep until a caller asks for something.
            match rx.recv() {
                Ok(msg) => dispatch(workers, msg),
                Err(_) => return,
            }
            continue;
        }
        while let Ok(msg) = rx.try_recv() {
            dispatch(workers, msg);
        }
        // Let sequences answered by their model's last step join the next one (bounded).
        loop {
            let now = Instant::now();
            let deadline = workers
                .iter()
                .map(|w| &w.scheduler)
                .filter(|s| s.has_work() && s.awaiting_any())
                .map(Scheduler::wait_deadline)
                .filter(|d| *d > now)
                .min();
            let Some(deadline) = deadline else { break };
            match rx.recv_timeout(deadline - now) {
                Ok(msg) => dispatch(workers, msg),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        for w in workers.iter_mut() {
            // Embeddings first: one batch for everything queued, then the generation step.
            if w.embedder.has_work() {
                w.embedder.run();
            }
            if w.scheduler.has_work() {
                w.scheduler.step();
            }
        }
    }
}
