//! `FaultProxy`: a TCP proxy whose behaviour can be switched at run time to fake partitions,
//! refused connections, slow links and cut connections in front of any server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::error::{Result, TestkitError};

/// How long the proxy waits to connect upstream before giving up on a client.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProxyMode {
    /// Forward everything both ways.
    #[default]
    Pass,
    /// Close every new connection as soon as it is accepted (the client sees EOF or a reset);
    /// existing connections keep working. Like a server that is restarting.
    DropNew,
    /// Accept new connections but never connect them upstream, and stop forwarding on existing
    /// ones: bytes are held, nothing is answered, nothing is closed. A network partition.
    /// Held bytes are delivered if the mode goes back to `Pass`, as TCP would after a heal.
    Blackhole,
    /// Forward everything, each chunk delayed by this much in each direction.
    Latency(Duration),
}

/// A TCP proxy on a free loopback port in front of `upstream`.
///
/// It runs on its own thread and runtime, so a test that pauses tokio's clock or blocks its
/// own runtime cannot stall it. Dropping the proxy closes its port and every connection.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    mode: watch::Sender<ProxyMode>,
    /// Bumped by `cut_connections`; every connection ends when it changes.
    cuts: watch::Sender<u64>,
    active: AtomicUsize,
    accepted: AtomicU64,
    dropped: AtomicU64,
    /// Reads forwarded client → server: with request/response protocols and Nagle off, one
    /// per request round trip.
    requests: AtomicU64,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` on a free port of 127.0.0.1, in [`ProxyMode::Pass`].
    pub fn start(upstream: SocketAddr) -> Result<Self> {
        let std_listener = std::net::TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| TestkitError::io("bind the fault proxy on 127.0.0.1", e))?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| TestkitError::io("make the fault proxy socket non-blocking", e))?;
        let addr = std_listener
            .local_addr()
            .map_err(|e| TestkitError::io("read the fault proxy address", e))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestkitError::io("build the fault proxy runtime", e))?;
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(ProxyMode::Pass),
            cuts: watch::Sender::new(0),
            active: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(std_listener) {
                        Ok(listener) => {
                            accept_loop(listener, upstream, task_shared, shutdown_rx).await
                        }
                        Err(e) => tracing::error!(error = %e, "fault proxy cannot listen"),
                    }
                });
                // Dropping the runtime here aborts every connection task.
            })
            .map_err(|e| TestkitError::io("spawn the fault proxy thread", e))?;
        tracing::debug!(%addr, %upstream, "fault proxy started");
        Ok(Self {
            addr,
            upstream,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where traffic goes.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Switches the behaviour; it applies at once to new and existing connections.
    pub fn set_mode(&self, mode: ProxyMode) {
        tracing::debug!(addr = %self.addr, ?mode, "fault proxy mode");
        self.shared.mode.send_replace(mode);
    }

    /// The current behaviour.
    pub fn mode(&self) -> ProxyMode {
        *self.shared.mode.borrow()
    }

    /// Closes every existing connection (both sides see EOF); new ones are handled by the mode.
    pub fn cut_connections(&self) {
        tracing::debug!(addr = %self.addr, "fault proxy cuts connections");
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    /// Connections currently open through the proxy.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Connections accepted since start (including dropped ones).
    pub fn accepted_connections(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    /// Chunks forwarded from clients to the server since start. A client that sends one
    /// request and waits for its answer produces one chunk per round trip, so the difference
    /// across N operations counts their round trips.
    pub fn requests_forwarded(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Connections closed on accept by [`ProxyMode::DropNew`].
    pub fn dropped_connections(&self) -> u64 {
        self.shared.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(true);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    shared.accepted.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(serve(client, upstream, Arc::clone(&shared)));
                }
                Err(e) => tracing::warn!(error = %e, "fault proxy accept failed"),
            },
        }
    }
}

/// Decrements the active-connection count however a connection ends.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    shared.active.fetch_add(1, Ordering::SeqCst);
    let _guard = ActiveGuard(Arc::clone(&shared));
    let mut cuts = shared.cuts.subscribe();
    let mut mode = shared.mode.subscribe();
    // A blackholed connection is held, unanswered, until the mode changes.
    let admitted = loop {
        match *mode.borrow_and_update() {
            ProxyMode::DropNew => break false,
            ProxyMode::Blackhole => {}
            ProxyMode::Pass | ProxyMode::Latency(_) => break true,
        }
        tokio::select! {
            _ = cuts.changed() => return,
            changed = mode.changed() => if changed.is_err() { return },
        }
    };
    if !admitted {
        shared.dropped.fetch_add(1, Ordering::SeqCst);
        return;
    }
    let server =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
            Ok(Ok(server)) => server,
            Ok(Err(e)) => {
                tracing::debug!(%upstream, error = %e, "fault proxy cannot reach upstream");
                return;
            }
            Err(_) => {
                tracing::debug!(%upstream, "fault proxy upstream connect timed out");
                return;
            }
        };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(
        client_read,
        server_write,
        shared.mode.subscribe(),
        Some(&shared.requests),
    );
    let down = pump(server_read, client_write, shared.mode.subscribe(), None);
    tokio::select! {
        _ = cuts.changed() => {}
        _ = async { tokio::join!(up, down) } => {}
    }
}

/// Copies one direction, obeying the mode before each chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
    forwarded: Option<&AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        loop {
            let current = *mode.borrow_and_update();
            match current {
                ProxyMode::Blackhole => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
                ProxyMode::Latency(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                ProxyMode::Pass | ProxyMode::DropNew => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if let Some(counter) = forwarded {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// An echo server on a free port, on the test's runtime.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(
        stream: &mut TcpStream,
        msg: &[u8],
        within: Duration,
    ) -> std::io::Result<Vec<u8>> {
        stream.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        match tokio::time::timeout(within, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Ok(buf),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer",
            )),
        }
    }

    /// Polls a counter with a deadline: the proxy runs on its own thread.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn pass_forwards_both_ways() {
        let proxy = FaultProxy::start(echo_server().await).unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"hello", LONG).await.unwrap(), b"hello");
        assert_eq!(round_trip(&mut s, b"again", LONG).await.unwrap(), b"again");
        assert_eq!(proxy.active_connections(), 1);
        assert_eq!(
            proxy.requests_forwarded(),
            2,
            "one chunk per request round trip"
        );
        drop(s);
        eventually("connection to close", || proxy.active_connections() == 0).await;
    }

    #[tokio::test]
    async fn blackhole_holds_traffic_until_healed() {
        let proxy = FaultProxy::start(echo_server().await).unwrap();
        let mut existing = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut existing, b"a", LONG).await.unwrap(), b"a");

        proxy.set_mode(ProxyMode::Blackhole);
        let err = round_trip(&mut existing, b"b", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::TimedOut,
            "existing connection must stall"
        );
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        let err = round_trip(&mut fresh, b"c", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::TimedOut,
            "new connection must stall"
        );

        proxy.set_mode(ProxyMode::Pass);
        let mut held = [0u8; 1];
        tokio::time::timeout(LONG, existing.read_exact(&mut held))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&held, b"b", "held bytes arrive after the heal");
        tokio::time::timeout(LONG, fresh.read_exact(&mut held))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&held, b"c");
    }

    #[tokio::test]
    async fn drop_new_closes_new_connections_but_keeps_existing_ones() {
        let proxy = FaultProxy::start(echo_server().await).unwrap();
        let mut existing = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut existing, b"x", LONG).await.unwrap(), b"x");
        proxy.set_mode(ProxyMode::DropNew);
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(LONG, fresh.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "new connection must be closed: {read:?}"
        );
        assert_eq!(proxy.dropped_connections(), 1);
        assert_eq!(round_trip(&mut existing, b"y", LONG).await.unwrap(), b"y");
    }

    #[tokio::test]
    async fn latency_delays_each_direction() {
        let proxy = FaultProxy::start(echo_server().await).unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.set_mode(ProxyMode::Latency(Duration::from_millis(100)));
        let started = Instant::now();
        assert_eq!(round_trip(&mut s, b"slow", LONG).await.unwrap(), b"slow");
        // One delay each way: a lower bound the proxy guarantees, not a speed target.
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn cut_closes_existing_connections_and_new_ones_work() {
        let proxy = FaultProxy::start(echo_server().await).unwrap();
        let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut old, b"1", LONG).await.unwrap(), b"1");
        proxy.cut_connections();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(LONG, old.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "cut connection must end: {read:?}"
        );
        let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut new, b"2", LONG).await.unwrap(), b"2");
    }

    #[tokio::test]
    async fn dropping_the_proxy_closes_its_port() {
        let proxy = FaultProxy::start(echo_server().await).unwrap();
        let addr = proxy.addr();
        drop(proxy);
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
