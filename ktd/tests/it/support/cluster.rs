//! Clusters of real `ktd` processes as the tests start them, and clients for them: a gateway
//! client that waits until the gateway serves ([`connect`]), a client for a
//! [`KtdCluster`] of sequencers ([`sequencer_client`]), committed epochs of distinct updates
//! ([`publish_epochs`]), and the three-sequencer, two-shard
//! directory with its gateways ([`Topology`]) that the cluster and runbook tests drive.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ktd_client::Client;
use ktd_core::vrf::VrfKey;
use ktd_testkit::Poll;
use ktd_testkit::net::free_addr;
use ktd_testkit::process::{KtdCluster, KtdNode};
use ktd_testkit::seed::write_vrf_seed;
use sequencer::{ClientOptions, SequencerClient};

use super::KTD;

/// Connects to the gateway at `addr`, waiting (up to 60 s) until it serves: it waits for the
/// cluster first.
pub async fn connect(addr: &str) -> Client {
    let url = format!("http://{addr}");
    Poll::new(
        format!("the gateway at {addr} to serve"),
        Duration::from_secs(60),
    )
    .every(Duration::from_millis(100))
    .until_ok(|| async {
        match tokio::time::timeout(Duration::from_secs(2), Client::connect(&url)).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(error)) => Err(format!("{error:#}")),
            Err(_) => Err("connect timed out".to_string()),
        }
    })
    .await
}

/// Publishes `rounds` epochs of `per_round` updates each (`{prefix}-{round}-{i}` = `key`), each
/// one committed before the next is published; returns the last committed epoch.
pub async fn publish_epochs(client: &Client, prefix: &str, rounds: usize, per_round: usize) -> u64 {
    let mut latest = 0;
    for round in 0..rounds {
        let updates = (0..per_round)
            .map(|i| {
                (
                    format!("{prefix}-{round}-{i}").into_bytes(),
                    b"key".to_vec(),
                )
            })
            .collect();
        let published = client.publish(updates, None).await.expect("publish");
        latest = client
            .wait_for_epoch(published.epoch)
            .await
            .expect("commit")
            .epoch;
    }
    latest
}

/// A client over every node of `cluster`, retrying generously (a failover is expected).
pub fn sequencer_client(cluster: &KtdCluster) -> SequencerClient {
    SequencerClient::with_options(
        cluster.addrs(),
        ClientOptions {
            total_timeout: Duration::from_secs(20),
            max_attempts: 400,
            ..ClientOptions::default()
        },
    )
}

/// Where and how a [`Topology`] runs.
#[derive(Clone, Debug)]
pub struct TopologyOptions {
    /// The directory's VRF seed.
    pub seed: [u8; 32],
    /// Sequencer `id` listens on `127.0.0.(ip_base + id)`, shard `i` on `ip_base + 10 + i`,
    /// gateway `i` on `ip_base + 20 + i`.
    pub ip_base: u8,
    /// Every sequencer start's `--epoch-interval` (a restart from the data directory keeps the
    /// id, peers and cluster metadata, but not the local epoch interval).
    pub epoch_interval: &'static str,
    /// How many shard servers (`s1`…).
    pub shards: u64,
    /// `--replication-factor` at `--init` (`None`: the sequencer's default, every partition on
    /// up to three servers).
    pub replication_factor: Option<u32>,
    /// More flags for node 1's `--init` (cluster limits).
    pub init_args: &'static [&'static str],
}

/// Three `ktd sequencer`s (bootstrapped from node 1), [`TopologyOptions::shards`] `ktd shard`s
/// holding 16 partitions (`--partition-bits 4`) in replica sets and one gateway, with data directories and `<name>.log` files under
/// one temporary root. Started shards first, then sequencers, then the gateway.
pub struct Topology {
    /// The VRF seed file the shards read.
    pub seed_file: String,
    /// The sequencers by node id.
    pub sequencers: BTreeMap<u64, KtdNode>,
    /// The shards, `s1` first.
    pub shards: Vec<KtdNode>,
    /// The gateways.
    pub gateways: Vec<KtdNode>,
    /// The sequencers' addresses, comma-separated: what `--sequencers` (and an operator's
    /// `KTD_SEQUENCERS`) holds.
    pub sequencer_list: String,
    options: TopologyOptions,
    // Declared last: the processes die before their directory is removed.
    root: tempfile::TempDir,
}

impl Topology {
    /// Starts the directory (it may still be electing a leader when this returns).
    pub fn start(options: TopologyOptions) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let seed_file = write_vrf_seed(root.path(), &options.seed);
        let sequencer_addrs: Vec<(u64, String)> = (1..=3u64)
            .map(|id| (id, free_addr(&options.ip(id))))
            .collect();
        let sequencer_list = sequencer_addrs
            .iter()
            .map(|(_, addr)| addr.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut topology = Self {
            seed_file,
            sequencers: BTreeMap::new(),
            shards: Vec::new(),
            gateways: Vec::new(),
            sequencer_list,
            options,
            root,
        };
        for index in 1..=topology.options.shards {
            let addr = free_addr(&topology.options.ip(10 + index));
            let mut shard = topology.shard_node(index, addr, &topology.shard_dir(index));
            shard.spawn(&[]);
            topology.shards.push(shard);
        }
        let shard_map = topology
            .shards
            .iter()
            .map(|node| format!("s{}=http://{}", node.id, node.addr))
            .collect::<Vec<_>>()
            .join(",");
        let peers = sequencer_addrs
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(",");
        let public_key = hex::encode(
            VrfKey::from_seed(&topology.options.seed)
                .expect("seed")
                .public_key(),
        );
        for (id, addr) in sequencer_addrs {
            let mut node = topology.sequencer_node(id, addr, &topology.sequencer_dir(id));
            let mut args = vec![
                "--id".to_string(),
                id.to_string(),
                "--peers".into(),
                peers.clone(),
            ];
            if id != 1 {
                args.push("--join".into());
            }
            if id == 1 {
                args.extend(
                    [
                        "--init",
                        "--vrf-public-key",
                        &public_key,
                        "--shards",
                        &shard_map,
                        "--partition-bits",
                        "4",
                    ]
                    .map(String::from),
                );
                if let Some(factor) = topology.options.replication_factor {
                    args.extend(["--replication-factor".to_string(), factor.to_string()]);
                }
                args.extend(topology.options.init_args.iter().map(|arg| arg.to_string()));
            }
            node.spawn(&args);
            topology.sequencers.insert(id, node);
        }
        topology.add_gateway();
        topology
    }

    /// The temporary root (data directories, logs, the seed file).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Sequencer `id`'s original data directory.
    pub fn sequencer_dir(&self, id: u64) -> PathBuf {
        self.root().join(format!("node-{id}"))
    }

    /// Shard `index`'s original data directory.
    pub fn shard_dir(&self, index: u64) -> PathBuf {
        self.root().join(format!("shard-{index}"))
    }

    /// A `ktd sequencer` slot `node-<id>` on `addr` with `data_dir` and the epoch interval
    /// (not started).
    pub fn sequencer_node(&self, id: u64, addr: String, data_dir: &Path) -> KtdNode {
        let interval = ["--epoch-interval", self.options.epoch_interval].map(String::from);
        KtdNode::sequencer(KTD, self.root(), id, addr, data_dir, &interval)
    }

    /// A `ktd shard` slot `shard-<index>` (id `s<index>`) on `addr` with `data_dir`, reading the
    /// seed file and following [`Topology::sequencer_list`] (not started). Copies the shard map
    /// moves away are deleted after 3 s (the default is 10 min), so tests see sources empty out
    /// and gateways still routing by an older map fail over.
    pub fn shard_node(&self, index: u64, addr: String, data_dir: &Path) -> KtdNode {
        let args = [
            "shard",
            "--id",
            &format!("s{index}"),
            "--listen",
            &addr,
            "--data-dir",
            &data_dir.display().to_string(),
            "--vrf-seed-file",
            &self.seed_file,
            "--partition-bits",
            "4",
            "--sequencers",
            &self.sequencer_list,
            "--orphan-grace",
            "3s",
            "--prune-interval",
            "1s",
        ]
        .map(String::from)
        .to_vec();
        KtdNode::new(
            KTD,
            self.root(),
            &format!("shard-{index}"),
            index,
            addr,
            args,
        )
    }

    /// Starts one more gateway (`gateway-<n>`) in front of the sequencers.
    pub fn add_gateway(&mut self) {
        self.add_gateway_with(&[]);
    }

    /// Starts one more gateway (`gateway-<n>`) in front of the sequencers, with `extra` flags.
    pub fn add_gateway_with(&mut self, extra: &[&str]) {
        let index = self.gateways.len() as u64 + 1;
        let addr = free_addr(&self.options.ip(20 + index));
        let mut args = [
            "gateway",
            "--listen",
            &addr,
            "--sequencers",
            &self.sequencer_list,
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|arg| arg.to_string()));
        let mut node = KtdNode::new(
            KTD,
            self.root(),
            &format!("gateway-{index}"),
            index,
            addr,
            args,
        );
        node.spawn(&[]);
        self.gateways.push(node);
    }

    /// A client over the sequencers of [`Topology::sequencer_list`], retrying generously.
    pub fn sequencer_client(&self) -> SequencerClient {
        SequencerClient::with_options(
            self.sequencer_list.split(',').map(String::from),
            ClientOptions {
                total_timeout: Duration::from_secs(20),
                max_attempts: 400,
                ..ClientOptions::default()
            },
        )
    }

    /// `http://ip:port` of the first gateway.
    pub fn gateway_url(&self) -> String {
        format!("http://{}", self.gateways[0].addr)
    }

    /// Sets [`Topology::sequencer_list`] to the current sequencers (after a replacement).
    pub fn update_sequencer_list(&mut self) {
        self.sequencer_list = self
            .sequencers
            .values()
            .map(|node| node.addr.as_str())
            .collect::<Vec<_>>()
            .join(",");
    }

    /// Every process log, for failure messages.
    pub fn logs(&self) -> String {
        self.sequencers
            .values()
            .chain(&self.shards)
            .chain(&self.gateways)
            .map(|node| {
                format!(
                    "===== {} {} =====\n{}",
                    node.name,
                    node.addr,
                    node.log_text()
                )
            })
            .collect()
    }
}

impl TopologyOptions {
    fn ip(&self, offset: u64) -> String {
        format!("127.0.0.{}", u64::from(self.ip_base) + offset)
    }
}
