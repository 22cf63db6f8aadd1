//! Prometheus series as the tests see them: the series the `ktd` binary exports, read from the
//! source (the first string of every `counter!`, `gauge!` and `histogram!`), with the check that
//! a PromQL expression (an alert rule, a dashboard panel) names only those, in the form the
//! exporter renders them ([`ExportedMetrics`]); and a live `/metrics` scrape read with a small
//! strict parser: a line that is neither a comment nor `name{labels} value` fails the test
//! ([`Scrape`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ktd_testkit::Poll;
use ktd_testkit::fs::{rust_files, workspace_root};
use ktd_testkit::net::http_get;

/// The exported metric names and how histograms are rendered.
pub struct ExportedMetrics {
    names: BTreeSet<String>,
    /// Whether the exporter is given histogram buckets (`set_buckets*`); without them
    /// metrics-exporter-prometheus renders every histogram as a summary (`{quantile=".."}`,
    /// `_sum`, `_count`) and there is no `_bucket` series.
    bucketed: bool,
}

/// The first string literal after each `macro_name!(` in `source`.
fn macro_names(source: &str, macro_name: &str, names: &mut BTreeSet<String>) {
    for (index, _) in source.match_indices(&format!("{macro_name}!(")) {
        let rest = source[index + macro_name.len() + 2..].trim_start();
        if let Some(literal) = rest.strip_prefix('"')
            && let Some(end) = literal.find('"')
        {
            names.insert(literal[..end].to_string());
        }
    }
}

/// The metric names in a PromQL expression, with `_bucket`, `_sum` and `_count` removed.
pub fn names_in(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("ktd_"))
        .map(|word| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .unwrap_or(word)
                .to_string()
        })
        .collect()
}

impl ExportedMetrics {
    /// Scans the `src` of every crate that runs in a server process.
    pub fn scan() -> Self {
        let root = workspace_root();
        let mut files = Vec::new();
        for dir in [
            "gateway/src",
            "sequencer/src",
            "shard/src",
            "proto/src",
            "rpc/src",
            "core/src",
            "ktd/src",
            "auditor/src",
            "client/src",
        ] {
            files.extend(rust_files(&root.join(dir)));
        }
        let mut names = BTreeSet::new();
        let mut bucketed = false;
        for file in files {
            let source = std::fs::read_to_string(&file).expect("source");
            for macro_name in ["counter", "gauge", "histogram"] {
                macro_names(&source, macro_name, &mut names);
            }
            bucketed |= source.contains(".set_buckets");
        }
        names.retain(|name| name.starts_with("ktd_"));
        assert!(names.len() >= 15, "too few metrics found: {names:?}");
        Self { names, bucketed }
    }

    /// Whether the code exports `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// Every exported name.
    pub fn names(&self) -> &BTreeSet<String> {
        &self.names
    }

    /// Checks that `expr` names only exported metrics, and that it does not rely on `_bucket`
    /// series the exporter does not render (a summary fallback, `or max(X{quantile=".."})`, is
    /// required then). Returns the names used.
    pub fn check_expr(&self, context: &str, expr: &str) -> BTreeSet<String> {
        let names = names_in(expr);
        for name in &names {
            assert!(
                self.contains(name),
                "{context}: {name} is not exported: {expr}"
            );
            if !self.bucketed && expr.contains(&format!("{name}_bucket")) {
                assert!(
                    expr.contains(&format!("{name}{{")) && expr.contains("quantile="),
                    "{context}: {name} is rendered as a summary (no histogram buckets are \
                     configured), so {name}_bucket does not exist: add `or max({name}{{quantile=\"..\"}})`: {expr}"
                );
            }
        }
        names
    }
}

/// One sample line.
#[derive(Debug)]
pub struct Sample {
    /// The series name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug)]
pub struct Scrape {
    /// Every sample line.
    pub samples: Vec<Sample>,
    /// The text as scraped.
    pub text: String,
}

impl Scrape {
    /// Parses Prometheus text exposition format 0.0.4; panics on any malformed line.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| parse_sample(line).unwrap_or_else(|| panic!("malformed line {line:?}")))
            .collect();
        Self {
            samples,
            text: text.to_string(),
        }
    }

    /// Every sample of `name` whose labels include `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
        })
    }

    /// The value of the one sample of `name` with `labels`, if exactly one exists.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.matching(name, labels);
        let first = found.next()?;
        found.next().is_none().then_some(first.value)
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = after_brace;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let eq = rest.find('=')?;
            let key = rest[..eq].to_string();
            rest = rest[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let close = loop {
                match chars.next()? {
                    (index, '"') => break index,
                    (_, '\\') => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        escaped @ ('\\' | '"') => value.push(escaped),
                        _ => return None,
                    },
                    (_, other) => value.push(other),
                }
            };
            rest = &rest[close + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
            if labels.insert(key, value).is_some() {
                return None;
            }
        }
    }
    let mut fields = rest.strip_prefix(' ')?.split(' ');
    let value = match fields.next()? {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        number => number.parse().ok()?,
    };
    // An optional integer timestamp, then nothing.
    if let Some(timestamp) = fields.next() {
        timestamp.parse::<i64>().ok()?;
    }
    fields.next().is_none().then_some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Scrapes `http://ADDR/metrics`; fails on anything but a 200 with well-formed text.
pub async fn scrape(addr: &str) -> Scrape {
    let response = http_get(addr.parse().expect("addr"), "/metrics").await;
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    Scrape::parse(body)
}

/// Scrapes `addr` until `check` finds no problem, or fails after `limit` with the last problems
/// and the last scrape.
pub async fn scrape_until(
    addr: &str,
    limit: Duration,
    check: impl Fn(&Scrape) -> Vec<String>,
) -> Scrape {
    Poll::new(format!("/metrics at {addr} to be right"), limit)
        .every(Duration::from_millis(200))
        .until_ok(|| async {
            let scrape = scrape(addr).await;
            let problems = check(&scrape);
            if problems.is_empty() {
                Ok(scrape)
            } else {
                Err(format!("\n  {}\n{}", problems.join("\n  "), scrape.text))
            }
        })
        .await
}

/// Collects a problem unless `value` (of `what`) exists and satisfies `sane`.
pub fn check_value(
    problems: &mut Vec<String>,
    what: &str,
    value: Option<f64>,
    sane: impl Fn(f64) -> bool,
) {
    match value {
        Some(value) if sane(value) => {}
        Some(value) => problems.push(format!("{what} = {value}")),
        None => problems.push(format!("{what} missing")),
    }
}
