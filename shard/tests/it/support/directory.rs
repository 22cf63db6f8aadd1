//! The reference [`Directory`] as the tests open it (a VRF seed derived from the test seed,
//! either configuration, any partition bits), and the comparison of an audit step with akd's.

use akd_core::{AzksElement, SingleAppendOnlyProof};
use ktd_core::AkdConfig;
use shard::lookup_proofs::LookupProofs;
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
    open_with(path, config, bits, seed, LookupProofs::default())
}

/// [`open`], storing lookup proofs in `lookup_proofs` mode.
pub fn open_with(
    path: &std::path::Path,
    config: AkdConfig,
    bits: u8,
    seed: u64,
    lookup_proofs: LookupProofs,
) -> Directory {
    let options = DirectoryOptions {
        config,
        partition_bits: bits,
        lookup_proofs,
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

/// Stock akd (in-memory storage) with the VRF key of `seed`, and a runtime to drive it.
pub fn stock_akd<TC: akd_core::configuration::Configuration>(
    seed: u64,
) -> (
    tokio::runtime::Runtime,
    akd::Directory<TC, akd::storage::memory::AsyncInMemoryDatabase, ktd_core::vrf::VrfKey>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let vrf = ktd_core::vrf::VrfKey::from_seed(&vrf_seed(seed)).expect("seed");
    let akd = runtime
        .block_on(akd::Directory::new(
            akd::storage::StorageManager::new_no_cache(
                akd::storage::memory::AsyncInMemoryDatabase::new(),
            ),
            vrf,
            akd::append_only_zks::AzksParallelismConfig::default(),
        ))
        .expect("akd directory");
    (runtime, akd)
}
