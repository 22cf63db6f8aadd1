//! The deployment files under `deploy/` against the real binary, one file per target:
//! `compose` (services, resources, healthchecks against a running server), `k8s` (manifests,
//! probes, identity, the wrapper scripts), `dashboard` (the Grafana dashboard and the alert
//! rules name only exported series) and `local_cluster` (`deploy/local-cluster.sh` starts a
//! healthy cluster and stops it). Here: every YAML and JSON file parses.
//!
//! Not covered (no Docker engine, no Kubernetes cluster on the CI machine): building the image,
//! `docker compose up`, and applying the manifests. `kubectl kustomize` renders the manifests
//! when kubectl is installed; the check is skipped with a note otherwise.

mod compose;
mod dashboard;
mod k8s;
mod local_cluster;

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::deploy::{deploy_dir, read, yaml};

#[test]
fn deploy_yaml_and_json_files_parse() {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, files);
            } else {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&deploy_dir(), &mut files);
    let mut parsed = 0;
    for path in files {
        match path.extension().and_then(|ext| ext.to_str()) {
            Some("yml" | "yaml") => {
                let value = yaml(&path);
                assert!(value.is_object(), "{}: not a mapping", path.display());
            }
            Some("json") => {
                let _: Value = serde_json::from_str(&read(&path))
                    .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            }
            _ => continue,
        }
        parsed += 1;
    }
    // compose (2), prometheus (1), grafana (3), k8s (13).
    assert!(parsed >= 19, "only {parsed} YAML/JSON files under deploy/");
}
