//! `ktd certs`: a development certificate authority for mutual TLS, with rcgen.
//!
//! Writes `ca.pem` (+ `ca.key`), and one certificate and key per component role:
//! `sequencer-<id>` for each sequencer node id (bound to that id by the SAN URI
//! `urn:ktd:sequencer-id:<id>`, so a sequencer cannot speak Raft for another), `shard` and
//! `gateway` and `auditor` (valid for the given host names and IP addresses, as server and
//! client: an auditor serves its signed heads), and `admin` and `client` (client-only). Each certificate names its role as the SAN URI
//! `urn:ktd:role:<role>`, which is what servers authorize by (`ktd_rpc::security`). Keys are
//! written with mode 600 and no file is ever overwritten. Production deployments use their own
//! CA (cert-manager, Vault, …) and the same SAN URIs.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ktd_rpc::security::{ROLE_URI_PREFIX, Role, SEQUENCER_ID_URI_PREFIX};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The roles `ktd certs` issues a certificate for, and its file stem (plus one
/// `sequencer-<id>` certificate per sequencer node id, bound to that id).
pub const ISSUED: [(Role, &str); 5] = [
    (Role::Shard, "shard"),
    (Role::Gateway, "gateway"),
    (Role::Admin, "admin"),
    (Role::Auditor, "auditor"),
    (Role::Client, "client"),
];

/// Whether a role's certificate is also a server certificate (valid for the hosts).
fn serves(role: Role) -> bool {
    matches!(
        role,
        Role::Sequencer | Role::Shard | Role::Gateway | Role::Auditor
    )
}

fn create(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "create {} (existing files are never overwritten)",
                path.display()
            )
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", path.display()))
}

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::seconds(valid_for.as_secs() as i64);
}

/// Writes the CA and the four role certificates into `out` (created), the node certificate
/// valid for `hosts`. Returns the files written.
pub fn write_dev_ca(
    out: &Path,
    hosts: &[String],
    sequencer_ids: &[u64],
    valid_for: Duration,
) -> anyhow::Result<Vec<PathBuf>> {
    if hosts.is_empty() {
        anyhow::bail!("--hosts needs at least one host name or IP address");
    }
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let mut written = Vec::new();

    let ca_key = KeyPair::generate().context("generate the CA key")?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "ktd development CA");
    validity(&mut ca, valid_for);
    let ca_cert = ca.self_signed(&ca_key).context("sign the CA")?;
    for (name, contents, mode) in [
        ("ca.pem", ca_cert.pem(), 0o644),
        ("ca.key", ca_key.serialize_pem(), 0o600),
    ] {
        let path = out.join(name);
        create(&path, &contents, mode)?;
        written.push(path);
    }
    let issuer = Issuer::new(ca, ca_key);

    let sequencers = sequencer_ids
        .iter()
        .map(|id| (Role::Sequencer, format!("sequencer-{id}"), Some(*id)));
    let others = ISSUED
        .iter()
        .map(|(role, stem)| (*role, stem.to_string(), None));
    for (role, stem, sequencer_id) in sequencers.chain(others) {
        let mut params = if serves(role) {
            CertificateParams::new(hosts.to_vec()).context("--hosts")?
        } else {
            CertificateParams::default()
        };
        if let Some(id) = sequencer_id {
            params.subject_alt_names.push(SanType::URI(
                format!("{SEQUENCER_ID_URI_PREFIX}{id}")
                    .try_into()
                    .context("sequencer id URI")?,
            ));
        }
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ktd {stem}"));
        params.subject_alt_names.push(SanType::URI(
            format!("{ROLE_URI_PREFIX}{}", role.name())
                .try_into()
                .context("role URI")?,
        ));
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = if serves(role) {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        validity(&mut params, valid_for);
        let key = KeyPair::generate().with_context(|| format!("generate the {stem} key"))?;
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("sign the {stem} certificate"))?;
        for (name, contents, mode) in [
            (format!("{stem}.pem"), cert.pem(), 0o644),
            (format!("{stem}.key"), key.serialize_pem(), 0o600),
        ] {
            let path = out.join(name);
            create(&path, &contents, mode)?;
            written.push(path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_roles_and_load() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = write_dev_ca(
            dir.path(),
            &["localhost".into(), "127.0.0.1".into()],
            &[1, 2],
            Duration::from_secs(86_400),
        )
        .expect("certs");
        assert_eq!(files.len(), 2 + 2 * (2 + ISSUED.len()));
        let sequencers = [
            (Role::Sequencer, "sequencer-1"),
            (Role::Sequencer, "sequencer-2"),
        ];
        for (role, stem) in ISSUED.into_iter().chain(sequencers) {
            let material = ktd_rpc::security::TlsMaterial::load(&ktd_rpc::security::TlsPaths {
                ca: dir.path().join("ca.pem"),
                cert: dir.path().join(format!("{stem}.pem")),
                key: dir.path().join(format!("{stem}.key")),
            })
            .expect("load");
            assert_eq!(material.roles(), [role]);
        }
        let pem = std::fs::read_to_string(dir.path().join("sequencer-2.pem")).expect("pem");
        assert_eq!(
            ktd_rpc::security::sequencer_id_of_pem(pem.as_bytes()),
            Some(2)
        );
        assert!(write_dev_ca(dir.path(), &["x".into()], &[1], Duration::from_secs(60)).is_err());
    }
}
