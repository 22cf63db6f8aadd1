//! Mutual TLS and roles over real processes: `ktd certs` makes a development CA; a sequencer, a
//! shard server and a gateway (public port + `--admin-listen` port) run with their component
//! certificates (`sequencer-1`, `shard`, `gateway`). Components talk to each other normally (a client-certificate publish is
//! committed through them and its lookup verifies); a client without a certificate, with one
//! from another CA, or speaking plaintext is refused; a client certificate cannot call the
//! admin service on the gateway's admin port or the sequencer's admin RPCs; an admin
//! certificate can; an auditor cannot publish; a gateway certificate cannot vote, change the
//! shard map or drive a shard build, a shard certificate cannot append, and one sequencer's
//! certificate cannot speak Raft for another node id.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use ktd_core::vrf::VrfKey;
use ktd_proto::ktd::sequencer::v1 as seq;
use ktd_proto::ktd::v1 as api;
use ktd_testkit::net::free_addr;
use ktd_testkit::process::KtdNode;
use ktd_testkit::seed::write_vrf_seed;
use ktd_testkit::{Poll, with_deadline};
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::support::KTD;
use crate::support::cli::ktd;

const SEED: [u8; 32] = [0x3e; 32];
const IP: &str = "127.0.0.41";

/// `--addr ADDR` plus the TLS flags for the `stem` certificate of `dir`.
fn as_role(dir: &Path, ca: &Path, stem: &str, addr: &str) -> Vec<String> {
    vec![
        "--addr".into(),
        format!("https://{addr}"),
        "--tls-ca".into(),
        ca.display().to_string(),
        "--tls-cert".into(),
        dir.join(format!("{stem}.pem")).display().to_string(),
        "--tls-key".into(),
        dir.join(format!("{stem}.key")).display().to_string(),
    ]
}

fn with(mut base: Vec<String>, more: &[&str]) -> Vec<String> {
    base.extend(more.iter().map(|arg| arg.to_string()));
    base
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A tonic endpoint to `addr` trusting `ca`, presenting `stem`'s certificate if given.
fn endpoint(dir: &Path, addr: &str, stem: Option<&str>) -> Endpoint {
    let read = |name: String| std::fs::read(dir.join(name)).expect("read pem");
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
}

#[test]
fn mutual_tls_refuses_strangers_and_keeps_admin_rpcs_for_admins() {
    with_deadline(Duration::from_secs(120), || async {
        let root = tempfile::tempdir().expect("temp dir");
        let certs = root.path().join("certs");
        let made = ktd(&[
            "certs".to_string(),
            "--out".into(),
            certs.display().to_string(),
            "--hosts".into(),
            format!("{IP},localhost"),
        ]);
        assert!(made.status.success(), "{}", stderr(&made));
        let ca = certs.join("ca.pem");
        let tls_of = |stem: &str| as_role(&certs, &ca, stem, "unused")[2..].to_vec();

        let seed_file = write_vrf_seed(root.path(), &SEED);
        let shard_addr = free_addr(IP);
        let mut shard = KtdNode::new(
            KTD,
            root.path(),
            "shard",
            1,
            shard_addr.clone(),
            with(
                tls_of("shard"),
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
                    "2",
                ],
            ),
        );
        shard.spawn(&[]);
        let sequencer_addr = free_addr(IP);
        let public_key = hex::encode(VrfKey::from_seed(&SEED).expect("seed").public_key());
        let mut sequencer = KtdNode::new(
            KTD,
            root.path(),
            "sequencer",
            1,
            sequencer_addr.clone(),
            with(
                tls_of("sequencer-1"),
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
                    &format!("s1=http://{shard_addr}"),
                    "--partition-bits",
                    "2",
                    "--epoch-interval",
                    "300ms",
                ],
            ),
        );
        sequencer.spawn(&[]);
        let gateway_addr = free_addr(IP);
        let admin_addr = free_addr(IP);
        let mut gateway = KtdNode::new(
            KTD,
            root.path(),
            "gateway",
            1,
            gateway_addr.clone(),
            with(
                tls_of("gateway"),
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

        // Components talk to each other over mutual TLS: a client's publish is committed.
        let client = as_role(&certs, &ca, "client", &gateway_addr);
        Poll::new("a publish over mutual TLS", Duration::from_secs(60))
            .every(Duration::from_millis(300))
            .context(|| {
                format!(
                    "--- sequencer\n{}\n--- gateway\n{}",
                    sequencer.log_text(),
                    gateway.log_text()
                )
            })
            .until_ok(|| async {
                let published = ktd(&with(
                    client.clone(),
                    &["publish", "alice", "key-1", "--wait"],
                ));
                if published.status.success() {
                    Ok(())
                } else {
                    Err(stderr(&published))
                }
            })
            .await;
        let lookup = ktd(&with(client.clone(), &["lookup", "alice", "--verify"]));
        assert!(lookup.status.success(), "{}", stderr(&lookup));
        assert!(String::from_utf8_lossy(&lookup.stdout).contains("key-1"));

        // No certificate: the handshake is refused.
        let no_cert = endpoint(&certs, &gateway_addr, None).connect().await;
        let refused = match no_cert {
            Err(_) => true,
            Ok(channel) => api::directory_client::DirectoryClient::new(channel)
                .get_epoch(api::GetEpochRequest::default())
                .await
                .is_err(),
        };
        assert!(refused, "a client without a certificate was served");
        // A certificate from another CA, and plaintext: refused too.
        let other = root.path().join("other-ca");
        assert!(
            ktd(&[
                "certs".to_string(),
                "--out".into(),
                other.display().to_string()
            ])
            .status
            .success()
        );
        let stranger = ktd(&with(
            as_role(&other, &ca, "client", &gateway_addr),
            &["epoch"],
        ));
        assert!(
            !stranger.status.success(),
            "a foreign certificate was served"
        );
        let plaintext = ktd(&[
            "--addr".to_string(),
            format!("http://{gateway_addr}"),
            "epoch".into(),
        ]);
        assert!(!plaintext.status.success(), "plaintext was served");

        // The admin port: a client certificate is denied, an admin certificate is served.
        let denied = ktd(&with(
            as_role(&certs, &ca, "client", &admin_addr),
            &["seal"],
        ));
        assert!(!denied.status.success());
        assert!(
            stderr(&denied).contains("PermissionDenied") && stderr(&denied).contains("admin"),
            "{}",
            stderr(&denied)
        );
        let published = ktd(&with(client.clone(), &["publish", "bob", "key-2"]));
        assert!(published.status.success(), "{}", stderr(&published));
        let sealed = ktd(&with(
            as_role(&certs, &ca, "admin", &admin_addr),
            &["status"],
        ));
        assert!(sealed.status.success(), "{}", stderr(&sealed));
        // The public port no longer serves the admin service.
        let moved = ktd(&with(
            as_role(&certs, &ca, "admin", &gateway_addr),
            &["status"],
        ));
        assert!(
            !moved.status.success(),
            "Admin is served on the public port"
        );

        // The sequencer's admin RPCs: not for client certificates.
        let channel = endpoint(&certs, &sequencer_addr, Some("client"))
            .connect()
            .await
            .expect("a client certificate may connect");
        let status = seq::sequencer_admin_client::SequencerAdminClient::new(channel)
            .transfer_leader(seq::TransferLeaderRequest { to_node_id: 1 })
            .await
            .expect_err("a client transferred leadership");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

        // Component roles are split: a gateway certificate (every gateway holds one) is not a
        // Raft peer, cannot re-point the shard map and cannot drive a shard's epoch steps; a
        // shard certificate cannot append; and no role commits an epoch over the wire.
        let as_gateway = endpoint(&certs, &sequencer_addr, Some("gateway"))
            .connect()
            .await
            .expect("a gateway certificate may connect");
        let status = seq::sequencer_admin_client::SequencerAdminClient::new(as_gateway.clone())
            .set_shard_map(seq::SetShardMapRequest::default())
            .await
            .expect_err("a gateway changed the shard map");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let status = ktd_proto::ktd::raft::v1::raft_client::RaftClient::new(as_gateway)
            .vote(ktd_proto::ktd::raft::v1::VoteRequest::default())
            .await
            .expect_err("a gateway voted");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let as_gateway_to_shard = endpoint(&certs, &shard_addr, Some("gateway"))
            .connect()
            .await
            .expect("connect");
        let status = ktd_proto::ktd::shard::v1::shard_client::ShardClient::new(as_gateway_to_shard)
            .build_epoch(futures::stream::iter([
                ktd_proto::ktd::shard::v1::BuildEpochRequest::default(),
            ]))
            .await
            .expect_err("a gateway drove a build");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let as_shard = endpoint(&certs, &sequencer_addr, Some("shard"))
            .connect()
            .await
            .expect("connect");
        let status = seq::sequencer_client::SequencerClient::new(as_shard)
            .append(seq::AppendRequest::default())
            .await
            .expect_err("a shard appended");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        // Sequencer 2's certificate cannot speak Raft as node 1.
        let as_sequencer_2 = endpoint(&certs, &sequencer_addr, Some("sequencer-2"))
            .connect()
            .await
            .expect("connect");
        let forged_vote = ktd_proto::ktd::raft::v1::VoteRequest {
            vote: Some(ktd_proto::ktd::raft::v1::Vote {
                leader_id: Some(ktd_proto::ktd::raft::v1::LeaderId {
                    term: 1_000,
                    node_id: 1,
                }),
                committed: false,
            }),
            ..Default::default()
        };
        let status = ktd_proto::ktd::raft::v1::raft_client::RaftClient::new(as_sequencer_2)
            .vote(forged_vote)
            .await
            .expect_err("sequencer 2 voted as node 1");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains("bound to node 2"), "{status:?}");

        // An auditor reads but cannot publish.
        let auditor = as_role(&certs, &ca, "auditor", &gateway_addr);
        assert!(ktd(&with(auditor.clone(), &["epoch"])).status.success());
        let publish = ktd(&with(auditor, &["publish", "carol", "key-3"]));
        assert!(
            stderr(&publish).contains("PermissionDenied"),
            "{}",
            stderr(&publish)
        );

        for node in [&mut gateway, &mut sequencer, &mut shard] {
            assert!(node.terminate(Duration::from_secs(30)).success());
        }
    });
}
