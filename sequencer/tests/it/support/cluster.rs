//! An in-process test cluster: real nodes, each serving gRPC on its own `127.0.0.<id>` address
//! with its own data directory, stopped and restarted like processes would be.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use ktd_testkit::eventually;
use ktd_testkit::seed::TEST_VRF_KEY;
use sequencer::node::WeakSequencer;
use sequencer::{ClientOptions, Sequencer, SequencerClient, SequencerConfig, SequencerError, pb};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct RunningNode {
    stop: oneshot::Sender<()>,
    task: JoinHandle<sequencer::Result<()>>,
    /// The node, once started (weak: stopping it is not held up by the test).
    node: Arc<Mutex<Option<WeakSequencer>>>,
}

/// A cluster of in-process nodes.
pub struct TestCluster {
    _root: tempfile::TempDir,
    root_path: PathBuf,
    /// Every node ever started: id → address.
    addrs: BTreeMap<u64, String>,
    running: BTreeMap<u64, RunningNode>,
    tweak: Box<dyn Fn(&mut SequencerConfig) + Send + Sync>,
}

/// A fast-retrying client for tests.
pub fn client_for(addrs: impl IntoIterator<Item = String>) -> SequencerClient {
    SequencerClient::with_options(
        addrs,
        ClientOptions {
            total_timeout: Duration::from_secs(20),
            max_attempts: 200,
            ..ClientOptions::default()
        },
    )
}

impl TestCluster {
    /// Starts `voters` nodes (ids 1..=voters) and bootstraps them as one cluster from node 1;
    /// `tweak` adjusts every node's configuration.
    pub async fn start(
        voters: u64,
        tweak: impl Fn(&mut SequencerConfig) + Send + Sync + 'static,
    ) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let mut cluster = Self {
            root_path: root.path().to_path_buf(),
            _root: root,
            addrs: BTreeMap::new(),
            running: BTreeMap::new(),
            tweak: Box::new(tweak),
        };
        let mut listeners = BTreeMap::new();
        for id in 1..=voters {
            let listener = TcpListener::bind(format!("127.0.0.{id}:0"))
                .await
                .expect("bind");
            cluster
                .addrs
                .insert(id, listener.local_addr().expect("addr").to_string());
            listeners.insert(id, listener);
        }
        let peers: Vec<String> = cluster
            .addrs
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect();
        for (id, listener) in listeners {
            let mut config = cluster.config(id, Some(id));
            config.peers = peers.clone();
            config.init = id == 1;
            config.join = id != 1;
            cluster.spawn(id, config, listener);
        }
        cluster.wait_leader().await;
        eventually("cluster metadata", Duration::from_secs(20), || async {
            let metadata = cluster.client().cluster_metadata().await.ok()?;
            metadata.metadata.map(|_| ())
        })
        .await;
        cluster
    }

    fn config(&self, id: u64, configured_id: Option<u64>) -> SequencerConfig {
        let mut config = SequencerConfig {
            id: configured_id,
            listen: self.addrs[&id].clone(),
            data_dir: self.data_dir(id),
            ..SequencerConfig::default()
        };
        config.cluster.vrf_public_key = TEST_VRF_KEY.into();
        config.epoch.interval = Duration::from_secs(3600);
        (self.tweak)(&mut config);
        config
    }

    /// Starts a node as `sequencer::run` does (its coordinator included), keeping a weak
    /// handle so tests can propose commits in process, as the leader's coordinator does.
    fn spawn(&mut self, id: u64, config: SequencerConfig, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let node = Arc::new(Mutex::new(None));
        let handle = node.clone();
        let task = tokio::spawn(async move {
            let sequencer = Sequencer::start(config).await?;
            sequencer.spawn_coordinator(Arc::new(shard::cluster::GrpcConnector::default()));
            *handle.lock().expect("handle lock") = Some(sequencer.downgrade());
            sequencer::serve(sequencer, listener, async move {
                let _ = stopped.await;
            })
            .await
        });
        self.running.insert(id, RunningNode { stop, task, node });
    }

    /// Proposes `commit` on the current leader, in process (the only way an epoch commits:
    /// there is no CommitEpoch RPC); follows leadership changes for up to 20 s.
    pub async fn commit_epoch(
        &self,
        commit: pb::CommitEpochRequest,
    ) -> sequencer::Result<pb::CommitEpochResponse> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let nodes: Vec<Sequencer> = self
                .running
                .values()
                .filter_map(|node| node.node.lock().expect("handle lock").as_ref()?.upgrade())
                .collect();
            let mut last = None;
            for node in nodes {
                match node.commit_epoch(commit.clone()).await {
                    Err(error @ SequencerError::NotLeader { .. }) => last = Some(error),
                    other => return other,
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(last.unwrap_or(SequencerError::NotLeader {
                    leader_id: None,
                    leader_addr: None,
                }));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Node `id` in this process, if it is running (for reading its internal gauges).
    pub fn node(&self, id: u64) -> Option<Sequencer> {
        self.running
            .get(&id)?
            .node
            .lock()
            .expect("handle lock")
            .as_ref()?
            .upgrade()
    }

    /// Replaces the configuration tweak used by later (re)starts.
    pub fn set_tweak(&mut self, tweak: impl Fn(&mut SequencerConfig) + Send + Sync + 'static) {
        self.tweak = Box::new(tweak);
    }

    /// The data directory of node `id`.
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.root_path.join(format!("node-{id}"))
    }

    /// The address of node `id`.
    pub fn addr(&self, id: u64) -> String {
        self.addrs[&id].clone()
    }

    /// Ids of running nodes.
    pub fn running_ids(&self) -> Vec<u64> {
        self.running.keys().copied().collect()
    }

    /// A client over every running node.
    pub fn client(&self) -> SequencerClient {
        client_for(self.running.keys().map(|id| self.addr(*id)))
    }

    /// Starts a brand-new, uninitialised node `id` (to be added as a learner).
    pub async fn add_node(&mut self, id: u64) -> String {
        let listener = TcpListener::bind(format!("127.0.0.{id}:0"))
            .await
            .expect("bind");
        self.addrs
            .insert(id, listener.local_addr().expect("addr").to_string());
        let mut config = self.config(id, Some(id));
        config.join = true;
        self.spawn(id, config, listener);
        self.addr(id)
    }

    /// Stops node `id` gracefully and waits until it has stopped.
    pub async fn stop(&mut self, id: u64) {
        let node = self.running.remove(&id).expect("node is running");
        let _ = node.stop.send(());
        let result = tokio::time::timeout(Duration::from_secs(30), node.task)
            .await
            .expect("node stops within 30 s")
            .expect("node task did not panic");
        result.expect("node shut down cleanly");
    }

    /// Restarts node `id` from its data directory, with no node id or init flag configured.
    pub async fn restart(&mut self, id: u64) {
        assert!(!self.running.contains_key(&id), "node {id} is running");
        let listener = eventually("rebind", Duration::from_secs(10), || async {
            TcpListener::bind(self.addr(id)).await.ok()
        })
        .await;
        let config = self.config(id, None);
        self.spawn(id, config, listener);
    }

    /// Stops every running node.
    pub async fn shutdown(mut self) {
        for id in self.running_ids() {
            self.stop(id).await;
        }
    }

    /// A node's own status.
    pub async fn status(&self, id: u64) -> Option<pb::NodeStatus> {
        self.client().node_status_at(&self.addr(id)).await.ok()
    }

    /// Waits until the running voters agree on a leader; returns it.
    pub async fn wait_leader(&self) -> u64 {
        eventually("a leader", Duration::from_secs(20), || async {
            let mut leader = None;
            for id in self.running_ids() {
                let status = self.status(id).await?;
                if status.state == "leader" {
                    leader = Some(status.node_id);
                }
            }
            let leader = leader?;
            for id in self.running_ids() {
                let status = self.status(id).await?;
                if status.state != "learner" && status.leader_id != leader {
                    return None;
                }
            }
            Some(leader)
        })
        .await
    }

    /// Waits until every node in `ids` has applied the same index as the leader has committed;
    /// returns that index.
    pub async fn wait_converged(&self, ids: &[u64]) -> u64 {
        eventually("nodes to converge", Duration::from_secs(30), || async {
            let leader = self.wait_leader().await;
            let committed = self.status(leader).await?.committed_index;
            for id in ids {
                if self.status(*id).await?.applied_index != committed {
                    return None;
                }
            }
            Some(committed)
        })
        .await
    }

    /// Node `id`'s log events from index 1 through `to`.
    pub async fn log(&self, id: u64, to: u64) -> Vec<pb::LogEvent> {
        let mut stream = self
            .client()
            .watch_log_at(&self.addr(id), 1)
            .await
            .expect("watch log");
        let mut events = Vec::new();
        while events
            .last()
            .is_none_or(|event: &pb::LogEvent| event.index < to)
        {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("log event within 10 s")
                .expect("stream open")
                .expect("log event");
            events.push(event);
        }
        events
    }
}

/// The `(sequence, label, value)` of every applied update in `events`, in log order.
pub fn sequenced_updates(events: &[pb::LogEvent]) -> Vec<(u64, Vec<u8>, Vec<u8>)> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(pb::log_event::Kind::Append(append)) => Some(append),
            _ => None,
        })
        .flat_map(|append| {
            append
                .updates
                .iter()
                .map(|update| (update.sequence, update.label.clone(), update.value.clone()))
        })
        .collect()
}

/// One update.
pub fn update(label: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> pb::Update {
    pb::Update {
        label: label.into(),
        value: value.into(),
    }
}
