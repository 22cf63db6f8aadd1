//! Repository hygiene that a compiler cannot check: every Rust file starts with a `//!` doc
//! saying what the module is for (STYLE §4).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let mut files = Vec::new();
    rust_files(workspace, &mut files);
    assert!(
        files.len() > 10,
        "found only {} Rust files under {}",
        files.len(),
        workspace.display()
    );
    let undocumented: Vec<_> = files
        .iter()
        .filter(|path| {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            !text.starts_with("//!")
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "files without a leading //! doc: {undocumented:#?}"
    );
}

/// ARCHITECTURE.md: openraft is named only by the sequencer's Raft layer, the node adapter that
/// drives the `Raft` handle, and the metrics that read `RaftMetrics`.
#[test]
fn only_the_raft_layer_names_openraft() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let mut files = Vec::new();
    rust_files(workspace, &mut files);
    let allowed = |path: &Path| {
        let relative = path.strip_prefix(workspace).unwrap_or(path);
        relative.starts_with("sequencer/src/raft")
            || relative == Path::new("sequencer/src/node.rs")
            || relative == Path::new("sequencer/src/metrics.rs")
            || relative.starts_with("sequencer/tests")
    };
    // Spelled in two pieces so this file does not name it.
    let needle = concat!("open", "raft::");
    let offenders: Vec<_> = files
        .iter()
        .filter(|path| !allowed(path))
        .filter(|path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .any(|line| line.contains(needle) && !line.trim_start().starts_with("//"))
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "openraft named outside sequencer::raft, node and metrics: {offenders:#?}"
    );
}
