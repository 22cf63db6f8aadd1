//! ktd's wire definitions: the `.proto` files under `proto/ktd/` and the tonic/prost code
//! generated from them, the conversions between akd's proof types and their messages
//! ([`akd`]), and wire-level names ([`audit_blob::AuditBlobName`]). No consensus or tree logic
//! and no transport plumbing live here (that is `ktd-rpc`), and this crate depends on no other
//! ktd crate.
//!
//! | module | package | file |
//! |---|---|---|
//! | [`ktd::v1`] | `ktd.v1` | `ktd/v1/directory.proto`: the public `Directory` and `Admin` services; `ktd/v1/akd.proto`: akd's proof messages, wire-compatible with `akd_core` |
//! | [`ktd::sequencer::v1`] | `ktd.sequencer.v1` | `ktd/sequencer/v1/sequencer.proto`: the sequencer's internal API and its replicated commands |
//! | [`ktd::raft::v1`] | `ktd.raft.v1` | `ktd/raft/v1/raft.proto`: Raft transport and the on-disk Raft log encoding |
//! | [`ktd::cluster::v1`] | `ktd.cluster.v1` | `ktd/cluster/v1/cluster.proto`: the shard map and the fence every shard mutation carries |
//! | [`ktd::shard::v1`] | `ktd.shard.v1` | `ktd/shard/v1/shard.proto`: the shard servers' internal API |
//! | [`ktd::auditor::v1`] | `ktd.auditor.v1` | `ktd/auditor/v1/auditor.proto`: an auditor's signed heads |
//!
//! [`akd`] converts between `akd_core`'s proof types and the `ktd.v1` proof messages. More
//! packages are added by listing them in `build.rs`'s `PROTOS` and declaring their module here.

pub mod akd;
pub mod audit_blob;

/// Largest message the public API (`ktd.v1`) sends or accepts; servers and clients set their
/// encoding and decoding limits from it.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Generated code, one module per proto package.
pub mod ktd {
    /// Package `ktd.v1`: the public API and akd's proof messages.
    #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
    pub mod v1 {
        tonic::include_proto!("ktd.v1");
    }

    /// Sequencer packages.
    pub mod sequencer {
        /// Package `ktd.sequencer.v1`: the sequencer's internal gRPC API.
        #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
        pub mod v1 {
            tonic::include_proto!("ktd.sequencer.v1");
        }
    }

    /// Cluster packages.
    pub mod cluster {
        /// Package `ktd.cluster.v1`: the shard map and the fence, shared by the sequencer and the
        /// shard servers.
        #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
        pub mod v1 {
            tonic::include_proto!("ktd.cluster.v1");
        }
    }

    /// Shard packages.
    pub mod shard {
        /// Package `ktd.shard.v1`: the shard servers' internal API.
        #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
        pub mod v1 {
            tonic::include_proto!("ktd.shard.v1");
        }
    }

    /// Auditor packages.
    pub mod auditor {
        /// Package `ktd.auditor.v1`: the independent auditor's signed heads.
        #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
        pub mod v1 {
            tonic::include_proto!("ktd.auditor.v1");
        }
    }

    /// Raft packages.
    pub mod raft {
        /// Package `ktd.raft.v1`: Raft transport between sequencer nodes.
        #[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
        pub mod v1 {
            tonic::include_proto!("ktd.raft.v1");
        }
    }
}

/// Encoded `FileDescriptorSet` of every package, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ktd_descriptor");
