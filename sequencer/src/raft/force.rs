//! Re-forming a sequencer cluster from one surviving node after its quorum is lost for good
//! (etcd's `--force-new-cluster`, CockroachDB's `debug recover`): an offline rewrite of the
//! stopped node's Raft log, run by `ktd admin force-new-cluster`.
//!
//! What it writes, in one synced batch (nothing else on disk changes):
//! - a membership entry at `last + 1` naming only this node, as the one voter (its address
//!   unchanged), under leader id `(T, self)` with `T = max(vote term, last log term) + 1`;
//! - the vote `(T, self)`, not committed.
//!
//! Started again, the node is a follower in a one-voter cluster whose log ends with that entry
//! (in Raft the newest membership entry of a log is in force, committed or not); it elects
//! itself at the next term and its first entry as leader commits everything before it. Applying
//! the membership entry removes the other members for good: their ids are refused afterwards
//! (`removed_node_ids`), so a destroyed node started again from an old copy of its disk cannot
//! rejoin. New members join with `ktd admin add-sequencer` as always.
//!
//! **What survives.** Every entry the survivor's log holds is kept and becomes committed,
//! including entries past the commit index it had learned: an entry a leader acknowledged to a
//! client may be one of them, so dropping the uncommitted tail (as etcd does) could lose an
//! acknowledged publish. Entries the survivor never received are lost — with several survivors
//! pick the one with the newest last log id (`--dry-run` prints it without writing).
//!
//! **Refused:** a data directory a running process holds (the RocksDB lock), a node the
//! membership in force does not name as a voter (a learner may be missing committed entries),
//! and a node that already is the only voter (nothing to do; reported, not rewritten).
//!
//! The decision ([`plan`]) is pure; [`force_new_cluster`] reads and writes around it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::vote::RaftLeaderId;

use crate::error::{Result, SequencerError};
use crate::raft::db::Storage;
use crate::raft::log_store;
use crate::raft::state_machine;
use crate::raft::types::{Entry, EntryPayload, LeaderId, LogId, Membership, NodeId, Vote};

/// What the rewrite does (or, for a dry run, would do).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ForcePlan {
    /// The surviving node.
    pub node_id: NodeId,
    /// Its address, kept in the new membership.
    pub address: String,
    /// Voters of the membership in force before (every config of a joint one).
    pub previous_voters: BTreeSet<NodeId>,
    /// Learners of the membership in force before.
    pub previous_learners: BTreeSet<NodeId>,
    /// The members removed (voters and learners but this node).
    pub removed: BTreeSet<NodeId>,
    /// The last log entry's index and term before the rewrite.
    pub last_log_index: u64,
    /// The last log entry's term before the rewrite.
    pub last_log_term: u64,
    /// The last commit index the node had learned (it may trail what the leader committed).
    pub known_committed_index: u64,
    /// The new membership entry's term (also the vote's).
    pub term: u64,
    /// The new membership entry's index (`last_log_index + 1`).
    pub index: u64,
}

impl ForcePlan {
    /// Entries past the commit index the node knew: kept, and committed once it leads.
    pub fn entries_past_known_commit(&self) -> u64 {
        self.last_log_index
            .saturating_sub(self.known_committed_index)
    }
}

/// Decides the rewrite for `node` from its vote, last log id, last commit it knew and the
/// membership in force. Pure.
pub fn plan(
    node: NodeId,
    vote: Option<&Vote>,
    last_log: Option<&LogId>,
    known_committed: Option<&LogId>,
    membership: &Membership,
) -> Result<ForcePlan> {
    let previous_voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let previous_learners: BTreeSet<NodeId> = membership.learner_ids().collect();
    if previous_voters.is_empty() {
        return Err(SequencerError::InvalidConfig(format!(
            "node {node} has no membership on disk: it never joined a cluster, there is nothing \
             to re-form"
        )));
    }
    if !previous_voters.contains(&node) {
        return Err(SequencerError::InvalidConfig(format!(
            "node {node} is not a voter of its cluster (voters {previous_voters:?}): a learner \
             may be missing committed entries and cannot re-form the cluster; use a voter"
        )));
    }
    if previous_voters.len() == 1 && previous_learners.is_empty() {
        return Err(SequencerError::InvalidConfig(format!(
            "node {node} already is the only member of its cluster: nothing to re-form (start \
             it; it elects itself)"
        )));
    }
    let address = membership
        .nodes()
        .find(|(id, _)| **id == node)
        .map(|(_, info)| info.addr.clone())
        .ok_or_else(|| {
            SequencerError::Corrupt(format!("the membership names voter {node} without a node"))
        })?;
    let vote_term = vote.map_or(0, |vote| vote.leader_id.term);
    let last_log_term = last_log.map_or(0, |log_id| log_id.committed_leader_id().term);
    let last_log_index = last_log.map_or(0, LogId::index);
    let term = vote_term.max(last_log_term) + 1;
    let removed = previous_voters
        .iter()
        .chain(&previous_learners)
        .copied()
        .filter(|id| *id != node)
        .collect();
    Ok(ForcePlan {
        node_id: node,
        address,
        previous_voters,
        previous_learners,
        removed,
        last_log_index,
        last_log_term,
        known_committed_index: known_committed.map_or(0, LogId::index),
        term,
        index: last_log_index + 1,
    })
}

/// The membership entry and vote that carry out `plan`.
pub fn rewrite(plan: &ForcePlan) -> Result<(Entry, Vote)> {
    let membership = Membership::new(
        vec![BTreeSet::from([plan.node_id])],
        BTreeMap::from([(
            plan.node_id,
            crate::raft::types::Node::new(plan.address.clone()),
        )]),
    )
    .map_err(|error| SequencerError::InvalidConfig(format!("membership: {error}")))?;
    let entry = Entry {
        log_id: LogId::new(LeaderId::new(plan.term, plan.node_id), plan.index),
        payload: EntryPayload::Membership(membership),
    };
    Ok((entry, Vote::new(plan.term, plan.node_id)))
}

/// Plans the rewrite of the stopped node's data directory and, unless `dry_run`, writes it.
/// Blocking (RocksDB): call it from a blocking thread.
pub fn force_new_cluster(data_dir: &Path, dry_run: bool) -> Result<ForcePlan> {
    if Storage::is_new(data_dir)? {
        return Err(SequencerError::IncompatibleDataDir {
            path: data_dir.display().to_string(),
            reason: "it holds no sequencer database".into(),
        });
    }
    let storage = Storage::open(data_dir, None)?;
    let node = storage.node_id();
    let vote = log_store::stored_vote(&storage)?;
    let log_state = log_store::stored_log_state(&storage)?;
    let committed = log_store::stored_committed(&storage)?;
    let (last_applied, applied) = state_machine::applied_membership(&storage)?;
    // The newest membership entry of the log is in force; below the last applied entry the
    // state machine's copy is (the log may have been purged there).
    let above = last_applied.as_ref().map_or(0, LogId::index);
    let membership = match log_store::last_membership_entry_above(&storage, above)? {
        Some(Entry {
            payload: EntryPayload::Membership(membership),
            ..
        }) => membership,
        _ => applied.membership().clone(),
    };
    let plan = plan(
        node,
        vote.as_ref(),
        log_state.last_log_id.as_ref(),
        committed.as_ref(),
        &membership,
    )?;
    if !dry_run {
        let (entry, vote) = rewrite(&plan)?;
        log_store::write_entry_and_vote(&storage, &entry, &vote)?;
        tracing::warn!(
            node_id = plan.node_id,
            removed = ?plan.removed,
            term = plan.term,
            index = plan.index,
            last_log_index = plan.last_log_index,
            known_committed_index = plan.known_committed_index,
            "FORCED A NEW CLUSTER: this node is now the only voter; the other members are \
             removed for good and must never be started on their old data"
        );
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::Node;

    fn three_voters() -> Membership {
        Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeMap::from([
                (1, Node::new("127.0.0.1:1")),
                (2, Node::new("127.0.0.1:2")),
                (3, Node::new("127.0.0.1:3")),
                (4, Node::new("127.0.0.1:4")),
            ]),
        )
        .expect("membership")
    }

    fn log_id(term: u64, node: NodeId, index: u64) -> LogId {
        LogId::new(LeaderId::new(term, node), index)
    }

    #[test]
    fn the_survivor_becomes_the_only_voter_one_term_past_anything_it_has_seen_keeping_its_whole_log()
     {
        let vote = Vote::new_committed(7, 1);
        let plan = plan(
            2,
            Some(&vote),
            Some(&log_id(6, 1, 120)),
            Some(&log_id(6, 1, 110)),
            &three_voters(),
        )
        .expect("plan");
        assert_eq!(plan.term, 8, "past the vote's term");
        assert_eq!(
            plan.index, 121,
            "after every entry it holds, committed or not"
        );
        assert_eq!(plan.entries_past_known_commit(), 10);
        assert_eq!(plan.removed, BTreeSet::from([1, 3, 4]));
        assert_eq!(plan.address, "127.0.0.1:2");
        let (entry, new_vote) = rewrite(&plan).expect("rewrite");
        assert_eq!(entry.log_id, log_id(8, 2, 121));
        assert!(!new_vote.committed, "it must still win an election");
        assert_eq!(new_vote.leader_id, LeaderId::new(8, 2));
        let EntryPayload::Membership(membership) = entry.payload else {
            panic!("a membership entry");
        };
        assert_eq!(membership.voter_ids().collect::<Vec<_>>(), vec![2]);
        assert_eq!(membership.learner_ids().count(), 0);
        // A log term newer than the vote (a follower that appended from a newer leader).
        let plan = plan_for(2, Vote::new(3, 1), log_id(5, 3, 9));
        assert_eq!(plan.term, 6);
    }

    fn plan_for(node: NodeId, vote: Vote, last: LogId) -> ForcePlan {
        plan(node, Some(&vote), Some(&last), None, &three_voters()).expect("plan")
    }

    #[test]
    fn a_learner_a_stranger_and_a_node_already_alone_are_refused() {
        let learner = plan(4, None, None, None, &three_voters()).expect_err("learner");
        assert!(learner.to_string().contains("not a voter"), "{learner}");
        let stranger = plan(9, None, None, None, &three_voters()).expect_err("stranger");
        assert!(stranger.to_string().contains("not a voter"), "{stranger}");
        let never_joined =
            plan(1, None, None, None, &Membership::default()).expect_err("no membership");
        assert!(
            never_joined.to_string().contains("never joined"),
            "{never_joined}"
        );
        let alone = Membership::new(
            vec![BTreeSet::from([1])],
            BTreeMap::from([(1, Node::new("127.0.0.1:1"))]),
        )
        .expect("membership");
        let alone = plan(1, None, None, None, &alone).expect_err("alone");
        assert!(alone.to_string().contains("already is the only"), "{alone}");
    }
}
