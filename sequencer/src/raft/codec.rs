//! Conversions between openraft's types and the `ktd.raft.v1` wire messages.
//!
//! One encoding serves the network and the disk: a log entry is stored as the `Entry` message a
//! leader sends. Decoding never panics: a missing required field is [`SequencerError::Malformed`]
//! (callers reading from disk turn it into `Corrupt`).

use std::collections::{BTreeMap, BTreeSet};

use ktd_proto::ktd::raft::v1 as pb;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, StreamAppendError, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::vote::RaftLeaderId;

use crate::error::{Result, SequencerError};
use crate::raft::types::{
    Command, Entry, EntryPayload, LeaderId, LogId, Membership, Node, NodeId, SnapshotMeta,
    StoredMembership, TypeConfig, Vote,
};

fn missing(what: &str) -> SequencerError {
    SequencerError::Malformed(format!("missing {what}"))
}

/// Encodes a leader id.
pub fn leader_id_to_pb(leader_id: &LeaderId) -> pb::LeaderId {
    pb::LeaderId {
        term: leader_id.term,
        node_id: leader_id.node_id,
    }
}

/// Decodes a leader id.
pub fn leader_id_from_pb(leader_id: &pb::LeaderId) -> LeaderId {
    LeaderId::new(leader_id.term, leader_id.node_id)
}

/// Encodes a log id.
pub fn log_id_to_pb(log_id: &LogId) -> pb::LogId {
    pb::LogId {
        leader_id: Some(leader_id_to_pb(log_id.committed_leader_id())),
        index: log_id.index(),
    }
}

/// Decodes a log id.
pub fn log_id_from_pb(log_id: &pb::LogId) -> Result<LogId> {
    let leader_id = log_id
        .leader_id
        .as_ref()
        .ok_or_else(|| missing("log id leader"))?;
    Ok(LogId::new(leader_id_from_pb(leader_id), log_id.index))
}

/// Decodes an optional log id.
pub fn opt_log_id_from_pb(log_id: Option<&pb::LogId>) -> Result<Option<LogId>> {
    log_id.map(log_id_from_pb).transpose()
}

/// Encodes a vote.
pub fn vote_to_pb(vote: &Vote) -> pb::Vote {
    pb::Vote {
        leader_id: Some(leader_id_to_pb(&vote.leader_id)),
        committed: vote.committed,
    }
}

/// Decodes a vote.
pub fn vote_from_pb(vote: Option<&pb::Vote>) -> Result<Vote> {
    let vote = vote.ok_or_else(|| missing("vote"))?;
    let leader_id = vote
        .leader_id
        .as_ref()
        .ok_or_else(|| missing("vote leader"))?;
    Ok(if vote.committed {
        Vote::new_committed(leader_id.term, leader_id.node_id)
    } else {
        Vote::new(leader_id.term, leader_id.node_id)
    })
}

/// Encodes a membership.
pub fn membership_to_pb(membership: &Membership) -> pb::Membership {
    pb::Membership {
        configs: membership
            .get_joint_config()
            .iter()
            .map(|config| pb::NodeIdSet {
                node_ids: config.iter().copied().collect(),
            })
            .collect(),
        nodes: membership
            .nodes()
            .map(|(id, node)| {
                (
                    *id,
                    pb::Node {
                        address: node.addr.clone(),
                    },
                )
            })
            .collect(),
    }
}

/// Decodes a membership.
pub fn membership_from_pb(membership: &pb::Membership) -> Result<Membership> {
    let configs: Vec<BTreeSet<NodeId>> = membership
        .configs
        .iter()
        .map(|config| config.node_ids.iter().copied().collect())
        .collect();
    let nodes: BTreeMap<NodeId, Node> = membership
        .nodes
        .iter()
        .map(|(id, node)| (*id, Node::new(node.address.clone())))
        .collect();
    Membership::new(configs, nodes)
        .map_err(|error| SequencerError::Malformed(format!("membership: {error}")))
}

/// Encodes a stored membership.
pub fn stored_membership_to_pb(stored: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: stored.log_id().as_ref().map(log_id_to_pb),
        membership: Some(membership_to_pb(stored.membership())),
    }
}

/// Decodes a stored membership (absent = the empty initial membership).
pub fn stored_membership_from_pb(
    stored: Option<&pb::StoredMembership>,
) -> Result<StoredMembership> {
    let Some(stored) = stored else {
        return Ok(StoredMembership::default());
    };
    let membership = match &stored.membership {
        Some(membership) => membership_from_pb(membership)?,
        None => Membership::default(),
    };
    Ok(StoredMembership::new(
        opt_log_id_from_pb(stored.log_id.as_ref())?,
        membership,
    ))
}

/// Encodes snapshot metadata.
pub fn snapshot_meta_to_pb(meta: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: meta.last_log_id.as_ref().map(log_id_to_pb),
        last_membership: Some(stored_membership_to_pb(&meta.last_membership)),
    }
}

/// Decodes snapshot metadata.
pub fn snapshot_meta_from_pb(meta: Option<&pb::SnapshotMeta>) -> Result<SnapshotMeta> {
    let meta = meta.ok_or_else(|| missing("snapshot meta"))?;
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from_pb(meta.last_log_id.as_ref())?,
        last_membership: stored_membership_from_pb(meta.last_membership.as_ref())?,
    })
}

/// Encodes a log entry.
pub fn entry_to_pb(entry: &Entry) -> pb::Entry {
    let payload = match &entry.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(command) => pb::entry::Payload::Normal(command.0.clone()),
        EntryPayload::Membership(membership) => {
            pb::entry::Payload::Membership(membership_to_pb(membership))
        }
    };
    pb::Entry {
        log_id: Some(log_id_to_pb(&entry.log_id)),
        payload: Some(payload),
    }
}

/// Decodes a log entry.
pub fn entry_from_pb(entry: pb::Entry) -> Result<Entry> {
    let log_id = log_id_from_pb(
        entry
            .log_id
            .as_ref()
            .ok_or_else(|| missing("entry log id"))?,
    )?;
    let payload = match entry.payload.ok_or_else(|| missing("entry payload"))? {
        pb::entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::entry::Payload::Normal(command) => EntryPayload::Normal(Command(command)),
        pb::entry::Payload::Membership(membership) => {
            EntryPayload::Membership(membership_from_pb(&membership)?)
        }
    };
    Ok(Entry { log_id, payload })
}

/// Encodes an AppendEntries request.
pub fn append_request_to_pb(
    request: &AppendEntriesRequest<TypeConfig>,
) -> pb::AppendEntriesRequest {
    pb::AppendEntriesRequest {
        vote: Some(vote_to_pb(&request.vote)),
        prev_log_id: request.prev_log_id.as_ref().map(log_id_to_pb),
        entries: request.entries.iter().map(entry_to_pb).collect(),
        leader_commit: request.leader_commit.as_ref().map(log_id_to_pb),
    }
}

/// Decodes an AppendEntries request.
pub fn append_request_from_pb(
    request: pb::AppendEntriesRequest,
) -> Result<AppendEntriesRequest<TypeConfig>> {
    Ok(AppendEntriesRequest {
        vote: vote_from_pb(request.vote.as_ref())?,
        prev_log_id: opt_log_id_from_pb(request.prev_log_id.as_ref())?,
        entries: request
            .entries
            .into_iter()
            .map(entry_from_pb)
            .collect::<Result<_>>()?,
        leader_commit: opt_log_id_from_pb(request.leader_commit.as_ref())?,
    })
}

/// Encodes an AppendEntries response.
pub fn append_response_to_pb(
    response: &AppendEntriesResponse<TypeConfig>,
) -> pb::AppendEntriesResponse {
    use pb::append_entries_response::Result as R;
    let result = match response {
        AppendEntriesResponse::Success => R::Success(pb::Empty {}),
        AppendEntriesResponse::PartialSuccess(matched) => R::PartialSuccess(pb::PartialSuccess {
            matched: matched.as_ref().map(log_id_to_pb),
        }),
        AppendEntriesResponse::Conflict => R::Conflict(pb::Empty {}),
        AppendEntriesResponse::HigherVote(vote) => R::HigherVote(vote_to_pb(vote)),
    };
    pb::AppendEntriesResponse {
        result: Some(result),
    }
}

/// Decodes an AppendEntries response.
pub fn append_response_from_pb(
    response: pb::AppendEntriesResponse,
) -> Result<AppendEntriesResponse<TypeConfig>> {
    use pb::append_entries_response::Result as R;
    Ok(
        match response.result.ok_or_else(|| missing("append result"))? {
            R::Success(_) => AppendEntriesResponse::Success,
            R::PartialSuccess(partial) => {
                AppendEntriesResponse::PartialSuccess(opt_log_id_from_pb(partial.matched.as_ref())?)
            }
            R::Conflict(_) => AppendEntriesResponse::Conflict,
            R::HigherVote(vote) => AppendEntriesResponse::HigherVote(vote_from_pb(Some(&vote))?),
        },
    )
}

/// Encodes one StreamAppend result.
pub fn stream_result_to_pb(result: &StreamAppendResult<TypeConfig>) -> pb::StreamAppendResponse {
    use pb::stream_append_response::Result as R;
    let result = match result {
        Ok(matched) => R::Success(pb::PartialSuccess {
            matched: matched.as_ref().map(log_id_to_pb),
        }),
        Err(StreamAppendError::Conflict(log_id)) => R::Conflict(log_id_to_pb(log_id)),
        Err(StreamAppendError::HigherVote(vote)) => R::HigherVote(vote_to_pb(vote)),
    };
    pb::StreamAppendResponse {
        result: Some(result),
    }
}

/// Decodes one StreamAppend result.
pub fn stream_result_from_pb(
    response: pb::StreamAppendResponse,
) -> Result<StreamAppendResult<TypeConfig>> {
    use pb::stream_append_response::Result as R;
    Ok(
        match response
            .result
            .ok_or_else(|| missing("stream append result"))?
        {
            R::Success(partial) => Ok(opt_log_id_from_pb(partial.matched.as_ref())?),
            R::Conflict(log_id) => Err(StreamAppendError::Conflict(log_id_from_pb(&log_id)?)),
            R::HigherVote(vote) => Err(StreamAppendError::HigherVote(vote_from_pb(Some(&vote))?)),
        },
    )
}

/// Encodes a vote request.
pub fn vote_request_to_pb(request: &VoteRequest<TypeConfig>) -> pb::VoteRequest {
    pb::VoteRequest {
        vote: Some(vote_to_pb(&request.vote)),
        last_log_id: request.last_log_id.as_ref().map(log_id_to_pb),
        leadership_transfer: request.leadership_transfer,
    }
}

/// Decodes a vote request.
pub fn vote_request_from_pb(request: &pb::VoteRequest) -> Result<VoteRequest<TypeConfig>> {
    let mut decoded = VoteRequest::new(
        vote_from_pb(request.vote.as_ref())?,
        opt_log_id_from_pb(request.last_log_id.as_ref())?,
    );
    decoded.leadership_transfer = request.leadership_transfer;
    Ok(decoded)
}

/// Encodes a vote response.
pub fn vote_response_to_pb(response: &VoteResponse<TypeConfig>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(vote_to_pb(&response.vote)),
        vote_granted: response.vote_granted,
        last_log_id: response.last_log_id.as_ref().map(log_id_to_pb),
    }
}

/// Decodes a vote response.
pub fn vote_response_from_pb(response: &pb::VoteResponse) -> Result<VoteResponse<TypeConfig>> {
    Ok(VoteResponse::new(
        vote_from_pb(response.vote.as_ref())?,
        opt_log_id_from_pb(response.last_log_id.as_ref())?,
        response.vote_granted,
    ))
}

/// Encodes a transfer-leader request.
pub fn transfer_request_to_pb(
    request: &TransferLeaderRequest<TypeConfig>,
) -> pb::TransferLeaderRequest {
    pb::TransferLeaderRequest {
        from_leader: Some(vote_to_pb(request.from_leader())),
        to_node_id: *request.to_node_id(),
        last_log_id: request.last_log_id().map(log_id_to_pb),
    }
}

/// Decodes a transfer-leader request.
pub fn transfer_request_from_pb(
    request: &pb::TransferLeaderRequest,
) -> Result<TransferLeaderRequest<TypeConfig>> {
    Ok(TransferLeaderRequest::new(
        vote_from_pb(request.from_leader.as_ref())?,
        request.to_node_id,
        opt_log_id_from_pb(request.last_log_id.as_ref())?,
    ))
}

/// Encodes a transfer-leader response.
pub fn transfer_response_to_pb(
    response: &TransferLeaderResponse<TypeConfig>,
) -> pb::TransferLeaderResponse {
    use openraft::raft::TransferLeaderError;
    use pb::transfer_leader_response::Result as R;
    let result = match response {
        Ok(()) => R::Ok(pb::Empty {}),
        Err(TransferLeaderError::VoteChanged { expected, actual }) => {
            R::VoteChanged(pb::VoteChanged {
                expected: Some(vote_to_pb(expected)),
                actual: Some(vote_to_pb(actual)),
            })
        }
        Err(TransferLeaderError::LogNotFlushed { expected, actual }) => {
            R::LogNotFlushed(pb::LogNotFlushed {
                expected: expected.as_ref().map(log_id_to_pb),
                actual: actual.as_ref().map(log_id_to_pb),
            })
        }
    };
    pb::TransferLeaderResponse {
        result: Some(result),
    }
}

/// Decodes a transfer-leader response.
pub fn transfer_response_from_pb(
    response: &pb::TransferLeaderResponse,
) -> Result<TransferLeaderResponse<TypeConfig>> {
    use openraft::raft::TransferLeaderError;
    use pb::transfer_leader_response::Result as R;
    Ok(
        match response
            .result
            .as_ref()
            .ok_or_else(|| missing("transfer leader result"))?
        {
            R::Ok(_) => Ok(()),
            R::VoteChanged(changed) => Err(TransferLeaderError::VoteChanged {
                expected: vote_from_pb(changed.expected.as_ref())?,
                actual: vote_from_pb(changed.actual.as_ref())?,
            }),
            R::LogNotFlushed(not_flushed) => Err(TransferLeaderError::LogNotFlushed {
                expected: opt_log_id_from_pb(not_flushed.expected.as_ref())?,
                actual: opt_log_id_from_pb(not_flushed.actual.as_ref())?,
            }),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ktd_proto::ktd::sequencer::v1 as api;

    #[test]
    fn entries_round_trip() {
        let log_id = LogId::new(LeaderId::new(3, 2), 17);
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([1, 2])],
            BTreeMap::from([
                (1, Node::new("a:1")),
                (2, Node::new("b:2")),
                (3, Node::new("c:3")),
                (4, Node::new("d:4")),
            ]),
        )
        .expect("valid membership");
        let command = Command(api::Command {
            kind: Some(api::command::Kind::Seal(api::SealRequest {
                epoch: 5,
                heartbeat: true,
                sealed_at_ms: 7,
            })),
        });
        for payload in [
            EntryPayload::Blank,
            EntryPayload::Normal(command),
            EntryPayload::Membership(membership),
        ] {
            let entry = Entry { log_id, payload };
            let decoded = entry_from_pb(entry_to_pb(&entry)).expect("decode");
            assert_eq!(decoded, entry);
        }
    }

    #[test]
    fn votes_round_trip() {
        let vote = Vote::new(9, 1);
        assert_eq!(
            vote_from_pb(Some(&vote_to_pb(&vote))).expect("decode"),
            vote
        );
        let vote = Vote::new_committed(9, 1);
        assert_eq!(
            vote_from_pb(Some(&vote_to_pb(&vote))).expect("decode"),
            vote
        );
        assert!(vote_from_pb(None).is_err());
    }
}
