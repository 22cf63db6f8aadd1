//! Secret files of 32 bytes written as 64 hex digits: the directory's VRF seed (`--vrf-seed-file`,
//! `ktd keygen`, the seed `ktd dev` generates in its data directory) and the auditor's signing
//! key. Files readable by group or others are refused; contents are never logged.

use std::path::Path;

use anyhow::{Context, anyhow, bail};
use zeroize::Zeroizing;

/// A 32-byte VRF seed from a file of 64 hex digits. Refuses files others can read.
pub fn read_vrf_seed(path: &Path) -> anyhow::Result<[u8; 32]> {
    read_secret_file(path, "VRF seed file")
}

/// A 32-byte secret (`what`: "VRF seed file", "signing key file") from a file of 64 hex
/// digits. Refuses files others can read; never logs the contents.
pub fn read_secret_file(path: &Path, what: &str) -> anyhow::Result<[u8; 32]> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).with_context(|| format!("{what} {}", path.display()))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        bail!(
            "{what} {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            metadata.permissions().mode() & 0o777
        );
    }
    // The file's text and its decoded bytes are zeroed when dropped; the caller holds the
    // only copy of the secret.
    let text = Zeroizing::new(
        std::fs::read_to_string(path).with_context(|| format!("read {what} {}", path.display()))?,
    );
    let bytes = Zeroizing::new(
        hex::decode(text.trim())
            .map_err(|error| anyhow!("{what} {}: not hex ({error})", path.display()))?,
    );
    <[u8; 32]>::try_from(&bytes[..]).map_err(|_| {
        anyhow!(
            "{what} {}: expected 32 bytes (64 hex digits), got {}",
            path.display(),
            bytes.len()
        )
    })
}

/// Writes a new random VRF seed to `path` (mode 600, refusing to overwrite); returns it.
pub fn write_new_vrf_seed(path: &Path) -> anyhow::Result<[u8; 32]> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let seed: [u8; 32] = rand::random();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create VRF seed file {}", path.display()))?;
    writeln!(file, "{}", hex::encode(seed))?;
    file.sync_all()?;
    Ok(seed)
}

/// The VRF public key of a seed.
pub fn vrf_public_key(seed: &[u8; 32]) -> anyhow::Result<[u8; 32]> {
    Ok(ktd_core::vrf::VrfKey::from_seed(seed)?.public_key())
}
