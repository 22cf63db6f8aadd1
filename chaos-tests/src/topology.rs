//! A real ktd cluster on one machine: 3 sequencer processes, N shard processes (default 2; every
//! partition held by `--replication-factor` of them) and 1 gateway on `127.0.0.x` with free
//! ports and data directories under one temporary root. Sequencers dial each other through a
//! fault proxy per directed link ([`Links`], `--peer-override`); gateways reach the sequencers
//! directly. Shards reach the sequencers directly and everyone reaches the shards at their real
//! addresses, unless [`TopologyOptions::fence_shards`] is set: then each shard sits behind a
//! [`ShardFence`] (its shard-map address and its `--sequencers` are proxies), so that it can be
//! cut off the network. A shard's data directory can be deleted while it is down
//! ([`Process::wipe_data`]). Every process
//! logs to `<root>/<name>.log`. Processes can be SIGKILLed and restarted from their data
//! directory, or paused with SIGSTOP and resumed with SIGCONT. Dropping the [`Topology`] kills
//! every process it started (and resumes paused ones first so that they die).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ktd_client::Client;
use ktd_testkit::process::{KtdNode, ProcessError, wait_timeout};

use crate::proxy::{LinkFault, Links, ShardFence};

/// Why the harness could not build or drive the cluster (never the system under test's fault).
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// The `ktd` binary is missing.
    #[error(
        "the ktd binary was not found at {0}; build it with `cargo build --release -p ktd --bin ktd` \
         (or run `cargo test --release --workspace`), or point KTD_BIN / --ktd at it"
    )]
    BinaryMissing(PathBuf),
    /// A local I/O step failed (temp dir, log file, port probe, spawn).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The cluster did not become healthy in time.
    #[error("the cluster did not become healthy within {limit:?}: {last_error}")]
    NotHealthy {
        /// The bound.
        limit: Duration,
        /// The last error seen while waiting.
        last_error: String,
    },
    /// A process slot was used in the wrong state (e.g. resuming one that is not paused).
    #[error("{0}")]
    State(String),
    /// The VRF seed could not be turned into a public key.
    #[error("VRF key: {0}")]
    Vrf(String),
}

impl From<ProcessError> for TopologyError {
    fn from(error: ProcessError) -> Self {
        match error {
            ProcessError::Io { what, source } => Self::Io { what, source },
            ProcessError::State(message) => Self::State(message),
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TopologyError {
    let what = what.into();
    move |source| TopologyError::Io { what, source }
}

/// Where the `ktd` binary is: `explicit`, else `$KTD_BIN`, else next to the running executable
/// (`target/release/ktd` for both `ktd-chaos` and the test binaries in `target/release/deps`),
/// else `$CARGO_TARGET_DIR/release/ktd` (default `$HOME/.cache/ktd-target`).
pub fn find_ktd(explicit: Option<&Path>) -> Result<PathBuf, TopologyError> {
    if let Some(path) = explicit {
        return exists(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("KTD_BIN") {
        return exists(PathBuf::from(path));
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("ktd");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cache/ktd-target")
        });
    exists(target.join("release/ktd"))
}

fn exists(path: PathBuf) -> Result<PathBuf, TopologyError> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(TopologyError::BinaryMissing(path))
    }
}

/// A free `ip:port` (bind port 0, then release it).
fn free_addr(ip: &str) -> Result<String, TopologyError> {
    ktd_testkit::net::try_free_addr(ip).map_err(io(format!("bind {ip}:0")))
}

/// What a process is in the cluster.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A sequencer node (Raft voter).
    Sequencer,
    /// A shard server.
    Shard,
    /// A gateway.
    Gateway,
}

/// One `ktd` process slot: address, data directory and log survive restarts. A process this
/// harness started is a [`KtdNode`]; one of a running cluster is driven by the inventory's
/// shell [`Hooks`].
pub struct Process {
    /// Its name (`seq-1`, `shard-2`, `gateway-1`) and log file stem.
    pub name: String,
    /// What it is.
    pub role: Role,
    /// The sequencer node id, or the index among its role.
    pub id: u64,
    /// `ip:port` it listens on.
    pub addr: String,
    /// Its data directory, if the harness started it (shards only; what `wipe-replica`
    /// deletes).
    data_dir: Option<PathBuf>,
    driver: Driver,
}

/// How the harness drives a process.
enum Driver {
    /// A child process the harness started.
    Child(KtdNode),
    /// A process this harness did not start (a drill against a running cluster).
    Hooks {
        hooks: Hooks,
        /// Its log, if the inventory names one.
        log: PathBuf,
        /// Whether the harness believes the process runs (it was not killed by a hook since
        /// the last start).
        up: bool,
        paused: bool,
    },
}

/// Shell commands that act on a process the harness did not start (`sh -c`, with `KTD_NODE`,
/// `KTD_NODE_ID` and `KTD_NODE_ADDR` set). A missing hook makes the faults that need it fail
/// with a clear harness error.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Kill the process abruptly (`kill -9 $(cat /tmp/ktd-local/sequencer-1.pid)`).
    pub kill: Option<String>,
    /// Start it again from its data (must return once it is launched, not wait for it).
    pub start: Option<String>,
    /// Freeze it (`kill -STOP ...`).
    pub pause: Option<String>,
    /// Unfreeze it (`kill -CONT ...`).
    pub resume: Option<String>,
}

/// How long a hook may run.
const HOOK_LIMIT: Duration = Duration::from_secs(30);

impl Process {
    fn new(
        binary: &Path,
        root: &Path,
        name: String,
        role: Role,
        id: u64,
        addr: String,
        base_args: Vec<String>,
    ) -> Self {
        let node = KtdNode::new(binary, root, &name, id, addr.clone(), base_args);
        Self {
            name,
            role,
            id,
            addr,
            data_dir: None,
            driver: Driver::Child(node),
        }
    }

    /// A process of a running cluster, driven by `hooks`; its log (if any) is read from `log`.
    pub fn external(
        name: String,
        role: Role,
        id: u64,
        addr: String,
        hooks: Hooks,
        log: Option<PathBuf>,
    ) -> Self {
        Self {
            name,
            role,
            id,
            addr,
            data_dir: None,
            driver: Driver::Hooks {
                hooks,
                log: log.unwrap_or_default(),
                up: true,
                paused: false,
            },
        }
    }

    /// Adds environment variables for every later start (of a process the harness starts).
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        if let Driver::Child(node) = &mut self.driver {
            node.set_env(env);
        }
    }

    /// Whether the harness drives it through inventory hooks.
    pub fn is_external(&self) -> bool {
        matches!(self.driver, Driver::Hooks { .. })
    }

    /// Runs hook `which` (bounded by [`HOOK_LIMIT`]); a missing hook or a failing command is a
    /// harness error naming the node.
    fn run_hook(&self, which: &str) -> Result<(), TopologyError> {
        let Driver::Hooks { hooks, .. } = &self.driver else {
            return Err(TopologyError::State(format!(
                "{} is not driven by hooks",
                self.name
            )));
        };
        let command = match which {
            "kill" => &hooks.kill,
            "start" => &hooks.start,
            "pause" => &hooks.pause,
            _ => &hooks.resume,
        };
        let command = command.as_deref().ok_or_else(|| {
            TopologyError::State(format!(
                "the inventory has no `{which}` hook for {}: add `{which} = \"...\"` to its [[nodes]] entry",
                self.name
            ))
        })?;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("KTD_NODE", &self.name)
            .env("KTD_NODE_ID", self.id.to_string())
            .env("KTD_NODE_ADDR", &self.addr)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("run the {which} hook of {}", self.name)))?;
        let status = wait_timeout(&mut child, HOOK_LIMIT)
            .map_err(io(format!("wait for the {which} hook of {}", self.name)))?;
        match status {
            Some(status) if status.success() => Ok(()),
            Some(status) => {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                Err(TopologyError::State(format!(
                    "the {which} hook of {} ({command:?}) failed with {status}: {}",
                    self.name,
                    stderr.trim()
                )))
            }
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(TopologyError::State(format!(
                    "the {which} hook of {} ({command:?}) did not finish within {HOOK_LIMIT:?}",
                    self.name
                )))
            }
        }
    }

    /// Starts the process with `extra` flags after the base ones.
    pub fn spawn(&mut self, extra: &[String]) -> Result<(), TopologyError> {
        if self.is_running() {
            return Err(TopologyError::State(format!("{} is running", self.name)));
        }
        if let Driver::Child(node) = &mut self.driver {
            return Ok(node.try_spawn(extra)?);
        }
        self.run_hook("start")?;
        if let Driver::Hooks { up, paused, .. } = &mut self.driver {
            (*up, *paused) = (true, false);
        }
        Ok(())
    }

    /// Restarts from the data directory with the base flags only.
    pub fn restart(&mut self) -> Result<(), TopologyError> {
        self.spawn(&[])
    }

    /// Whether the process is running (possibly paused).
    pub fn is_running(&self) -> bool {
        match &self.driver {
            Driver::Child(node) => node.is_running(),
            Driver::Hooks { up, .. } => *up,
        }
    }

    /// Whether it is paused.
    pub fn is_paused(&self) -> bool {
        match &self.driver {
            Driver::Child(node) => node.is_paused(),
            Driver::Hooks { paused, .. } => *paused,
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> Result<(), TopologyError> {
        if let Driver::Child(node) = &mut self.driver {
            return Ok(node.try_kill9()?);
        }
        if !self.is_running() {
            return Err(TopologyError::State(format!(
                "{} is not running",
                self.name
            )));
        }
        self.run_hook("kill")?;
        if let Driver::Hooks { up, paused, .. } = &mut self.driver {
            (*up, *paused) = (false, false);
        }
        Ok(())
    }

    /// SIGSTOP: the process keeps its sockets but does nothing.
    pub fn pause(&mut self) -> Result<(), TopologyError> {
        if let Driver::Child(node) = &mut self.driver {
            return Ok(node.try_pause()?);
        }
        self.run_hook("pause")?;
        if let Driver::Hooks { paused, .. } = &mut self.driver {
            *paused = true;
        }
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self) -> Result<(), TopologyError> {
        if let Driver::Child(node) = &mut self.driver {
            return Ok(node.try_resume()?);
        }
        if !self.is_paused() {
            return Err(TopologyError::State(format!("{} is not paused", self.name)));
        }
        self.run_hook("resume")?;
        if let Driver::Hooks { paused, .. } = &mut self.driver {
            *paused = false;
        }
        Ok(())
    }

    /// Its data directory, if the harness knows it (a shard it started).
    pub fn data_dir(&self) -> Option<&Path> {
        self.data_dir.as_deref()
    }

    /// Deletes the data directory of a process that is down (a lost disk). Errors if it runs
    /// or its data directory is unknown (a process this harness did not start).
    pub fn wipe_data(&mut self) -> Result<(), TopologyError> {
        if self.is_running() {
            return Err(TopologyError::State(format!(
                "{} is running: stop it before wiping its data",
                self.name
            )));
        }
        let Some(dir) = &self.data_dir else {
            return Err(TopologyError::State(format!(
                "the data directory of {} is unknown",
                self.name
            )));
        };
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(TopologyError::Io {
                what: format!("delete {}", dir.display()),
                source: error,
            }),
        }
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        match &self.driver {
            Driver::Child(node) => node.log_path(),
            Driver::Hooks { log, .. } => log,
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct TopologyOptions {
    /// The `ktd` binary.
    pub ktd: PathBuf,
    /// The sequencer's automatic epoch interval.
    pub epoch_interval: Duration,
    /// The VRF seed (the directory's key), 32 bytes.
    pub vrf_seed: [u8; 32],
    /// Bound on startup until the gateway answers `GetEpoch`.
    pub startup_limit: Duration,
    /// Deliberately broken gateway modes (`KTD_UNSAFE_*` variables): when non-empty the
    /// gateway gets them and `--unsafe-test-mode`. Positive controls only.
    pub gateway_unsafe_env: Vec<(String, String)>,
    /// Shard servers (at least 1).
    pub shards: u32,
    /// `--replication-factor` at `--init` (`None`: the sequencer's default, min(3, shards)).
    pub replication_factor: Option<u32>,
    /// Put every shard behind a [`ShardFence`] (needed by `isolate-shard`).
    pub fence_shards: bool,
}

/// A running cluster.
pub struct Topology {
    /// Sequencers, by node id 1, 2, 3 (index = id - 1).
    pub sequencers: Vec<Process>,
    /// Shard servers.
    pub shards: Vec<Process>,
    /// Gateways.
    pub gateways: Vec<Process>,
    /// The fault proxies between sequencers, one per directed link (none for a drill against a
    /// running cluster).
    pub links: Links,
    /// The fences around the shards, by shard name (empty unless
    /// [`TopologyOptions::fence_shards`]).
    pub shard_fences: std::collections::BTreeMap<String, ShardFence>,
    /// Sequencers removed from the cluster during the run (kept for their logs).
    pub retired: Vec<Process>,
    /// How to start another sequencer (`None` for a cluster this harness did not start).
    spawner: Option<Spawner>,
    // Declared last: the processes die before their directory is removed.
    root: Option<tempfile::TempDir>,
}

/// What [`Topology::spawn_sequencer`] needs.
#[derive(Clone, Debug)]
struct Spawner {
    binary: PathBuf,
    epoch_interval: String,
    /// The VRF seed file shards read, and the sequencers they tail (for [`Topology::spawn_shard`]).
    seed_file: PathBuf,
    sequencers: String,
}

/// `ktd shard` arguments of shard server `s<index>` (16 partitions).
fn shard_args(
    index: u64,
    addr: &str,
    data_dir: &Path,
    seed_file: &Path,
    sequencers: &str,
) -> Vec<String> {
    vec![
        "shard".to_string(),
        "--id".into(),
        format!("s{index}"),
        "--listen".into(),
        addr.to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--vrf-seed-file".into(),
        seed_file.display().to_string(),
        "--partition-bits".into(),
        "4".into(),
        "--sequencers".into(),
        sequencers.to_string(),
    ]
}

impl Topology {
    /// Starts 3 sequencers, `options.shards` shards (16 partitions, `options.replication_factor`
    /// replicas each) and 1 gateway, and waits until the gateway answers `GetEpoch`.
    pub async fn start(options: &TopologyOptions) -> Result<Self, TopologyError> {
        let binary = exists(options.ktd.clone())?;
        let binary_for_spawner = binary.clone();
        let root = tempfile::Builder::new()
            .prefix("ktd-chaos-")
            .tempdir()
            .map_err(io("create the cluster's temp dir"))?;
        let seed_file = ktd_testkit::seed::try_write_vrf_seed(root.path(), &options.vrf_seed)
            .map_err(io("write the VRF seed file"))?;
        let public_key = ktd_core::vrf::VrfKey::from_seed(&options.vrf_seed)
            .map_err(|error| TopologyError::Vrf(error.to_string()))?
            .public_key();
        let sequencer_addrs = (1..=3u64)
            .map(|id| free_addr(&format!("127.0.0.{}", 10 + id)))
            .collect::<Result<Vec<_>, _>>()?;
        let sequencer_list = sequencer_addrs.join(",");
        let interval = humantime::format_duration(options.epoch_interval).to_string();

        let mut shards = Vec::new();
        let mut shard_fences = std::collections::BTreeMap::new();
        let mut shard_map_entries = Vec::new();
        for index in 1..=u64::from(options.shards.max(1)) {
            let addr = free_addr(&format!("127.0.0.{}", (20 + index).min(39)))?;
            let data_dir = root.path().join(format!("shard-{index}"));
            let name = format!("shard-{index}");
            let (map_addr, shard_sequencers) = if options.fence_shards {
                let fence = ShardFence::start(index, &addr, &sequencer_addrs)
                    .await
                    .map_err(io(format!("start the fence of {name}")))?;
                let entry = (fence.inbound_addr().to_string(), fence.sequencer_addrs());
                shard_fences.insert(name.clone(), fence);
                entry
            } else {
                (addr.clone(), sequencer_addrs.clone())
            };
            shard_map_entries.push(format!("s{index}=http://{map_addr}"));
            let args = shard_args(
                index,
                &addr,
                &data_dir,
                &seed_file,
                &shard_sequencers.join(","),
            );
            let mut process =
                Process::new(&binary, root.path(), name, Role::Shard, index, addr, args);
            process.data_dir = Some(data_dir);
            process.spawn(&[])?;
            shards.push(process);
        }
        let shard_map = shard_map_entries.join(",");
        let peers = sequencer_addrs
            .iter()
            .enumerate()
            .map(|(index, addr)| format!("{}={addr}", index + 1))
            .collect::<Vec<_>>()
            .join(",");
        let members: Vec<(u64, String)> = (1u64..).zip(sequencer_addrs.iter().cloned()).collect();
        let links = Links::start(&members)
            .await
            .map_err(io("start the sequencer link proxies"))?;
        let mut sequencers = Vec::new();
        for (index, addr) in sequencer_addrs.iter().enumerate() {
            let id = index as u64 + 1;
            let mut base = sequencer_args(addr, &root.path().join(format!("seq-{id}")), &interval);
            // Restarts keep dialling through the proxies.
            for entry in links.overrides(id) {
                base.extend(["--peer-override".to_string(), entry]);
            }
            let mut first = vec![
                "--id".to_string(),
                id.to_string(),
                "--peers".into(),
                peers.clone(),
            ];
            if id != 1 {
                first.push("--join".to_string());
            }
            if id == 1 {
                first.extend([
                    "--init".to_string(),
                    "--vrf-public-key".into(),
                    hex::encode(public_key),
                    "--partition-bits".into(),
                    "4".into(),
                    "--shards".into(),
                    shard_map.clone(),
                ]);
                if let Some(factor) = options.replication_factor {
                    first.extend(["--replication-factor".to_string(), factor.to_string()]);
                }
            }
            let mut process = Process::new(
                &binary,
                root.path(),
                format!("seq-{id}"),
                Role::Sequencer,
                id,
                addr.clone(),
                base,
            );
            process.spawn(&first)?;
            sequencers.push(process);
        }
        let gateway_addr = free_addr("127.0.0.31")?;
        let mut args = vec![
            "gateway".to_string(),
            "--listen".into(),
            gateway_addr.clone(),
            "--sequencers".into(),
            sequencer_list,
        ];
        if !options.gateway_unsafe_env.is_empty() {
            args.push("--unsafe-test-mode".into());
        }
        let mut gateway = Process::new(
            &binary,
            root.path(),
            "gateway-1".into(),
            Role::Gateway,
            1,
            gateway_addr,
            args,
        );
        gateway.set_env(options.gateway_unsafe_env.clone());
        gateway.spawn(&[])?;
        let topology = Self {
            sequencers,
            shards,
            gateways: vec![gateway],
            links,
            shard_fences,
            retired: Vec::new(),
            spawner: Some(Spawner {
                binary: binary_for_spawner,
                epoch_interval: interval,
                seed_file: seed_file.clone(),
                sequencers: sequencer_addrs.join(","),
            }),
            root: Some(root),
        };
        topology.wait_healthy(options.startup_limit).await?;
        Ok(topology)
    }

    /// Waits until the first gateway connects and answers `GetEpoch`.
    pub async fn wait_healthy(&self, limit: Duration) -> Result<Client, TopologyError> {
        let started = Instant::now();
        let mut last_error = String::from("not tried");
        while started.elapsed() < limit {
            match tokio::time::timeout(Duration::from_secs(3), async {
                let client = Client::connect(&self.gateway_url()).await?;
                client.epoch(None).await?;
                anyhow::Ok(client)
            })
            .await
            {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(error)) => last_error = format!("{error:#}"),
                Err(_) => last_error = "GetEpoch timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(TopologyError::NotHealthy { limit, last_error })
    }

    /// `http://ip:port` of the first gateway (an inventory's address may carry its scheme).
    pub fn gateway_url(&self) -> String {
        match self.gateways.first() {
            Some(gateway) if gateway.addr.contains("://") => gateway.addr.clone(),
            Some(gateway) => format!("http://{}", gateway.addr),
            None => "http://no-gateway.invalid".into(),
        }
    }

    /// The sequencers' `ip:port`s.
    pub fn sequencer_addrs(&self) -> Vec<String> {
        self.sequencers.iter().map(|p| p.addr.clone()).collect()
    }

    /// A cluster this harness did not start (a drill): its processes are driven by the
    /// inventory's hooks; there are no link proxies and no spare sequencers.
    pub fn external(processes: Vec<Process>) -> Self {
        let mut topology = Self {
            sequencers: Vec::new(),
            shards: Vec::new(),
            gateways: Vec::new(),
            links: Links::default(),
            shard_fences: std::collections::BTreeMap::new(),
            retired: Vec::new(),
            spawner: None,
            root: None,
        };
        for process in processes {
            match process.role {
                Role::Sequencer => topology.sequencers.push(process),
                Role::Shard => topology.shards.push(process),
                Role::Gateway => topology.gateways.push(process),
            }
        }
        topology.sequencers.sort_by_key(|p| p.id);
        topology
    }

    /// Cuts shard `name` off the network (every proxy of its fence to blackhole) or puts it
    /// back (`false`: pass). Errors if it has no fence.
    pub fn fence_shard(&self, name: &str, isolated: bool) -> Result<(), TopologyError> {
        let fence = self.shard_fences.get(name).ok_or_else(|| {
            TopologyError::State(format!(
                "{name} has no fence (the topology was started without fence_shards)"
            ))
        })?;
        fence.set(if isolated {
            LinkFault::Blackhole
        } else {
            LinkFault::Pass
        });
        Ok(())
    }

    /// Whether shard `name` is cut off by its fence.
    pub fn shard_isolated(&self, name: &str) -> bool {
        self.shard_fences
            .get(name)
            .is_some_and(ShardFence::is_faulted)
    }

    /// The `ktd` binary of a cluster this harness started.
    pub fn ktd_binary(&self) -> Option<&Path> {
        self.spawner
            .as_ref()
            .map(|spawner| spawner.binary.as_path())
    }

    /// The root directory (data dirs and logs) of a cluster this harness started.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_ref().map(tempfile::TempDir::path)
    }

    /// Starts one more sequencer (the next node id, a fresh data directory, `--join`): a
    /// node for an operator to add with `AddLearner`. It dials its peers directly (no link
    /// proxies). Errors for a cluster this harness did not start.
    pub fn spawn_sequencer(&mut self) -> Result<u64, TopologyError> {
        let (Some(spawner), Some(root)) = (self.spawner.clone(), self.root()) else {
            return Err(TopologyError::State(
                "this cluster was not started by the harness: no spare sequencer to add".into(),
            ));
        };
        let id = self
            .sequencers
            .iter()
            .chain(&self.retired)
            .map(|p| p.id)
            .max()
            .unwrap_or(0)
            + 1;
        let ip = format!("127.0.0.{}", (10 + id).min(254));
        let addr = free_addr(&ip)?;
        let base = sequencer_args(
            &addr,
            &root.join(format!("seq-{id}")),
            &spawner.epoch_interval,
        );
        let mut process = Process::new(
            &spawner.binary,
            root,
            format!("seq-{id}"),
            Role::Sequencer,
            id,
            addr,
            base,
        );
        // A new member: `--join` lets it create its data directory.
        process.spawn(&["--id".to_string(), id.to_string(), "--join".to_string()])?;
        self.sequencers.push(process);
        Ok(id)
    }

    /// Starts one more shard server (`shard-<n>`, id `s<n>`, the next index, an empty data
    /// directory, no fence), for an operator to add to the shard map. Returns its id and
    /// address. Errors for a cluster this harness did not start.
    pub fn spawn_shard(&mut self) -> Result<(String, String), TopologyError> {
        let (Some(spawner), Some(root)) = (self.spawner.clone(), self.root()) else {
            return Err(TopologyError::State(
                "this cluster was not started by the harness: no spare shard server to add".into(),
            ));
        };
        let index = self.shards.iter().map(|p| p.id).max().unwrap_or(0) + 1;
        let addr = free_addr(&format!("127.0.0.{}", (20 + index).min(39)))?;
        let data_dir = root.join(format!("shard-{index}"));
        let args = shard_args(
            index,
            &addr,
            &data_dir,
            &spawner.seed_file,
            &spawner.sequencers,
        );
        let mut process = Process::new(
            &spawner.binary,
            root,
            format!("shard-{index}"),
            Role::Shard,
            index,
            addr.clone(),
            args,
        );
        process.data_dir = Some(data_dir);
        process.spawn(&[])?;
        self.shards.push(process);
        Ok((format!("s{index}"), addr))
    }

    /// Kills sequencer `id` (if it runs) and moves it to [`Topology::retired`]: it was removed
    /// from the membership and must not be restarted by the final heal.
    pub fn retire_sequencer(&mut self, id: u64) -> Result<(), TopologyError> {
        let index = self
            .sequencers
            .iter()
            .position(|p| p.id == id)
            .ok_or_else(|| TopologyError::State(format!("no sequencer seq-{id}")))?;
        let mut process = self.sequencers.remove(index);
        if process.is_paused() {
            process.resume()?;
        }
        if process.is_running() {
            process.kill9()?;
        }
        self.retired.push(process);
        Ok(())
    }

    /// Every process, sequencers first (retired ones last).
    pub fn processes(&self) -> impl Iterator<Item = &Process> {
        self.sequencers
            .iter()
            .chain(&self.shards)
            .chain(&self.gateways)
            .chain(&self.retired)
    }

    /// The process named `name`.
    pub fn process_mut(&mut self, name: &str) -> Option<&mut Process> {
        self.sequencers
            .iter_mut()
            .chain(&mut self.shards)
            .chain(&mut self.gateways)
            .find(|process| process.name == name)
    }

    /// The current leader's node id, as a running, unpaused sequencer reports it (`None` if no
    /// reachable node reports itself leader). If several do (an old leader cut off by a
    /// partition still believes it leads), the one with the highest term.
    pub async fn leader(&self) -> Option<u64> {
        let mut best: Option<(u64, u64)> = None;
        for process in &self.sequencers {
            if !process.is_running() || process.is_paused() {
                continue;
            }
            if let Ok(Ok(status)) = tokio::time::timeout(
                Duration::from_millis(800),
                sequencer::client::node_status_at(&process.addr),
            )
            .await
                && status.state == "leader"
                && best.is_none_or(|(term, _)| status.term > term)
            {
                best = Some((status.term, status.node_id));
            }
        }
        best.map(|(_, id)| id)
    }

    /// Copies every log to `dir`.
    pub fn copy_logs(&self, dir: &Path) -> Result<(), TopologyError> {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        for process in self.processes() {
            let target = dir.join(format!("{}.log", process.name));
            // A log that was never written (or an inventory node without one) is not an error.
            if process.log_path().is_file() {
                std::fs::copy(process.log_path(), &target)
                    .map_err(io(format!("copy {}", process.log_path().display())))?;
            }
        }
        Ok(())
    }

    /// Every log, for failure messages.
    pub fn logs(&self) -> String {
        self.processes()
            .map(|process| format!("===== {} =====\n{}", process.name, process.log_text()))
            .collect()
    }
}

/// The flags every start of a sequencer passes.
fn sequencer_args(addr: &str, data_dir: &Path, epoch_interval: &str) -> Vec<String> {
    vec![
        "sequencer".to_string(),
        "--listen".into(),
        addr.to_string(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--epoch-interval".into(),
        epoch_interval.to_string(),
    ]
}
