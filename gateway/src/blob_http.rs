//! Audit blobs over plain HTTP in the layout WhatsApp publishes its key-transparency audit proofs
//! in (an S3 bucket behind a CDN), so akd's own auditor tools and Plexi read ktd unchanged:
//!
//! - `GET /?list-type=2[&prefix=P][&start-after=K][&continuation-token=T][&max-keys=N]`: an S3
//!   `ListObjectsV2` answer (`ListBucketResult`, one `Contents/Key` per blob, `IsTruncated`,
//!   `NextContinuationToken`) of the blob names `E/hex(root E-1)/hex(root E)`, in S3's order:
//!   lexicographic by bytes (`"10/…"` before `"2/…"`), `start-after` and the token exclusive,
//!   at most 1000 keys a page (`max-keys`, default 1000).
//! - `GET /E/PREV/CUR`: the blob, the protobuf `SingleAppendOnlyProof` bytes `GetAuditBlob`
//!   answers (`application/octet-stream`, immutable: cached for a year; `ETag` its BLAKE3).
//!
//! Listed are the epochs whose blob can be served: from the oldest retained epoch + 1 to the
//! latest committed one. The order is computed, not sorted: [`Keys`] walks the decimal trie of
//! epoch numbers in preorder, skipping whole subtrees outside the bounds, so a page costs
//! O(page + digits) whatever the number of epochs. Errors are S3's XML `Error` documents with
//! the gRPC mapping's meaning (400 bad request, 404 no such epoch or pruned, 503 unavailable).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ktd_core::akd_core::configuration::Configuration;
use ktd_proto::ktd::v1 as api;

use crate::error::GatewayError;
use crate::service::Gateway;

/// Most keys one listing page holds (S3's bound).
pub const MAX_KEYS: usize = 1000;

/// The preorder successor of `n` among `1..=latest` (decimal strings in lexicographic order).
fn successor(n: u64, latest: u64) -> Option<u64> {
    match n.checked_mul(10) {
        Some(child) if child <= latest => Some(child),
        _ => after_subtree(n, latest),
    }
}

/// The first number after every number that starts with `n`'s digits, in preorder.
fn after_subtree(mut n: u64, latest: u64) -> Option<u64> {
    loop {
        if n % 10 != 9 && n < latest {
            return Some(n + 1);
        }
        n /= 10;
        if n == 0 {
            return None;
        }
    }
}

/// The largest number ≤ `latest` whose digits start with `n`'s.
fn subtree_max(n: u64, latest: u64) -> u64 {
    let (mut low, mut high, mut best) = (n, n, n);
    loop {
        match (
            low.checked_mul(10),
            high.checked_mul(10).and_then(|h| h.checked_add(9)),
        ) {
            (Some(next_low), Some(next_high)) if next_low <= latest => {
                low = next_low;
                high = next_high;
                best = high.min(latest);
            }
            _ => return best,
        }
    }
}

/// Where a listing starts: keys greater than `bound` (or equal, if `inclusive`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    /// The bound, a key or any string.
    pub bound: String,
    /// Whether a key equal to it is listed.
    pub inclusive: bool,
}

impl Start {
    /// Whether `key` comes at or after the start.
    pub fn admits(&self, key: &str) -> bool {
        key > self.bound.as_str() || (self.inclusive && key == self.bound)
    }
}

/// The first epoch of `lowest..=latest`, in key order, whose key may come at or after `start`,
/// and whether that depends on the rest of its key (its hashes): the caller then checks the key
/// with [`Start::admits`] and, if not, moves on with [`Keys::next_after`].
fn first_candidate(start: &Start, lowest: u64, latest: u64) -> Option<(u64, bool)> {
    let bound = start.bound.as_bytes();
    let mut n = 1;
    loop {
        if n > latest {
            return None;
        }
        if subtree_max(n, latest) < lowest {
            n = after_subtree(n, latest)?;
            continue;
        }
        let digits = n.to_string();
        let digits = digits.as_bytes();
        let shared = digits.iter().zip(bound).take_while(|(a, b)| a == b).count();
        if shared < digits.len() {
            // The digits differ from the bound before they end (or the bound ends first).
            if shared == bound.len() || digits[shared] > bound[shared] {
                // Every key of this subtree is greater.
                if n >= lowest {
                    return Some((n, false));
                }
                n = successor(n, latest)?;
            } else {
                n = after_subtree(n, latest)?;
            }
            continue;
        }
        // The bound starts with these digits: the key is digits + '/' + hashes.
        let decided = match bound.get(digits.len()) {
            None => Some(true),
            Some(&next) if next < b'/' => Some(true),
            Some(b'/') if bound.len() == digits.len() + 1 => Some(true),
            Some(b'/') => None,
            Some(_) => Some(false),
        };
        match decided {
            Some(true) if n >= lowest => return Some((n, false)),
            None if n >= lowest => return Some((n, true)),
            // Not this one (too low, or its key sorts before the bound): its children may.
            _ => n = successor(n, latest)?,
        }
    }
}

/// Epochs `lowest..=latest` in the order of their blob keys.
#[derive(Clone, Copy, Debug)]
pub struct Keys {
    /// The oldest epoch listed.
    pub lowest: u64,
    /// The newest.
    pub latest: u64,
}

impl Keys {
    /// The first epoch whose key may be at or after `start`, and whether that depends on its
    /// hashes (then check its key with [`Start::admits`], and go on with [`Keys::next_after`]).
    pub fn first(&self, start: &Start) -> Option<(u64, bool)> {
        if self.lowest > self.latest {
            return None;
        }
        first_candidate(start, self.lowest, self.latest)
    }

    /// The epoch after `n` in key order.
    pub fn next_after(&self, n: u64) -> Option<u64> {
        let mut next = successor(n, self.latest)?;
        while next < self.lowest {
            next = if subtree_max(next, self.latest) < self.lowest {
                after_subtree(next, self.latest)?
            } else {
                successor(next, self.latest)?
            };
        }
        Some(next)
    }
}

/// An S3-style error document.
fn s3_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{}</Message></Error>\n",
        escape(message)
    );
    (status, [(header::CONTENT_TYPE, "application/xml")], body).into_response()
}

fn gateway_error(error: GatewayError) -> Response {
    let status = tonic::Status::from(error);
    let (http, code) = match status.code() {
        tonic::Code::InvalidArgument => (StatusCode::BAD_REQUEST, "InvalidArgument"),
        tonic::Code::NotFound | tonic::Code::OutOfRange | tonic::Code::FailedPrecondition => {
            (StatusCode::NOT_FOUND, "NoSuchKey")
        }
        tonic::Code::ResourceExhausted => (StatusCode::SERVICE_UNAVAILABLE, "SlowDown"),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
    };
    s3_error(http, code, status.message())
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The blob key of `epoch`.
async fn key_of<TC: Configuration>(
    gateway: &Gateway<TC>,
    epoch: u64,
) -> Result<String, GatewayError> {
    let previous = gateway.epochs().at(epoch - 1).await?;
    let current = gateway.epochs().at(epoch).await?;
    Ok(format!(
        "{epoch}/{}/{}",
        hex::encode(previous.root_hash()),
        hex::encode(current.root_hash())
    ))
}

/// One listing page: its keys and whether more follow.
async fn page<TC: Configuration>(
    gateway: &Gateway<TC>,
    keys: Keys,
    start: &Start,
    prefix: &str,
    max_keys: usize,
) -> Result<(Vec<String>, bool), GatewayError> {
    let mut listed = Vec::new();
    let mut next = keys.first(start);
    while let Some((epoch, check)) = next {
        let key = key_of(gateway, epoch).await?;
        next = keys.next_after(epoch).map(|epoch| (epoch, false));
        if check && !start.admits(&key) {
            continue;
        }
        if !key.starts_with(prefix) {
            if key.as_str() > prefix {
                // Sorted: nothing later starts with the prefix either.
                return Ok((listed, false));
            }
            continue;
        }
        if listed.len() == max_keys {
            return Ok((listed, true));
        }
        listed.push(key);
    }
    Ok((listed, false))
}

async fn list<TC: Configuration>(
    State(gateway): State<Arc<Gateway<TC>>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if query.get("list-type").map(String::as_str) != Some("2") {
        return s3_error(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            "only ListObjectsV2 is served: pass list-type=2",
        );
    }
    let max_keys = match query.get("max-keys").map(|text| text.parse::<usize>()) {
        None => MAX_KEYS,
        Some(Ok(keys)) => keys.min(MAX_KEYS),
        Some(Err(_)) => {
            return s3_error(
                StatusCode::BAD_REQUEST,
                "InvalidArgument",
                "max-keys is not a number",
            );
        }
    };
    let prefix = query.get("prefix").cloned().unwrap_or_default();
    let start_after = query.get("start-after").cloned().unwrap_or_default();
    let token = query.get("continuation-token").cloned();
    // The token (the last key of the previous page) wins over start-after, as in S3; the listing
    // starts at the prefix if that comes later.
    let after = token.clone().unwrap_or_else(|| start_after.clone());
    let start = if prefix.as_str() > after.as_str() {
        Start {
            bound: prefix.clone(),
            inclusive: true,
        }
    } else {
        Start {
            bound: after,
            inclusive: false,
        }
    };
    let latest = match gateway.epochs().latest().await {
        Ok(latest) => latest.epoch,
        Err(error) => return gateway_error(error),
    };
    let keys = Keys {
        lowest: gateway.safe_epoch() + 1,
        latest,
    };
    let (listed, truncated) = match page(&gateway, keys, &start, &prefix, max_keys).await {
        Ok(page) => page,
        Err(error) => return gateway_error(error),
    };
    let mut body = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">",
    );
    let _ = write!(
        body,
        "<Name>ktd</Name><Prefix>{}</Prefix><KeyCount>{}</KeyCount><MaxKeys>{max_keys}</MaxKeys><IsTruncated>{truncated}</IsTruncated>",
        escape(&prefix),
        listed.len()
    );
    if !start_after.is_empty() {
        let _ = write!(body, "<StartAfter>{}</StartAfter>", escape(&start_after));
    }
    if let Some(token) = &token {
        let _ = write!(
            body,
            "<ContinuationToken>{}</ContinuationToken>",
            escape(token)
        );
    }
    if truncated && let Some(last) = listed.last() {
        let _ = write!(
            body,
            "<NextContinuationToken>{}</NextContinuationToken>",
            escape(last)
        );
    }
    for key in &listed {
        let _ = write!(
            body,
            "<Contents><Key>{key}</Key><StorageClass>STANDARD</StorageClass></Contents>"
        );
    }
    body.push_str("</ListBucketResult>\n");
    (
        [
            (header::CONTENT_TYPE, "application/xml"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn blob<TC: Configuration>(
    State(gateway): State<Arc<Gateway<TC>>>,
    Path((epoch, previous, current)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let name = format!("{epoch}/{previous}/{current}");
    let blob = match gateway
        .get_audit_blob(api::GetAuditBlobRequest { name: name.clone() })
        .await
    {
        Ok(blob) => blob,
        Err(error) => return gateway_error(error),
    };
    let etag = format!("\"{}\"", blake3::hash(&blob.proof).to_hex());
    if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|value| value.as_bytes() == etag.as_bytes())
    {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let mut response = blob.proof.into_response();
    let response_headers = response.headers_mut();
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response_headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        response_headers.insert(header::ETAG, etag);
    }
    response
}

/// The blob routes (`/` listing, `/{E}/{PREV}/{CUR}` blobs) over `gateway`.
pub fn router<TC: Configuration>(gateway: Arc<Gateway<TC>>) -> axum::Router {
    axum::Router::new()
        .route("/", get(list::<TC>))
        .route("/{epoch}/{previous}/{current}", get(blob::<TC>))
        .with_state(gateway)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key of `lowest..=latest` at or after `start` in S3 order, the slow way.
    fn oracle(lowest: u64, latest: u64, start: &Start, key: impl Fn(u64) -> String) -> Vec<u64> {
        let mut keys: Vec<(String, u64)> = (lowest..=latest).map(|n| (key(n), n)).collect();
        keys.sort();
        keys.into_iter()
            .filter(|(key, _)| start.admits(key))
            .map(|(_, n)| n)
            .collect()
    }

    fn walk(keys: Keys, start: &Start, key: impl Fn(u64) -> String) -> Vec<u64> {
        let mut out = Vec::new();
        let mut next = keys.first(start);
        while let Some((n, check)) = next {
            if !check || start.admits(&key(n)) {
                out.push(n);
            }
            next = keys.next_after(n).map(|n| (n, false));
        }
        out
    }

    #[test]
    fn blob_keys_are_walked_in_s3_order_from_any_start_within_the_retained_epochs() {
        let key = |n: u64| format!("{n}/{:064x}/{:064x}", n * 7919 % 1000, n);
        let bounds = [
            "", "0", "1", "1/", "10", "10/", "10/5", "10/ff", "19", "2", "250/", "3/0000", "5:",
            "9", "99/", "999", "a", "/",
        ];
        for (lowest, latest) in [
            (1, 1),
            (1, 9),
            (1, 10),
            (1, 131),
            (7, 131),
            (100, 1205),
            (120, 125),
            (2, 1),
        ] {
            let keys = Keys { lowest, latest };
            for bound in bounds
                .iter()
                .map(|bound| bound.to_string())
                .chain((lowest..=latest.min(lowest + 30)).map(key))
            {
                for inclusive in [false, true] {
                    let start = Start {
                        bound: bound.clone(),
                        inclusive,
                    };
                    assert_eq!(
                        walk(keys, &start, key),
                        oracle(lowest, latest, &start, key),
                        "lowest {lowest} latest {latest} start {start:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_page_of_a_large_directory_needs_no_walk_over_older_epochs() {
        let keys = Keys {
            lowest: 722_606,
            latest: 9_000_000,
        };
        let start = Start {
            bound: String::new(),
            inclusive: false,
        };
        let (first, _) = keys.first(&start).expect("a key");
        assert_eq!(first, 1_000_000);
        assert_eq!(keys.next_after(first), Some(1_000_001));
        assert_eq!(keys.next_after(1_999_999), Some(2_000_000));
        // 9, 90, …, 90000 are older than the oldest listed epoch; 900000 is not.
        assert_eq!(keys.next_after(8_999_999), Some(900_000));
        assert_eq!(keys.next_after(9_000_000), Some(900_001));
        assert_eq!(keys.next_after(999_999), None, "the last key in byte order");
    }
}
