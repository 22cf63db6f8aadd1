//! A userspace TCP fault proxy, one per **directed link**: the connections that node A
//! initiates to node B go through `proxy(A→B)`, which listens on its own `127.0.0.x` port and
//! forwards to B's real address. No root is needed (`tc netem` is not available here and `nft`
//! needs root; see the research notes §2.6).
//!
//! A link's [`LinkFault`] can be changed at any time and applies to the connections already open
//! (gRPC keeps its connections for the node's lifetime), not only to new ones:
//!
//! | fault | new connections | open connections |
//! |---|---|---|
//! | `Pass` | forwarded | forwarded |
//! | `Blackhole` | accepted, bytes swallowed, never forwarded | bytes in both directions swallowed |
//! | `Reject` | accepted and closed at once | closed |
//! | `Delay(d)` | forwarded | every chunk delivered `d` after it was read, each direction |
//!
//! [`ShardFence`] puts proxies around one shard server so that it can be cut off the network
//! (fault `isolate-shard`): an **inbound** proxy whose address is the shard's address in the
//! shard map (so the sequencers, the gateway and the other shards all reach it through it), and
//! one **outbound** proxy per sequencer that the shard's `--sequencers` list names (its log
//! tail and readiness). Shards dial each other only to copy a partition when the coordinator
//! tells them to, which an isolated shard cannot hear. Blackholing all of them isolates the
//! shard in both directions; the process keeps running.
//!
//! A blackhole is a partition in which packets vanish: peers see deadlines and keepalives
//! expire, not resets. A connection that lost bytes in a blackhole is closed when the link
//! leaves it (its byte stream has a hole, as a TCP connection whose retransmissions gave up);
//! one that stayed idle carries on. Delayed chunks keep their order; a chunk still in flight
//! when the link turns into a blackhole is lost.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a link does to its traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkFault {
    /// Forward everything.
    Pass,
    /// Swallow every byte, in both directions; accept new connections and hold them.
    Blackhole,
    /// Close open connections and every new one.
    Reject,
    /// Deliver every chunk this long after it was read, in each direction.
    Delay(#[serde(with = "humantime_serde")] Duration),
}

/// Bound on connecting to the real destination.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest chunk read at once.
const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks in flight per direction (backpressure for delayed links).
const CHUNKS_IN_FLIGHT: usize = 64;

/// One directed link's proxy. Dropping it closes the listener and every connection.
#[derive(Debug)]
pub struct LinkProxy {
    addr: SocketAddr,
    upstream: String,
    fault: watch::Sender<LinkFault>,
    cancel: CancellationToken,
}

impl LinkProxy {
    /// Listens on `listen` (`ip:0` for an ephemeral port) and forwards to `upstream`
    /// (`host:port`). Must be called inside a tokio runtime.
    pub async fn start(listen: &str, upstream: impl Into<String>) -> io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let upstream = upstream.into();
        let (fault, fault_rx) = watch::channel(LinkFault::Pass);
        let cancel = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            Arc::from(upstream.as_str()),
            fault_rx,
            cancel.clone(),
        ));
        Ok(Self {
            addr,
            upstream,
            fault,
            cancel,
        })
    }

    /// Where it listens: dial this instead of the destination.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The destination.
    pub fn upstream(&self) -> &str {
        &self.upstream
    }

    /// Changes the fault, for open connections too.
    pub fn set(&self, fault: LinkFault) {
        self.fault.send_replace(fault);
    }

    /// The current fault.
    pub fn fault(&self) -> LinkFault {
        *self.fault.borrow()
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: Arc<str>,
    fault: watch::Receiver<LinkFault>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((inbound, _)) => {
                tokio::spawn(connection(
                    inbound,
                    upstream.clone(),
                    fault.clone(),
                    cancel.child_token(),
                ));
            }
            // Out of file descriptors or a connection reset before accept: try again shortly.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// One proxied connection, until either side closes it, the link rejects it, or the proxy
/// stops. Returning drops (closes) both sockets.
async fn connection(
    mut inbound: TcpStream,
    upstream: Arc<str>,
    mut fault: watch::Receiver<LinkFault>,
    cancel: CancellationToken,
) {
    // A link in a blackhole holds new connections without reaching the destination.
    loop {
        let current = *fault.borrow_and_update();
        match current {
            LinkFault::Reject => return,
            LinkFault::Blackhole => {
                let mut buf = [0u8; 4096];
                tokio::select! {
                    () = cancel.cancelled() => return,
                    changed = fault.changed() => if changed.is_err() { return },
                    read = inbound.read(&mut buf) => match read {
                        // The client sent bytes into the void: the stream has a hole.
                        Ok(n) if n > 0 => return hold(inbound, fault, cancel).await,
                        _ => return,
                    },
                }
            }
            LinkFault::Pass | LinkFault::Delay(_) => break,
        }
    }
    let outbound = tokio::select! {
        () = cancel.cancelled() => return,
        connected = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(&*upstream)) => {
            match connected {
                Ok(Ok(stream)) => stream,
                // The destination is down or unreachable: the client sees the connection close.
                _ => return,
            }
        }
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let lost = AtomicBool::new(false);
    let forward = {
        let (up, down) = (fault.clone(), fault.clone());
        let lost = &lost;
        async move {
            tokio::try_join!(
                pump(in_read, out_write, up, lost),
                pump(out_read, in_write, down, lost),
            )
        }
    };
    let watchdog = async {
        loop {
            if fault.changed().await.is_err() {
                return;
            }
            let current = *fault.borrow_and_update();
            if current == LinkFault::Reject
                || (current != LinkFault::Blackhole && lost.load(Ordering::Relaxed))
            {
                return;
            }
        }
    };
    tokio::select! {
        () = cancel.cancelled() => {}
        () = watchdog => {}
        _ = forward => {}
    }
}

/// A connection whose first bytes were swallowed: swallow the rest until the link leaves the
/// blackhole, then close it.
async fn hold(
    mut inbound: TcpStream,
    mut fault: watch::Receiver<LinkFault>,
    cancel: CancellationToken,
) {
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = fault.changed() => {
                if changed.is_err() || *fault.borrow_and_update() != LinkFault::Blackhole {
                    return;
                }
            }
            read = inbound.read(&mut buf) => if !matches!(read, Ok(n) if n > 0) { return },
        }
    }
}

/// Forwards one direction: a reader stamps every chunk with its delivery time, a writer
/// delivers it then (so delays pipeline instead of limiting throughput). Ends at end of stream
/// (passing the half-close on) or on an I/O error.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    fault: watch::Receiver<LinkFault>,
    lost: &AtomicBool,
) -> io::Result<()> {
    let (chunks, mut queued) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let reader_fault = fault.clone();
    let reader = async move {
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            let current = *reader_fault.borrow();
            let due = match current {
                LinkFault::Pass => Instant::now(),
                LinkFault::Delay(delay) => Instant::now() + delay,
                LinkFault::Blackhole => {
                    lost.store(true, Ordering::Relaxed);
                    continue;
                }
                // The watchdog closes the connection.
                LinkFault::Reject => std::future::pending().await,
            };
            if chunks.send((due, buf[..n].to_vec())).await.is_err() {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if *fault.borrow() == LinkFault::Blackhole {
                // In flight when the link went dark.
                lost.store(true, Ordering::Relaxed);
                continue;
            }
            to.write_all(&chunk).await?;
        }
        // The reader saw the end of the stream: pass the half-close on.
        to.shutdown().await
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// The proxies of every directed link between a set of nodes: link `(from, to)` carries the
/// connections `from` initiates to `to`.
#[derive(Debug, Default)]
pub struct Links {
    links: BTreeMap<(u64, u64), LinkProxy>,
}

/// The address a link listens on: `127.0.0.{100 + 10·from + to}` while that fits (so a link is
/// recognisable in `ss` output), else `127.0.0.1`; always an ephemeral port.
fn listen_addr(from: u64, to: u64) -> String {
    match 100u64
        .checked_add(from.saturating_mul(10))
        .and_then(|n| n.checked_add(to))
    {
        Some(octet) if octet <= 254 => format!("127.0.0.{octet}:0"),
        _ => "127.0.0.1:0".to_string(),
    }
}

impl Links {
    /// Starts a proxy for every ordered pair of `nodes` (`(id, real address)`).
    pub async fn start(nodes: &[(u64, String)]) -> io::Result<Self> {
        let mut links = BTreeMap::new();
        for (from, _) in nodes {
            for (to, upstream) in nodes {
                if from != to {
                    let proxy = LinkProxy::start(&listen_addr(*from, *to), upstream.clone())
                        .await
                        .map_err(|error| {
                            io::Error::new(
                                error.kind(),
                                format!("proxy for link {from}->{to}: {error}"),
                            )
                        })?;
                    links.insert((*from, *to), proxy);
                }
            }
        }
        Ok(Self { links })
    }

    /// `--peer-override` entries for node `from`: `TO=PROXY_ADDR` for each of its links.
    pub fn overrides(&self, from: u64) -> Vec<String> {
        self.links
            .iter()
            .filter(|((source, _), _)| *source == from)
            .map(|((_, to), proxy)| format!("{to}={}", proxy.addr()))
            .collect()
    }

    /// Sets link `from → to`; `false` if there is no such link.
    pub fn set(&self, from: u64, to: u64, fault: LinkFault) -> bool {
        match self.links.get(&(from, to)) {
            Some(proxy) => {
                proxy.set(fault);
                true
            }
            None => false,
        }
    }

    /// Link `from → to`'s fault.
    pub fn fault(&self, from: u64, to: u64) -> Option<LinkFault> {
        self.links.get(&(from, to)).map(LinkProxy::fault)
    }

    /// Every link, `(from, to)`.
    pub fn pairs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.links.keys().copied()
    }

    /// Every link back to `Pass`.
    pub fn heal_all(&self) {
        for proxy in self.links.values() {
            proxy.set(LinkFault::Pass);
        }
    }
}

/// The proxies around one shard server (see the module docs): every connection to it, and
/// every connection it opens to a sequencer.
#[derive(Debug)]
pub struct ShardFence {
    inbound: LinkProxy,
    to_sequencers: Vec<LinkProxy>,
}

impl ShardFence {
    /// Proxies for shard number `index` (listening on `127.0.0.{40 + index}` for the inbound one
    /// and `127.0.0.{50 + index}` for the outbound ones, ephemeral ports) in front of `shard`
    /// and of every address in `sequencers`.
    pub async fn start(index: u64, shard: &str, sequencers: &[String]) -> io::Result<Self> {
        let octet = |base: u64| (base + index).min(254);
        let named = |what: String| {
            move |error: io::Error| io::Error::new(error.kind(), format!("{what}: {error}"))
        };
        let inbound = LinkProxy::start(&format!("127.0.0.{}:0", octet(40)), shard)
            .await
            .map_err(named(format!("inbound proxy of shard {index}")))?;
        let mut to_sequencers = Vec::new();
        for sequencer in sequencers {
            to_sequencers.push(
                LinkProxy::start(&format!("127.0.0.{}:0", octet(50)), sequencer.clone())
                    .await
                    .map_err(named(format!("proxy shard {index} -> {sequencer}")))?,
            );
        }
        Ok(Self {
            inbound,
            to_sequencers,
        })
    }

    /// The address everyone dials to reach the shard (its shard-map address).
    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound.addr()
    }

    /// The sequencer addresses the shard dials (its `--sequencers`), in the order given.
    pub fn sequencer_addrs(&self) -> Vec<String> {
        self.to_sequencers
            .iter()
            .map(|proxy| proxy.addr().to_string())
            .collect()
    }

    /// Every proxy of the fence to `fault`.
    pub fn set(&self, fault: LinkFault) {
        self.inbound.set(fault);
        for proxy in &self.to_sequencers {
            proxy.set(fault);
        }
    }

    /// Whether any of its proxies is not `Pass`.
    pub fn is_faulted(&self) -> bool {
        std::iter::once(&self.inbound)
            .chain(&self.to_sequencers)
            .any(|proxy| proxy.fault() != LinkFault::Pass)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(5);

    /// An echo server; returns its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn proxy() -> LinkProxy {
        let upstream = echo_server().await;
        LinkProxy::start("127.0.0.1:0", upstream.to_string())
            .await
            .expect("proxy")
    }

    async fn connect(proxy: &LinkProxy) -> TcpStream {
        tokio::time::timeout(LIMIT, TcpStream::connect(proxy.addr()))
            .await
            .expect("connect in time")
            .expect("connect")
    }

    /// Sends `message` and reads it back within `limit`; `None` if nothing came back in time.
    async fn echo(stream: &mut TcpStream, message: &[u8], limit: Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(limit.max(LIMIT), stream.write_all(message))
            .await
            .expect("write in time")
            .expect("write");
        let mut back = vec![0u8; message.len()];
        match tokio::time::timeout(limit, stream.read_exact(&mut back)).await {
            Ok(Ok(_)) => Some(back),
            Ok(Err(error)) => panic!("read failed: {error}"),
            Err(_) => None,
        }
    }

    /// Whether the peer closed the stream (end of stream or reset) within `limit`.
    async fn closed(stream: &mut TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(limit, stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn pass_forwards_both_ways() {
        let proxy = proxy().await;
        let mut stream = connect(&proxy).await;
        assert_eq!(
            echo(&mut stream, b"hello", LIMIT).await.as_deref(),
            Some(&b"hello"[..])
        );
        let big = vec![7u8; 256 << 10];
        assert_eq!(echo(&mut stream, &big, LIMIT).await, Some(big));
    }

    #[tokio::test]
    async fn blackhole_swallows_open_and_new_connections_until_healed() {
        let proxy = proxy().await;
        let mut open = connect(&proxy).await;
        let mut idle = connect(&proxy).await;
        assert!(echo(&mut open, b"before", LIMIT).await.is_some());
        assert!(echo(&mut idle, b"before", LIMIT).await.is_some());

        proxy.set(LinkFault::Blackhole);
        let quiet = Duration::from_millis(300);
        assert_eq!(
            echo(&mut open, b"lost", quiet).await,
            None,
            "open connection"
        );
        let mut new = connect(&proxy).await;
        assert_eq!(echo(&mut new, b"lost", quiet).await, None, "new connection");
        assert!(
            !closed(&mut open, quiet).await,
            "a blackhole does not close"
        );

        proxy.set(LinkFault::Pass);
        // Connections that lost bytes are closed; the idle one and fresh ones work.
        assert!(closed(&mut open, LIMIT).await);
        assert!(closed(&mut new, LIMIT).await);
        assert!(echo(&mut idle, b"after", LIMIT).await.is_some());
        let mut fresh = connect(&proxy).await;
        assert!(echo(&mut fresh, b"after", LIMIT).await.is_some());
    }

    #[tokio::test]
    async fn a_shard_fence_cuts_the_shard_off_both_ways_until_restored() {
        let shard = echo_server().await;
        let sequencers = vec![
            echo_server().await.to_string(),
            echo_server().await.to_string(),
        ];
        let fence = ShardFence::start(1, &shard.to_string(), &sequencers)
            .await
            .expect("fence");
        let dial = |addr: String| async move {
            tokio::time::timeout(LIMIT, TcpStream::connect(addr))
                .await
                .expect("connect in time")
                .expect("connect")
        };
        let mut addrs = vec![fence.inbound_addr().to_string()];
        addrs.extend(fence.sequencer_addrs());
        assert_eq!(addrs.len(), 3);
        for addr in &addrs {
            let mut stream = dial(addr.clone()).await;
            assert!(echo(&mut stream, b"up", LIMIT).await.is_some(), "{addr}");
        }
        assert!(!fence.is_faulted());

        fence.set(LinkFault::Blackhole);
        assert!(fence.is_faulted());
        for addr in &addrs {
            let mut stream = dial(addr.clone()).await;
            let quiet = Duration::from_millis(300);
            assert_eq!(echo(&mut stream, b"cut", quiet).await, None, "{addr}");
        }

        fence.set(LinkFault::Pass);
        assert!(!fence.is_faulted());
        for addr in &addrs {
            let mut stream = dial(addr.clone()).await;
            assert!(echo(&mut stream, b"back", LIMIT).await.is_some(), "{addr}");
        }
    }

    #[tokio::test]
    async fn reject_closes_open_and_new_connections() {
        let proxy = proxy().await;
        let mut open = connect(&proxy).await;
        assert!(echo(&mut open, b"before", LIMIT).await.is_some());

        proxy.set(LinkFault::Reject);
        assert!(closed(&mut open, LIMIT).await, "open connection");
        let mut new = connect(&proxy).await;
        assert!(closed(&mut new, LIMIT).await, "new connection");

        proxy.set(LinkFault::Pass);
        let mut fresh = connect(&proxy).await;
        assert!(echo(&mut fresh, b"after", LIMIT).await.is_some());
    }

    #[tokio::test]
    async fn delay_applies_each_way_and_keeps_order() {
        let proxy = proxy().await;
        let mut stream = connect(&proxy).await;
        assert!(echo(&mut stream, b"warm", LIMIT).await.is_some());

        let delay = Duration::from_millis(150);
        proxy.set(LinkFault::Delay(delay));
        let started = std::time::Instant::now();
        for chunk in [&b"one "[..], b"two ", b"three"] {
            stream.write_all(chunk).await.expect("write");
        }
        let mut back = vec![0u8; 13];
        tokio::time::timeout(LIMIT, stream.read_exact(&mut back))
            .await
            .expect("in time")
            .expect("read");
        let elapsed = started.elapsed();
        assert_eq!(back, b"one two three");
        assert!(elapsed >= delay * 2, "round trip {elapsed:?}");
        assert!(elapsed < delay * 2 + LIMIT, "round trip {elapsed:?}");

        proxy.set(LinkFault::Pass);
        let started = std::time::Instant::now();
        assert!(echo(&mut stream, b"fast", LIMIT).await.is_some());
        assert!(started.elapsed() < delay * 2, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_dead_destination_closes_the_connection() {
        let gone = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = gone.local_addr().expect("addr");
        drop(gone);
        let proxy = LinkProxy::start("127.0.0.1:0", addr.to_string())
            .await
            .expect("proxy");
        let mut stream = connect(&proxy).await;
        assert!(closed(&mut stream, LIMIT).await);
    }

    #[tokio::test]
    async fn links_cover_every_ordered_pair() {
        let a = echo_server().await;
        let b = echo_server().await;
        let links = Links::start(&[(1, a.to_string()), (2, b.to_string())])
            .await
            .expect("links");
        assert_eq!(links.pairs().collect::<Vec<_>>(), [(1, 2), (2, 1)]);
        let overrides = links.overrides(1);
        assert_eq!(overrides.len(), 1);
        assert!(overrides[0].starts_with("2=127.0.0.112:"), "{overrides:?}");
        assert!(links.set(1, 2, LinkFault::Blackhole));
        assert!(!links.set(1, 3, LinkFault::Blackhole));
        assert_eq!(links.fault(1, 2), Some(LinkFault::Blackhole));
        assert_eq!(links.fault(2, 1), Some(LinkFault::Pass));
        links.heal_all();
        assert_eq!(links.fault(1, 2), Some(LinkFault::Pass));
    }
}
