//! The openraft type configuration and the aliases the rest of the crate uses.
//!
//! Everything openraft-specific is named here once, so a bump of the pinned alpha touches this
//! module (and its siblings under `raft/`) rather than the whole crate.

use std::fmt;

use ktd_proto::ktd::sequencer::v1 as pb;

/// A Raft node id. Never reused: a removed node rejoins under a new id.
pub type NodeId = u64;

/// What the cluster stores about a node: the address its gRPC server listens on (peers and
/// clients use the same port).
pub type Node = openraft::BasicNode;

/// A replicated command, the payload of a normal Raft log entry.
///
/// A newtype over the wire message so it can be displayed in openraft's logs without printing
/// labels or values (they identify users).
#[derive(Clone, PartialEq)]
pub struct Command(pub pb::Command);

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use pb::command::Kind;
        match &self.0.kind {
            Some(Kind::Append(append)) => write!(f, "Append({} updates)", append.updates.len()),
            Some(Kind::Seal(seal)) if seal.heartbeat => write!(f, "Heartbeat({})", seal.epoch),
            Some(Kind::Seal(seal)) => write!(f, "Seal({})", seal.epoch),
            Some(Kind::CommitEpoch(commit)) => write!(f, "CommitEpoch({})", commit.epoch),
            Some(Kind::InitCluster(_)) => write!(f, "InitCluster"),
            Some(Kind::SetShardMap(map)) => write!(f, "SetShardMap({} shards)", map.shards.len()),
            Some(Kind::Retention(_)) => write!(f, "Retention"),
            Some(Kind::Restore(_)) => write!(f, "Restore"),
            None => write!(f, "Empty"),
        }
    }
}

openraft::declare_raft_types!(
    /// ktd's Raft types: `u64` node ids, [`Command`] entries, [`pb::ApplyResult`] responses.
    pub TypeConfig:
        D = Command,
        R = pb::ApplyResult,
        NodeId = NodeId,
        Node = Node,
);

/// A log id (leader id + index).
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
/// A vote.
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
/// A (committed) leader id: term + node id.
pub type LeaderId = openraft::alias::LeaderIdOf<TypeConfig>;
/// A Raft log entry.
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
/// A log entry's payload.
pub type EntryPayload = openraft::alias::EntryPayloadOf<TypeConfig>;
/// A membership configuration.
pub type Membership = openraft::Membership<NodeId, Node>;
/// A membership with the log id it was stored at.
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
/// Snapshot metadata.
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
/// Raft metrics.
pub type RaftMetrics = openraft::RaftMetrics<TypeConfig>;
