//! ktd's light verifying client: what a service embeds to publish keys and to look them up with
//! every proof checked locally, against the root the gateway names, before anything is returned.
//!
//! Its dependency tree holds the wire definitions, the pure core and stock akd's verifiers —
//! no RocksDB, no openraft, no axum, no clap (CI checks it with `cargo tree`).
//!
//! ```no_run
//! # async fn example() -> Result<(), ktd_client::ClientError> {
//! use ktd_client::Client;
//!
//! let client = Client::connect("http://127.0.0.1:8080").await?;
//! let published = client.publish(vec![(b"alice".to_vec(), b"key-1".to_vec())], None).await?;
//! client.wait_for_epoch(published.epoch).await?;
//! match client.lookup(b"alice", None).await {
//!     Ok(found) => assert_eq!(found.value, b"key-1"),
//!     // A forged or broken proof: evidence against the directory, never retried silently.
//!     Err(error) if error.is_verification_failure() => panic!("{error}"),
//!     // Unreachable, refused (with its gRPC code), or malformed: retry or report.
//!     Err(error) => return Err(error),
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`client`]: [`Client`] and the verified answers it returns.
//! - [`strict`]: the strict proof verifier (stock akd plus the structural checks akd skips).
//! - [`blobs`]: a directory of audit blobs in the layout auditors read ([`BlobDir`]).
//! - [`head`]: checking an auditor's signed head.
//! - [`error`]: the client's one error type, [`ClientError`].

pub mod blobs;
pub mod client;
pub mod error;
pub mod head;
pub mod strict;

pub use blobs::BlobDir;
pub use client::{
    Client, EpochRoot, Published, VerifiedAbsence, VerifiedAudit, VerifiedBlob, VerifiedLookup,
    VerifiedVersion, new_idempotency_key,
};
pub use error::{ClientError, Result};
/// The akd configuration types (what a directory's `GetPublicKey` names).
pub use ktd_core::config;
pub use ktd_core::{AkdConfig, akd_core, with_configuration};
