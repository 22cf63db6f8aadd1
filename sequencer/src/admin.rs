//! The `ktd.sequencer.v1.SequencerAdmin` gRPC service: seal now, shard map, status, membership, leader
//! transfer, snapshots, cluster metadata. Thin, like [`crate::api`].

use std::collections::BTreeSet;
use std::time::Duration;

use ktd_proto::ktd::sequencer::v1 as pb;
use ktd_proto::ktd::sequencer::v1::sequencer_admin_server;
use tonic::{Request, Response, Status};

use crate::node::{Sequencer, WeakSequencer};

/// Most epoch records one `Restore` step installs (one Raft entry of at most a few MiB).
pub const MAX_RESTORE_RECORDS: usize = 1024;
/// Most updates one `Restore` step replays (the client also keeps a step under ~1 MiB).
pub const MAX_REPLAY_UPDATES: usize = 4096;

/// The admin service.
#[derive(Clone, Debug)]
pub struct AdminService {
    sequencer: WeakSequencer,
}

impl AdminService {
    /// Serves `sequencer` (without keeping it alive).
    pub fn new(sequencer: &Sequencer) -> Self {
        Self {
            sequencer: sequencer.downgrade(),
        }
    }

    fn node(&self) -> Result<Sequencer, Status> {
        self.sequencer
            .upgrade()
            .ok_or_else(|| Status::unavailable("the sequencer is shutting down"))
    }

    /// The tonic server for this service.
    pub fn into_server(self) -> sequencer_admin_server::SequencerAdminServer<Self> {
        sequencer_admin_server::SequencerAdminServer::new(self)
    }
}

#[tonic::async_trait]
impl sequencer_admin_server::SequencerAdmin for AdminService {
    async fn seal(
        &self,
        request: Request<pb::SealRequest>,
    ) -> Result<Response<pb::SealResponse>, Status> {
        let request = request.into_inner();
        let node = self.node()?;
        let sealed = match (request.epoch, request.heartbeat) {
            (epoch, false) => node.seal((epoch != 0).then_some(epoch)).await?,
            (0, true) => node.heartbeat(node.open_epoch_view().0).await?,
            (epoch, true) => node.heartbeat(epoch).await?,
        };
        Ok(Response::new(sealed))
    }

    async fn set_shard_map(
        &self,
        request: Request<pb::SetShardMapRequest>,
    ) -> Result<Response<pb::SetShardMapResponse>, Status> {
        let request = request.into_inner();
        // The first release's form (one owner per partition) is still accepted; the state
        // machine validates and normalises either.
        let map = request
            .map
            .unwrap_or_else(|| ktd_proto::ktd::cluster::v1::ShardMap {
                shards: request.shards,
                ..Default::default()
            });
        let shard_map = self
            .node()?
            .set_shard_map(map, request.expected_version)
            .await?;
        Ok(Response::new(pb::SetShardMapResponse {
            shard_map: Some(shard_map),
        }))
    }

    async fn get_cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Ok(Response::new(self.node()?.cluster_status().await?))
    }

    async fn get_node_status(
        &self,
        _request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        Ok(Response::new(self.node()?.node_status()))
    }

    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let request = request.into_inner();
        let response = self
            .node()?
            .add_learner(request.node_id, request.address, request.wait)
            .await?;
        Ok(Response::new(response))
    }

    async fn promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let node_ids: BTreeSet<u64> = request.into_inner().node_ids.into_iter().collect();
        Ok(Response::new(self.node()?.promote(node_ids).await?))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        Ok(Response::new(
            self.node()?
                .remove_node(request.into_inner().node_id)
                .await?,
        ))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let to = request.into_inner().to_node_id;
        let wait = self.node()?.config().raft.election_timeout_max * 10 + Duration::from_secs(1);
        let leader_id = self
            .node()?
            .transfer_leader((to != 0).then_some(to), wait)
            .await?;
        Ok(Response::new(pb::TransferLeaderResponse { leader_id }))
    }

    async fn trigger_snapshot(
        &self,
        request: Request<pb::TriggerSnapshotRequest>,
    ) -> Result<Response<pb::TriggerSnapshotResponse>, Status> {
        let (snapshot_index, purged_index) = self
            .node()?
            .trigger_snapshot(request.into_inner().purge)
            .await?;
        Ok(Response::new(pb::TriggerSnapshotResponse {
            snapshot_index,
            purged_index,
        }))
    }

    async fn init_cluster(
        &self,
        request: Request<pb::ClusterMetadata>,
    ) -> Result<Response<pb::ClusterMetadata>, Status> {
        Ok(Response::new(
            self.node()?.init_cluster(request.into_inner()).await?,
        ))
    }

    async fn update_retention(
        &self,
        request: Request<pb::RetentionCommand>,
    ) -> Result<Response<pb::HistoryRetention>, Status> {
        let command = request.into_inner();
        if matches!(
            command.kind,
            Some(pb::retention_command::Kind::AdvanceSafeEpoch(_))
        ) {
            return Err(Status::invalid_argument(
                "the safe epoch is advanced by the leader's retention loop only; change the \
                 window or the pins instead",
            ));
        }
        Ok(Response::new(self.node()?.update_retention(command).await?))
    }

    async fn get_retention(
        &self,
        _request: Request<pb::GetRetentionRequest>,
    ) -> Result<Response<pb::HistoryRetention>, Status> {
        Ok(Response::new(self.node()?.history_retention()))
    }

    async fn restore(
        &self,
        request: Request<pb::RestoreCommand>,
    ) -> Result<Response<pb::RestoreState>, Status> {
        let command = request.into_inner();
        if command.records.len() > MAX_RESTORE_RECORDS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_RESTORE_RECORDS} epoch records per restore step, got {}",
                command.records.len()
            )));
        }
        if let Some(replay) = &command.replay
            && replay.updates.len() > MAX_REPLAY_UPDATES
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_REPLAY_UPDATES} updates per replay step, got {}",
                replay.updates.len()
            )));
        }
        Ok(Response::new(self.node()?.restore(command).await?))
    }
}
