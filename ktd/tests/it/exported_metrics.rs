//! The Prometheus series the `ktd` binary exports, read from the source (the first string of
//! every `counter!`, `gauge!` and `histogram!`), and the check that a PromQL expression (an alert
//! rule, a dashboard panel) names only those, in the form the exporter renders them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The exported metric names and how histograms are rendered.
pub struct ExportedMetrics {
    names: BTreeSet<String>,
    /// Whether the exporter is given histogram buckets (`set_buckets*`); without them
    /// metrics-exporter-prometheus renders every histogram as a summary (`{quantile=".."}`,
    /// `_sum`, `_count`) and there is no `_bucket` series.
    bucketed: bool,
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("source dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
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
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
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
            rust_files(&root.join(dir), &mut files);
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

    /// Checks that `expr` names only exported metrics or ones in `pending`, and that it does
    /// not rely on `_bucket` series the exporter does not render (a summary fallback,
    /// `or max(X{quantile=".."})`, is required then). Returns the names used.
    pub fn check_expr(&self, context: &str, expr: &str, pending: &[&str]) -> BTreeSet<String> {
        let names = names_in(expr);
        for name in &names {
            let exported = self.contains(name);
            assert!(
                exported || pending.contains(&name.as_str()),
                "{context}: {name} is not exported (nor listed as pending): {expr}"
            );
            if exported && !self.bucketed && expr.contains(&format!("{name}_bucket")) {
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
