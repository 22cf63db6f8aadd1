//! `deploy/local-cluster.sh` starts a healthy cluster (answering the Kubernetes probes' health
//! services, serving a verified lookup) and stops it with SIGTERM, with no unexpected error or
//! warning in the logs.

use std::process::{Command, Output};
use std::time::Duration;

use ktd_testkit::grpc::health;
use ktd_testkit::net::free_addr;
use ktd_testkit::with_deadline;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::KTD;
use crate::support::cli::{KtdCli, ktd_at};
use crate::support::deploy::{check_workloads, deploy_dir, kubernetes_objects, read};

/// `deploy/local-cluster.sh` with its addresses and directory; stops the cluster on drop.
struct LocalClusterScript {
    dir: tempfile::TempDir,
    env: Vec<(&'static str, String)>,
    running: bool,
}

impl LocalClusterScript {
    fn run(&self, action: &str) -> Output {
        Command::new(deploy_dir().join("local-cluster.sh"))
            .arg(action)
            .arg(self.dir.path())
            .envs(self.env.iter().map(|(key, value)| (*key, value.as_str())))
            .output()
            .expect("run deploy/local-cluster.sh")
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for entry in std::fs::read_dir(self.dir.path()).expect("dir").flatten() {
            if entry.path().extension().is_some_and(|ext| ext == "log") {
                text.push_str(&format!("==> {}\n", entry.path().display()));
                text.push_str(&read(&entry.path()));
            }
        }
        text
    }
}

impl Drop for LocalClusterScript {
    fn drop(&mut self) {
        if self.running {
            let _ = self.run("stop");
        }
    }
}

/// Whether `pid` runs (a zombie counts as stopped).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit(')')
                .next()
                .map(|rest| rest.trim_start().to_string())
        })
        .is_some_and(|state| !state.starts_with('Z'))
}

#[test]
fn local_cluster_script_starts_and_stops_a_healthy_cluster() {
    let cli = KtdCli::load();
    let probes = check_workloads(&cli, &kubernetes_objects());
    with_deadline(Duration::from_secs(150), move || async move {
        let ip = "127.0.0.71";
        let sequencers: Vec<String> = (0..3).map(|_| free_addr(ip)).collect();
        let shards: Vec<String> = (0..2).map(|_| free_addr(ip)).collect();
        let gateway = free_addr(ip);
        let mut script = LocalClusterScript {
            dir: tempfile::tempdir().expect("temp dir"),
            env: vec![
                ("KTD_BIN", KTD.to_string()),
                (
                    "KTD_LOCAL_SEQUENCERS",
                    (1..)
                        .zip(&sequencers)
                        .map(|(id, addr)| format!("{id}={addr}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                (
                    "KTD_LOCAL_SHARDS",
                    (1..)
                        .zip(&shards)
                        .map(|(id, addr)| format!("s{id}={addr}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                ),
                ("KTD_LOCAL_GATEWAY", gateway.clone()),
                ("KTD_EPOCH_INTERVAL", "300ms".to_string()),
            ],
            running: true,
        };

        tracing::info!("--- start: the script waits until the gateway answers");
        {
            let started = tokio::task::block_in_place(|| script.run("start"));
            assert!(started.status.success(), "{started:?}\n{}", script.logs());
            let status = String::from_utf8_lossy(&started.stdout);
            assert_eq!(status.matches("(voter)").count(), 3, "{status}");
            assert_eq!(status.matches("reachable").count(), 2, "{status}");
        }

        tracing::info!("--- publish and verify a lookup through the gateway");
        {
            let ktd = |args: &[&str]| ktd_at(&gateway, args);
            let published =
                tokio::task::block_in_place(|| ktd(&["publish", "alice", "key-1", "--wait"]));
            assert!(published.status.success(), "{published:?}");
            let looked_up = tokio::task::block_in_place(|| ktd(&["lookup", "alice", "--verify"]));
            let stdout = String::from_utf8_lossy(&looked_up.stdout);
            assert!(
                looked_up.status.success() && stdout.contains("verified"),
                "{looked_up:?}"
            );
        }

        tracing::info!("--- every Kubernetes gRPC probe's health service answers SERVING");
        {
            for probe in &probes {
                let addrs = match probe.server.as_str() {
                    "sequencer" => sequencers.clone(),
                    "shard" => shards.clone(),
                    _ => vec![gateway.clone()],
                };
                for addr in addrs {
                    let status = health(&addr, &probe.service).await;
                    assert_eq!(status, Ok(ServingStatus::Serving), "{probe:?} at {addr}");
                }
            }
        }

        tracing::info!("--- stop: SIGTERM, every process exits");
        {
            let pids: Vec<String> = std::fs::read_dir(script.dir.path())
                .expect("dir")
                .flatten()
                .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "pid"))
                .map(|entry| read(&entry.path()).trim().to_string())
                .collect();
            assert_eq!(pids.len(), 6);
            let stopped = tokio::task::block_in_place(|| script.run("stop"));
            script.running = false;
            let stderr = String::from_utf8_lossy(&stopped.stderr);
            assert!(
                stopped.status.success() && stderr.contains("stopped 6 processes"),
                "{stopped:?}"
            );
            assert!(
                !stderr.contains("SIGKILL"),
                "a process ignored SIGTERM: {stderr}"
            );
            for pid in &pids {
                assert!(!alive(pid), "pid {pid} still runs");
            }
        }

        tracing::info!("--- no unexpected errors or warnings in the logs");
        {
            // Stopping all three sequencers at once leaves a stopping leader no one to hand over to.
            let allowed = ["could not hand over leadership before stopping"];
            let logs = script.logs();
            let unexpected: Vec<&str> = logs
                .lines()
                .filter(|line| line.contains("ERROR") || line.contains("WARN"))
                .filter(|line| !allowed.iter().any(|allowed| line.contains(allowed)))
                .collect();
            assert!(unexpected.is_empty(), "{unexpected:#?}");
        }
    });
}
