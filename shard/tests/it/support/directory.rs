//! The reference [`Directory`] as the tests open it (a VRF seed derived from the test seed,
//! either configuration, any partition bits), and the comparison of an audit step with akd's.

use akd_core::{AzksElement, SingleAppendOnlyProof};
use ktd_core::AkdConfig;
use shard::{Directory, DirectoryOptions};

/// akd's experimental configuration with its example domain label.
pub fn experimental() -> AkdConfig {
    AkdConfig::Experimental {
        domain_label: "ExampleLabel".into(),
    }
}

/// A VRF seed derived from the test seed (tests never use a compiled-in production key).
pub fn vrf_seed(seed: u64) -> [u8; 32] {
    *blake3::hash(&seed.to_be_bytes()).as_bytes()
}

/// Opens (or creates) a reference directory at `path` whose VRF seed derives from `seed`.
pub fn open(path: &std::path::Path, config: AkdConfig, bits: u8, seed: u64) -> Directory {
    let options = DirectoryOptions {
        config,
        partition_bits: bits,
        ..DirectoryOptions::default()
    };
    Directory::open(path, options, &vrf_seed(seed)).expect("open directory")
}

fn sorted(mut elements: Vec<AzksElement>) -> Vec<AzksElement> {
    elements.sort();
    elements
}

/// Asserts that two audit steps hold the same unchanged nodes and inserted leaves, in any
/// order.
pub fn assert_same_step(
    ours: &SingleAppendOnlyProof,
    theirs: &SingleAppendOnlyProof,
    context: &str,
) {
    assert_eq!(
        sorted(ours.unchanged_nodes.clone()),
        sorted(theirs.unchanged_nodes.clone()),
        "unchanged nodes differ ({context})"
    );
    assert_eq!(
        sorted(ours.inserted.clone()),
        sorted(theirs.inserted.clone()),
        "inserted leaves differ ({context})"
    );
}
