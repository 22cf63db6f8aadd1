//! Transport security shared by every ktd process: mutual TLS (rustls with ring, through
//! tonic), roles read from client certificates, and one authorization layer per server.
//!
//! * **Identity.** A process loads a CA bundle, its certificate and its private key
//!   ([`TlsMaterial::load`]; the key must not be readable by group or others). Servers present
//!   the certificate and (by default) require a client certificate signed by the CA; outgoing
//!   connections ([`endpoint`]) present it and verify the server against the CA once
//!   [`install`] has been called. Without TLS configured everything is plaintext and
//!   unauthenticated: a development mode.
//! * **Roles** ([`Role`]) are SAN URIs `urn:ktd:role:<role>` in the certificate (`ktd certs`
//!   issues them): `node` for ktd's own processes, `admin`, `auditor`, `client`. A connection
//!   without a certificate (allowed only where client authentication is optional) has the role
//!   [`Role::Anonymous`].
//! * **Authorization** ([`AuthorizeLayer`]) maps each gRPC method to the roles allowed to call
//!   it ([`Policy`]) and answers `UNAUTHENTICATED` / `PERMISSION_DENIED` before the handler runs.
//!   Health checks and reflection are open to every TLS peer.

use std::fmt;
use std::path::{Path, PathBuf};
#[cfg(feature = "server")]
use std::pin::Pin;
use std::sync::OnceLock;
#[cfg(feature = "server")]
use std::task::{Context as TaskContext, Poll};

#[cfg(feature = "server")]
use tonic::transport::ServerTlsConfig;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The SAN URI prefix that names a role.
pub const ROLE_URI_PREFIX: &str = "urn:ktd:role:";

/// The SAN URI prefix that binds a sequencer certificate to one Raft node id
/// (`urn:ktd:sequencer-id:3`).
pub const SEQUENCER_ID_URI_PREFIX: &str = "urn:ktd:sequencer-id:";

/// Who a peer is, for authorization.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A sequencer (Raft peer, epoch coordinator on the leader). Its certificate may also bind
    /// its node id ([`SEQUENCER_ID_URI_PREFIX`]): Raft messages from it must then claim that id.
    Sequencer,
    /// A shard server.
    Shard,
    /// A gateway.
    Gateway,
    /// Operators: seal, membership, leader transfer, snapshots.
    Admin,
    /// Third-party auditors: epochs and audit proofs.
    Auditor,
    /// Services that publish and look up keys.
    Client,
    /// No certificate (only where client authentication is optional): read-only.
    Anonymous,
}

impl Role {
    /// The role's name in certificates and messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Sequencer => "sequencer",
            Role::Shard => "shard",
            Role::Gateway => "gateway",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
            Role::Client => "client",
            Role::Anonymous => "anonymous",
        }
    }

    /// Parses a role name (`anonymous` is not a certificate role).
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "sequencer" => Some(Role::Sequencer),
            "shard" => Some(Role::Shard),
            "gateway" => Some(Role::Gateway),
            "admin" => Some(Role::Admin),
            "auditor" => Some(Role::Auditor),
            "client" => Some(Role::Client),
            _ => None,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors loading TLS material.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A file could not be read.
    #[error("{what} {path}: {error}")]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The private key is readable by group or others.
    #[error("TLS key {path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}")]
    KeyPermissions {
        /// Its path.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// A file holds no usable PEM certificate or key.
    #[error("{what} {path}: {message}")]
    Pem {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Only some of the TLS files were given.
    #[error("TLS needs all of --tls-ca, --tls-cert and --tls-key (missing {0})")]
    Incomplete(&'static str),
    /// An address is not a valid endpoint.
    #[error("bad address {addr:?}: {message}")]
    Address {
        /// The address.
        addr: String,
        /// Why.
        message: String,
    },
}

/// Where a process's TLS files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    /// PEM bundle of the CA(s) peers' certificates must chain to.
    pub ca: PathBuf,
    /// This process's certificate (PEM; chain allowed).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 600).
    pub key: PathBuf,
}

impl TlsPaths {
    /// `Some` when all three are given, `None` when none is, an error otherwise.
    pub fn from_parts(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsPaths>, SecurityError> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsPaths { ca, cert, key })),
            (ca, cert, _) => Err(SecurityError::Incomplete(if ca.is_none() {
                "--tls-ca"
            } else if cert.is_none() {
                "--tls-cert"
            } else {
                "--tls-key"
            })),
        }
    }
}

/// A process's loaded CA, certificate and key.
#[derive(Clone)]
pub struct TlsMaterial {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    roles: Vec<Role>,
    not_after_unix: i64,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("roles", &self.roles)
            .field("not_after_unix", &self.not_after_unix)
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|error| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        error,
    })
}

/// The first certificate of a PEM file: its roles and expiry.
fn leaf_info(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<(Vec<Role>, i64), SecurityError> {
    let bad = |message: String| SecurityError::Pem {
        what,
        path: path.to_path_buf(),
        message,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem)
        .map_err(|error| bad(format!("not a PEM certificate ({error})")))?;
    let cert = pem
        .parse_x509()
        .map_err(|error| bad(format!("not an X.509 certificate ({error})")))?;
    Ok((roles_in(&cert), cert.validity().not_after.timestamp()))
}

fn roles_in(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<Role> {
    let mut roles = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && let Some(role) = uri.strip_prefix(ROLE_URI_PREFIX).and_then(Role::parse)
                && !roles.contains(&role)
            {
                roles.push(role);
            }
        }
    }
    roles
}

/// The Raft node id a sequencer certificate is bound to (`None`: it names none).
pub fn sequencer_id_of_der(leaf: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::URI(uri) => {
            uri.strip_prefix(SEQUENCER_ID_URI_PREFIX)?.parse().ok()
        }
        _ => None,
    })
}

/// [`sequencer_id_of_der`] of a PEM certificate.
pub fn sequencer_id_of_pem(pem: &[u8]) -> Option<u64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    sequencer_id_of_der(&pem.contents)
}

/// The roles of a peer's certificate chain (read from the leaf; empty if it names none).
pub fn roles_of_der(leaf: &[u8]) -> Vec<Role> {
    x509_parser::parse_x509_certificate(leaf)
        .map(|(_, cert)| roles_in(&cert))
        .unwrap_or_default()
}

impl TlsMaterial {
    /// Reads and checks the files: PEM certificates that parse, a key not readable by group
    /// or others.
    pub fn load(paths: &TlsPaths) -> Result<TlsMaterial, SecurityError> {
        let ca_pem = read("TLS CA", &paths.ca)?;
        leaf_info("TLS CA", &paths.ca, &ca_pem)?;
        let cert_pem = read("TLS certificate", &paths.cert)?;
        let (roles, not_after_unix) = leaf_info("TLS certificate", &paths.cert, &cert_pem)?;
        {
            use std::os::unix::fs::PermissionsExt;
            let metadata = std::fs::metadata(&paths.key).map_err(|error| SecurityError::Read {
                what: "TLS key",
                path: paths.key.clone(),
                error,
            })?;
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(SecurityError::KeyPermissions {
                    path: paths.key.clone(),
                    mode,
                });
            }
        }
        let key_pem = read("TLS key", &paths.key)?;
        if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY-----") {
            return Err(SecurityError::Pem {
                what: "TLS key",
                path: paths.key.clone(),
                message: "no PEM private key".into(),
            });
        }
        Ok(TlsMaterial {
            ca_pem,
            cert_pem,
            key_pem,
            roles,
            not_after_unix,
        })
    }

    /// The roles this process's own certificate names.
    pub fn roles(&self) -> &[Role] {
        &self.roles
    }

    /// When this process's certificate expires (Unix seconds).
    pub fn not_after_unix(&self) -> i64 {
        self.not_after_unix
    }

    #[cfg(feature = "server")]
    /// The server side: present the certificate; require a client certificate signed by the
    /// CA unless `client_auth_optional`.
    pub fn server_config(&self, client_auth_optional: bool) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(client_auth_optional)
            .timeout(crate::limits::HANDSHAKE_TIMEOUT)
    }

    /// The client side: present the certificate, trust only the CA.
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

static CLIENT_TLS: OnceLock<ClientTlsConfig> = OnceLock::new();
static SERVER_TLS: OnceLock<TlsMaterial> = OnceLock::new();

/// Makes this process use mutual TLS with `material`: every connection it opens through
/// [`endpoint`], and every server it builds with [`server_builder`]. Called once at start-up;
/// later calls are ignored.
pub fn install(material: &TlsMaterial) {
    use_ring_provider();
    let _ = CLIENT_TLS.set(material.client_config());
    let _ = SERVER_TLS.set(material.clone());
    metrics::gauge!("ktd_tls_certificate_expiry_timestamp_seconds")
        .set(material.not_after_unix() as f64);
}

/// Makes ring this process's rustls provider (once; a provider already installed stays). TLS is
/// ring throughout ktd, but a dependency that enables rustls' aws-lc-rs as well (object_store's
/// cloud backends) leaves rustls without a default, and tonic's server configuration asks for
/// the default: without this, the first TLS connection panics.
fn use_ring_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(feature = "server")]
/// Errors building a TLS server.
#[derive(Debug, thiserror::Error)]
#[error("TLS server configuration: {0}")]
pub struct ServerTlsError(#[from] tonic::transport::Error);

#[cfg(feature = "server")]
/// A gRPC server builder: serving TLS with this process's certificate once [`install`] was
/// called (requiring a client certificate unless `client_auth_optional`), plaintext otherwise.
pub fn server_builder(
    client_auth_optional: bool,
) -> Result<tonic::transport::Server, ServerTlsError> {
    let builder = tonic::transport::Server::builder();
    use_ring_provider();
    Ok(match SERVER_TLS.get() {
        Some(material) => builder.tls_config(material.server_config(client_auth_optional))?,
        None => builder,
    })
}

/// Whether [`install`] was called.
pub fn client_tls_installed() -> bool {
    CLIENT_TLS.get().is_some()
}

/// An endpoint for `addr` (`host:port`, `http://host:port` or `https://host:port`): TLS with
/// this process's identity when installed, plaintext otherwise.
pub fn endpoint(addr: &str) -> Result<Endpoint, SecurityError> {
    let host = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    let bad = |message: String| SecurityError::Address {
        addr: addr.to_string(),
        message,
    };
    match CLIENT_TLS.get() {
        None => Endpoint::from_shared(format!("http://{host}")).map_err(|e| bad(e.to_string())),
        Some(tls) => Endpoint::from_shared(format!("https://{host}"))
            .and_then(|endpoint| endpoint.tls_config(tls.clone()))
            .map_err(|e| bad(e.to_string())),
    }
}

/// Which roles may call a method (`/package.Service/Method`); `None`: nobody (over TLS the call
/// is refused with `PERMISSION_DENIED`; `grpc.health.v1` and reflection are open to every peer).
pub type Policy = fn(&str) -> Option<&'static [Role]>;

const SEQUENCERS: &[Role] = &[Role::Sequencer];
const SEQUENCERS_AND_ADMINS: &[Role] = &[Role::Sequencer, Role::Admin];
const INTERNAL_READERS: &[Role] = &[Role::Sequencer, Role::Shard, Role::Gateway, Role::Admin];
const APPENDERS: &[Role] = &[Role::Gateway, Role::Admin];
const LOG_READERS: &[Role] = &[Role::Sequencer, Role::Shard, Role::Admin];
const SHARD_PEERS: &[Role] = &[Role::Sequencer, Role::Shard, Role::Admin];
const ADMINS: &[Role] = &[Role::Admin];
const READERS: &[Role] = &[Role::Admin, Role::Auditor, Role::Client, Role::Anonymous];
const WRITERS: &[Role] = &[Role::Admin, Role::Client];

/// A sequencer's port. Raft only between sequencers; appends from gateways; the log and its
/// batches for shard servers; membership, shard-map and metadata changes for admins (and a
/// sequencer forwarding its own start-up writes to the leader); statuses and seals also for
/// gateways (which forward an admin's seal and status) and shard servers. No method commits an
/// epoch: the leader's own coordinator does, in process.
pub fn sequencer_policy(path: &str) -> Option<&'static [Role]> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match (service, method) {
        ("ktd.raft.v1.Raft", _) => Some(SEQUENCERS),
        ("ktd.sequencer.v1.Sequencer", "Append") => Some(APPENDERS),
        ("ktd.sequencer.v1.Sequencer", "GetSealedBatch" | "GetOpenEpoch" | "WatchLog") => {
            Some(LOG_READERS)
        }
        ("ktd.sequencer.v1.Sequencer", "GetEpoch" | "GetClusterMetadata") => Some(INTERNAL_READERS),
        ("ktd.sequencer.v1.SequencerAdmin", "Seal" | "GetClusterStatus" | "GetNodeStatus") => {
            Some(INTERNAL_READERS)
        }
        ("ktd.sequencer.v1.SequencerAdmin", _) => Some(SEQUENCERS_AND_ADMINS),
        _ => None,
    }
}

/// A shard server's port: epoch steps (prepare, leaves, build, bootstrap) only from the
/// sequencers' coordinator; partition copies for other shard servers; proof reads for
/// gateways and the coordinator; admins everywhere.
pub fn shard_policy(path: &str) -> Option<&'static [Role]> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match (service, method) {
        ("ktd.shard.v1.Shard", "PrepareEpoch" | "ComputeLeaves" | "BuildEpoch" | "Bootstrap") => {
            Some(SEQUENCERS_AND_ADMINS)
        }
        ("ktd.shard.v1.Shard", "StreamPartition") => Some(SHARD_PEERS),
        ("ktd.shard.v1.Shard", _) => Some(INTERNAL_READERS),
        _ => None,
    }
}

/// A gateway's ports: publishing for clients; reads for everyone; the `Admin` service (served
/// on the admin port) for admins only.
pub fn gateway_policy(path: &str) -> Option<&'static [Role]> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    match (service, method) {
        ("ktd.v1.Directory", "Publish") => Some(WRITERS),
        ("ktd.v1.Directory", _) => Some(READERS),
        ("ktd.v1.Admin", _) => Some(ADMINS),
        _ => None,
    }
}

/// An auditor's gRPC port: signed heads for everyone.
pub fn auditor_policy(path: &str) -> Option<&'static [Role]> {
    match path.trim_start_matches('/').split('/').next()? {
        "ktd.auditor.v1.Auditor" => Some(READERS),
        _ => None,
    }
}

#[cfg(feature = "server")]
/// The Raft node id the caller's TLS certificate is bound to: `None` on a plaintext
/// connection or a certificate that binds none (then the caller is not checked further).
pub fn peer_sequencer_id<T>(request: &tonic::Request<T>) -> Option<u64> {
    peer_certificate(request).and_then(|der| sequencer_id_of_der(&der))
}

#[cfg(feature = "server")]
/// The DER of the caller's TLS client certificate (`None`: plaintext, or no certificate): who
/// is calling, for state kept per caller (the gateway scopes idempotency keys by it).
pub fn peer_certificate<T>(request: &tonic::Request<T>) -> Option<Vec<u8>> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let info = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    certs.first().map(|cert| cert.as_ref().to_vec())
}

#[cfg(feature = "server")]
/// The peer's roles, from the TLS connection of `request` (`None`: not a TLS connection).
fn peer_roles<B>(request: &http::Request<B>) -> Option<Vec<Role>> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let info = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()?;
    Some(match info.peer_certs() {
        Some(certs) if !certs.is_empty() => roles_of_der(certs[0].as_ref()),
        _ => vec![Role::Anonymous],
    })
}

/// The verdict for a call to `path` by a peer with `roles` (`None`: not over TLS, allowed).
#[cfg(any(feature = "server", test))]
fn verdict(policy: Policy, path: &str, roles: Option<&[Role]>) -> Result<(), tonic::Status> {
    let Some(roles) = roles else {
        return Ok(());
    };
    if path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.") {
        return Ok(());
    }
    let Some(allowed) = policy(path) else {
        // Deny by default: a method no policy names is served to nobody (a service added
        // without a policy entry is not open to every TLS peer).
        return Err(tonic::Status::permission_denied(format!(
            "{path} is not served to any role here"
        )));
    };
    if roles.iter().any(|role| allowed.contains(role)) {
        return Ok(());
    }
    let names = |roles: &[Role]| {
        roles
            .iter()
            .map(|role| role.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if roles == [Role::Anonymous] {
        return Err(tonic::Status::unauthenticated(format!(
            "{path} needs a client certificate with one of the roles: {}",
            names(allowed)
        )));
    }
    Err(tonic::Status::permission_denied(format!(
        "{path} needs one of the roles {}; the client certificate has {}",
        names(allowed),
        if roles.is_empty() {
            "none".to_string()
        } else {
            names(roles)
        }
    )))
}

#[cfg(feature = "server")]
/// Authorizes every call of a TLS server by [`Policy`] (plaintext servers are not checked).
#[derive(Clone, Copy, Debug)]
pub struct AuthorizeLayer {
    policy: Policy,
}

#[cfg(feature = "server")]
impl AuthorizeLayer {
    /// Checks calls against `policy`.
    pub fn new(policy: Policy) -> Self {
        Self { policy }
    }
}

#[cfg(feature = "server")]
impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            inner,
            policy: self.policy,
        }
    }
}

#[cfg(feature = "server")]
/// The service [`AuthorizeLayer`] wraps.
#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    policy: Policy,
}

#[cfg(feature = "server")]
impl<S, B, R> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let roles = peer_roles(&request);
        match verdict(self.policy, request.uri().path(), roles.as_deref()) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => {
                tracing::info!(
                    target: "ktd::rpc",
                    path = request.uri().path(),
                    code = ?status.code(),
                    "refused: {}",
                    status.message()
                );
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_checked_per_method() {
        let publish = "/ktd.v1.Directory/Publish";
        let seal = "/ktd.v1.Admin/SealEpoch";
        let ok = |policy, path, roles: &[Role]| verdict(policy, path, Some(roles)).is_ok();
        assert!(ok(gateway_policy, publish, &[Role::Client]));
        assert!(!ok(gateway_policy, publish, &[Role::Auditor]));
        assert!(ok(
            gateway_policy,
            "/ktd.v1.Directory/Lookup",
            &[Role::Anonymous]
        ));
        assert!(ok(gateway_policy, seal, &[Role::Admin]));
        let denied = verdict(gateway_policy, seal, Some(&[Role::Client])).expect_err("denied");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("admin"), "{denied:?}");
        let anonymous = verdict(gateway_policy, seal, Some(&[Role::Anonymous])).expect_err("no");
        assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);
        assert!(!ok(gateway_policy, seal, &[]));
        assert!(ok(
            sequencer_policy,
            "/ktd.raft.v1.Raft/Vote",
            &[Role::Sequencer]
        ));
        // A gateway is not a Raft peer, cannot change the shard map or membership, and cannot
        // drive a shard's epoch steps; a shard cannot append.
        for (policy, path, role) in [
            (
                sequencer_policy as Policy,
                "/ktd.raft.v1.Raft/AppendEntries",
                Role::Gateway,
            ),
            (sequencer_policy, "/ktd.raft.v1.Raft/Vote", Role::Shard),
            (
                sequencer_policy,
                "/ktd.sequencer.v1.SequencerAdmin/SetShardMap",
                Role::Gateway,
            ),
            (
                sequencer_policy,
                "/ktd.sequencer.v1.SequencerAdmin/InitCluster",
                Role::Gateway,
            ),
            (
                sequencer_policy,
                "/ktd.sequencer.v1.SequencerAdmin/AddLearner",
                Role::Shard,
            ),
            (
                sequencer_policy,
                "/ktd.sequencer.v1.Sequencer/Append",
                Role::Shard,
            ),
            (
                sequencer_policy,
                "/ktd.sequencer.v1.Sequencer/CommitEpoch",
                Role::Sequencer,
            ),
            (
                shard_policy,
                "/ktd.shard.v1.Shard/BuildEpoch",
                Role::Gateway,
            ),
            (shard_policy, "/ktd.shard.v1.Shard/Bootstrap", Role::Gateway),
            (
                shard_policy,
                "/ktd.shard.v1.Shard/PrepareEpoch",
                Role::Shard,
            ),
            (gateway_policy, "/ktd.v1.Directory/Publish", Role::Gateway),
            (gateway_policy, "/ktd.v1.Unknown/Method", Role::Admin),
        ] {
            assert!(!ok(policy, path, &[role]), "{path} must refuse {role}");
        }
        assert!(ok(
            sequencer_policy,
            "/ktd.sequencer.v1.Sequencer/WatchLog",
            &[Role::Shard]
        ));
        assert!(ok(
            shard_policy,
            "/ktd.shard.v1.Shard/LookupPlan",
            &[Role::Gateway]
        ));
        assert!(!ok(
            sequencer_policy,
            "/ktd.raft.v1.Raft/Vote",
            &[Role::Admin]
        ));
        assert!(!ok(
            sequencer_policy,
            "/ktd.sequencer.v1.SequencerAdmin/TransferLeader",
            &[Role::Client]
        ));
        assert!(ok(
            shard_policy,
            "/grpc.health.v1.Health/Check",
            &[Role::Anonymous]
        ));
        // Plaintext servers (development mode) do not check.
        assert!(verdict(gateway_policy, seal, None).is_ok());
    }

    #[test]
    fn partial_tls_settings_are_refused() {
        assert!(
            TlsPaths::from_parts(None, None, None)
                .expect("none")
                .is_none()
        );
        let error = TlsPaths::from_parts(Some("ca".into()), None, Some("k".into()))
            .expect_err("incomplete");
        assert!(error.to_string().contains("--tls-cert"), "{error}");
    }
}
