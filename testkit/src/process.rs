//! `ktd` child processes for tests, benches and drills: start one with its flags (stderr
//! captured in `<root>/<name>.log`, `RUST_LOG` from [`node_log_filter`]), SIGKILL it, stop it
//! with SIGTERM, freeze it with SIGSTOP and thaw it with SIGCONT, restart it from its data
//! directory. Dropping a [`KtdNode`] kills its process (thawing it first).
//!
//! Every operation comes twice: `try_*` returns a [`ProcessError`] (for a harness that reports
//! its own failures, like `ktd-chaos`), the plain one fails the test.
//!
//! [`KtdCluster`] is a bootstrapped cluster of `ktd sequencer` processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::net::free_addr;
use crate::seed::TEST_VRF_KEY;

/// The `RUST_LOG` of every process started here unless `KTD_NODE_LOG` says otherwise.
pub const DEFAULT_NODE_LOG: &str = "info,openraft=error,h2=warn,hyper=warn";

/// The `RUST_LOG` a started process gets: `$KTD_NODE_LOG`, else [`DEFAULT_NODE_LOG`].
pub fn node_log_filter() -> String {
    std::env::var("KTD_NODE_LOG").unwrap_or_else(|_| DEFAULT_NODE_LOG.into())
}

/// The peak resident set (`VmHWM`) of process `pid` (this process if `None`), in bytes; `None`
/// where `/proc` does not say.
pub fn peak_rss_bytes(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".into(),
    };
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
}

/// Why a process could not be driven.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A local I/O step failed (log file, spawn, signal, wait).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// The process was in the wrong state (e.g. resuming one that is not paused), or did not
    /// do what it was asked in time.
    #[error("{0}")]
    State(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ProcessError {
    let what = what.into();
    move |source| ProcessError::Io { what, source }
}

/// Waits up to `limit` for `child` to exit; `None` if it still runs then.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if started.elapsed() > limit {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `ktd` process slot: its name, id, address, flags and log survive restarts.
pub struct KtdNode {
    /// Its name (`node-1`, `shard-2`, `gateway-1`, `dev`) and log file stem.
    pub name: String,
    /// The sequencer node id, or the index among its kind.
    pub id: u64,
    /// `ip:port` it listens on.
    pub addr: String,
    binary: PathBuf,
    /// The subcommand and the flags every start passes (`sequencer --listen .. --data-dir ..`).
    base_args: Vec<String>,
    /// Extra environment for every start.
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
}

impl KtdNode {
    /// A slot running `binary <base_args> ...`, logging to `<root>/<name>.log`.
    pub fn new(
        binary: impl Into<PathBuf>,
        root: &Path,
        name: &str,
        id: u64,
        addr: String,
        base_args: Vec<String>,
    ) -> Self {
        Self {
            name: name.to_string(),
            id,
            addr,
            binary: binary.into(),
            base_args,
            env: Vec::new(),
            log: root.join(format!("{name}.log")),
            child: None,
            paused: false,
        }
    }

    /// A `ktd sequencer` slot named `node-<id>` (`--listen addr --data-dir data_dir`, then
    /// `extra_base` at every start).
    pub fn sequencer(
        binary: impl Into<PathBuf>,
        root: &Path,
        id: u64,
        addr: String,
        data_dir: &Path,
        extra_base: &[String],
    ) -> Self {
        let mut base_args = vec![
            "sequencer".to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        base_args.extend_from_slice(extra_base);
        Self::new(binary, root, &format!("node-{id}"), id, addr, base_args)
    }

    /// A `ktd dev` slot on `ip` (free port) with its data under `root/dev`, logging to
    /// `root/dev.log`; `extra` flags follow the base ones at every start.
    pub fn dev(binary: impl Into<PathBuf>, root: &Path, ip: &str, extra: &[&str]) -> Self {
        let addr = free_addr(ip);
        let mut base_args = vec![
            "dev".to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            root.join("dev").display().to_string(),
        ];
        base_args.extend(extra.iter().map(|arg| arg.to_string()));
        Self::new(binary, root, "dev", 1, addr, base_args)
    }

    /// Sets environment variables for every later start.
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    /// Starts the process with `extra` flags after the base ones.
    pub fn try_spawn(&mut self, extra: &[String]) -> Result<(), ProcessError> {
        if self.child.is_some() {
            return Err(ProcessError::State(format!("{} is running", self.name)));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io(format!("open {}", self.log.display())))?;
        let child = Command::new(&self.binary)
            .args(&self.base_args)
            .args(extra)
            .env("RUST_LOG", node_log_filter())
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(io(format!(
                "start {} ({})",
                self.name,
                self.binary.display()
            )))?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// [`KtdNode::try_spawn`], failing the test on an error.
    pub fn spawn(&mut self, extra: &[String]) {
        self.try_spawn(extra)
            .unwrap_or_else(|error| panic!("{error}"));
    }

    /// Restarts from the data directory with the base flags only (no node id, peers or
    /// `--init`).
    pub fn try_restart(&mut self) -> Result<(), ProcessError> {
        self.try_spawn(&[])
    }

    /// [`KtdNode::try_restart`], failing the test on an error.
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|error| panic!("{error}"));
    }

    /// Sends SIGKILL and reaps the process.
    pub fn try_kill9(&mut self) -> Result<(), ProcessError> {
        let mut child = self.take_child()?;
        child.kill().map_err(io(format!("SIGKILL {}", self.name)))?;
        child.wait().map_err(io(format!("reap {}", self.name)))?;
        self.paused = false;
        Ok(())
    }

    /// [`KtdNode::try_kill9`], failing the test on an error.
    pub fn kill9(&mut self) {
        self.try_kill9().unwrap_or_else(|error| panic!("{error}"));
    }

    /// Sends SIGTERM and waits up to `limit` for the exit status; a process still running
    /// then is killed and reported.
    pub fn try_terminate(&mut self, limit: Duration) -> Result<ExitStatus, ProcessError> {
        self.signal("TERM")?;
        let mut child = self.take_child()?;
        match wait_timeout(&mut child, limit).map_err(io(format!("wait for {}", self.name)))? {
            Some(status) => Ok(status),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Err(ProcessError::State(format!(
                    "{} did not exit within {limit:?} after SIGTERM",
                    self.name
                )))
            }
        }
    }

    /// [`KtdNode::try_terminate`], failing the test on an error.
    pub fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.try_terminate(limit)
            .unwrap_or_else(|error| panic!("{error}"))
    }

    /// SIGSTOP: the process keeps its sockets but does nothing.
    pub fn try_pause(&mut self) -> Result<(), ProcessError> {
        self.signal("STOP")?;
        self.paused = true;
        Ok(())
    }

    /// [`KtdNode::try_pause`], failing the test on an error.
    pub fn pause(&mut self) {
        self.try_pause().unwrap_or_else(|error| panic!("{error}"));
    }

    /// SIGCONT after [`KtdNode::try_pause`].
    pub fn try_resume(&mut self) -> Result<(), ProcessError> {
        if !self.paused {
            return Err(ProcessError::State(format!("{} is not paused", self.name)));
        }
        self.signal("CONT")?;
        self.paused = false;
        Ok(())
    }

    /// [`KtdNode::try_resume`], failing the test on an error.
    pub fn resume(&mut self) {
        self.try_resume().unwrap_or_else(|error| panic!("{error}"));
    }

    /// Whether the process runs (possibly paused).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Whether it is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn take_child(&mut self) -> Result<Child, ProcessError> {
        self.child
            .take()
            .ok_or_else(|| ProcessError::State(format!("{} is not running", self.name)))
    }

    fn signal(&self, signal: &str) -> Result<(), ProcessError> {
        let pid = self
            .pid()
            .ok_or_else(|| ProcessError::State(format!("{} is not running", self.name)))?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .map_err(io("run kill"))?;
        if status.success() {
            Ok(())
        } else {
            Err(ProcessError::State(format!(
                "kill -{signal} {} failed",
                self.name
            )))
        }
    }
}

impl Drop for KtdNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.paused {
                let _ = Command::new("kill")
                    .arg("-CONT")
                    .arg(child.id().to_string())
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A cluster of `ktd sequencer` processes on `127.0.0.(10+id)`, bootstrapped from node 1 with
/// [`TEST_VRF_KEY`]; data directories and `node-<id>.log` files under one temporary root.
pub struct KtdCluster {
    /// The processes by node id.
    pub nodes: BTreeMap<u64, KtdNode>,
    // Declared last: the processes die before their directory is removed.
    root: tempfile::TempDir,
}

impl KtdCluster {
    /// Starts `n` processes of `binary` and bootstraps them from node 1.
    pub fn start(binary: impl AsRef<Path>, n: u64) -> Self {
        Self::start_with(binary, n, |_| Vec::new())
    }

    /// [`KtdCluster::start`] with `extra(id)` appended to node `id`'s first flags.
    pub fn start_with(
        binary: impl AsRef<Path>,
        n: u64,
        extra: impl Fn(u64) -> Vec<String>,
    ) -> Self {
        let binary = binary.as_ref();
        let root = tempfile::tempdir().expect("temp dir");
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let addr = free_addr(&format!("127.0.0.{}", 10 + id));
            let data_dir = root.path().join(format!("node-{id}"));
            let node = KtdNode::sequencer(binary, root.path(), id, addr, &data_dir, &[]);
            nodes.insert(id, node);
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
            if node.id != 1 {
                args.push("--join".into());
            }
            if node.id == 1 {
                args.push("--init".into());
                args.push("--vrf-public-key".into());
                args.push(TEST_VRF_KEY.into());
            }
            args.extend(extra(node.id));
            node.spawn(&args);
        }
        Self { nodes, root }
    }

    /// Every node's address, by id.
    pub fn addrs(&self) -> Vec<String> {
        self.nodes.values().map(|node| node.addr.clone()).collect()
    }

    /// Every process log, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .values()
            .map(|node| format!("===== node {} =====\n{}", node.id, node.log_text()))
            .collect()
    }

    /// The root directory (data directories and `node-<id>.log` files).
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Stops the processes and keeps the root directory (for looking at the logs).
    pub fn keep_files(self) -> PathBuf {
        let KtdCluster { nodes, root } = self;
        drop(nodes);
        root.keep()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for `ktd`: `sh -c SCRIPT` with the slot's flags as `$0 $1 ..`.
    fn shell(root: &Path, script: &str) -> KtdNode {
        KtdNode::new(
            "/bin/sh",
            root,
            "sh",
            1,
            "unused".into(),
            vec!["-c".into(), script.into()],
        )
    }

    #[test]
    fn a_process_logs_stderr_stops_on_sigterm_and_refuses_a_double_start() {
        let root = tempfile::tempdir().expect("temp dir");
        let mut node = shell(
            root.path(),
            "echo \"started $RUST_LOG $MARK\" >&2; trap 'exit 0' TERM; while :; do sleep 0.05; done",
        );
        node.set_env(vec![("MARK".into(), "marked".into())]);
        node.spawn(&[]);
        assert!(node.try_spawn(&[]).is_err(), "already running");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node.log_text().contains("started") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            node.log_text()
                .contains(&format!("started {} marked", node_log_filter())),
            "{}",
            node.log_text()
        );
        node.pause();
        assert!(node.is_paused());
        node.resume();
        assert!(node.try_resume().is_err(), "not paused");
        assert!(node.terminate(Duration::from_secs(10)).success());
        assert!(!node.is_running());
        assert!(node.try_kill9().is_err(), "not running");
        node.restart();
        node.kill9();
        assert!(node.pid().is_none());
    }
}
