//! Every RPC of every server, from every role, with garbage and oversized bodies.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use ktd_rpc::security::{Policy, Role};
use ktd_testkit::with_deadline;
use tonic::Code;
use tonic::transport::Channel;

use super::{Answer, Secured, frame, raw_call};

/// The certificates the suite calls with, and the role each carries (`None`: no certificate).
const CALLERS: &[(Option<&str>, Role)] = &[
    (Some("sequencer-1"), Role::Sequencer),
    (Some("sequencer-2"), Role::Sequencer),
    (Some("shard"), Role::Shard),
    (Some("gateway"), Role::Gateway),
    (Some("admin"), Role::Admin),
    (Some("auditor"), Role::Auditor),
    (Some("client"), Role::Client),
    (None, Role::Anonymous),
];

/// The auditor's per-method request limit (`auditor/src/server.rs`: every method is a small read).
fn auditor_limits(_path: &str) -> usize {
    5 + (64 << 10)
}

/// Bodies past this size are not sent for real (a BuildEpoch stream's 256 MiB, Raft's 512 MiB): the
/// 4 GiB frame header covers those methods' decode limits.
const LARGEST_REAL_BODY: usize = (16 << 20) + 64;

/// One RPC: its path, the server that serves it, that server's policy and request limits.
struct Method {
    path: String,
    addr: String,
    policy: Policy,
    limit: usize,
}

/// Every `rpc` of every `service` in `proto/ktd/**/*.proto`, as `/package.Service/Method`.
fn rpcs_in_protos() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read proto dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "proto") {
                let text = std::fs::read_to_string(&path).expect("read proto");
                let mut package = String::new();
                let mut service = String::new();
                for line in text.lines().map(str::trim) {
                    if let Some(rest) = line.strip_prefix("package ") {
                        package = rest.trim_end_matches(';').trim().to_string();
                    } else if let Some(rest) = line.strip_prefix("service ") {
                        service = rest.trim_end_matches('{').trim().to_string();
                    } else if let Some(rest) = line.strip_prefix("rpc ") {
                        let name = rest.split('(').next().expect("rpc name").trim();
                        out.push(format!("/{package}.{service}/{name}"));
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/ktd"),
        &mut out,
    );
    out.sort();
    out
}

fn methods(secured: &Secured) -> Vec<Method> {
    rpcs_in_protos()
        .into_iter()
        .map(|path| {
            let service = path
                .trim_start_matches('/')
                .split('/')
                .next()
                .expect("service");
            let (addr, policy, limits): (&str, Policy, fn(&str) -> usize) = match service {
                "ktd.v1.Directory" => (
                    &secured.gateway.addr,
                    ktd_rpc::security::gateway_policy,
                    gateway::server::request_limits,
                ),
                "ktd.v1.Admin" => (
                    &secured.admin_addr,
                    ktd_rpc::security::gateway_policy,
                    gateway::server::request_limits,
                ),
                "ktd.sequencer.v1.Sequencer"
                | "ktd.sequencer.v1.SequencerAdmin"
                | "ktd.raft.v1.Raft" => (
                    &secured.sequencer.addr,
                    ktd_rpc::security::sequencer_policy,
                    sequencer::serve::request_limits,
                ),
                "ktd.shard.v1.Shard" => (
                    &secured.shard.addr,
                    ktd_rpc::security::shard_policy,
                    shard::server::request_limits,
                ),
                "ktd.auditor.v1.Auditor" => (
                    &secured.auditor.addr,
                    ktd_rpc::security::auditor_policy,
                    auditor_limits,
                ),
                other => panic!("{path}: service {other} is served by no server the suite knows"),
            };
            Method {
                limit: limits(&path),
                path,
                addr: addr.to_string(),
                policy,
            }
        })
        .collect()
}

/// Request bodies no method can decode (its caller is allowed: every one is refused with a
/// status that says why).
fn garbage() -> Vec<(&'static str, Bytes)> {
    vec![
        (
            "a field with wire type 7",
            frame(0, 4, &[0x0f, 0xff, 0xff, 0x07]),
        ),
        (
            "a varint that never ends",
            frame(
                0,
                12,
                &[
                    0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                ],
            ),
        ),
        (
            "a length-delimited field longer than the message",
            frame(0, 3, &[0x0a, 0x7f, 0x01]),
        ),
        (
            "HTTP/1 text instead of gRPC framing",
            Bytes::from_static(b"GET / HTTP/1.1\r\nHost: ktd\r\n\r\n"),
        ),
        ("a frame cut short", frame(0, 100, &[0x08, 0x01, 0x10])),
        (
            "a compressed frame without an encoding",
            frame(1, 2, &[0x08, 0x01]),
        ),
    ]
}

#[test]
fn every_rpc_of_every_server_refuses_garbage_oversized_bodies_and_unauthorized_roles_and_keeps_serving()
 {
    with_deadline(Duration::from_secs(240), || async {
        let secured = Secured::start("127.0.0.51", [0x51; 32]).await;
        let before = secured.state_at_rest().await;
        let methods = methods(&secured);
        assert!(
            methods.len() >= 46,
            "the protos name {} RPCs: {:?}",
            methods.len(),
            methods.iter().map(|m| &m.path).collect::<Vec<_>>()
        );

        // One connection per (server, caller).
        let mut channels: std::collections::BTreeMap<
            (String, Option<&'static str>),
            Option<Channel>,
        > = Default::default();
        for method in &methods {
            for (stem, _) in CALLERS {
                let key = (method.addr.clone(), *stem);
                if let std::collections::btree_map::Entry::Vacant(entry) = channels.entry(key) {
                    let channel = secured.channel(&method.addr, *stem).await.ok();
                    assert!(
                        channel.is_some() || stem.is_none(),
                        "{stem:?} cannot connect to {}",
                        method.addr
                    );
                    entry.insert(channel);
                }
            }
        }
        let channel = |method: &Method, stem: Option<&'static str>| {
            channels[&(method.addr.clone(), stem)].clone()
        };

        // Every problem is collected, so one run names them all.
        let mut problems: Vec<String> = Vec::new();
        let mut calls = 0usize;
        for method in &methods {
            let path = method.path.as_str();
            let allowed =
                |role: Role| (method.policy)(path).is_some_and(|roles| roles.contains(&role));
            let (insider, _) = CALLERS
                .iter()
                .copied()
                .find(|(stem, role)| stem.is_some() && allowed(*role))
                .unwrap_or_else(|| panic!("{path}: no role may call it"));
            let insider_channel = channel(method, insider).expect("certificate connects");

            // (a) Garbage from a caller the policy allows.
            for (what, body) in garbage() {
                let what = format!("{path} with {what} from {insider:?}");
                calls += 1;
                match raw_call(&insider_channel, path, body).await {
                    Ok(answer) => problems.extend(answer.unclear(&what)),
                    Err(error) => problems.push(format!("{what}: {error}")),
                }
            }

            // (b) Past the method's limit: a real body when it is at most 16 MiB, and a frame
            // header claiming 4 GiB for every method. OUT_OF_RANGE either from the per-method
            // byte limit or, when the frame header alone exceeds it, from tonic's decode limit.
            let mut oversized = vec![(
                format!("{path} with a frame header claiming 4 GiB"),
                frame(0, u32::MAX, &[0x08, 0x01]),
            )];
            if method.limit <= LARGEST_REAL_BODY {
                oversized.push((
                    format!("{path} with a body of {} bytes", method.limit + 5),
                    frame(0, method.limit as u32, &vec![0u8; method.limit]),
                ));
            }
            for (what, body) in oversized {
                calls += 1;
                match raw_call(&insider_channel, path, body).await {
                    Ok(answer) => {
                        problems.extend(answer.unclear(&what));
                        if answer.code != Code::OutOfRange {
                            problems.push(format!("{what}: not OUT_OF_RANGE: {answer:?}"));
                        }
                    }
                    Err(error) => problems.push(format!("{what}: {error}")),
                }
            }

            // (c) Every role: refused before the body is read unless the policy allows it (an
            // allowed caller's garbage then fails to decode: not a permission error).
            for (stem, role) in CALLERS.iter().copied() {
                let what = format!("{path} from {stem:?} ({role})");
                let Some(channel) = channel(method, stem) else {
                    // No certificate and the server requires one: refused at the handshake.
                    continue;
                };
                calls += 1;
                let answer: Answer = match (
                    raw_call(&channel, path, frame(0, 4, &[0x0f, 0xff, 0xff, 0x07])).await,
                    stem,
                ) {
                    (Ok(answer), _) => answer,
                    // A server that requires certificates may also refuse the first request
                    // of a connection without one (TLS 1.3 checks the client after the
                    // handshake).
                    (Err(_), None) => continue,
                    (Err(error), Some(_)) => {
                        problems.push(format!("{what}: {error}"));
                        continue;
                    }
                };
                problems.extend(answer.unclear(&what));
                let permission =
                    matches!(answer.code, Code::PermissionDenied | Code::Unauthenticated);
                if allowed(role) && permission {
                    problems.push(format!("{what} is allowed by the policy: {answer:?}"));
                }
                if !(allowed(role) || permission && answer.message.contains("role")) {
                    problems.push(format!("{what} must be refused by the policy: {answer:?}"));
                }
            }
        }
        assert!(
            problems.is_empty(),
            "{} of {calls} calls were not answered with a clear status:\n{}",
            problems.len(),
            problems.join("\n")
        );
        tracing::info!(calls, methods = methods.len(), "the barrage is over");

        let after = secured.state_at_rest().await;
        assert_eq!(before, after, "a refused call changed the directory");
        secured.publish_and_verify("after-barrage", "key-2").await;
        secured.stop();
    });
}
