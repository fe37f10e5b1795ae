//! Accepting client connections and holding each within limits: a cap on how many are
//! open, and bounds on a client that sends its headers slowly, sits idle, or stops reading.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::body::{BoxError, ServerBody};
use super::AppState;
use crate::config::ServerConfig;

/// The limits one connection is held to.
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub write_stall_timeout: Duration,
}

impl ConnLimits {
    pub fn from_config(c: &ServerConfig) -> Self {
        Self {
            // A semaphore holds at most this many permits; no machine holds more sockets.
            max_connections: c.connection_limit().clamp(1, 1 << 24),
            header_timeout: Duration::from_millis(c.header_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            write_stall_timeout: Duration::from_millis(c.write_stall_timeout_ms),
        }
    }

    /// How often a connection checks its timeouts: a fraction of the shortest, within
    /// bounds that keep thousands of idle connections cheap.
    fn check_every(&self) -> Duration {
        let shortest = self.header_timeout.min(self.idle_timeout).min(self.write_stall_timeout);
        (shortest / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
    }
}

/// Where the server is in its life, as each connection sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Finish what is in flight, take nothing new.
    Draining,
    /// The grace period is over: close now.
    Closing,
}

/// Serve until `shutdown` resolves, then stop accepting and give open connections up to
/// the configured grace period to finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let limits = ConnLimits::from_config(&state.server);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own header timer closes an HTTP/1.1 connection whose request headers are late,
    // including a keep-alive connection that waits that long for its next request.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    // Pings find HTTP/2 peers that vanished without closing.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (phase, phase_rx) = watch::channel(Phase::Serving);
    tracing::info!(max_connections = limits.max_connections, "accepting connections");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    state.metrics.record_connection_closed("over_capacity");
                    tokio::spawn(refuse(stream));
                    continue;
                };
                let conn = ConnTask {
                    builder: builder.clone(),
                    state: state.clone(),
                    limits,
                    phase: phase_rx.clone(),
                };
                tokio::spawn(async move {
                    conn.run(stream, peer).await;
                    drop(permit);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    state.draining.store(true, Ordering::Relaxed);
    drop(listener);
    let _ = phase.send(Phase::Draining);
    let grace = Duration::from_millis(state.server.shutdown_grace_ms);
    tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down: finishing in-flight requests");
    // Every connection holds a permit: all of them back means all connections closed.
    let all = limits.max_connections as u32;
    match tokio::time::timeout(grace, permits.acquire_many(all)).await {
        Ok(_) => tracing::info!("all connections closed"),
        Err(_) => {
            tracing::warn!("grace period over; closing the remaining connections");
            let _ = phase.send(Phase::Closing);
            let _ = tokio::time::timeout(Duration::from_secs(1), permits.acquire_many(all)).await;
        }
    }
    Ok(())
}

/// Past the connection cap: a plain 503 the client can read, then close.
async fn refuse(mut stream: TcpStream) {
    let body = r#"{"error":{"message":"the server is at its connection limit; retry later","type":"overloaded_error","param":null,"code":503}}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let send = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent, so closing does not reset the connection under the
        // response before the client has read it.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), send).await;
}

struct ConnTask {
    builder: auto::Builder<TokioExecutor>,
    state: Arc<AppState>,
    limits: ConnLimits,
    phase: watch::Receiver<Phase>,
}

impl ConnTask {
    async fn run(mut self, stream: TcpStream, peer: std::net::SocketAddr) {
        let metrics = self.state.metrics.clone();
        metrics.open_connections.inc();
        let activity = Arc::new(Activity::new());
        let io = WatchedIo { inner: stream, activity: activity.clone() };
        let state = self.state.clone();
        let requests = activity.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            let request = requests.begin_request();
            async move {
                let resp = super::handle(state, req).await;
                let resp = resp.map(|body| RequestBody { inner: body, _request: request }.boxed_unsync());
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        let conn = self.builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut check = tokio::time::interval(self.limits.check_every());
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing = false;
        loop {
            tokio::select! {
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    break;
                }
                _ = check.tick() => match activity.verdict(&self.limits) {
                    Verdict::Fine => {}
                    Verdict::Idle if !closing => {
                        closing = true;
                        metrics.record_connection_closed("idle");
                        conn.as_mut().graceful_shutdown();
                    }
                    Verdict::Idle => {}
                    Verdict::Drop(reason) => {
                        // Dropping the connection drops its response bodies, which stops
                        // the plugin instances serving them and frees their sequences.
                        tracing::info!(%peer, reason, "closing connection");
                        metrics.record_connection_closed(reason);
                        break;
                    }
                },
                changed = self.phase.changed() => {
                    let phase = if changed.is_ok() { *self.phase.borrow() } else { Phase::Closing };
                    match phase {
                        Phase::Serving => {}
                        Phase::Draining if !closing => {
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        Phase::Draining => {}
                        Phase::Closing => break,
                    }
                }
            }
        }
        metrics.open_connections.dec();
    }
}

/// What a connection's traffic says about it.
enum Verdict {
    Fine,
    /// Nothing in flight and no traffic for the idle timeout: close it politely.
    Idle,
    /// Close it now, for this reason.
    Drop(&'static str),
}

const NOT_BLOCKED: u64 = u64::MAX;

/// A connection's traffic, written by its socket and read by its timeout checks.
struct Activity {
    born: Instant,
    /// Milliseconds since `born` of the last byte read or written.
    last_io_ms: AtomicU64,
    /// Since when a write has waited on the client; `NOT_BLOCKED` when none does.
    write_blocked_since_ms: AtomicU64,
    requests_started: AtomicU64,
    /// Requests whose response is not done (handler running, or body still streaming).
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            born: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            write_blocked_since_ms: AtomicU64::new(NOT_BLOCKED),
            requests_started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    fn progressed(&self) {
        self.last_io_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// After a write (or flush) was polled: `Some(n)` bytes went out, `None`: it waits on
    /// the client.
    fn wrote(&self, sent: Option<usize>) {
        match sent {
            None => {
                let now = self.now_ms();
                let _ = self.write_blocked_since_ms.compare_exchange(
                    NOT_BLOCKED,
                    now,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            Some(n) => {
                self.write_blocked_since_ms.store(NOT_BLOCKED, Ordering::Relaxed);
                // A flush of nothing is not traffic: hyper flushes whenever it is polled.
                if n > 0 {
                    self.progressed();
                }
            }
        }
    }

    fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.requests_started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    fn verdict(&self, limits: &ConnLimits) -> Verdict {
        let now = self.now_ms();
        let blocked_since = self.write_blocked_since_ms.load(Ordering::Relaxed);
        if blocked_since != NOT_BLOCKED
            && now.saturating_sub(blocked_since) >= limits.write_stall_timeout.as_millis() as u64
        {
            return Verdict::Drop("write_stall");
        }
        // hyper times out slow HTTP/1.1 headers itself; this also covers a client that
        // never sends enough to tell which protocol it speaks.
        if self.requests_started.load(Ordering::Relaxed) == 0 && now >= limits.header_timeout.as_millis() as u64 {
            return Verdict::Drop("header_timeout");
        }
        let quiet = now.saturating_sub(self.last_io_ms.load(Ordering::Relaxed));
        if self.in_flight.load(Ordering::Relaxed) == 0 && quiet >= limits.idle_timeout.as_millis() as u64 {
            return Verdict::Idle;
        }
        Verdict::Fine
    }
}

/// Counts a request as in flight until its response body is dropped.
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.progressed();
    }
}

/// A response body that keeps its request counted as in flight.
struct RequestBody {
    inner: ServerBody,
    _request: RequestGuard,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn sent(polled: &Poll<io::Result<usize>>) -> Option<usize> {
    match polled {
        Poll::Pending => None,
        Poll::Ready(Ok(n)) => Some(*n),
        Poll::Ready(Err(_)) => Some(0),
    }
}

/// A socket that records its traffic in an [`Activity`].
struct WatchedIo {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.progressed();
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.wrote(sent(&polled));
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.wrote(sent(&polled));
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.activity.wrote(if polled.is_pending() { None } else { Some(0) });
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
