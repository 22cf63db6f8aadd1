//! One typed configuration per server, the same way for all five: a serde struct with
//! `deny_unknown_fields` and `Default` ([`ShardConfig`], [`GatewayConfig`], [`DevConfig`],
//! [`AuditorConfig`] here; `sequencer::SequencerConfig` in the sequencer crate), layered
//! defaults < TOML file (`--config` or `KTD_<SERVER>_CONFIG`) < `KTD_*` environment variables <
//! flags (the layering is `crate::cli::parse`), then validated once into a resolved form the
//! server runs with (`resolve`). Secrets (the VRF seed, the auditor's signing key) exist only in
//! the resolved forms, whose `Debug` redacts them; the configurations hold their file paths.
//!
//! A file holds one server's keys at its top level, or — a *combined* file such as
//! `deploy/ktd.example.toml` — one table per server (`[sequencer]`, `[shard]`, `[gateway]`,
//! `[dev]`, `[auditor]`), of which each server reads its own. Errors are one line naming the
//! file and the key: `gateway.toml: unknown key "listen_port"`,
//! `gateway.toml: max_in_flight: invalid type: string "lots", expected usize`.

mod auditor;
mod dev;
mod gateway;
mod process;
mod shard;
#[cfg(test)]
mod tests;

use std::path::Path;

use anyhow::{Context, anyhow, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use auditor::{AuditorConfig, ResolvedAuditor};
pub use dev::{DevConfig, ResolvedDev};
pub use gateway::{ClientAuth, GatewayConfig, ResolvedGateway};
pub use process::{PROCESS_KEYS, ProcessConfig};
pub use shard::{ResolvedShard, ShardConfig};

/// The servers, as subcommands and as the tables of a combined file.
pub const SERVERS: [&str; 5] = ["sequencer", "shard", "gateway", "dev", "auditor"];

/// A server's file format.
pub trait ServerFile: Default + Serialize + DeserializeOwned {
    /// The server's subcommand, and its table in a combined file.
    const SERVER: &'static str;
    /// Where the keys shared by every process go ([`ProcessConfig`]); `None` if this server's
    /// file has none of them (the sequencer: its process settings are flags and variables).
    fn process_mut(&mut self) -> Option<&mut ProcessConfig>;
}

impl ServerFile for sequencer::SequencerConfig {
    const SERVER: &'static str = "sequencer";
    fn process_mut(&mut self) -> Option<&mut ProcessConfig> {
        None
    }
}

/// Reads a server's configuration file (see the module docs); errors are one line starting
/// with the file's path.
pub fn load<T: ServerFile>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    from_toml(&text).map_err(|error| anyhow!("{}: {error}", path.display()))
}

/// Parses a server's configuration from TOML text: unknown keys and bad values are one-line
/// errors naming the key.
pub fn from_toml<T: ServerFile>(text: &str) -> Result<T, String> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|error: toml::de::Error| syntax_error(text, &error))?;
    let mut prefix = String::new();
    let combined = table
        .iter()
        .any(|(key, value)| SERVERS.contains(&key.as_str()) && value.is_table());
    if combined {
        for (key, value) in &table {
            if !SERVERS.contains(&key.as_str()) {
                return Err(format!(
                    "unknown key {key:?} (a file of server tables holds only [{}])",
                    SERVERS.join("], [")
                ));
            }
            if !value.is_table() {
                return Err(format!("{key}: expected a table, got {}", value.type_str()));
            }
        }
        table = match table.remove(T::SERVER) {
            Some(toml::Value::Table(own)) => own,
            _ => toml::Table::new(),
        };
        prefix = format!("{}.", T::SERVER);
    }
    let shared: toml::Table = PROCESS_KEYS
        .iter()
        .filter_map(|key| table.remove_entry(*key))
        .collect();
    let mut config: T = deserialize(table, &prefix)?;
    match config.process_mut() {
        Some(process) => *process = deserialize(shared, &prefix)?,
        None => {
            if let Some(key) = shared.keys().next() {
                return Err(format!("unknown key \"{prefix}{key}\""));
            }
        }
    }
    Ok(config)
}

/// Deserializes `table`; an error names the key (`prefix` + its path).
fn deserialize<T: DeserializeOwned>(table: toml::Table, prefix: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(table).map_err(|error| {
        // The path ends at the key the error is about (an unknown key included).
        let inner = error.path().to_string();
        let key = if inner == "." { "" } else { inner.as_str() };
        let path = format!("{prefix}{key}");
        let path = path.trim_end_matches('.');
        let message = error.inner().message().trim().replace('\n', "; ");
        // serde's "unknown field `x`, expected one of ..." is a key this format does not have.
        if message.starts_with("unknown field `") {
            format!("unknown key {path:?}")
        } else if path.is_empty() {
            message
        } else {
            format!("{path}: {message}")
        }
    })
}

/// A TOML syntax error as one line: "line L, column C: what is wrong".
fn syntax_error(text: &str, error: &toml::de::Error) -> String {
    let place = error.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
        format!("line {line}, column {column}: ")
    });
    format!(
        "{}{}",
        place.unwrap_or_default(),
        error.message().trim().replace('\n', "; ")
    )
}

/// `--check-config`'s output: a header, `notes` as comments, then `config` as TOML.
pub fn effective_toml(config: &impl Serialize, notes: &[String]) -> anyhow::Result<String> {
    let mut text = String::from("# effective configuration (valid)\n");
    for note in notes {
        text.push_str(&format!("# {note}\n"));
    }
    text.push_str(&toml::to_string(config).context("print the configuration")?);
    Ok(text)
}

/// A setting without a default: its value, or an error naming where it can be set.
fn required<'a, T>(value: &'a Option<T>, key: &str, flag_and_env: &str) -> anyhow::Result<&'a T> {
    value.as_ref().ok_or_else(|| {
        anyhow!("{key} is not set: give {flag_and_env}, or `{key}` in the --config file")
    })
}

/// Checks an address to listen on: an IP socket address, or `HOST:PORT`.
fn check_address(key: &str, value: &str) -> anyhow::Result<()> {
    if value.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    match value.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !host.contains(|c: char| c.is_whitespace() || c == '/')
                && port.parse::<u16>().is_ok() =>
        {
            Ok(())
        }
        _ => bail!("{key}: {value:?} is not an address to listen on (IP:PORT or HOST:PORT)"),
    }
}

/// Partition bits within the limit every server shares.
fn check_partition_bits(bits: u8) -> anyhow::Result<()> {
    ktd_core::shard_map::check_partition_bits(u64::from(bits))
        .map(|_| ())
        .context("partition_bits")
}

/// `AkdConfig` as its name in files (`whatsapp_v1`, `experimental:<domain label>`).
/// Serde for settings written as their `Display` text and parsed with `FromStr`.
mod as_text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<T, D::Error>
    where
        T: FromStr<Err: Display>,
        D: Deserializer<'de>,
    {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

mod akd_configuration {
    use ktd_core::AkdConfig;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(config: &AkdConfig, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(config)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<AkdConfig, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}
