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

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

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
        }
    }
}

impl<S> tower::Layer<S> for RequestLimitLayer {
    type Service = RequestLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestLimit {
            inner,
            limits: self.limits,
            large: self.large.clone(),
        }
    }
}

/// The service [`RequestLimitLayer`] wraps.
#[derive(Clone, Debug)]
pub struct RequestLimit<S> {
    inner: S,
    limits: RequestLimits,
    large: Arc<Admission>,
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
        self.inner.call(request.map(|body| {
            tonic::body::Body::new(LimitedBody {
                inner: body,
                received: 0,
                limit,
                path,
                large,
                admitted: None,
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
            Poll::Ready(Some(Ok(frame))) => {
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
