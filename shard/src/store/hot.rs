//! The hot tree levels: an in-memory copy of the node versions whose labels are shorter than
//! `levels` bits (issue 19, part 2).
//!
//! Why: an epoch build reads, per partition, every node of the top trie levels (they are all on
//! some updated leaf's path), and keys in `nodes` are epoch-major, so those nodes are scattered
//! over every block of every epoch's key range. In a directory larger than the block cache the
//! deep, random reads evict them, and each top-level read becomes a block read. Holding the top
//! levels here makes their reads a lock and an array index.
//!
//! Layout: one slot per possible label of length `< levels`, at its heap index
//! `2^len − 1 + prefix` (the first `len` bits as an integer), in chunks allocated on first use
//! (a shard holding few partitions touches few chunks). A slot holds a label's **two newest
//! versions**: an epoch build reads version `E − 1` while lookups read the committed epoch, and a
//! re-driven build of `E` after a discard rewrites `E`.
//!
//! Invariants:
//! - **Bounded:** `levels` is fixed at open from the configured bytes, so at most
//!   `2^levels − 1` slots of [`SLOT_BYTES`] each exist, whatever the directory holds.
//! - **A subset of the store:** every held `(label, version)` maps to the bytes `nodes` holds for
//!   it. The store's write paths fill it only after their batch is written, and every path that
//!   deletes or rewrites node versions (discards, partition deletion, copies, pruning, the damage
//!   test hook) drops the affected entries after its batch. A read-through fill that raced an
//!   invalidation is refused by the generation check: each invalidation bumps the generation
//!   before it drops entries, and a fill is applied under the chunk lock only if the generation
//!   is still the one read before the store read.
//! - **No trust needed:** a wrong entry would still be caught where every node is checked against
//!   its parent's hash (lookup walks) — the invariant above is what keeps that from happening.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockWriteGuard};

use akd_core::NodeLabel;
use ktd_core::tree::{InteriorNode, NodeKey};

/// Slots per lazily allocated chunk.
const CHUNK: usize = 1 << 10;

/// Most levels held (2^24 slots ≈ 6 GiB): a bound on a misconfigured size.
const MAX_LEVELS: u8 = 24;

/// A label's two newest held versions; `None` is an empty place.
type Slot = [Option<(u64, InteriorNode)>; 2];

/// A lazily allocated run of [`CHUNK`] slots.
type Chunk = RwLock<Option<Box<[Slot]>>>;

/// Bytes of one slot (the unit [`HotNodes::levels_for`] sizes by).
pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

/// Hit and miss counts since open (reads of labels short enough to be held).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotStats {
    /// Reads answered from memory.
    pub hits: u64,
    /// Reads of held-length labels that went to RocksDB.
    pub misses: u64,
    /// Slots allocated (chunks in use × chunk size).
    pub allocated_slots: u64,
    /// Bytes allocated for slots.
    pub allocated_bytes: u64,
    /// Label lengths held: `0..levels`.
    pub levels: u8,
}

impl HotStats {
    /// Sets `ktd_shard_hot_tree_bytes{dir}`, `ktd_shard_hot_tree_levels{dir}` and
    /// `ktd_shard_hot_tree_reads_total{dir,outcome=hit|miss}` (sampled with the storage gauges).
    pub fn export(&self, dir: &std::path::Path) {
        let dir = dir.display().to_string();
        metrics::gauge!("ktd_shard_hot_tree_bytes", "dir" => dir.clone())
            .set(self.allocated_bytes as f64);
        metrics::gauge!("ktd_shard_hot_tree_levels", "dir" => dir.clone())
            .set(f64::from(self.levels));
        metrics::counter!("ktd_shard_hot_tree_reads_total", "dir" => dir.clone(), "outcome" => "hit")
            .absolute(self.hits);
        metrics::counter!("ktd_shard_hot_tree_reads_total", "dir" => dir, "outcome" => "miss")
            .absolute(self.misses);
    }
}

/// The hot tree levels of one store. See the module docs.
pub struct HotNodes {
    levels: u8,
    chunks: Box<[Chunk]>,
    generation: AtomicU64,
    /// The largest version ever held (an epoch discard above it has nothing to drop).
    max_version: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    allocated_chunks: AtomicUsize,
}

impl HotNodes {
    /// The levels `bytes` of slots hold: the largest `L ≤ 24` with `(2^L − 1)` slots in
    /// `bytes` (0, nothing held, below one slot).
    pub fn levels_for(bytes: usize) -> u8 {
        let slots = bytes / SLOT_BYTES;
        // 2^L − 1 ≤ slots  ⇔  L ≤ log2(slots + 1).
        let levels = (slots as u64 + 1).ilog2() as u8;
        levels.min(MAX_LEVELS)
    }

    /// Holds labels shorter than [`HotNodes::levels_for`]`(bytes)` bits.
    pub fn with_bytes(bytes: usize) -> Self {
        Self::with_levels(Self::levels_for(bytes))
    }

    /// Holds labels shorter than `levels` bits (at most 24).
    pub fn with_levels(levels: u8) -> Self {
        let levels = levels.min(MAX_LEVELS);
        let slots = (1usize << levels) - 1;
        let chunks = (0..slots.div_ceil(CHUNK))
            .map(|_| RwLock::new(None))
            .collect();
        Self {
            levels,
            chunks,
            generation: AtomicU64::new(0),
            max_version: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            allocated_chunks: AtomicUsize::new(0),
        }
    }

    /// Whether `label` is short enough to be held.
    pub fn holds(&self, label: &NodeLabel) -> bool {
        label.label_len < u32::from(self.levels)
    }

    /// The current generation, to pass to [`HotNodes::fill`] after a store read.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The held node of `key`, counting a hit or a miss; `None` if not held (or not holdable,
    /// uncounted).
    pub fn get(&self, key: &NodeKey) -> Option<InteriorNode> {
        let (chunk, offset) = self.position(&key.label)?;
        let found = self.chunks[chunk]
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .and_then(|slots| {
                slots[offset]
                    .iter()
                    .flatten()
                    .find(|(version, _)| *version == key.version)
                    .map(|(_, node)| *node)
            });
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Holds `node` as `key`, written to the store just now (a label not short enough is
    /// ignored).
    pub fn insert(&self, key: &NodeKey, node: &InteriorNode) {
        self.put(key, node, None);
    }

    /// Holds `node` as `key`, read from the store while the generation was `generation`;
    /// ignored if an invalidation has run since.
    pub fn fill(&self, key: &NodeKey, node: &InteriorNode, generation: u64) {
        self.put(key, node, Some(generation));
    }

    fn put(&self, key: &NodeKey, node: &InteriorNode, generation: Option<u64>) {
        let Some((chunk, offset)) = self.position(&key.label) else {
            return;
        };
        let mut guard = self.write(chunk);
        // Raised before the generation check: an invalidation that reads it after bumping the
        // generation either sees this version (and scans) or has bumped before the check below
        // (which then refuses this fill), so its early exit never skips a held version.
        self.max_version.fetch_max(key.version, Ordering::SeqCst);
        if generation.is_some_and(|generation| generation != self.generation()) {
            return;
        }
        let slots = guard.get_or_insert_with(|| {
            self.allocated_chunks.fetch_add(1, Ordering::Relaxed);
            vec![[None, None]; CHUNK].into_boxed_slice()
        });
        let slot = &mut slots[offset];
        let place = if let Some(same) = slot
            .iter()
            .position(|entry| entry.is_some_and(|(version, _)| version == key.version))
        {
            same
        } else if let Some(empty) = slot.iter().position(Option::is_none) {
            empty
        } else {
            // Both places full with other versions: replace the older, if this one is newer.
            let older = usize::from(slot[1].map(|(v, _)| v) < slot[0].map(|(v, _)| v));
            if slot[older].is_some_and(|(version, _)| version > key.version) {
                return;
            }
            older
        };
        slot[place] = Some((key.version, *node));
    }

    /// Drops every held version `≥ from` (an interrupted epoch's node versions are discarded).
    pub fn discard_from(&self, from: u64) {
        self.retain_in(None, |version| version < from, from);
    }

    /// Drops the held versions `≥ from` of labels in tree partition `partition` of `bits`
    /// (and of labels shorter than `bits`, which span partitions).
    pub fn discard_partition_from(&self, partition: u32, bits: u8, from: u64) {
        self.retain_in(Some((partition, bits)), |version| version < from, from);
    }

    /// Drops everything held of tree partition `partition` of `bits` (deleted, copied in or
    /// damaged).
    pub fn clear_partition(&self, partition: u32, bits: u8) {
        self.retain_in(Some((partition, bits)), |_| false, 0);
    }

    /// Drops everything held (after a change to `nodes` whose keys are not known).
    pub fn clear(&self) {
        self.retain_in(None, |_| false, 0);
    }

    /// Drops the held version `key`, if held (pruned).
    pub fn remove(&self, key: &NodeKey) {
        let Some((chunk, offset)) = self.position(&key.label) else {
            return;
        };
        self.generation.fetch_add(1, Ordering::SeqCst);
        if let Some(slots) = self.write(chunk).as_mut() {
            for entry in &mut slots[offset] {
                if entry.is_some_and(|(version, _)| version == key.version) {
                    *entry = None;
                }
            }
        }
    }

    /// Hit and miss counts and the memory in use.
    pub fn stats(&self) -> HotStats {
        let chunks = self.allocated_chunks.load(Ordering::Relaxed) as u64;
        HotStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            allocated_slots: chunks * CHUNK as u64,
            allocated_bytes: chunks * (CHUNK * SLOT_BYTES) as u64,
            levels: self.levels,
        }
    }

    /// Keeps the versions `keep` accepts in the slots of `scope` (a partition, or everything).
    /// `lowest_dropped` is the smallest version `keep` can reject: nothing held above the
    /// largest version ever held is dropped, so that case skips the scan.
    fn retain_in(&self, scope: Option<(u32, u8)>, keep: impl Fn(u64) -> bool, lowest_dropped: u64) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        if lowest_dropped > self.max_version.load(Ordering::SeqCst) {
            return;
        }
        let retain = |first: usize, count: usize| {
            let mut index = first;
            let end = first + count;
            while index < end {
                let (chunk, offset) = (index / CHUNK, index % CHUNK);
                let stop = end.min((chunk + 1) * CHUNK);
                if let Some(slots) = self.write(chunk).as_mut() {
                    for slot in &mut slots[offset..offset + (stop - index)] {
                        for entry in slot.iter_mut() {
                            if entry.is_some_and(|(version, _)| !keep(version)) {
                                *entry = None;
                            }
                        }
                    }
                }
                index = stop;
            }
        };
        match scope {
            // A partition that does not exist at `bits` (a corrupt record naming it): everything.
            Some((partition, bits)) if u64::from(partition) >> bits.min(63) != 0 => {
                retain(0, (1usize << self.levels) - 1)
            }
            None => retain(0, (1usize << self.levels) - 1),
            Some((partition, bits)) => {
                for len in 0..self.levels {
                    let level_start = (1usize << len) - 1;
                    if len < bits {
                        // Labels above the partitions: each spans several.
                        retain(level_start, 1usize << len);
                    } else {
                        let width = 1usize << (len - bits);
                        retain(level_start + partition as usize * width, width);
                    }
                }
            }
        }
    }

    /// `(chunk, offset)` of `label`'s slot, `None` if it is too long to be held.
    fn position(&self, label: &NodeLabel) -> Option<(usize, usize)> {
        if !self.holds(label) {
            return None;
        }
        let len = label.label_len;
        let head = u64::from_be_bytes(label.label_val[..8].try_into().ok()?);
        let prefix = if len == 0 { 0 } else { head >> (64 - len) };
        let index = (1usize << len) - 1 + prefix as usize;
        Some((index / CHUNK, index % CHUNK))
    }

    fn write(&self, chunk: usize) -> RwLockWriteGuard<'_, Option<Box<[Slot]>>> {
        self.chunks[chunk]
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ktd_core::tree::NodeRef;

    fn label(bits: &str) -> NodeLabel {
        let mut val = [0u8; 32];
        for (i, bit) in bits.bytes().enumerate() {
            if bit == b'1' {
                val[i / 8] |= 0x80 >> (i % 8);
            }
        }
        NodeLabel::new(val, bits.len() as u32)
    }

    fn key(bits: &str, version: u64) -> NodeKey {
        NodeKey {
            label: label(bits),
            version,
        }
    }

    fn node(tag: u8) -> InteriorNode {
        let child = |bit: &str| NodeRef {
            label: label(bit),
            hash: akd_core::AzksValue([tag; 32]),
            min_epoch: 1,
            max_epoch: u64::from(tag),
        };
        InteriorNode {
            children: [child("0"), child("1")],
        }
    }

    #[test]
    fn sizes_to_the_largest_complete_set_of_levels_that_fits() {
        assert_eq!(HotNodes::levels_for(0), 0);
        assert_eq!(HotNodes::levels_for(SLOT_BYTES), 1);
        assert_eq!(HotNodes::levels_for(3 * SLOT_BYTES), 2);
        assert_eq!(HotNodes::levels_for(7 * SLOT_BYTES - 1), 2);
        assert_eq!(HotNodes::levels_for(usize::MAX), MAX_LEVELS);
        let hot = HotNodes::with_levels(3);
        assert!(hot.holds(&label("01")) && !hot.holds(&label("010")));
    }

    #[test]
    fn holds_the_two_newest_versions_of_each_label() {
        let hot = HotNodes::with_levels(8);
        for version in [3, 5, 4] {
            hot.insert(&key("0110", version), &node(version as u8));
        }
        assert_eq!(hot.get(&key("0110", 3)), None, "the oldest was replaced");
        assert_eq!(hot.get(&key("0110", 4)), Some(node(4)));
        assert_eq!(hot.get(&key("0110", 5)), Some(node(5)));
        hot.insert(&key("0110", 2), &node(2));
        assert_eq!(
            hot.get(&key("0110", 2)),
            None,
            "older than both held: not taken"
        );
        hot.insert(&key("0110", 5), &node(9));
        assert_eq!(
            hot.get(&key("0110", 5)),
            Some(node(9)),
            "same version rewritten"
        );
        // Labels that share a prefix, and the empty label, have their own slots.
        hot.insert(&key("011", 5), &node(1));
        hot.insert(&key("", 5), &node(7));
        assert_eq!(hot.get(&key("0110", 5)), Some(node(9)));
        assert_eq!(hot.get(&key("011", 5)), Some(node(1)));
        assert_eq!(hot.get(&key("", 5)), Some(node(7)));
        let long = key("011011011", 5);
        hot.insert(&long, &node(1));
        assert_eq!(hot.get(&long), None, "too long to be held");
        let stats = hot.stats();
        assert_eq!(
            (stats.hits, stats.misses),
            (6, 2),
            "the long label is not counted"
        );
    }

    #[test]
    fn discards_drop_only_their_epochs_and_partition() {
        let hot = HotNodes::with_levels(6);
        // Partition bits 2: "01…" is partition 1, "10…" partition 2; "0" spans partitions.
        for bits in ["0", "01", "0110", "10", "1011"] {
            hot.insert(&key(bits, 4), &node(4));
            hot.insert(&key(bits, 5), &node(5));
        }
        hot.discard_partition_from(1, 2, 5);
        for (bits, kept) in [
            ("0", false),
            ("01", false),
            ("0110", false),
            ("10", true),
            ("1011", true),
        ] {
            assert_eq!(hot.get(&key(bits, 5)).is_some(), kept, "{bits} at 5");
            assert!(
                hot.get(&key(bits, 4)).is_some(),
                "{bits} at 4 is older than the discard"
            );
        }
        hot.discard_from(5);
        assert_eq!(hot.get(&key("1011", 5)), None);
        hot.clear_partition(2, 2);
        assert_eq!(hot.get(&key("1011", 4)), None);
        assert!(hot.get(&key("0110", 4)).is_some());
        hot.remove(&key("0110", 4));
        assert_eq!(hot.get(&key("0110", 4)), None);
        // A partition number that does not exist at its bits clears everything, never panics.
        hot.clear_partition(9, 2);
        assert_eq!(hot.get(&key("10", 4)), None);
        hot.insert(&key("10", 4), &node(4));
        hot.clear();
        assert_eq!(hot.get(&key("10", 4)), None);
    }

    #[test]
    fn a_fill_that_raced_an_invalidation_is_refused() {
        let hot = HotNodes::with_levels(6);
        let before = hot.generation();
        hot.discard_from(9);
        hot.fill(&key("01", 3), &node(3), before);
        assert_eq!(hot.get(&key("01", 3)), None);
        hot.fill(&key("01", 3), &node(3), hot.generation());
        assert_eq!(hot.get(&key("01", 3)), Some(node(3)));
    }

    #[test]
    fn memory_is_allocated_by_chunk_on_first_use() {
        let hot = HotNodes::with_levels(20);
        assert_eq!(hot.stats().allocated_bytes, 0);
        hot.insert(&key("1111111111111111111", 1), &node(1));
        let stats = hot.stats();
        assert_eq!(stats.allocated_slots, CHUNK as u64);
        assert_eq!(stats.allocated_bytes, (CHUNK * SLOT_BYTES) as u64);
    }
}
