//! Checking an auditor's signed head: the client side of `ktd auditor` (Plexi's signature
//! format). Trust a directory's root only if an auditor you trust signed it.
//!
//! A head is Plexi's `SignatureMessage` (ciphersuite 1: protobuf + Ed25519) signed with the
//! auditor's Ed25519 key: namespace, epoch and root digest.

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use ktd_proto::ktd::auditor::v1 as pb;

/// Plexi ciphersuite 0x0001: protobuf serialisation, Ed25519 signature.
pub const CIPHERSUITE_PROTOBUF_ED25519: u32 = 1;

/// Why a signed head was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("signed head refused: {0}")]
pub struct HeadError(pub String);

/// Checks `head` against the auditor's public key and namespace, and returns the
/// `(epoch, root)` it vouches for.
pub fn verify_head(
    public_key: &[u8; 32],
    namespace: &str,
    head: &pb::SignedHead,
) -> Result<(u64, [u8; 32]), HeadError> {
    let refuse = |message: String| HeadError(message);
    let key = VerifyingKey::from_bytes(public_key)
        .map_err(|error| refuse(format!("auditor key: {error}")))?;
    let signature = Signature::from_slice(&head.signature)
        .map_err(|error| refuse(format!("signature: {error}")))?;
    key.verify(&head.signed_bytes, &signature)
        .map_err(|_| refuse("the signature does not verify with the auditor's key".into()))?;
    let message: pb::SignatureMessage = prost::Message::decode(head.signed_bytes.as_slice())
        .map_err(|error| refuse(format!("signed bytes: {error}")))?;
    if message.version != Some(CIPHERSUITE_PROTOBUF_ED25519) {
        return Err(refuse(format!("unknown ciphersuite {:?}", message.version)));
    }
    if message.namespace.as_deref() != Some(namespace) {
        return Err(refuse(format!(
            "signed for namespace {:?}, not {namespace:?}",
            message.namespace
        )));
    }
    let epoch = message
        .epoch
        .and_then(|epoch| epoch.inner)
        .ok_or_else(|| refuse("no epoch in the signed message".into()))?;
    let root: [u8; 32] = message
        .digest
        .unwrap_or_default()
        .try_into()
        .map_err(|_| refuse("the signed digest is not 32 bytes".into()))?;
    Ok((epoch, root))
}
