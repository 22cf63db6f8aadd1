//! The directory's secrets as tests write them: a VRF seed file (hex, mode 600, as `ktd`
//! requires) and a VRF public key for clusters that never build a tree.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A VRF public key for sequencer-only clusters (no shard evaluates a label, so any 32 bytes
/// will do).
pub const TEST_VRF_KEY: &str = "2222222222222222222222222222222222222222222222222222222222222222";

/// Writes `seed` as `root/vrf-seed.hex` (hex and a newline, created new with mode 600) and
/// returns its path.
pub fn try_write_vrf_seed(root: &Path, seed: &[u8; 32]) -> std::io::Result<PathBuf> {
    let path = root.join("vrf-seed.hex");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    writeln!(file, "{}", hex::encode(seed))?;
    Ok(path)
}

/// [`try_write_vrf_seed`], failing the test on an error; the path as a flag value.
pub fn write_vrf_seed(root: &Path, seed: &[u8; 32]) -> String {
    try_write_vrf_seed(root, seed)
        .unwrap_or_else(|error| panic!("write the VRF seed file under {}: {error}", root.display()))
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_seed_file_is_hex_and_private() {
        let root = tempfile::tempdir().expect("temp dir");
        let path = write_vrf_seed(root.path(), &[0xab; 32]);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{}\n", "ab".repeat(32))
        );
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            try_write_vrf_seed(root.path(), &[0; 32]).is_err(),
            "never overwritten"
        );
    }
}
