//! `ktd-chaos`: run fault scenarios against a local ktd cluster and judge the history.
//!
//! ```text
//! ktd-chaos list
//! ktd-chaos run --scenario leader-kill --seed 42 --duration 30s --out /tmp/chaos-out
//! ktd-chaos run --scenario leader-kill --inject-violation stale-read   # must exit 1
//! ktd-chaos replay /tmp/chaos-out          # re-run the checkers on a saved history
//! ktd-chaos drill --inventory deploy/drill-inventory.local.toml --scenario leader-kill \
//!     --slo write_unavailability=5s,p99_publish=2s   # against an already running cluster
//! ```
//!
//! Exit codes: 0 ok, 1 correctness violation, 2 SLO breach, 3 harness problem (bad scenario,
//! inventory or flags, a failing hook, a cluster that never became healthy).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use chaos_tests::checker::check_all;
use chaos_tests::cli::{Cli, Command};
use chaos_tests::history::{FinalState, History};
use chaos_tests::inventory::Inventory;
use chaos_tests::positive_control::{self, Mutation};
use chaos_tests::report::Exit;
use chaos_tests::runner::{self, RunOptions};
use chaos_tests::scenario::{BUILTIN, Scenario};
use chaos_tests::topology::find_ktd;
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let exit = match cli.command {
        Command::List => {
            for (name, text) in BUILTIN {
                match Scenario::parse(name, text) {
                    Ok(scenario) => println!(
                        "{name:<24} {:>5}  {}",
                        humantime::format_duration(scenario.duration).to_string(),
                        scenario.description
                    ),
                    Err(error) => println!("{name:<24} INVALID: {error}"),
                }
            }
            Exit::Ok
        }
        Command::Run {
            scenario,
            seed,
            duration,
            out,
            ktd,
            inject_violation,
            json,
            slo,
        } => run(
            scenario,
            seed,
            duration,
            out,
            ktd,
            inject_violation,
            json,
            slo,
        ),
        Command::Drill {
            inventory,
            scenario,
            slo,
            seed,
            duration,
            out,
            json,
        } => drill(&inventory, &scenario, slo, seed, duration, out, json),
        Command::Replay {
            path,
            inject_violation,
        } => replay(&path, inject_violation),
    };
    ExitCode::from(exit as u8)
}

/// The async runtime (`None`, reported, if it cannot start).
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new()
        .map_err(|error| eprintln!("error: cannot start the async runtime: {error}"))
        .ok()
}

/// Loads a scenario and applies `--slo` overrides.
fn load_scenario(name: &str, slo: Option<&str>) -> Result<Scenario, String> {
    let mut scenario = Scenario::load(name).map_err(|error| error.to_string())?;
    if let Some(overrides) = slo {
        scenario.slo.apply_overrides(overrides)?;
    }
    Ok(scenario)
}

/// Prints the report and returns its exit code (or a harness problem).
fn finish(
    result: Result<runner::RunOutput, runner::HarnessError>,
    out: Option<PathBuf>,
    json: bool,
) -> Exit {
    match result {
        Ok(output) => {
            if json {
                match serde_json::to_string_pretty(&output.report) {
                    Ok(text) => println!("{text}"),
                    Err(error) => eprintln!("error: {error}"),
                }
            } else {
                print!("{}", output.report.render());
            }
            if let Some(out) = out {
                eprintln!("artifacts in {}", out.display());
            }
            output.report.exit
        }
        Err(error) => {
            eprintln!("harness error: {error}");
            Exit::Harness
        }
    }
}

fn drill(
    inventory_path: &Path,
    scenario: &str,
    slo: Option<String>,
    seed: u64,
    duration: Option<Duration>,
    out: Option<PathBuf>,
    json: bool,
) -> Exit {
    let scenario = match load_scenario(scenario, slo.as_deref()) {
        Ok(scenario) => scenario,
        Err(error) => {
            eprintln!("error: {error}");
            return Exit::Harness;
        }
    };
    let inventory = match Inventory::load(inventory_path).and_then(|inventory| {
        inventory.check_scenario(&inventory_path.display().to_string(), &scenario)?;
        Ok(inventory)
    }) {
        Ok(inventory) => inventory,
        Err(error) => {
            eprintln!("error: {error}");
            return Exit::Harness;
        }
    };
    let Some(runtime) = runtime() else {
        return Exit::Harness;
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    eprintln!(
        "ktd-chaos: drill {} against {} with seed {seed} ({}); keys drill-{stamp}-key-N",
        scenario.name,
        inventory_path.display(),
        humantime::format_duration(duration.unwrap_or(scenario.duration))
    );
    let options = RunOptions {
        ktd: PathBuf::new(),
        seed,
        duration,
        out: out.clone(),
        mutation: None,
        key_prefix: format!("drill-{stamp}-"),
    };
    let result = runtime.block_on(runner::drill(&scenario, &options, inventory.topology()));
    finish(result, out, json)
}

#[allow(clippy::too_many_arguments)]
fn run(
    scenario: String,
    seed: u64,
    duration: Option<Duration>,
    out: Option<PathBuf>,
    ktd: Option<PathBuf>,
    mutation: Option<Mutation>,
    json: bool,
    slo: Option<String>,
) -> Exit {
    let scenario = match load_scenario(&scenario, slo.as_deref()) {
        Ok(scenario) => scenario,
        Err(error) => {
            eprintln!("error: {error}");
            return Exit::Harness;
        }
    };
    let ktd = match find_ktd(ktd.as_deref()) {
        Ok(ktd) => ktd,
        Err(error) => {
            eprintln!("error: {error}");
            return Exit::Harness;
        }
    };
    let Some(runtime) = runtime() else {
        return Exit::Harness;
    };
    eprintln!(
        "ktd-chaos: running {} with seed {seed} ({})",
        scenario.name,
        humantime::format_duration(duration.unwrap_or(scenario.duration))
    );
    let options = RunOptions {
        ktd,
        seed,
        duration,
        out: out.clone(),
        mutation,
        key_prefix: String::new(),
    };
    finish(
        runtime.block_on(runner::run(&scenario, &options)),
        out,
        json,
    )
}

fn replay(path: &Path, mutation: Option<Mutation>) -> Exit {
    let (history_path, final_path) = if path.is_dir() {
        (path.join("history.jsonl"), path.join("final.json"))
    } else {
        (path.to_path_buf(), path.with_file_name("final.json"))
    };
    let history = std::fs::read_to_string(&history_path)
        .map_err(|error| format!("read {}: {error}", history_path.display()))
        .and_then(|text| {
            History::from_jsonl(&text)
                .map_err(|error| format!("{}: {error}", history_path.display()))
        });
    let mut history = match history {
        Ok(history) => history,
        Err(error) => {
            eprintln!("error: {error}");
            return Exit::Harness;
        }
    };
    let mut final_state: FinalState = match std::fs::read_to_string(&final_path) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(state) => state,
            Err(error) => {
                eprintln!("error: {}: {error}", final_path.display());
                return Exit::Harness;
            }
        },
        Err(_) => {
            eprintln!(
                "note: no {}; checking the history alone",
                final_path.display()
            );
            FinalState::default()
        }
    };
    if let Some(mutation) = mutation {
        match positive_control::apply(mutation, &mut history, &mut final_state) {
            Some(description) => println!("POSITIVE CONTROL: {description}"),
            None => {
                eprintln!("error: nothing to mutate for {mutation:?}");
                return Exit::Harness;
            }
        }
    }
    let verdicts = check_all(&history, &final_state);
    let mut exit = Exit::Ok;
    println!("{} events", history.events.len());
    for verdict in &verdicts {
        println!(
            "  {:<28} {}",
            verdict.checker,
            if verdict.ok() { "ok" } else { "VIOLATED" }
        );
        for violation in verdict.violations.iter().take(10) {
            println!("      - {violation}");
        }
        if !verdict.ok() {
            exit = Exit::Violation;
        }
    }
    exit
}
