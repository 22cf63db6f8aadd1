//! Parsing the command line: a `--config` TOML file's keys become flags wherever neither the
//! command line nor the environment set them (defaults < file < environment < flags).

use std::path::PathBuf;

use clap::Parser;

use super::args::Cli;

/// Subcommands whose settings may also come from a `--config` TOML file.
const CONFIG_FILE_SUBCOMMANDS: [&str; 4] = ["shard", "gateway", "dev", "auditor"];

/// Parses the command line; a `--config` file's keys become flags wherever neither the command
/// line nor the environment set them (defaults < file < environment < flags). Errors are one
/// line.
pub fn parse_cli() -> Result<Cli, String> {
    use clap::{CommandFactory, parser::ValueSource};
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // A lenient first pass finds the file (required flags may be in it); without one, the
    // normal parse (with --help, usage errors and exit codes).
    let Ok(matches) = Cli::command()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
    else {
        // --help, --version and usage errors: clap's own output and exit status.
        return Ok(Cli::parse_from(argv));
    };
    let config = matches.subcommand().and_then(|(name, sub)| {
        CONFIG_FILE_SUBCOMMANDS
            .iter()
            .find(|candidate| **candidate == name)
            .zip(sub.try_get_one::<PathBuf>("config").ok().flatten())
    });
    let Some((name, path)) = config else {
        return Ok(Cli::parse_from(argv));
    };
    let (name, path) = (*name, path.as_path());
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("config file {}: {error}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|error: toml::de::Error| format!("{}: {}", path.display(), error.message()))?;
    let mut command = Cli::command();
    // Propagates the global flags (TLS) into the subcommand, so the file may set them too.
    command.build();
    let subcommand = command
        .find_subcommand(name)
        .ok_or_else(|| format!("no subcommand {name}"))?;
    let sub_matches = matches
        .subcommand_matches(name)
        .ok_or_else(|| format!("no subcommand {name}"))?;
    let mut extra: Vec<String> = Vec::new();
    for (key, value) in &table {
        let arg = subcommand
            .get_arguments()
            .find(|arg| arg.get_id() == key.as_str() && arg.get_long().is_some())
            .filter(|_| !matches!(key.as_str(), "config" | "check_config"))
            .ok_or_else(|| format!("{}: unknown key {key:?}", path.display()))?;
        if matches!(
            sub_matches.value_source(key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let flag = format!("--{}", arg.get_long().unwrap_or(key));
        let takes_value = arg.get_action().takes_values();
        let scalar = |value: &toml::Value| match value {
            toml::Value::String(text) => Ok(text.clone()),
            toml::Value::Integer(number) => Ok(number.to_string()),
            toml::Value::Float(number) => Ok(number.to_string()),
            other => Err(format!(
                "{}: {key}: expected a string or number, got {}",
                path.display(),
                other.type_str()
            )),
        };
        match value {
            toml::Value::Boolean(set) if !takes_value => {
                if *set {
                    extra.push(flag);
                }
            }
            toml::Value::Array(items) if takes_value => {
                for item in items {
                    extra.push(flag.clone());
                    extra.push(scalar(item)?);
                }
            }
            value if takes_value => {
                extra.push(flag);
                extra.push(scalar(value)?);
            }
            other => {
                return Err(format!(
                    "{}: {key}: expected true or false, got {}",
                    path.display(),
                    other.type_str()
                ));
            }
        }
    }
    let argv = argv.into_iter().chain(extra.into_iter().map(Into::into));
    Cli::try_parse_from(argv).map_err(|error| {
        let rendered = error.to_string();
        let first = rendered.lines().next().unwrap_or_default();
        format!(
            "{}: {}",
            path.display(),
            first.trim_start_matches("error: ")
        )
    })
}
