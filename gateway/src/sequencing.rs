//! How the gateway reaches the sequencer: over gRPC ([`SequencerClient`], following the leader)
//! or in the same process ([`Sequencer`], `ktd dev`). Both give the same answers and errors.

use sequencer::pb;
use sequencer::{Result, Sequencer, SequencerClient};

/// The sequencer operations the gateway uses.
#[async_trait::async_trait]
pub trait Sequencing: Send + Sync + 'static {
    /// Orders `updates` into the open epoch (idempotent per `idempotency_key`).
    async fn append(
        &self,
        updates: Vec<pb::Update>,
        idempotency_key: Vec<u8>,
    ) -> Result<pb::AppendResponse>;

    /// The latest committed epoch's record, or `epoch`'s (linearizable).
    async fn get_epoch(&self, epoch: Option<u64>) -> Result<pb::EpochRecord>;

    /// Seals the open epoch now.
    async fn seal(&self) -> Result<pb::SealResponse>;

    /// Cluster metadata and shard map.
    async fn cluster_metadata(&self) -> Result<pb::ClusterMetadataResponse>;

    /// Raft membership, leader, epochs.
    async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse>;
}

#[async_trait::async_trait]
impl Sequencing for SequencerClient {
    async fn append(
        &self,
        updates: Vec<pb::Update>,
        idempotency_key: Vec<u8>,
    ) -> Result<pb::AppendResponse> {
        let key = (!idempotency_key.is_empty()).then_some(idempotency_key);
        SequencerClient::append(self, updates, key).await
    }

    async fn get_epoch(&self, epoch: Option<u64>) -> Result<pb::EpochRecord> {
        SequencerClient::get_epoch(self, epoch).await
    }

    async fn seal(&self) -> Result<pb::SealResponse> {
        SequencerClient::seal(self, None).await
    }

    async fn cluster_metadata(&self) -> Result<pb::ClusterMetadataResponse> {
        SequencerClient::cluster_metadata(self).await
    }

    async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse> {
        SequencerClient::cluster_status(self).await
    }
}

#[async_trait::async_trait]
impl Sequencing for Sequencer {
    async fn append(
        &self,
        updates: Vec<pb::Update>,
        idempotency_key: Vec<u8>,
    ) -> Result<pb::AppendResponse> {
        // Without a caller key, one made up here makes this call's own retries safe.
        let retry_key = idempotency_key.is_empty();
        let key = if retry_key {
            rand::random::<[u8; 16]>().to_vec()
        } else {
            idempotency_key
        };
        Sequencer::append_keyed(self, updates, key, retry_key).await
    }

    async fn get_epoch(&self, epoch: Option<u64>) -> Result<pb::EpochRecord> {
        Sequencer::get_epoch(self, epoch).await
    }

    async fn seal(&self) -> Result<pb::SealResponse> {
        Sequencer::seal(self, None).await
    }

    async fn cluster_metadata(&self) -> Result<pb::ClusterMetadataResponse> {
        let (metadata, shard_map) = Sequencer::cluster_metadata(self);
        Ok(pb::ClusterMetadataResponse {
            metadata,
            shard_map: Some(shard_map),
            safe_epoch: self.history_retention().safe_epoch,
        })
    }

    async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse> {
        Sequencer::cluster_status(self).await
    }
}
