//! ktd's gRPC transport plumbing, shared by every server and client: [`security`] (mutual TLS,
//! roles from certificate SAN URIs, per-server authorization), [`telemetry`] (W3C trace context
//! over gRPC metadata, one span and RED metrics per served RPC, the JSON logs' context) and
//! [`health`] (`grpc.health.v1` statuses) and [`limits`] (what one caller can make a server
//! hold: request bytes per method, streams and requests per connection, connections, header and
//! body time).
//!
//! Servers enable the `server` feature (the server TLS configuration, the authorization layer,
//! health); clients — `ktd-client` — leave it off and take only what dialing needs.
//!
//! It sits beside the wire definitions ([`ktd_proto`]) rather than in them, so a program that
//! only needs the messages takes the wire without the plumbing. Nothing here knows about trees
//! or consensus.

#[cfg(feature = "server")]
pub mod health;
#[cfg(feature = "server")]
pub mod limits;
pub mod security;
pub mod telemetry;
