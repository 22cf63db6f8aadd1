//! `ktd shard`'s configuration ([`ShardConfig`]) and what it resolves to ([`ResolvedShard`]):
//! the VRF seed read from its file, and the settings `crate::serve::run_shard` takes.

use std::path::PathBuf;
use std::time::Duration;

use ktd_core::AkdConfig;
use serde::{Deserialize, Serialize};
use shard::lookup_proofs::LookupProofs;

use super::{ProcessConfig, ServerFile, check_address, check_partition_bits, required};
use crate::serve::ShardSettings;

/// Default block cache of a shard's store, in MiB.
pub const DEFAULT_BLOCK_CACHE_MIB: usize =
    shard::store::StoreOptions::DEFAULT_BLOCK_CACHE_BYTES >> 20;
/// Default memory of a shard's hot tree levels, in MiB.
pub const DEFAULT_HOT_TREE_MIB: usize = shard::store::StoreOptions::DEFAULT_HOT_TREE_BYTES >> 20;

/// The store tuning of `block_cache_mib` and `hot_tree_mib`, checked (a block cache of at least
/// 8 MiB, and each at most 1 TiB).
pub(crate) fn store_options(
    block_cache_mib: usize,
    hot_tree_mib: usize,
) -> anyhow::Result<shard::store::StoreOptions> {
    const MAX_MIB: usize = 1 << 20;
    if !(8..=MAX_MIB).contains(&block_cache_mib) {
        anyhow::bail!("block_cache_mib must be between 8 and {MAX_MIB}, not {block_cache_mib}");
    }
    if hot_tree_mib > MAX_MIB {
        anyhow::bail!("hot_tree_mib must be at most {MAX_MIB}, not {hot_tree_mib}");
    }
    Ok(shard::store::StoreOptions {
        block_cache_bytes: block_cache_mib << 20,
        hot_tree_bytes: hot_tree_mib << 20,
        ..shard::store::StoreOptions::default()
    })
}

/// A shard server's configuration (file keys = flag names with `_`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardConfig {
    /// This shard's id in the shard map. Required.
    pub id: Option<String>,
    /// Address to listen on. Required.
    pub listen: Option<String>,
    /// The data directory. Required.
    pub data_dir: Option<PathBuf>,
    /// The directory's VRF seed file (64 hex digits, mode 600). Required.
    pub vrf_seed_file: Option<PathBuf>,
    /// Tree partition bits (must match the cluster's).
    pub partition_bits: u8,
    /// `whatsapp_v1` or `experimental:<domain label>` (must match the cluster's).
    #[serde(with = "super::akd_configuration")]
    pub configuration: AkdConfig,
    /// Sequencer addresses: the shard tails their log to evaluate VRF labels while epochs are
    /// open (without them, labels are evaluated when an epoch is built).
    pub sequencers: Vec<String>,
    /// How long a partition copy the shard map moved to other servers keeps serving reads
    /// before this server deletes it.
    #[serde(with = "humantime_serde")]
    pub orphan_grace: Duration,
    /// How often the server deletes the tree history below the cluster's safe epoch (history
    /// retention).
    #[serde(with = "humantime_serde")]
    pub prune_interval: Duration,
    /// When lookups' VRF proofs are stored: `eager`, `lazy` or `off`.
    #[serde(with = "super::as_text")]
    pub lookup_proofs: LookupProofs,
    /// RocksDB's block cache, in MiB.
    pub block_cache_mib: usize,
    /// Memory for the top tree levels held in memory, in MiB (0: none).
    pub hot_tree_mib: usize,
    /// Metrics, logs, traces and TLS.
    #[serde(flatten, skip_deserializing)]
    pub process: ProcessConfig,
}

impl Default for ShardConfig {
    fn default() -> Self {
        Self {
            id: None,
            listen: None,
            data_dir: None,
            vrf_seed_file: None,
            partition_bits: 4,
            configuration: AkdConfig::WhatsAppV1,
            sequencers: Vec::new(),
            orphan_grace: shard::local::DEFAULT_ORPHAN_GRACE,
            prune_interval: shard::local::DEFAULT_PRUNE_INTERVAL,
            lookup_proofs: LookupProofs::default(),
            block_cache_mib: DEFAULT_BLOCK_CACHE_MIB,
            hot_tree_mib: DEFAULT_HOT_TREE_MIB,
            process: ProcessConfig::default(),
        }
    }
}

impl ServerFile for ShardConfig {
    const SERVER: &'static str = "shard";
    fn process_mut(&mut self) -> Option<&mut ProcessConfig> {
        Some(&mut self.process)
    }
}

/// A shard server's validated configuration, with its VRF seed.
#[derive(Debug)]
pub struct ResolvedShard {
    /// Address to listen on.
    pub listen: String,
    /// What the server runs with (the seed is redacted from `Debug` and zeroed on drop).
    pub settings: ShardSettings,
    /// The seed's VRF public key (what `--check-config` shows instead of the seed).
    pub vrf_public_key: [u8; 32],
}

impl ShardConfig {
    /// Validates the configuration and reads the VRF seed file (its length and permissions).
    pub fn resolve(&self) -> anyhow::Result<ResolvedShard> {
        let id = required(&self.id, "id", "--id, KTD_SHARD_ID")?;
        let listen = required(&self.listen, "listen", "--listen, KTD_SHARD_LISTEN")?;
        check_address("listen", listen)?;
        let data_dir = required(&self.data_dir, "data_dir", "--data-dir, KTD_SHARD_DATA_DIR")?;
        let seed_file = required(
            &self.vrf_seed_file,
            "vrf_seed_file",
            "--vrf-seed-file, KTD_SHARD_VRF_SEED_FILE",
        )?;
        check_partition_bits(self.partition_bits)?;
        let settings = ShardSettings {
            id: id.clone(),
            data_dir: data_dir.clone(),
            vrf_seed: crate::seed_file::read_vrf_seed(seed_file)?,
            partition_bits: self.partition_bits,
            config: self.configuration.clone(),
            sequencers: self.sequencers.clone(),
            orphan_grace: self.orphan_grace,
            prune_interval: self.prune_interval,
            lookup_proofs: self.lookup_proofs,
            store: store_options(self.block_cache_mib, self.hot_tree_mib)?,
        };
        Ok(ResolvedShard {
            listen: listen.clone(),
            vrf_public_key: crate::seed_file::vrf_public_key(&settings.vrf_seed)?,
            settings,
        })
    }
}
