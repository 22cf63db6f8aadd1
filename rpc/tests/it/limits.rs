//! The connection cap, the handshake deadline and the body timeouts of `ktd_rpc::limits`, on a
//! real gRPC server (the standard health service) bound to an ephemeral 127.0.0.x port: raw TCP
//! and raw HTTP/2 clients misbehave while a normal client keeps being served.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ktd_rpc::limits::{BodyTimeouts, ConnectionLimits, RequestLimitLayer};
use ktd_testkit::with_deadline;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

/// Every method up to 64 KiB.
fn small(_: &str) -> usize {
    64 << 10
}

/// A health server on an ephemeral port of `ip`, with `connections` and `body` limits.
async fn start(ip: &str, connections: ConnectionLimits, body: BodyTimeouts) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (_reporter, health) = tonic_health::server::health_reporter();
    let incoming = ktd_rpc::limits::incoming(listener, "test", connections);
    let router = ktd_rpc::limits::bounded(tonic::transport::Server::builder())
        .layer(RequestLimitLayer::new(small).with_body_timeouts(body))
        .add_service(health);
    tokio::spawn(router.serve_with_incoming(incoming));
    addr
}

/// A normal gRPC client: one connection, one health check.
async fn client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect");
    HealthClient::new(channel)
}

async fn check(client: &mut HealthClient<tonic::transport::Channel>) -> Result<(), tonic::Status> {
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|_| ())
}

/// Reads until the server closes `stream` (EOF or reset); fails if it stays open for `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) {
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the server kept the connection open for {limit:?}"
    );
}

#[test]
fn a_connection_past_the_cap_is_closed_at_once_while_held_ones_keep_being_served() {
    with_deadline(Duration::from_secs(60), || async {
        let limits = ConnectionLimits {
            max_connections: 3,
            handshake_timeout: Duration::from_secs(60),
        };
        let addr = start("127.0.0.61", limits, BodyTimeouts::default()).await;
        let mut normal = client(addr).await;
        check(&mut normal)
            .await
            .expect("the first client is served");
        // Two idle raw connections fill the cap (3 with the client's).
        let _idle_1 = TcpStream::connect(addr).await.expect("idle 1");
        let _idle_2 = TcpStream::connect(addr).await.expect("idle 2");
        let mut refused = TcpStream::connect(addr).await.expect("tcp connect");
        closed_within(&mut refused, Duration::from_secs(10)).await;
        check(&mut normal)
            .await
            .expect("a held connection is still served at the cap");
        // Freeing a slot lets a new client in.
        drop(_idle_1);
        ktd_testkit::Poll::new("a new client once a slot is free", Duration::from_secs(20))
            .until_ok(|| async {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(|error| error.to_string())?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(2))
                    .connect()
                    .await
                    .map_err(|error| error.to_string())?;
                check(&mut HealthClient::new(channel))
                    .await
                    .map_err(|status| status.to_string())
            })
            .await;
    });
}

#[test]
fn a_connection_that_sends_no_handshake_is_closed_after_the_handshake_timeout() {
    with_deadline(Duration::from_secs(60), || async {
        let limits = ConnectionLimits {
            max_connections: 16,
            handshake_timeout: Duration::from_secs(1),
        };
        let addr = start("127.0.0.62", limits, BodyTimeouts::default()).await;
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        closed_within(&mut silent, Duration::from_secs(15)).await;
        let mut normal = client(addr).await;
        check(&mut normal).await.expect("a normal client is served");
    });
}

#[test]
fn a_request_whose_body_stalls_is_answered_deadline_exceeded_and_the_server_keeps_serving() {
    with_deadline(Duration::from_secs(60), || async {
        let body = BodyTimeouts {
            idle: Duration::from_secs(1),
            total: Duration::from_secs(30),
        };
        let addr = start("127.0.0.63", ConnectionLimits::default(), body).await;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut h2, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}/grpc.health.v1.Health/Check"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request");
        let (response, mut send) = h2.send_request(request, false).expect("send");
        // Three of the five bytes of the gRPC frame header, then nothing.
        send.send_data(Bytes::from_static(&[0, 0, 0]), false)
            .expect("data");
        let response = tokio::time::timeout(Duration::from_secs(15), response)
            .await
            .expect("an answer within the bound")
            .expect("a response");
        let status = match response.headers().get("grpc-status") {
            Some(status) => status.to_str().expect("ascii").to_string(),
            None => {
                let mut body = response.into_body();
                let trailers = tokio::time::timeout(Duration::from_secs(15), body.trailers())
                    .await
                    .expect("trailers within the bound")
                    .expect("trailers")
                    .expect("a grpc-status trailer");
                trailers["grpc-status"].to_str().expect("ascii").to_string()
            }
        };
        assert_eq!(
            status,
            (tonic::Code::DeadlineExceeded as i32).to_string(),
            "a stalled body is answered DEADLINE_EXCEEDED"
        );
        let mut normal = client(addr).await;
        check(&mut normal).await.expect("the server keeps serving");
    });
}
