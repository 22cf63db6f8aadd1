//! `ktd` child processes (sequencers, shards, gateways, `ktd dev`): start, SIGKILL, SIGTERM,
//! restart from the data directory. Each process logs to a file under the test's root
//! directory; the logs are printed if a test fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sequencer::{ClientOptions, SequencerClient};

/// A VRF public key for tests.
pub const TEST_VRF_KEY: &str = "2222222222222222222222222222222222222222222222222222222222222222";

/// Writes `seed` as the directory's VRF seed file (`root/vrf-seed.hex`, mode 600, as `ktd`
/// requires) and returns its path.
pub fn write_vrf_seed(root: &Path, seed: &[u8; 32]) -> String {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = root.join("vrf-seed.hex");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .expect("seed file");
    writeln!(file, "{}", hex::encode(seed)).expect("write seed");
    path.display().to_string()
}

/// One `ktd` process slot: its address and data directory survive restarts.
pub struct KtdNode {
    pub id: u64,
    pub addr: String,
    /// The subcommand and the flags every start passes (`sequencer --listen .. --data-dir ..`).
    base_args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

/// Finds a free port on `ip` (bind port 0, then release it).
pub fn free_addr(ip: &str) -> String {
    let listener = std::net::TcpListener::bind(format!("{ip}:0")).expect("bind");
    listener.local_addr().expect("addr").to_string()
}

impl KtdNode {
    /// A process slot running `ktd <base_args> ...`, logging to `<root>/<name>.log`.
    pub fn new(name: &str, root: &Path, id: u64, addr: String, base_args: Vec<String>) -> Self {
        Self {
            id,
            addr,
            base_args,
            log: root.join(format!("{name}.log")),
            child: None,
        }
    }

    /// Starts the process with `extra` flags after the base ones.
    pub fn spawn(&mut self, extra: &[String]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_ktd"));
        command
            .args(&self.base_args)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("KTD_NODE_LOG")
                    .unwrap_or_else(|_| "info,openraft=error,h2=warn,hyper=warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(command.spawn().expect("start ktd"));
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                panic!(
                    "node {} did not exit within {limit:?} after SIGTERM",
                    self.id
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A `ktd sequencer` slot logging to `<root>/node-<id>.log`.
    pub fn sequencer(root: &Path, id: u64, addr: String, data_dir: PathBuf) -> Self {
        let base_args = vec![
            "sequencer".to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        Self::new(&format!("node-{id}"), root, id, addr, base_args)
    }

    /// A `ktd dev` slot on `ip` (free port) with its data under `root/dev`, logging to
    /// `root/dev.log`; `extra` flags follow the base ones.
    pub fn dev(root: &Path, ip: &str, extra: &[&str]) -> Self {
        let addr = free_addr(ip);
        let mut base_args = vec![
            "dev".to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            root.join("dev").display().to_string(),
        ];
        base_args.extend(extra.iter().map(|arg| arg.to_string()));
        Self::new("dev", root, 1, addr, base_args)
    }

    /// Restarts from the data directory: no node id, no peers, no --init.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "node {} is running", self.id);
        self.spawn(&[]);
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for KtdNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A cluster of `ktd sequencer` processes.
pub struct KtdCluster {
    pub nodes: BTreeMap<u64, KtdNode>,
    _root: tempfile::TempDir,
}

impl KtdCluster {
    /// Starts `n` processes on `127.0.0.(10+id)` and bootstraps them from node 1.
    pub fn start(n: u64) -> Self {
        Self::start_with(n, |_| Vec::new())
    }

    /// [`KtdCluster::start`] with `extra(id)` appended to node `id`'s flags.
    pub fn start_with(n: u64, extra: impl Fn(u64) -> Vec<String>) -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let addr = free_addr(&format!("127.0.0.{}", 10 + id));
            let data_dir = root.path().join(format!("node-{id}"));
            nodes.insert(id, KtdNode::sequencer(root.path(), id, addr, data_dir));
        }
        let peers: Vec<String> = nodes
            .values()
            .map(|node| format!("{}={}", node.id, node.addr))
            .collect();
        let peers = peers.join(",");
        for node in nodes.values_mut() {
            let mut args = vec![
                "--id".to_string(),
                node.id.to_string(),
                "--peers".into(),
                peers.clone(),
            ];
            if node.id == 1 {
                args.push("--init".into());
                args.push("--vrf-public-key".into());
                args.push(TEST_VRF_KEY.into());
            }
            args.extend(extra(node.id));
            node.spawn(&args);
        }
        Self { nodes, _root: root }
    }

    /// Every node's address.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.values().map(|node| node.addr.clone()).collect()
    }

    /// A client over every node, retrying generously (a failover is expected).
    pub fn client(&self) -> SequencerClient {
        SequencerClient::with_options(
            self.addrs(),
            ClientOptions {
                total_timeout: Duration::from_secs(20),
                max_attempts: 400,
                ..ClientOptions::default()
            },
        )
    }

    /// Every process log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .values()
            .map(|node| format!("===== node {} =====\n{}", node.id, node.log_text()))
            .collect()
    }

    /// The root directory (data directories and `node-<id>.log` files).
    #[allow(dead_code)]
    pub fn root(&self) -> &Path {
        self._root.path()
    }

    /// Keeps the root directory after the cluster is dropped (for looking at the logs).
    #[allow(dead_code)]
    pub fn keep_files(self) -> std::path::PathBuf {
        let KtdCluster { nodes, _root } = self;
        drop(nodes);
        _root.keep()
    }
}
