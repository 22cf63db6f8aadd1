//! Replicas on disk, over real processes (3 sequencers, 3 shard servers with replication factor
//! 3, 1 gateway on 127.0.0.7x): "built" means durable. Every shard server is SIGKILLed the moment
//! an epoch's root is committed; reopened offline, a majority of each partition's replicas holds
//! that epoch's built marker with the same root, and those roots stitch to the committed root.
//! Restarted, the servers serve the epoch and commit the next one.
//!
//! (The runbooks in `runbooks.rs` cover a server down, a lost disk, a disagreeing replica and
//! map changes; `cluster.rs` compares a replicated cluster with stock akd epoch by epoch.)

use std::collections::BTreeMap;
use std::time::Duration;

use ktd_core::config::WhatsAppV1;
use ktd_core::stitch::TopTree;
use ktd_core::tree::PartitionRoot;
use ktd_testkit::grpc::wait_health;
use ktd_testkit::with_deadline;
use shard::store::{RocksStore, StoreOptions};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::cluster::{Topology, TopologyOptions, connect};

const SEED: [u8; 32] = [0x6b; 32];
const BITS: u8 = 4;

#[test]
fn shard_servers_killed_right_after_a_commit_reopen_with_the_epoch_built() {
    with_deadline(Duration::from_secs(150), || async {
        let mut topology = Topology::start(TopologyOptions {
            seed: SEED,
            ip_base: 70,
            epoch_interval: "1h",
            shards: 3,
            replication_factor: Some(3),
            init_args: &[],
        });
        let client = connect(&topology.gateways[0].addr).await;
        let mut committed = None;
        for round in 0..3u32 {
            let updates = (0..200u32)
                .map(|i| (format!("durable-{round}-{i}").into_bytes(), b"key".to_vec()))
                .collect();
            client.publish(updates, None).await.expect("publish");
            committed = Some(client.seal().await.expect("seal and commit"));
        }
        let committed = committed.expect("an epoch");
        // The root is committed only once a majority of every replica set reported the epoch
        // built; kill every server at once, before anything else can happen.
        for shard in &mut topology.shards {
            shard.kill9();
        }
        let dirs: Vec<_> = (1..=3).map(|index| topology.shard_dir(index)).collect();
        let markers = tokio::task::spawn_blocking(move || {
            dirs.iter()
                .map(|dir| {
                    let (store, _) =
                        RocksStore::open(dir, StoreOptions::default()).expect("reopen the store");
                    store.built_markers().expect("built markers")
                })
                .collect::<Vec<_>>()
        })
        .await
        .expect("read markers");
        let mut roots: Vec<Option<PartitionRoot>> = Vec::new();
        for partition in 0..1u32 << BITS {
            let mut at_epoch: BTreeMap<String, usize> = BTreeMap::new();
            let mut root = None;
            for server in &markers {
                let marker = server
                    .iter()
                    .find(|marker| marker.partition == partition)
                    .unwrap_or_else(|| panic!("partition {partition}: no built marker"));
                assert!(
                    marker.epoch + 1 >= committed.epoch,
                    "partition {partition}: a replica lost more than the last epoch: {marker:?}"
                );
                if marker.epoch == committed.epoch {
                    *at_epoch.entry(format!("{:?}", marker.root)).or_default() += 1;
                    root = Some(marker.root);
                }
            }
            assert_eq!(
                at_epoch.len(),
                1,
                "partition {partition}: replicas built epoch {} with different roots: {at_epoch:?}",
                committed.epoch
            );
            let count = at_epoch.values().sum::<usize>();
            assert!(
                count >= 2,
                "partition {partition}: only {count} of 3 replicas hold epoch {} on disk",
                committed.epoch
            );
            roots.push(root.expect("a root"));
        }
        let top = TopTree::<WhatsAppV1>::new(BITS, roots).expect("top tree");
        assert_eq!(
            top.root_hash(),
            committed.root_hash,
            "the roots on disk stitch to the committed root"
        );

        for shard in &mut topology.shards {
            shard.restart();
        }
        for shard in &topology.shards {
            wait_health(
                &shard.addr,
                ServingStatus::Serving,
                "a restarted shard server",
            )
            .await;
        }
        let found = client
            .lookup(b"durable-2-7", None)
            .await
            .expect("verified lookup after the restart");
        assert_eq!(found.epoch, committed.epoch);
        client
            .publish(vec![(b"after".to_vec(), b"key".to_vec())], None)
            .await
            .expect("publish");
        let next = client.seal().await.expect("the next epoch commits");
        assert_eq!(next.epoch, committed.epoch + 1);
    });
}
