//! The adversarial suite: a directory of real processes under mutual TLS (`ktd certs`: one
//! certificate per role) — a shard server, a sequencer, a gateway with its admin port, an
//! auditor — called by hostile or mistaken peers on every RPC of every server.
//!
//! * [`barrage`]: every method named in `proto/ktd/**/*.proto` (read at test time, so a new RPC
//!   is covered or the test fails) gets garbage bodies, bodies past its server's per-method
//!   limit, a frame header claiming 4 GiB, and a call from every role certificate, compared with
//!   the server's policy (`ktd_rpc::security`).
//! * [`forged`]: well-formed calls from roles that may make them, carrying stale Raft terms,
//!   stale fences, old epochs, a changed cluster metadata and shard maps that are out of range,
//!   duplicated, incomplete or too large; and (an ignored test, a known finding) base roots
//!   that are not the committed ones.
//!
//! **Invariant** checked by both: every refusal is a gRPC status with a code and a message that
//! says what was wrong (never a transport error or an internal "h2 protocol error" text), the
//! directory's state is the same afterwards ([`State`]: latest epoch and root, cluster
//! metadata and shard map, Raft term and leader, every partition's built epoch and root on the
//! shard), and a normal publish is then committed and its lookup verifies.

mod barrage;
mod forged;

use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Output;
use std::task::{Context, Poll as TaskPoll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use ktd_core::vrf::VrfKey;
use ktd_proto::ktd::sequencer::v1 as seq;
use ktd_proto::ktd::shard::v1 as shard_pb;
use ktd_proto::ktd::v1 as api;
use ktd_testkit::Poll;
use ktd_testkit::net::free_addr;
use ktd_testkit::process::KtdNode;
use ktd_testkit::seed::write_vrf_seed;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::support::KTD;
use crate::support::cli::ktd;

/// Texts that mean a transport or library internal reached the caller instead of a status
/// that explains the refusal.
const LEAKS: &[&str] = &[
    "h2 protocol error",
    "hyper::",
    "transport error",
    "stream no longer needed",
    "broken pipe",
    "connection reset",
    "panicked",
];

/// The directory's partition bits (4 partitions: BuildEpoch requests stay small).
pub const PARTITION_BITS: u32 = 2;

/// The processes of one directory under mutual TLS, and the certificates of every role.
pub struct Secured {
    pub certs: PathBuf,
    pub shard: KtdNode,
    pub sequencer: KtdNode,
    pub gateway: KtdNode,
    pub admin_addr: String,
    pub auditor: KtdNode,
    // Declared last: the processes die before their directory is removed.
    root: tempfile::TempDir,
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

impl Secured {
    /// Makes the certificates and starts shard `s1`, sequencer 1 (a one-node Raft cluster),
    /// the gateway and the auditor on `ip`, then publishes `alice` and waits for its commit.
    pub async fn start(ip: &str, seed: [u8; 32]) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let certs = root.path().join("certs");
        let made = ktd(&[
            "certs".to_string(),
            "--out".into(),
            certs.display().to_string(),
            "--hosts".into(),
            format!("{ip},localhost"),
        ]);
        assert!(made.status.success(), "{}", stderr(&made));
        let tls = |stem: &str| -> Vec<String> {
            vec![
                "--tls-ca".into(),
                certs.join("ca.pem").display().to_string(),
                "--tls-cert".into(),
                certs.join(format!("{stem}.pem")).display().to_string(),
                "--tls-key".into(),
                certs.join(format!("{stem}.key")).display().to_string(),
            ]
        };
        let with = |mut base: Vec<String>, more: &[&str]| {
            base.extend(more.iter().map(|arg| arg.to_string()));
            base
        };
        let bits = PARTITION_BITS.to_string();
        let seed_file = write_vrf_seed(root.path(), &seed);
        let shard_addr = free_addr(ip);
        let sequencer_addr = free_addr(ip);
        let mut shard = KtdNode::new(
            KTD,
            root.path(),
            "shard",
            1,
            shard_addr.clone(),
            with(
                tls("shard"),
                &[
                    "shard",
                    "--id",
                    "s1",
                    "--listen",
                    &shard_addr,
                    "--data-dir",
                    &root.path().join("shard").display().to_string(),
                    "--vrf-seed-file",
                    &seed_file,
                    "--partition-bits",
                    &bits,
                    "--sequencers",
                    &sequencer_addr,
                ],
            ),
        );
        shard.spawn(&[]);
        let public_key = hex::encode(VrfKey::from_seed(&seed).expect("seed").public_key());
        let mut sequencer = KtdNode::new(
            KTD,
            root.path(),
            "sequencer",
            1,
            sequencer_addr.clone(),
            with(
                tls("sequencer-1"),
                &[
                    "sequencer",
                    "--listen",
                    &sequencer_addr,
                    "--data-dir",
                    &root.path().join("sequencer").display().to_string(),
                    "--id",
                    "1",
                    "--peers",
                    &format!("1={sequencer_addr}"),
                    "--init",
                    "--vrf-public-key",
                    &public_key,
                    "--shards",
                    &format!("s1=https://{shard_addr}"),
                    "--partition-bits",
                    &bits,
                    "--epoch-interval",
                    "200ms",
                ],
            ),
        );
        sequencer.spawn(&[]);
        let gateway_addr = free_addr(ip);
        let admin_addr = free_addr(ip);
        let mut gateway = KtdNode::new(
            KTD,
            root.path(),
            "gateway",
            1,
            gateway_addr.clone(),
            with(
                tls("gateway"),
                &[
                    "gateway",
                    "--listen",
                    &gateway_addr,
                    "--admin-listen",
                    &admin_addr,
                    "--sequencers",
                    &sequencer_addr,
                ],
            ),
        );
        gateway.spawn(&[]);
        let key_file = root.path().join("auditor.key");
        let made = ktd(&["keygen", "--out", &key_file.display().to_string()]);
        assert!(made.status.success(), "{}", stderr(&made));
        let auditor_addr = free_addr(ip);
        let auditor_http = free_addr(ip);
        let mut auditor = KtdNode::new(
            KTD,
            root.path(),
            "auditor",
            1,
            auditor_addr.clone(),
            with(
                tls("auditor"),
                &[
                    "auditor",
                    "--namespace",
                    "adversarial.test",
                    "--data-dir",
                    &root.path().join("auditor").display().to_string(),
                    "--signing-key-file",
                    &key_file.display().to_string(),
                    "--gateway",
                    &format!("https://{gateway_addr}"),
                    "--listen",
                    &auditor_addr,
                    "--http-listen",
                    &auditor_http,
                ],
            ),
        );
        auditor.spawn(&[]);
        let secured = Self {
            certs,
            shard,
            sequencer,
            gateway,
            admin_addr,
            auditor,
            root,
        };
        secured.publish_and_verify("alice", "key-1").await;
        secured
    }

    /// `--addr` and the TLS flags of the `client` certificate, for `ktd` client commands.
    fn client_args(&self, more: &[&str]) -> Vec<String> {
        let mut args = vec![
            "--addr".to_string(),
            format!("https://{}", self.gateway.addr),
            "--tls-ca".into(),
            self.certs.join("ca.pem").display().to_string(),
            "--tls-cert".into(),
            self.certs.join("client.pem").display().to_string(),
            "--tls-key".into(),
            self.certs.join("client.key").display().to_string(),
        ];
        args.extend(more.iter().map(|arg| arg.to_string()));
        args
    }

    /// Publishes `label = value` as a client (retrying until the directory serves), waits for
    /// its commit, and checks that a verified lookup returns it.
    pub async fn publish_and_verify(&self, label: &str, value: &str) {
        Poll::new(
            format!("a verified publish of {label}"),
            Duration::from_secs(60),
        )
        .every(Duration::from_millis(300))
        .context(|| self.logs())
        .until_ok(|| async {
            let published = ktd(&self.client_args(&["publish", label, value, "--wait"]));
            if published.status.success() {
                Ok(())
            } else {
                Err(stderr(&published))
            }
        })
        .await;
        let lookup = ktd(&self.client_args(&["lookup", label, "--verify"]));
        assert!(lookup.status.success(), "{}", stderr(&lookup));
        assert!(
            String::from_utf8_lossy(&lookup.stdout).contains(value),
            "{}",
            String::from_utf8_lossy(&lookup.stdout)
        );
    }

    /// A channel to `addr` presenting the `stem` certificate (`None`: no certificate; the
    /// connection may then be refused).
    pub async fn channel(&self, addr: &str, stem: Option<&str>) -> Result<Channel, String> {
        let read = |name: String| std::fs::read(self.certs.join(name)).expect("read pem");
        let mut tls =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("ca.pem".into())));
        if let Some(stem) = stem {
            tls = tls.identity(Identity::from_pem(
                read(format!("{stem}.pem")),
                read(format!("{stem}.key")),
            ));
        }
        Endpoint::from_shared(format!("https://{addr}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .map_err(|error| format!("{error:?}"))
    }

    /// A channel with a certificate, which must connect.
    pub async fn as_role(&self, addr: &str, stem: &str) -> Channel {
        self.channel(addr, Some(stem))
            .await
            .unwrap_or_else(|error| panic!("connect to {addr} as {stem}: {error}"))
    }

    /// What must not change when the directory refuses a call.
    pub async fn state(&self) -> State {
        let gateway = self.as_role(&self.gateway.addr, "admin").await;
        let latest = api::directory_client::DirectoryClient::new(gateway)
            .get_epoch(api::GetEpochRequest::default())
            .await
            .expect("latest epoch")
            .into_inner();
        let sequencer = self.as_role(&self.sequencer.addr, "admin").await;
        let metadata = seq::sequencer_client::SequencerClient::new(sequencer.clone())
            .get_cluster_metadata(seq::GetClusterMetadataRequest {})
            .await
            .expect("metadata")
            .into_inner();
        let mut admin = seq::sequencer_admin_client::SequencerAdminClient::new(sequencer);
        let cluster = admin
            .get_cluster_status(seq::ClusterStatusRequest {})
            .await
            .expect("cluster status")
            .into_inner();
        let node = admin
            .get_node_status(seq::NodeStatusRequest {})
            .await
            .expect("node status")
            .into_inner();
        let shard = self.as_role(&self.shard.addr, "admin").await;
        let status = shard_pb::shard_client::ShardClient::new(shard)
            .status(shard_pb::StatusRequest::default())
            .await
            .expect("shard status")
            .into_inner();
        State {
            latest: (latest.epoch, latest.root_hash),
            metadata,
            raft: (node.term, node.leader_id, node.state),
            epochs: (cluster.open_epoch, cluster.last_committed_epoch),
            shard: (
                status.partition_states,
                status.built_epoch,
                status.fence_term,
                status.shard_map_version,
            ),
        }
    }

    /// Waits until the shard has built the latest committed epoch and nothing is sealed
    /// (the directory is at rest), and returns its state.
    pub async fn state_at_rest(&self) -> State {
        Poll::new("the directory at rest", Duration::from_secs(30))
            .every(Duration::from_millis(200))
            .until(|| async {
                let state = self.state().await;
                let at_rest = state.shard.1 == state.latest.0
                    && state.epochs.0 == state.epochs.1 + 1
                    && state.epochs.1 == state.latest.0;
                at_rest.then_some(state)
            })
            .await
    }

    /// Every process log, for failure messages.
    pub fn logs(&self) -> String {
        [&self.shard, &self.sequencer, &self.gateway, &self.auditor]
            .iter()
            .map(|node| format!("===== {} =====\n{}", node.name, node.log_text()))
            .collect()
    }

    /// Stops every process (each must exit cleanly: nothing the suite sent crashed it).
    pub fn stop(mut self) {
        for node in [
            &mut self.auditor,
            &mut self.gateway,
            &mut self.sequencer,
            &mut self.shard,
        ] {
            assert!(
                node.is_running(),
                "{} died:\n{}",
                node.name,
                node.log_text()
            );
            assert!(node.terminate(Duration::from_secs(30)).success());
        }
        drop(self.root);
    }
}

/// The state the suite compares before and after its calls.
#[derive(Debug, PartialEq)]
pub struct State {
    /// The gateway's latest committed epoch and root.
    pub latest: (u64, Vec<u8>),
    /// Cluster metadata and shard map.
    pub metadata: seq::ClusterMetadataResponse,
    /// Raft term, leader, this node's role.
    pub raft: (u64, u64, String),
    /// Open and last committed epoch.
    pub epochs: (u64, u64),
    /// Every partition's built epoch and root; built epoch, fence term, shard-map version.
    pub shard: (Vec<shard_pb::PartitionState>, u64, u64, u64),
}

/// A gRPC answer: its status code and message.
#[derive(Debug)]
pub struct Answer {
    pub code: Code,
    pub message: String,
}

impl Answer {
    /// Asserts a refusal that explains itself: not OK, a message, no transport internals.
    pub fn assert_clear(&self, what: &str) {
        if let Some(problem) = self.unclear(what) {
            panic!("{problem}");
        }
    }

    /// What is wrong with this answer as a refusal (`None`: it is a clear one).
    pub fn unclear(&self, what: &str) -> Option<String> {
        if self.code == Code::Ok {
            return Some(format!("{what} was accepted: {self:?}"));
        }
        if self.message.trim().is_empty() {
            return Some(format!("{what}: no message: {self:?}"));
        }
        let lower = self.message.to_lowercase();
        LEAKS
            .iter()
            .find(|leak| lower.contains(*leak))
            .map(|_| format!("{what}: internal text in {self:?}"))
    }
}

/// Asserts a tonic result is a clear refusal and returns it.
pub fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>) -> Answer {
    let status = match result {
        Ok(answer) => panic!("{what} was accepted: {answer:?}"),
        Err(status) => status,
    };
    let answer = Answer {
        code: status.code(),
        message: status.message().to_string(),
    };
    answer.assert_clear(what);
    answer
}

/// One gRPC message frame: compression flag, the length it claims, the payload.
pub fn frame(compressed: u8, claimed_len: u32, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(compressed);
    out.put_u32(claimed_len);
    out.put_slice(payload);
    out.freeze()
}

/// A request body sent in one piece.
struct Once(Option<Bytes>);

impl http_body::Body for Once {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> TaskPoll<Option<Result<Frame<Bytes>, Infallible>>> {
        TaskPoll::Ready(self.0.take().map(|bytes| Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

/// Sends `body` as the raw HTTP/2 body of a gRPC call to `path` (any bytes: framing is the
/// caller's) and returns the gRPC status, from the headers or the trailers; `Err` when no
/// status arrived (a transport failure: the server did not answer with a status).
pub async fn raw_call(channel: &Channel, path: &str, body: Bytes) -> Result<Answer, String> {
    use tonic::client::GrpcService;
    use tonic::codegen::http;
    let mut channel = channel.clone();
    std::future::poll_fn(|cx| GrpcService::poll_ready(&mut channel, cx))
        .await
        .map_err(|error| format!("{path}: channel not ready: {error:?}"))?;
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(Once(Some(body))))
        .map_err(|error| format!("{path}: request: {error}"))?;
    let response = GrpcService::call(&mut channel, request)
        .await
        .map_err(|error| format!("{path}: transport failure: {error:?}"))?;
    let answer = |status: tonic::Status| Answer {
        code: status.code(),
        message: status.message().to_string(),
    };
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return Ok(answer(status));
    }
    let mut body = response.into_body();
    loop {
        let next =
            std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx)).await;
        match next {
            None => return Err(format!("{path}: the answer ended without a grpc-status")),
            Some(Err(status)) => {
                return Err(format!("{path}: the answer's body failed: {status:?}"));
            }
            Some(Ok(frame)) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return tonic::Status::from_header_map(&trailers)
                        .map(answer)
                        .ok_or_else(|| format!("{path}: trailers without a grpc-status"));
                }
            }
        }
    }
}
