//! A poisoned epoch — one every shard replica refuses — is reported, not retried silently: the
//! leader's coordinator marks it poisoned after a run of refusals (`coordinator::stall`), the
//! leader's status carries the epoch, the attempts and the replicas' error, and the report clears
//! once the replicas take the epoch and it commits.
//!
//! The refusal here is a shard server that decodes only tiny request messages (smaller than any
//! part of an epoch's share the coordinator sends), the situation of a shard running with lower
//! limits than the sequencer's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ktd_core::AkdConfig;
use ktd_core::ShardMap;
use ktd_core::user::UpdateLimits;
use ktd_core::vrf::VrfKey;
use ktd_testkit::eventually;
use sequencer::pb;
use shard::api::ShardApi;
use shard::local::{LocalShard, NoPeers};
use shard::node::ShardNode;
use shard::server::ShardService;
use shard::store::StoreOptions;
use tokio::sync::oneshot;

use crate::support::cluster::TestCluster;
use crate::support::with_deadline;

type Wa = ktd_core::config::WhatsAppV1;

/// Partition bits of the test clusters (the sequencer's default).
const BITS: u8 = 4;

/// Serves `shard` on `address` until `stop`, decoding request messages up to `max_message`
/// bytes (`None`: the shard server's own limits).
async fn serve_shard(
    shard: Arc<dyn ShardApi>,
    address: SocketAddr,
    max_message: Option<usize>,
    stop: oneshot::Receiver<()>,
) -> SocketAddr {
    // The address may still be held by a server that is stopping: try for a while.
    let listener = eventually(
        "bind the shard server's address",
        Duration::from_secs(10),
        || async move { tokio::net::TcpListener::bind(address).await.ok() },
    )
    .await;
    let address = listener.local_addr().expect("address");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut service = ShardService::new(shard).into_server();
    if let Some(max) = max_message {
        service = service.max_decoding_message_size(max);
    }
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.await;
            })
            .await
    });
    address
}

async fn leader_stall(cluster: &TestCluster) -> Option<pb::CommitStall> {
    let status = cluster.client().cluster_status().await.ok()?;
    status
        .members
        .into_iter()
        .find(|member| member.node_id == status.leader_id)?
        .status?
        .commit_stall
}

#[test]
fn an_epoch_every_replica_refuses_is_reported_poisoned_and_the_report_clears_once_it_commits() {
    with_deadline(Duration::from_secs(120), || async {
        let seed = [7u8; 32];
        let vrf = VrfKey::from_seed(&seed).expect("seed");
        let public_key: String = vrf
            .public_key()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let cluster = TestCluster::start(1, move |config| {
            config.cluster.vrf_public_key = public_key.clone();
        })
        .await;
        let client = cluster.client();

        let shard_dir = tempfile::tempdir().expect("temp dir");
        let node = ShardNode::<Wa>::open(
            shard_dir.path(),
            &AkdConfig::WhatsAppV1,
            BITS,
            vrf,
            UpdateLimits::default(),
            StoreOptions::default(),
        )
        .expect("open the shard");
        let shard: Arc<dyn ShardApi> =
            Arc::new(LocalShard::load("s1", Arc::new(node), Arc::new(NoPeers)).expect("load"));
        let (stop_strict, stopped) = oneshot::channel();
        let address = serve_shard(
            shard.clone(),
            "127.0.0.1:0".parse().expect("address"),
            Some(256),
            stopped,
        )
        .await;
        let map =
            ShardMap::even(BITS, 1, vec![("s1".into(), format!("http://{address}"))]).expect("map");
        client
            .set_shard_map(shard::replicated::shard_map_to_pb(&map), 0)
            .await
            .expect("set the shard map");

        let updates: Vec<pb::Update> = (0..8)
            .map(|i| pb::Update {
                label: format!("user-{i}").into_bytes(),
                value: vec![i as u8; 600],
            })
            .collect();
        client.append(updates, None).await.expect("append");
        let sealed = client.seal(None).await.expect("seal");
        assert_eq!(sealed.epoch, 1);

        let stall = eventually(
            "epoch 1 reported poisoned",
            Duration::from_secs(60),
            || async { leader_stall(&cluster).await.filter(|stall| stall.poisoned) },
        )
        .await;
        assert_eq!(stall.epoch, 1);
        assert!(
            stall.attempts >= sequencer::coordinator::stall::POISON_AFTER,
            "{stall:?}"
        );
        assert!(stall.since_ms > 0, "{stall:?}");
        assert!(
            stall.last_error.contains("too large"),
            "the report names the replicas' refusal: {stall:?}"
        );
        let status = client.cluster_status().await.expect("status");
        assert_eq!(
            status.last_committed_epoch, 0,
            "nothing committed meanwhile"
        );

        // The shard server comes back with its normal limits on the same address: the epoch
        // commits and the report goes away.
        let _ = stop_strict.send(());
        let (_stop, stopped) = oneshot::channel();
        serve_shard(shard, address, None, stopped).await;
        eventually("epoch 1 commits", Duration::from_secs(60), || async {
            let status = client.cluster_status().await.ok()?;
            (status.last_committed_epoch >= 1).then_some(())
        })
        .await;
        eventually(
            "the stall report clears",
            Duration::from_secs(10),
            || async {
                let status = client.cluster_status().await.ok()?;
                let leader = status
                    .members
                    .iter()
                    .find(|member| member.node_id == status.leader_id)?;
                leader
                    .status
                    .as_ref()
                    .is_some_and(|status| status.commit_stall.is_none())
                    .then_some(())
            },
        )
        .await;
    });
}
