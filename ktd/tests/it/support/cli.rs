//! The `ktd` command line from a test: running it ([`ktd`], [`ktd_at`]), and the command line
//! as its `--help` describes it ([`KtdCli`]: the subcommands, each one's flags and the
//! environment variables it reads). Deployment files (systemd units, compose, Kubernetes) are
//! checked against the latter, so a renamed or invented flag fails a test instead of a
//! deployment.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::process::{Command, Output};

use super::KTD;

/// A `ktd` command with `RUST_LOG` unset (so stderr holds only what the command itself
/// prints).
pub fn command() -> Command {
    let mut command = Command::new(KTD);
    command.env_remove("RUST_LOG");
    command
}

/// Runs `ktd ARGS` to completion ([`command`]).
pub fn ktd<S: AsRef<OsStr>>(args: &[S]) -> Output {
    command().args(args).output().expect("run ktd")
}

/// Runs `ktd --addr http://ADDR ARGS` to completion: a client command against the directory at
/// `addr`.
pub fn ktd_at<S: AsRef<OsStr>>(addr: &str, args: &[S]) -> Output {
    command()
        .arg("--addr")
        .arg(format!("http://{addr}"))
        .args(args)
        .output()
        .expect("run ktd")
}

/// Every `ktd` subcommand with its `--help` text.
pub struct KtdCli {
    helps: BTreeMap<String, String>,
}

fn help_text(args: &[&str]) -> String {
    let output = ktd(&[args, &["--help"]].concat());
    assert!(output.status.success(), "ktd {args:?} --help: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl KtdCli {
    /// Runs `ktd --help` and `ktd SUBCOMMAND --help` for every subcommand listed.
    pub fn load() -> Self {
        let top = help_text(&[]);
        let commands = top
            .split("Commands:")
            .nth(1)
            .and_then(|rest| rest.split("Options:").next())
            .expect("a Commands: section");
        let helps: BTreeMap<String, String> = commands
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| *name != "help")
            .map(|name| (name.to_string(), help_text(&[name])))
            .collect();
        assert!(
            ["dev", "sequencer", "shard", "gateway", "epoch"]
                .iter()
                .all(|name| helps.contains_key(*name)),
            "{:?}",
            helps.keys()
        );
        Self { helps }
    }

    /// `ktd SUBCOMMAND --help`.
    pub fn help(&self, subcommand: &str) -> &str {
        self.helps
            .get(subcommand)
            .unwrap_or_else(|| panic!("ktd has no subcommand {subcommand:?}"))
    }

    /// The `ktd` subcommand a command line or shell script runs: the first word (quotes,
    /// brackets and an `args=(` prefix stripped) that names one.
    pub fn subcommand_of(&self, text: &str) -> Option<String> {
        text.split_whitespace()
            .map(|word| {
                let word = word.rsplit("=(").next().unwrap_or(word);
                word.trim_matches(|c: char| "\"'()[],;".contains(c))
            })
            .find(|word| self.helps.contains_key(*word))
            .map(str::to_string)
    }

    /// Checks that every `--flag` in `text` (a command line or a shell script running one `ktd`
    /// subcommand) is a flag of that subcommand; returns the subcommand. `context` names the
    /// file and the entry for the failure message.
    pub fn check_command(&self, context: &str, text: &str) -> String {
        let subcommand = self
            .subcommand_of(text)
            .unwrap_or_else(|| panic!("{context}: runs no ktd subcommand: {text}"));
        let help = self.help(&subcommand);
        let known: Vec<&str> = help
            .split(|c: char| c.is_whitespace() || c == ',')
            .collect();
        for flag in flags_in(text) {
            assert!(
                known.contains(&flag.as_str()),
                "{context}: ktd {subcommand} has no {flag}"
            );
        }
        subcommand
    }

    /// Checks that `ktd SUBCOMMAND` reads the environment variable `name`.
    pub fn check_env(&self, context: &str, subcommand: &str, name: &str) {
        assert!(
            self.help(subcommand).contains(&format!("env: {name}=")),
            "{context}: ktd {subcommand} reads no {name}"
        );
    }
}

/// The `--flag` words in `text`: `--` at the start of a word (after whitespace, a quote, a
/// bracket or `(`), then lowercase letters, digits and dashes.
pub fn flags_in(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut flags = Vec::new();
    for (index, _) in text.match_indices("--") {
        let starts_word = index == 0 || b" \t\n\"'([,".contains(&bytes[index - 1]);
        let name: String = text[index + 2..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
            .collect();
        if starts_word && name.starts_with(|c: char| c.is_ascii_lowercase()) {
            flags.push(format!("--{name}"));
        }
    }
    flags
}

/// The `KTD_*` environment variable names in `text`.
pub fn ktd_env_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
        .filter(|word| word.starts_with("KTD_"))
        .map(str::to_string)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}
