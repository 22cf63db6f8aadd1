//! Resource limits every ktd server applies before a request reaches its service: what one
//! caller can make a server hold in memory is bounded whatever it sends.
//!
//! * **Request bytes per method** ([`RequestLimitLayer`]): each method has its own bound
//!   ([`RequestLimits`]), counted on the HTTP/2 body as it arrives, so an oversized `Lookup` is
//!   refused after its first 64 KiB instead of being buffered and decoded whole
//!   (`OUT_OF_RANGE`, naming the method and the limit). tonic's per-service decode limit stays
//!   as the ceiling for the largest method of a service.
//! * **Large requests at once** (bodies past [`LARGE_REQUEST_BYTES`], e.g. big publishes): at
//!   most a fixed number per server, across connections; one more is answered
//!   `RESOURCE_EXHAUSTED` as soon as its body grows past that size.
//! * **Streams and requests per connection** ([`bounded`]): at most [`MAX_STREAMS`] concurrent
//!   HTTP/2 streams and [`MAX_REQUESTS_PER_CONNECTION`] requests in service per connection
//!   (more wait in HTTP/2 flow control, unread, instead of each buffering a message), and a
//!   bounded header list; idle connections are probed and dropped.
//!
//! So a server holds at most `large × largest limit` of request bytes in all, plus 1 MiB per
//! request in service (at most [`MAX_REQUESTS_PER_CONNECTION`] per connection), whatever a
//! caller sends (the gateway: 32 × 16 MiB of publishes, 64 KiB per read).
//! * **Connections** ([`incoming`]): at most [`ConnectionLimits::max_connections`] accepted
//!   connections per server (default [`MAX_CONNECTIONS`]); one more is accepted and closed at
//!   once (`ktd_connections_refused_total`), so the listen backlog never fills with clients
//!   that wait forever. A connection must deliver its first [`HANDSHAKE_BYTES`] (the HTTP/2
//!   preface, or a TLS ClientHello) within [`ConnectionLimits::handshake_timeout`] (default
//!   [`HANDSHAKE_TIMEOUT`]; TLS handshakes are bounded by the same time), or it is closed; after
//!   the handshake the HTTP/2 keepalive closes peers that stop answering pings.
//! * **Body time** ([`BodyTimeouts`]): a unary request's body may pause at most
//!   [`BODY_IDLE_TIMEOUT`] between frames and take at most [`BODY_TIMEOUT`] in all; past either,
//!   the request fails `DEADLINE_EXCEEDED` (naming the bound) and its stream is released. The
//!   client-streaming Raft methods ([`client_streaming`]) are exempt: their streams idle by
//!   design and only sequencer peers may open them.
//!
//! Invariant: whatever a caller sends, a server holds at most `max_connections` connections,
//! each for at most the handshake timeout before it speaks HTTP/2, and a request stream for
//! at most [`BODY_TIMEOUT`] before its request is complete.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

/// Connections one server holds at once (each costs a socket, HTTP/2 state and up to
/// [`MAX_REQUESTS_PER_CONNECTION`] requests in service).
pub const MAX_CONNECTIONS: usize = 4096;
/// Time a new connection has to deliver its first [`HANDSHAKE_BYTES`] (and to finish a TLS
/// handshake).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes that end the handshake deadline: the length of the HTTP/2 client preface (a TLS
/// ClientHello is longer).
pub const HANDSHAKE_BYTES: usize = 24;
/// Longest pause between two frames of a unary request's body.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest time a unary request's body may take in all (16 MiB in 60 s is 280 KB/s).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// Concurrent HTTP/2 streams one connection may open.
pub const MAX_STREAMS: u32 = 256;
/// Requests of one connection in service at once (the rest wait, their bodies unread).
pub const MAX_REQUESTS_PER_CONNECTION: usize = 256;
/// Largest HTTP/2 header list (metadata) a request may carry.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 << 10;

/// Applies the per-connection limits to a server builder.
pub fn bounded(builder: tonic::transport::Server) -> tonic::transport::Server {
    builder
        .max_concurrent_streams(Some(MAX_STREAMS))
        .concurrency_limit_per_connection(MAX_REQUESTS_PER_CONNECTION)
        .http2_max_header_list_size(Some(MAX_HEADER_LIST_BYTES))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// How many connections a server holds, and how fast a new one must speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections held at once; one more is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Time a new connection has to deliver its first [`HANDSHAKE_BYTES`].
    pub handshake_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// The accepted connections of `listener` (`TCP_NODELAY`, TCP keepalive), capped by `limits`:
/// pass it to `serve_with_incoming_shutdown`. `server` labels the connection metrics
/// (`ktd_connections_open`, `ktd_connections_refused_total`).
pub fn incoming(
    listener: tokio::net::TcpListener,
    server: &'static str,
    limits: ConnectionLimits,
) -> Incoming<tonic::transport::server::TcpIncoming> {
    let tcp = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(10)));
    Incoming::new(tcp, server, limits)
}

/// A stream of accepted connections holding at most [`ConnectionLimits::max_connections`] at
/// once ([`incoming`]).
#[derive(Debug)]
pub struct Incoming<S> {
    inner: S,
    permits: Arc<Semaphore>,
    server: &'static str,
    limits: ConnectionLimits,
}

impl<S> Incoming<S> {
    /// Caps the connections `inner` yields.
    pub fn new(inner: S, server: &'static str, limits: ConnectionLimits) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            server,
            limits,
        }
    }
}

impl<S, IO> tokio_stream::Stream for Incoming<S>
where
    S: tokio_stream::Stream<Item = std::io::Result<IO>> + Unpin,
{
    type Item = std::io::Result<Connection<IO>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let io = match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(io))) => io,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            };
            match self.permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let server = self.server;
                    metrics::gauge!("ktd_connections_open", "server" => server).increment(1.0);
                    return Poll::Ready(Some(Ok(Connection {
                        io,
                        open: Open {
                            server,
                            _permit: permit,
                        },
                        handshake: Some(Box::pin(tokio::time::sleep(
                            self.limits.handshake_timeout,
                        ))),
                        received: 0,
                    })));
                }
                Err(_) => {
                    // Closed at once: the client sees a reset/EOF instead of waiting in the
                    // backlog.
                    drop(io);
                    metrics::counter!("ktd_connections_refused_total", "server" => self.server)
                        .increment(1);
                    tracing::debug!(
                        server = self.server,
                        max = self.limits.max_connections,
                        "connection refused: at the connection cap"
                    );
                }
            }
        }
    }
}

/// A held connection slot (released, and the gauge lowered, when the connection is dropped).
#[derive(Debug)]
struct Open {
    server: &'static str,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::gauge!("ktd_connections_open", "server" => self.server).decrement(1.0);
    }
}

/// An accepted connection under [`Incoming`]'s cap: reads fail `TimedOut` if its first
/// [`HANDSHAKE_BYTES`] do not arrive within the handshake timeout.
#[derive(Debug)]
pub struct Connection<IO> {
    io: IO,
    open: Open,
    handshake: Option<Pin<Box<Sleep>>>,
    received: usize,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Connection<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.received = this.received.saturating_add(buf.filled().len() - before);
                if this.received >= HANDSHAKE_BYTES {
                    this.handshake = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .handshake
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                tracing::debug!(
                    server = this.open.server,
                    "connection closed: no handshake in time"
                );
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection sent no handshake in time",
                )))
            }
            other => other,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Connection<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Connection<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// How long a unary request's body may pause between frames, and take in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyTimeouts {
    /// Longest pause between two frames.
    pub idle: Duration,
    /// Longest time for the whole body.
    pub total: Duration,
}

impl Default for BodyTimeouts {
    fn default() -> Self {
        Self {
            idle: BODY_IDLE_TIMEOUT,
            total: BODY_TIMEOUT,
        }
    }
}

/// The methods whose requests are streams (Raft replication and snapshot installation): their
/// bodies idle between messages by design, so [`BodyTimeouts`] do not apply to them.
pub fn client_streaming(path: &str) -> bool {
    matches!(
        path,
        "/ktd.raft.v1.Raft/StreamAppend" | "/ktd.raft.v1.Raft/InstallSnapshot"
    )
}

/// Largest request body of a method (`/package.Service/Method`), in bytes: a policy per
/// server, like [`crate::security::Policy`].
pub type RequestLimits = fn(&str) -> usize;

/// A request body past this many bytes is *large*: a server receives at most
/// [`RequestLimitLayer::large_in_flight`] of them at once, across all connections.
pub const LARGE_REQUEST_BYTES: usize = 1 << 20;

/// Limits every request's body to what [`RequestLimits`] allows its method, and how many
/// large requests are received at once.
#[derive(Clone, Debug)]
pub struct RequestLimitLayer {
    limits: RequestLimits,
    large: Arc<Admission>,
    timeouts: BodyTimeouts,
}

/// Large requests in flight, and the cap.
#[derive(Debug)]
struct Admission {
    in_flight: AtomicUsize,
    max: usize,
}

/// One admitted large request (released when its body is dropped).
struct Admitted(Arc<Admission>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut current = self.in_flight.load(Ordering::Acquire);
        loop {
            if current >= self.max {
                return None;
            }
            match self.in_flight.compare_exchange(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Admitted(self.clone())),
                Err(actual) => current = actual,
            }
        }
    }
}

impl RequestLimitLayer {
    /// Bounds request bodies by `limits`, with at most 32 large requests at once.
    pub fn new(limits: RequestLimits) -> Self {
        Self::large_in_flight(limits, 32)
    }

    /// Bounds request bodies by `limits`, with at most `max` large requests at once (one more
    /// is answered `RESOURCE_EXHAUSTED` as soon as its body grows past
    /// [`LARGE_REQUEST_BYTES`]).
    pub fn large_in_flight(limits: RequestLimits, max: usize) -> Self {
        Self {
            limits,
            large: Arc::new(Admission {
                in_flight: AtomicUsize::new(0),
                max,
            }),
            timeouts: BodyTimeouts::default(),
        }
    }

    /// Bounds the time of unary request bodies by `timeouts` instead of the defaults.
    pub fn with_body_timeouts(mut self, timeouts: BodyTimeouts) -> Self {
        self.timeouts = timeouts;
        self
    }
}

impl<S> tower::Layer<S> for RequestLimitLayer {
    type Service = RequestLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestLimit {
            inner,
            limits: self.limits,
            large: self.large.clone(),
            timeouts: self.timeouts,
        }
    }
}

/// The service [`RequestLimitLayer`] wraps.
#[derive(Clone, Debug)]
pub struct RequestLimit<S> {
    inner: S,
    limits: RequestLimits,
    large: Arc<Admission>,
    timeouts: BodyTimeouts,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for RequestLimit<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path().to_string();
        let limit = (self.limits)(&path);
        let large = self.large.clone();
        let timeouts = (!client_streaming(&path)).then_some(self.timeouts);
        self.inner.call(request.map(|body| {
            tonic::body::Body::new(LimitedBody {
                inner: body,
                received: 0,
                limit,
                path,
                large,
                admitted: None,
                timer: timeouts.map(BodyTimer::new),
            })
        }))
    }
}

/// A request body that fails with `OUT_OF_RANGE` once it exceeds its method's limit, and with
/// `RESOURCE_EXHAUSTED` when it grows past [`LARGE_REQUEST_BYTES`] while the server already
/// receives its maximum of large requests.
struct LimitedBody {
    inner: tonic::body::Body,
    received: usize,
    limit: usize,
    path: String,
    large: Arc<Admission>,
    admitted: Option<Admitted>,
    /// `None`: a client-streaming method (no body timeouts).
    timer: Option<BodyTimer>,
}

/// The body deadlines of one request: the next frame by `idle` after the last one, the end by
/// `total` after the request arrived.
struct BodyTimer {
    timeouts: BodyTimeouts,
    end: Instant,
    sleep: Pin<Box<Sleep>>,
}

impl BodyTimer {
    fn new(timeouts: BodyTimeouts) -> Self {
        let now = Instant::now();
        let end = now + timeouts.total;
        Self {
            timeouts,
            end,
            sleep: Box::pin(tokio::time::sleep_until(end.min(now + timeouts.idle))),
        }
    }

    /// A frame arrived: the next one is due `idle` from now.
    fn frame(&mut self) {
        let next = self.end.min(Instant::now() + self.timeouts.idle);
        self.sleep.as_mut().reset(next);
    }

    /// The error once a deadline passed (registers the waker otherwise).
    fn expired(&mut self, cx: &mut TaskContext<'_>, path: &str) -> Option<tonic::Status> {
        self.sleep.as_mut().poll(cx).is_ready().then(|| {
            let message = if Instant::now() >= self.end {
                format!(
                    "{path}: the request body took longer than {:?}",
                    self.timeouts.total
                )
            } else {
                format!(
                    "{path}: the request body stalled for more than {:?}",
                    self.timeouts.idle
                )
            };
            tonic::Status::deadline_exceeded(message)
        })
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => match this.timer.as_mut().and_then(|t| t.expired(cx, &this.path)) {
                Some(status) => {
                    // Only once: the body is finished after its error.
                    this.timer = None;
                    Poll::Ready(Some(Err(status)))
                }
                None => Poll::Pending,
            },
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(timer) = &mut this.timer {
                    timer.frame();
                }
                if let Some(data) = frame.data_ref() {
                    this.received = this.received.saturating_add(data.len());
                    if this.received > this.limit {
                        return Poll::Ready(Some(Err(tonic::Status::out_of_range(format!(
                            "{} requests are at most {} bytes",
                            this.path, this.limit
                        )))));
                    }
                    if this.received > LARGE_REQUEST_BYTES && this.admitted.is_none() {
                        match this.large.admit() {
                            Some(admitted) => this.admitted = Some(admitted),
                            None => {
                                return Poll::Ready(Some(Err(tonic::Status::resource_exhausted(
                                    format!(
                                        "{}: {} large requests are being received already; \
                                         retry later",
                                        this.path, this.large.max
                                    ),
                                ))));
                            }
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limited(chunks: Vec<&'static [u8]>, limit: usize) -> LimitedBody {
        LimitedBody {
            inner: tonic::body::Body::new(ChunkBody(
                chunks.into_iter().map(Bytes::from_static).collect(),
            )),
            received: 0,
            limit,
            path: "/ktd.v1.Directory/Lookup".into(),
            large: Arc::new(Admission {
                in_flight: AtomicUsize::new(0),
                max: 1,
            }),
            admitted: None,
            timer: None,
        }
    }

    /// A body of chunks, one data frame each.
    struct ChunkBody(std::collections::VecDeque<Bytes>);

    impl Body for ChunkBody {
        type Data = Bytes;
        type Error = tonic::Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut TaskContext<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
            Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    fn drain(mut body: LimitedBody) -> Result<usize, tonic::Status> {
        let waker = std::task::Waker::noop();
        let mut cx = TaskContext::from_waker(waker);
        let mut total = 0;
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    total += frame.data_ref().map_or(0, Bytes::len);
                }
                Poll::Ready(Some(Err(status))) => return Err(status),
                Poll::Ready(None) => return Ok(total),
                Poll::Pending => unreachable!("the test body is always ready"),
            }
        }
    }

    #[test]
    fn a_body_within_its_methods_limit_passes_and_one_byte_more_is_out_of_range() {
        assert_eq!(
            drain(limited(vec![b"abcd", b"efgh"], 8)).expect("8 bytes"),
            8
        );
        let refused = drain(limited(vec![b"abcd", b"efghi"], 8)).expect_err("9 bytes");
        assert_eq!(refused.code(), tonic::Code::OutOfRange);
        assert!(refused.message().contains("Lookup"), "{refused:?}");
        assert!(refused.message().contains("at most 8 bytes"), "{refused:?}");
    }
}
