//! The directory's ECVRF key: node labels, label proofs and the commitment key.
//!
//! ECVRF-EDWARDS25519-SHA512-TAI through `akd_core::ecvrf` (akd-spec §2.2), never a copy of it.
//! The 32-byte secret seed is supplied by the caller (a key file in production, generated in
//! the dev data directory); no key is compiled in. The seed never leaves this type except
//! through [`akd_core::ecvrf::VRFKeyStorage::retrieve`], and `Debug` redacts it.

use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use akd_core::configuration::Configuration;
use akd_core::ecvrf::{
    Proof, VRFExpandedPrivateKey, VRFKeyStorage, VRFPrivateKey, VRFPublicKey, VrfError,
};
use akd_core::hash::Digest;
use akd_core::{AkdLabel, NodeLabel, VersionFreshness};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// Length of a VRF seed (an ed25519 secret key).
pub const SEED_LEN: usize = 32;

/// A directory's VRF key, expanded once for fast evaluation.
#[derive(Clone)]
pub struct VrfKey {
    seed: Zeroizing<[u8; SEED_LEN]>,
    expanded: VRFExpandedPrivateKey,
    public: VRFPublicKey,
}

impl fmt::Debug for VrfKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VrfKey")
            .field("public", &hex_bytes(self.public.as_bytes()))
            .field("seed", &"<redacted>")
            .finish()
    }
}

impl VrfKey {
    /// Builds the key from its 32-byte seed.
    pub fn from_seed(seed: &[u8]) -> Result<Self> {
        let seed: [u8; SEED_LEN] = seed
            .try_into()
            .map_err(|_| Error::InvalidSeedLength { len: seed.len() })?;
        let private = VRFPrivateKey::try_from(&seed[..]).map_err(vrf_error)?;
        let expanded = VRFExpandedPrivateKey::from(&private);
        let public = VRFPublicKey::from(&private);
        Ok(Self {
            seed: Zeroizing::new(seed),
            expanded,
            public,
        })
    }

    /// The 32-byte public key clients verify VRF proofs with.
    pub fn public_key(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// The commitment key `H(seed)` (akd derives it the same way, akd-spec §1.2).
    pub fn commitment_key<TC: Configuration>(&self) -> Digest {
        TC::hash(&self.seed[..])
    }

    /// The node label of `(akd_label, freshness, version)`: one VRF evaluation (~45 µs).
    pub fn node_label<TC: Configuration>(
        &self,
        akd_label: &AkdLabel,
        freshness: VersionFreshness,
        version: u64,
    ) -> NodeLabel {
        <Self as VRFKeyStorage>::get_node_label_with_expanded_key::<TC>(
            &self.expanded,
            &self.public,
            akd_label,
            freshness,
            version,
        )
    }

    /// The node label and its 80-byte VRF proof: one VRF proof (~95 µs), no separate evaluation.
    ///
    /// Byte-identical to akd's `get_label_proof_with_key` (the same alpha, the same
    /// `VRFExpandedPrivateKey::prove` it calls), but with the key expanded once: akd's
    /// `VRFPrivateKey::prove` re-derives the expanded key (a SHA-512) and the public key (a
    /// base-point multiplication) on every proof, a sixth of the proof's cost.
    pub fn prove<TC: Configuration>(
        &self,
        akd_label: &AkdLabel,
        freshness: VersionFreshness,
        version: u64,
    ) -> (NodeLabel, Vec<u8>) {
        let alpha = TC::get_hash_from_label_input(akd_label, freshness, version);
        let proof = self.expanded.prove(&self.public, &alpha);
        let label = match ready(self.get_node_label_from_vrf_proof(proof)) {
            Some(label) => label,
            None => self.node_label::<TC>(akd_label, freshness, version),
        };
        (label, proof_bytes(&proof))
    }
}

/// `VRFKeyStorage` lets akd's provided functions (and akd's own `Directory`, in tests and
/// benchmarks) use this key.
#[async_trait::async_trait]
impl VRFKeyStorage for VrfKey {
    async fn retrieve(&self) -> std::result::Result<Vec<u8>, VrfError> {
        Ok(self.seed.to_vec())
    }
}

/// Checks that `vrf_proof` proves `expected` is the node label of `(akd_label, freshness,
/// version)` under `public_key`, with stock akd code only: `VRFPublicKey::verify` on akd's label
/// input, then akd's own proof-to-label mapping (what `akd_core`'s private `verify_label` does).
pub fn verify_label<TC: Configuration>(
    public_key: &[u8],
    akd_label: &AkdLabel,
    freshness: VersionFreshness,
    version: u64,
    vrf_proof: &[u8],
    expected: NodeLabel,
) -> Result<()> {
    let public = VRFPublicKey::try_from(public_key).map_err(vrf_error)?;
    let proof = Proof::try_from(vrf_proof).map_err(vrf_error)?;
    let input = TC::get_hash_from_label_input(akd_label, freshness, version);
    public.verify(&proof, &input).map_err(vrf_error)?;
    let label = ready(ProofOnly.get_node_label_from_vrf_proof(proof))
        .ok_or_else(|| Error::Vrf("akd's label mapping did not complete".into()))?;
    if label != expected {
        return Err(Error::Vrf(
            "the VRF proof's output does not match the proven node label".into(),
        ));
    }
    Ok(())
}

/// A key storage with no key: only akd's provided `get_node_label_from_vrf_proof`, which reads
/// the proof alone, is ever called on it.
#[derive(Clone)]
struct ProofOnly;

#[async_trait::async_trait]
impl VRFKeyStorage for ProofOnly {
    async fn retrieve(&self) -> std::result::Result<Vec<u8>, VrfError> {
        Err(VrfError::SigningKey(
            "a proof-only key storage holds no key".into(),
        ))
    }
}

fn proof_bytes(proof: &Proof) -> Vec<u8> {
    proof.to_bytes().to_vec()
}

fn vrf_error(error: VrfError) -> Error {
    Error::Vrf(error.to_string())
}

fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Polls a future that cannot wait (akd's `get_node_label_from_vrf_proof` has no await point)
/// once; `None` if it was not ready.
fn ready<F: Future>(future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use akd_core::configuration::WhatsAppV1Configuration as Wa;

    #[test]
    fn wrong_seed_length_is_a_typed_error() {
        for len in [0, 31, 33, 64] {
            let error = VrfKey::from_seed(&vec![7u8; len]).expect_err("must reject");
            assert!(matches!(error, Error::InvalidSeedLength { len: got } if got == len));
        }
    }

    #[test]
    fn proof_label_equals_evaluated_label() {
        let key = VrfKey::from_seed(&[9u8; 32]).expect("valid seed");
        let akd_label = AkdLabel::from("alice");
        let (label, proof) = key.prove::<Wa>(&akd_label, VersionFreshness::Fresh, 3);
        assert_eq!(
            label,
            key.node_label::<Wa>(&akd_label, VersionFreshness::Fresh, 3)
        );
        assert_eq!(proof.len(), 80);
        assert!(!format!("{key:?}").contains("0909"));
    }

    #[test]
    fn proofs_are_byte_identical_to_akds_private_key_proofs() {
        type Ex = crate::config::Experimental;
        let seed = [5u8; 32];
        let key = VrfKey::from_seed(&seed).expect("valid seed");
        let private = VRFPrivateKey::try_from(&seed[..]).expect("valid seed");
        for (who, version) in [("alice", 1), ("bob", 2), ("carol", 3), ("dave", 1 << 40)] {
            let akd_label = AkdLabel::from(who);
            for freshness in [VersionFreshness::Fresh, VersionFreshness::Stale] {
                let stock = <VrfKey as VRFKeyStorage>::get_label_proof_with_key::<Wa>(
                    &private, &akd_label, freshness, version,
                );
                assert_eq!(
                    key.prove::<Wa>(&akd_label, freshness, version).1,
                    proof_bytes(&stock)
                );
                let stock = <VrfKey as VRFKeyStorage>::get_label_proof_with_key::<Ex>(
                    &private, &akd_label, freshness, version,
                );
                assert_eq!(
                    key.prove::<Ex>(&akd_label, freshness, version).1,
                    proof_bytes(&stock)
                );
            }
        }
    }

    #[test]
    fn stock_label_verification_accepts_honest_and_rejects_swapped_proofs() {
        let key = VrfKey::from_seed(&[9u8; 32]).expect("valid seed");
        let alice = AkdLabel::from("alice");
        let (label, proof) = key.prove::<Wa>(&alice, VersionFreshness::Fresh, 1);
        let public = key.public_key();
        verify_label::<Wa>(&public, &alice, VersionFreshness::Fresh, 1, &proof, label)
            .expect("honest proof");
        let (other, _) = key.prove::<Wa>(&alice, VersionFreshness::Fresh, 2);
        for (who, version, claimed) in [("bob", 1, label), ("alice", 2, label), ("alice", 1, other)]
        {
            let result = verify_label::<Wa>(
                &public,
                &AkdLabel::from(who),
                VersionFreshness::Fresh,
                version,
                &proof,
                claimed,
            );
            assert!(result.is_err(), "{who} v{version} must not verify");
        }
        assert!(
            verify_label::<Wa>(
                &public,
                &alice,
                VersionFreshness::Fresh,
                1,
                &proof[..79],
                label
            )
            .is_err()
        );
    }
}
