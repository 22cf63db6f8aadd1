//! Files for tests: the workspace root, every Rust file below a folder, a recursive copy.

use std::path::{Path, PathBuf};

/// The workspace root (the folder above this crate's manifest).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the testkit crate sits in the workspace root")
}

/// Every `.rs` file below `dir`, sorted; hidden folders and `target` are skipped, and so are
/// folders that cannot be read below `dir` itself.
pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if path.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    walk(&path, out);
                }
            } else if name.ends_with(".rs") {
                out.push(path);
            }
        }
    }
    assert!(dir.is_dir(), "{} is not a folder", dir.display());
    let mut files = Vec::new();
    walk(dir, &mut files);
    files.sort();
    files
}

/// Copies the folder `from` to `to` (created), recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|error| panic!("mkdir {}: {error}", to.display()));
    let entries =
        std::fs::read_dir(from).unwrap_or_else(|error| panic!("read {}: {error}", from.display()));
    for entry in entries {
        let entry = entry.expect("directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|error| panic!("copy {}: {error}", entry.path().display()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copied_tree_has_the_same_files() {
        let root = tempfile::tempdir().expect("temp dir");
        let from = root.path().join("from");
        std::fs::create_dir_all(from.join("a/b")).expect("mkdir");
        std::fs::write(from.join("a/b/c.rs"), "//! c").expect("write");
        std::fs::write(from.join("d.txt"), "d").expect("write");
        copy_dir(&from, &root.path().join("to"));
        assert_eq!(
            std::fs::read_to_string(root.path().join("to/a/b/c.rs")).expect("copied"),
            "//! c"
        );
        assert_eq!(rust_files(&root.path().join("to")).len(), 1);
        assert!(workspace_root().join("Cargo.toml").is_file());
    }
}
