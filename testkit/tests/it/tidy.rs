//! Repository hygiene that a compiler cannot check, over the whole workspace: every Rust file
//! starts with a `//!` doc saying what the module is for (STYLE §4); openraft is named only in
//! the sequencer's Raft layer (ARCHITECTURE.md); a test binary's topic files share code only
//! through its `support/` modules; `ktd-testkit` is only ever a dev-dependency.

use std::path::{Path, PathBuf};

use ktd_testkit::fs::{rust_files, workspace_root};

/// Every Rust file of the workspace, as paths relative to its root.
fn workspace_files() -> Vec<PathBuf> {
    let root = workspace_root();
    let files: Vec<PathBuf> = rust_files(root)
        .into_iter()
        .map(|path| path.strip_prefix(root).unwrap_or(&path).to_path_buf())
        .collect();
    assert!(
        files.len() > 10,
        "found only {} Rust files under {}",
        files.len(),
        root.display()
    );
    files
}

fn read(relative: &Path) -> String {
    std::fs::read_to_string(workspace_root().join(relative)).unwrap_or_default()
}

/// The lines of `text` that are not comments.
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
}

#[test]
fn every_rust_file_starts_with_a_module_doc() {
    let undocumented: Vec<PathBuf> = workspace_files()
        .into_iter()
        .filter(|path| !read(path).starts_with("//!"))
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
    let allowed = |relative: &Path| {
        relative.starts_with("sequencer/src/raft")
            || relative == Path::new("sequencer/src/node.rs")
            || relative == Path::new("sequencer/src/metrics.rs")
            || relative.starts_with("sequencer/tests")
    };
    // Spelled in two pieces so this file does not name it.
    let needle = concat!("open", "raft::");
    let offenders: Vec<PathBuf> = workspace_files()
        .into_iter()
        .filter(|path| !allowed(path))
        .filter(|path| code_lines(&read(path)).any(|line| line.contains(needle)))
        .collect();
    assert!(
        offenders.is_empty(),
        "openraft named outside sequencer::raft, node and metrics: {offenders:#?}"
    );
}

/// ARCHITECTURE.md: in a test binary (`<crate>/tests/it/`), a topic file is read on its own: it
/// names only the binary's `support` modules, never another topic file.
#[test]
fn test_topic_files_share_code_only_through_support() {
    let mut offenders = Vec::new();
    let mut topics = 0;
    for path in workspace_files() {
        let mut parts = path.components().map(|part| part.as_os_str());
        let in_test_binary = parts.nth(1).is_some_and(|dir| dir == "tests")
            && parts.next().is_some_and(|dir| dir == "it");
        let is_topic = in_test_binary
            && !path.ends_with("it/main.rs")
            && !path.components().any(|part| part.as_os_str() == "support");
        if !is_topic {
            continue;
        }
        topics += 1;
        // Spelled in two pieces so this file does not name it.
        let needle = concat!("crate", "::");
        for line in code_lines(&read(&path)) {
            for (index, _) in line.match_indices(needle) {
                if !line[index + needle.len()..].starts_with("support") {
                    offenders.push(format!("{}: {}", path.display(), line.trim()));
                }
            }
        }
    }
    assert!(topics > 20, "found only {topics} test topic files");
    assert!(
        offenders.is_empty(),
        "topic files naming another topic file (move the shared piece to tests/it/support/): \
         {offenders:#?}"
    );
}

/// ARCHITECTURE.md: `ktd-testkit` is used only as a dev-dependency; chaos-tests, a test tool,
/// is the one crate that may use it as a normal dependency.
#[test]
fn the_testkit_is_only_a_dev_dependency() {
    let manifest = |dir: &str| -> toml::Table {
        read(&Path::new(dir).join("Cargo.toml"))
            .parse()
            .unwrap_or_else(|error| panic!("{dir}/Cargo.toml: {error}"))
    };
    let workspace = manifest(".");
    let members = workspace["workspace"]["members"]
        .as_array()
        .expect("workspace members");
    assert!(
        members
            .iter()
            .any(|member| member.as_str() == Some("testkit")),
        "the testkit is a workspace member"
    );
    let mut offenders = Vec::new();
    for member in members {
        let dir = member.as_str().expect("member path");
        let manifest = manifest(dir);
        let package = manifest["package"]["name"].as_str().expect("name");
        if package == "chaos-tests" || package == "ktd-testkit" {
            continue;
        }
        for section in ["dependencies", "build-dependencies"] {
            if manifest
                .get(section)
                .and_then(toml::Value::as_table)
                .is_some_and(|deps| deps.contains_key("ktd-testkit"))
            {
                offenders.push(format!("{package} [{section}]"));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "ktd-testkit outside [dev-dependencies]: {offenders:?}"
    );
}
