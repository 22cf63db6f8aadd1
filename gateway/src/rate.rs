//! Per-caller budgets for the gateway's expensive reads (complete or long key histories,
//! audits, `GetEpoch{wait}`), so that one caller cannot take every in-flight permit or keep
//! the shards busy for everyone else.
//!
//! * **Who**: a caller is its TLS client certificate (BLAKE3 of the DER) when it presents one,
//!   else its IP address ([`Caller::of`]).
//! * **Budget**: a token bucket per caller ([`RateLimits`]): `burst` tokens, refilled at
//!   `per_second`. A request that costs more than what is left is answered
//!   `RESOURCE_EXHAUSTED` at once, with the wait until it would fit in the message and in the
//!   `ktd-retry-after-ms` trailer ([`crate::error::RETRY_AFTER_MS_METADATA`]).
//! * **Waits**: at most `max_waits` `GetEpoch{wait}` requests of one caller wait at once.
//! * **Memory**: at most `max_callers` callers are tracked. A caller whose bucket is full again
//!   and who has no wait in progress is the same as an unknown one, so such entries are
//!   dropped first when the map is full; then the least recently seen. (A full map can at worst
//!   forget a caller's spent budget, never refuse a new caller.)
//!
//! Invariant: the cost a caller can put on the gateway and shards per second through these
//! methods is at most `per_second` (after a `burst`), whatever it sends, and the state kept for
//! it is one small entry.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{GatewayError, Result};

/// The budget of each caller.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimits {
    /// Tokens a caller regains per second.
    pub per_second: f64,
    /// Tokens a caller can spend at once (a bucket's size).
    pub burst: f64,
    /// `GetEpoch{wait}` requests one caller may have waiting at once.
    pub max_waits: usize,
    /// Callers tracked at once.
    pub max_callers: usize,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            per_second: 20.0,
            burst: 200.0,
            max_waits: 64,
            max_callers: 100_000,
        }
    }
}

/// Who is calling, for budgets.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// A TLS client certificate (BLAKE3 of its DER).
    Certificate([u8; 32]),
    /// A caller without one: its IP address.
    Address(IpAddr),
    /// No address known (not over TCP): one shared budget.
    Unknown,
}

/// A caller: its principal, and whether it is anonymous over TLS (no client certificate,
/// `--tls-client-auth optional`), whose reads are also capped in size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Whose budget the request spends.
    pub principal: Principal,
    /// A TLS connection without a client certificate.
    pub anonymous: bool,
}

impl Caller {
    /// The caller of `request`.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
        if let Some(der) = ktd_rpc::security::peer_certificate(request) {
            return Self {
                principal: Principal::Certificate(*blake3::hash(&der).as_bytes()),
                anonymous: false,
            };
        }
        let tls = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .is_some();
        Self {
            principal: request
                .remote_addr()
                .map_or(Principal::Unknown, |addr| Principal::Address(addr.ip())),
            anonymous: tls,
        }
    }
}

/// One caller's bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    waits: usize,
}

/// The budgets of every caller ([module docs](self)).
#[derive(Debug)]
pub struct RateLimiter {
    limits: RateLimits,
    buckets: Arc<Mutex<HashMap<Principal, Bucket>>>,
}

/// A `GetEpoch{wait}` in progress (released when dropped).
#[derive(Debug)]
pub struct Wait {
    principal: Principal,
    buckets: Arc<Mutex<HashMap<Principal, Bucket>>>,
}

impl Drop for Wait {
    fn drop(&mut self) {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(bucket) = buckets.get_mut(&self.principal) {
            bucket.waits = bucket.waits.saturating_sub(1);
        }
    }
}

impl RateLimiter {
    /// Budgets of `limits`.
    pub fn new(limits: RateLimits) -> Self {
        Self {
            limits,
            buckets: Arc::default(),
        }
    }

    /// Spends `cost` tokens of `principal`'s budget for a `what` request, or refuses it with
    /// the time until it would fit.
    pub fn charge(&self, principal: &Principal, what: &'static str, cost: f64) -> Result<()> {
        self.with_bucket(principal, |bucket, limits| {
            // A request dearer than the whole bucket needs a full one.
            let cost = cost.min(limits.burst);
            if bucket.tokens >= cost {
                bucket.tokens -= cost;
                return Ok(());
            }
            let missing = cost - bucket.tokens;
            Err(refused(what, missing / limits.per_second))
        })
    }

    /// Spends `cost` tokens and takes one of `principal`'s waits, held until the returned
    /// [`Wait`] is dropped.
    pub fn wait(&self, principal: &Principal, what: &'static str, cost: f64) -> Result<Wait> {
        self.with_bucket(principal, |bucket, limits| {
            if bucket.waits >= limits.max_waits {
                metrics::counter!("ktd_gateway_rate_limited_total", "method" => what).increment(1);
                return Err(GatewayError::TooManyWaits {
                    what,
                    max: limits.max_waits,
                });
            }
            let cost = cost.min(limits.burst);
            if bucket.tokens < cost {
                let missing = cost - bucket.tokens;
                return Err(refused(what, missing / limits.per_second));
            }
            bucket.tokens -= cost;
            bucket.waits += 1;
            Ok(())
        })?;
        Ok(Wait {
            principal: principal.clone(),
            buckets: self.buckets.clone(),
        })
    }

    fn with_bucket<T>(
        &self,
        principal: &Principal,
        decide: impl FnOnce(&mut Bucket, &RateLimits) -> Result<T>,
    ) -> Result<T> {
        let limits = self.limits;
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !buckets.contains_key(principal) && buckets.len() >= limits.max_callers.max(1) {
            make_room(&mut buckets, &limits, now);
        }
        let bucket = buckets.entry(principal.clone()).or_insert(Bucket {
            tokens: limits.burst,
            updated: now,
            waits: 0,
        });
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * limits.per_second).min(limits.burst);
        bucket.updated = now;
        decide(bucket, &limits)
    }

    /// Callers tracked now.
    pub fn callers(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }
}

/// Frees at least one entry of a full map: the callers whose bucket has refilled and who wait
/// for nothing (indistinguishable from new ones), else the least recently seen without waits.
fn make_room(buckets: &mut HashMap<Principal, Bucket>, limits: &RateLimits, now: Instant) {
    let refill = seconds(limits.burst / limits.per_second);
    buckets.retain(|_, bucket| {
        bucket.waits > 0 || now.saturating_duration_since(bucket.updated) < refill
    });
    if buckets.len() < limits.max_callers.max(1) {
        return;
    }
    let oldest = buckets
        .iter()
        .filter(|(_, bucket)| bucket.waits == 0)
        .min_by_key(|(_, bucket)| bucket.updated)
        .map(|(principal, _)| principal.clone());
    if let Some(oldest) = oldest {
        buckets.remove(&oldest);
    }
}

fn refused(what: &'static str, seconds_until: f64) -> GatewayError {
    metrics::counter!("ktd_gateway_rate_limited_total", "method" => what).increment(1);
    GatewayError::RateLimited {
        what,
        retry_after: seconds(seconds_until),
    }
}

/// `secs` as a duration between 1 ms and a day (a day for anything not a positive number:
/// budgets built in code are not validated like configuration).
fn seconds(secs: f64) -> Duration {
    match secs.is_finite() && secs > 0.0 {
        true => Duration::from_secs_f64(secs.clamp(0.001, 86_400.0)),
        false => Duration::from_secs(86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(burst: f64, max_callers: usize) -> RateLimiter {
        RateLimiter::new(RateLimits {
            per_second: 0.001,
            burst,
            max_waits: 2,
            max_callers,
        })
    }

    fn ip(last: u8) -> Principal {
        Principal::Address(IpAddr::from([10, 0, 0, last]))
    }

    #[test]
    fn a_caller_past_its_burst_is_refused_with_a_retry_hint_while_another_is_served() {
        let limiter = limiter(3.0, 16);
        for _ in 0..3 {
            limiter
                .charge(&ip(1), "KeyHistory", 1.0)
                .expect("within the burst");
        }
        match limiter.charge(&ip(1), "KeyHistory", 1.0) {
            Err(GatewayError::RateLimited { retry_after, .. }) => {
                assert!(retry_after > Duration::from_secs(1), "{retry_after:?}");
            }
            other => panic!("expected RateLimited, got {other:?}"),
        }
        limiter
            .charge(&ip(2), "KeyHistory", 1.0)
            .expect("another caller");
    }

    #[test]
    fn waits_of_one_caller_are_bounded_and_released_when_dropped() {
        let limiter = limiter(100.0, 16);
        let first = limiter.wait(&ip(1), "GetEpoch", 1.0).expect("first");
        let _second = limiter.wait(&ip(1), "GetEpoch", 1.0).expect("second");
        assert!(limiter.wait(&ip(1), "GetEpoch", 1.0).is_err(), "third");
        let _other = limiter
            .wait(&ip(2), "GetEpoch", 1.0)
            .expect("another caller");
        drop(first);
        let _third = limiter
            .wait(&ip(1), "GetEpoch", 1.0)
            .expect("after one ended");
    }

    #[test]
    fn the_caller_map_stays_bounded_and_never_refuses_a_new_caller() {
        let limiter = limiter(1.0, 4);
        for last in 0..50 {
            limiter
                .charge(&ip(last), "Audit", 1.0)
                .expect("a new caller");
            assert!(limiter.callers() <= 4, "{}", limiter.callers());
        }
    }
}
