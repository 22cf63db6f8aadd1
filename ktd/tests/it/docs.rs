//! The docs do what they say: every shell command in `README.md`, `ARCHITECTURE.md` and
//! `docs/**/*.md` is run or parse-checked against the real tools, the metrics catalogue names exactly the exported
//! series, every alert has a documented response, and every `DESIGN §…` / `akd-spec §…`
//! reference and relative link resolves. The conventions are in `docs/README.md`:
//!
//! - a ```` ```sh ```` block is checked: each command in it must be one this test knows how to
//!   check, or the test fails (tag the block ```` ```sh illustrative ```` instead);
//! - in a ```` ```sh illustrative ```` block, the `ktd`, `./x.sh`, `deploy/*.sh`, `ktd-chaos` and
//!   `cargo` commands are still parse-checked, the rest is shown only;
//! - an inline code span that starts with one of those commands is parse-checked unless it is a
//!   synopsis (`…`, `...`, `|`, `[`, `<`, `{`, or an upper-case placeholder such as `N`).
//!
//! How each command is checked:
//!
//! - `ktd publish | lookup | history | audit | epoch` in a checked block, without TLS flags and
//!   against the default address, run for real, in document order, against a `ktd dev` this
//!   test starts; every other `ktd` command runs as `ktd ARGS --help`, which clap parses up to
//!   `--help` (unknown flags, bad values and extra arguments fail);
//! - `ktd-chaos` (and `./x.sh chaos`) parse with `chaos_tests::cli::Cli`, and a named scenario,
//!   `--slo` overrides and a drill inventory load as `ktd-chaos` would load them;
//! - `./x.sh SUB`: `SUB` is one of the script's commands; `dev` and `ktd` are checked as `ktd`,
//!   `chaos` as `ktd-chaos`, `bench NAME` names a `[[bench]]` whose source reads every flag
//!   given (benches are not built by `cargo test`, so this one check is static);
//! - `deploy/*.sh`: the arguments match one of the usage lines in the script's header;
//! - `cargo`: the package, binary and bench named exist in the workspace.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chaos_tests::cli::{Cli as ChaosCli, Command as ChaosCommand};
use chaos_tests::inventory::Inventory;
use chaos_tests::scenario::Scenario;
use clap::Parser;
use clap::error::ErrorKind;

use ktd_testkit::process::KtdNode;
use ktd_testkit::with_deadline;

use crate::support::KTD;
use crate::support::metrics::ExportedMetrics;

/// The repository root.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the ktd crate sits in the repository")
        .to_path_buf()
}

/// `README.md`, `ARCHITECTURE.md`, then every `docs/**/*.md`, sorted: the order real commands
/// run in.
fn doc_files() -> Vec<PathBuf> {
    fn markdown_under(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("docs dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                markdown_under(&path, files);
            } else if path.extension().is_some_and(|ext| ext == "md") {
                files.push(path);
            }
        }
    }
    let root = repo_root();
    let mut files = Vec::new();
    markdown_under(&root.join("docs"), &mut files);
    files.sort();
    files.splice(0..0, [root.join("README.md"), root.join("ARCHITECTURE.md")]);
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Where a command was found, and how it must be checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// In a ```` ```sh ```` block: every command is checked.
    Checked,
    /// In a ```` ```sh illustrative ```` block: only commands this test knows are checked.
    Illustrative,
    /// An inline code span: parse-checked.
    Inline,
}

/// One command line from the docs.
#[derive(Debug)]
struct Snippet {
    /// `file:line`.
    place: String,
    kind: Kind,
    text: String,
}

/// The shell snippets of one Markdown file: the logical lines of `sh` blocks (continuation
/// lines joined) and the inline code spans that start with a command this test checks.
fn snippets(file: &str, markdown: &str) -> Vec<Snippet> {
    let mut found = Vec::new();
    // Prose with fenced lines blanked, so inline spans keep their line numbers.
    let mut prose: Vec<&str> = Vec::new();
    let mut fence: Option<(usize, Option<Kind>)> = None;
    let mut pending = String::new();
    let mut pending_line = 0;
    for (index, line) in markdown.lines().enumerate() {
        let line_no = index + 1;
        let trimmed = line.trim_start();
        let ticks = trimmed.chars().take_while(|c| *c == '`').count();
        match fence {
            Some((open_ticks, kind)) => {
                prose.push("");
                if ticks >= open_ticks && trimmed[ticks..].trim().is_empty() {
                    fence = None;
                    assert!(
                        pending.is_empty(),
                        "{file}:{pending_line}: a `\\` ends the block"
                    );
                    continue;
                }
                let Some(kind) = kind else { continue };
                if pending.is_empty() {
                    pending_line = line_no;
                }
                match trimmed.trim_end().strip_suffix('\\') {
                    Some(head) => {
                        pending.push_str(head.trim_end());
                        pending.push(' ');
                    }
                    None => {
                        pending.push_str(trimmed);
                        let text = std::mem::take(&mut pending);
                        if !text.trim().is_empty() {
                            found.push(Snippet {
                                place: format!("{file}:{pending_line}"),
                                kind,
                                text,
                            });
                        }
                    }
                }
            }
            None if ticks >= 3 => {
                prose.push("");
                let info = trimmed[ticks..].trim();
                let kind = match info {
                    "sh" => Some(Kind::Checked),
                    "sh illustrative" => Some(Kind::Illustrative),
                    "" => panic!(
                        "{file}:{line_no}: a code block needs a language: `sh` (checked), \
                         `sh illustrative`, `text`, `toml`, `rust`, ..."
                    ),
                    _ if ["bash", "shell", "console", "zsh", "sh-session"].contains(&info)
                        || info.starts_with("sh ") =>
                    {
                        panic!(
                            "{file}:{line_no}: shell blocks are `sh` (checked) or \
                             `sh illustrative`, not `{info}`"
                        )
                    }
                    _ => None,
                };
                fence = Some((ticks, kind));
            }
            None => prose.push(line),
        }
    }
    assert!(fence.is_none(), "{file}: a code block is not closed");
    for (line_no, span) in inline_spans(&prose) {
        let starts_with_command = ["ktd ", "./x.sh ", "deploy/", "ktd-chaos ", "cargo "]
            .iter()
            .any(|prefix| span.starts_with(prefix));
        let placeholder = span.split_whitespace().any(|word| {
            word.chars().any(|c| c.is_ascii_uppercase())
                && word
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "_:".contains(c))
        });
        let synopsis = placeholder
            || ["…", "...", "|", "[", "<", "{"]
                .iter()
                .any(|mark| span.contains(mark));
        let is_command = !span.starts_with("deploy/") || span.contains(".sh ");
        if starts_with_command && is_command && !synopsis {
            found.push(Snippet {
                place: format!("{file}:{line_no}"),
                kind: Kind::Inline,
                text: span,
            });
        }
    }
    found
}

/// The inline code spans of `lines` (a span may cross a line break) with their line numbers.
fn inline_spans(lines: &[&str]) -> Vec<(usize, String)> {
    let text = lines.join("\n");
    let bytes = text.as_bytes();
    let run_at = |at: usize| bytes[at..].iter().take_while(|b| **b == b'`').count();
    let mut spans = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] != b'`' {
            at += 1;
            continue;
        }
        let open = run_at(at);
        let content_start = at + open;
        let mut search = content_start;
        let mut close = None;
        while search < bytes.len() {
            if bytes[search] == b'`' {
                let run = run_at(search);
                if run == open {
                    close = Some(search);
                    break;
                }
                search += run;
            } else {
                search += 1;
            }
        }
        let Some(close) = close else {
            at = content_start;
            continue;
        };
        let line_no = text[..at].matches('\n').count() + 1;
        let content = text[content_start..close].replace('\n', " ");
        spans.push((line_no, content.trim().to_string()));
        at = close + open;
    }
    spans
}

/// Splits one shell line into simple commands at `;`, `&&`, `||`, `|` and `&`, keeping quotes
/// and `$( … )` whole and dropping a `#` comment.
fn simple_commands(line: &str) -> Vec<String> {
    let chars: Vec<char> = line.chars().collect();
    let (mut single, mut double, mut depth) = (false, false, 0usize);
    let mut commands = Vec::new();
    let mut current = String::new();
    let mut index = 0;
    while index < chars.len() {
        let c = chars[index];
        let next = chars.get(index + 1).copied();
        let prev = index.checked_sub(1).map(|i| chars[i]);
        let quoted = single || double || depth > 0;
        match c {
            '\'' if !double && depth == 0 => single = !single,
            '"' if !single => double = !double,
            '$' if !single && next == Some('(') => {
                depth += 1;
                current.push_str("$(");
                index += 2;
                continue;
            }
            ')' if depth > 0 && !single => depth -= 1,
            '#' if !quoted && prev.is_none_or(char::is_whitespace) => break,
            ';' | '|' | '&' if !quoted => {
                let redirect = c == '&' && (prev == Some('>') || next == Some('>'));
                if !redirect {
                    commands.push(std::mem::take(&mut current));
                    if next == Some(c) {
                        index += 1;
                    }
                    index += 1;
                    continue;
                }
            }
            _ => {}
        }
        current.push(c);
        index += 1;
    }
    commands.push(current);
    commands
        .into_iter()
        .map(|command| command.trim().to_string())
        .filter(|command| !command.is_empty())
        .collect()
}

/// The words of a simple command with their quotes removed; `$( … )` stays one word.
fn words(command: &str) -> Vec<String> {
    let (mut single, mut double, mut depth) = (false, false, 0usize);
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    let chars: Vec<char> = command.chars().collect();
    let mut index = 0;
    while index < chars.len() {
        let c = chars[index];
        match c {
            '\'' if !double && depth == 0 => {
                single = !single;
                in_word = true;
            }
            '"' if !single && depth == 0 => {
                double = !double;
                in_word = true;
            }
            '$' if !single && chars.get(index + 1) == Some(&'(') => {
                depth += 1;
                current.push_str("$(");
                in_word = true;
                index += 2;
                continue;
            }
            ')' if depth > 0 => {
                depth -= 1;
                current.push(c);
            }
            c if c.is_whitespace() && !single && !double && depth == 0 => {
                if in_word {
                    words.push(std::mem::take(&mut current));
                    in_word = false;
                }
            }
            c => {
                current.push(c);
                in_word = true;
            }
        }
        index += 1;
    }
    if in_word {
        words.push(current);
    }
    words
}

/// The commands inside `$( … )` substitutions of `word`.
fn substitutions(word: &str) -> Vec<String> {
    let mut inner = Vec::new();
    let mut rest = word;
    while let Some(start) = rest.find("$(") {
        let body = &rest[start + 2..];
        let mut depth = 1;
        let mut end = body.len();
        for (offset, c) in body.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = offset;
                        break;
                    }
                }
                _ => {}
            }
        }
        inner.push(body[..end].to_string());
        rest = &body[(end + 1).min(body.len())..];
    }
    inner
}

/// What a simple command runs.
#[derive(Debug)]
enum Program {
    /// Nothing to check: an assignment, `export`, a keyword such as `done`.
    Nothing,
    Ktd(Vec<String>),
    Xsh(Vec<String>),
    Chaos(Vec<String>),
    Cargo(Vec<String>),
    /// A script under `deploy/`, with its arguments.
    Script(String, Vec<String>),
    /// Anything else (`kubectl`, `docker`, `kill`, ...), by name.
    Other(String),
}

fn is_assignment(word: &str) -> bool {
    word.split_once('=').is_some_and(|(name, _)| {
        !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit())
    })
}

fn program(words: &[String]) -> Program {
    let mut words: Vec<String> = words.to_vec();
    // Redirections and their targets.
    let mut kept = Vec::new();
    let mut skip_next = false;
    for word in words.drain(..) {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        let redirect = word.trim_start_matches(['0', '1', '2', '&']);
        if redirect.starts_with('>') || redirect.starts_with('<') {
            skip_next = matches!(redirect, ">" | ">>" | "<");
            continue;
        }
        kept.push(word);
    }
    let mut rest = kept.as_slice();
    while let Some((first, tail)) = rest.split_first() {
        let keyword = [
            "until", "while", "if", "then", "do", "else", "!", "sudo", "exec", "time",
        ]
        .contains(&first.as_str());
        if keyword || is_assignment(first) {
            rest = tail;
        } else {
            break;
        }
    }
    let Some((first, args)) = rest.split_first() else {
        return Program::Nothing;
    };
    let args = args.to_vec();
    match first.as_str() {
        "done" | "fi" | "true" => Program::Nothing,
        "export" if args.iter().all(|arg| is_assignment(arg)) => Program::Nothing,
        "ktd" | "$KTD" | "${KTD}" => Program::Ktd(args),
        "./x.sh" | "x.sh" => Program::Xsh(args),
        "ktd-chaos" => Program::Chaos(args),
        "cargo" => Program::Cargo(args),
        script if script.trim_start_matches("./").starts_with("deploy/") => {
            Program::Script(script.trim_start_matches("./").to_string(), args)
        }
        other => Program::Other(other.to_string()),
    }
}

/// Every program a snippet runs, substitutions included.
fn programs(text: &str) -> Vec<Program> {
    let mut found = Vec::new();
    for command in simple_commands(text) {
        let words = words(&command);
        for word in &words {
            for inner in substitutions(word) {
                found.extend(programs(&inner));
            }
        }
        found.push(program(&words));
    }
    found
}

/// Runs `ktd ARGS` (or `ktd ARGS --help`) and returns its output; fails on a non-zero exit.
fn run_ktd(place: &str, args: &[String], addr: Option<&str>) -> String {
    let mut command = Command::new(KTD);
    for (name, _) in std::env::vars() {
        if name.starts_with("KTD_") {
            command.env_remove(name);
        }
    }
    match addr {
        Some(addr) => {
            let mut args = args.to_vec();
            for arg in &mut args {
                if arg == "http://127.0.0.1:8080" {
                    *arg = addr.to_string();
                }
            }
            command.args(args).env("KTD_ADDR", addr);
        }
        None => {
            command.args(args).arg("--help");
        }
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ktd");
    let started = Instant::now();
    while child.try_wait().expect("wait for ktd").is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!(
                "{place}: `ktd {}` did not finish within 30 s",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().expect("ktd output");
    assert!(
        output.status.success(),
        "{place}: `ktd {}{}` failed ({}):\n{}",
        args.join(" "),
        if addr.is_some() { "" } else { " --help" },
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `ktd` subcommand of `args` (global flags skipped), and whether the command may run for
/// real against the test's `ktd dev`: a client read or publish, no TLS, the default address.
fn ktd_runs_for_real(args: &[String]) -> bool {
    let mut index = 0;
    let mut default_addr = true;
    while let Some(arg) = args.get(index) {
        match arg.as_str() {
            "--addr" => {
                default_addr &=
                    args.get(index + 1).map(String::as_str) == Some("http://127.0.0.1:8080");
                index += 2;
            }
            "--tls-ca" | "--tls-cert" | "--tls-key" => return false,
            flag if flag.starts_with("--addr=") || flag.starts_with("--tls-") => return false,
            subcommand => {
                return default_addr
                    && ["publish", "lookup", "history", "audit", "epoch"].contains(&subcommand);
            }
        }
    }
    false
}

/// A workspace package: its name, directory and manifest.
struct Package {
    name: String,
    dir: PathBuf,
    manifest: toml::Table,
}

fn packages() -> Vec<Package> {
    let root = repo_root();
    let workspace: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .expect("Cargo.toml")
        .parse()
        .expect("workspace manifest");
    workspace["workspace"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|member| {
            let dir = root.join(member.as_str().expect("member path"));
            let manifest: toml::Table = std::fs::read_to_string(dir.join("Cargo.toml"))
                .expect("member manifest")
                .parse()
                .expect("member manifest parses");
            let name = manifest["package"]["name"]
                .as_str()
                .expect("name")
                .to_string();
            Package {
                name,
                dir,
                manifest,
            }
        })
        .collect()
}

impl Package {
    /// The names of its `[[bin]]`s (or the default binary) or `[[bench]]`es.
    fn targets(&self, kind: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .manifest
            .get(kind)
            .and_then(toml::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|target| target.get("name")?.as_str().map(str::to_string))
            .collect();
        if kind == "bin" && self.dir.join("src/main.rs").exists() && names.is_empty() {
            names.push(self.name.clone());
        }
        names
    }
}

/// Checks `./x.sh bench NAME ARGS`: the bench exists and its source reads every flag given.
fn check_bench(place: &str, packages: &[Package], name: &str, args: &[String]) {
    let package = packages
        .iter()
        .find(|package| package.targets("bench").iter().any(|bench| bench == name))
        .unwrap_or_else(|| panic!("{place}: no [[bench]] named {name}"));
    let source = std::fs::read_to_string(package.dir.join(format!("benches/{name}.rs")))
        .unwrap_or_else(|error| panic!("{place}: bench {name}'s source: {error}"));
    let args = match args.split_first() {
        Some((first, rest)) if first == "--" => rest,
        _ => args,
    };
    for flag in args.iter().filter(|arg| arg.starts_with("--")) {
        let flag_name = flag.trim_start_matches('-').split('=').next().unwrap_or("");
        let field = flag_name.replace('-', "_");
        let read_by_hand = source.contains(&format!("\"--{flag_name}\""));
        let clap_field = source.contains("#[arg(long")
            && source.lines().any(|line| {
                let line = line.trim_start();
                line.strip_prefix("pub ")
                    .unwrap_or(line)
                    .starts_with(&format!("{field}:"))
            });
        assert!(
            flag_name == "help" || read_by_hand || clap_field,
            "{place}: bench {} reads no {flag}",
            package.dir.join(format!("benches/{name}.rs")).display()
        );
    }
}

/// Checks `cargo build|run|test|bench -p PACKAGE --bin NAME --bench NAME --test NAME`: the
/// package and targets exist.
fn check_cargo(place: &str, packages: &[Package], args: &[String]) {
    let value = |flags: &[&str]| {
        args.iter()
            .position(|arg| flags.contains(&arg.as_str()))
            .and_then(|index| args.get(index + 1))
            .cloned()
    };
    let selected: Vec<&Package> = match value(&["-p", "--package"]) {
        Some(name) => {
            let package = packages
                .iter()
                .find(|package| package.name == name)
                .unwrap_or_else(|| panic!("{place}: no workspace package {name}"));
            vec![package]
        }
        None => packages.iter().collect(),
    };
    for (flag, kind) in [("--bin", "bin"), ("--bench", "bench")] {
        if let Some(name) = value(&[flag]) {
            assert!(
                selected
                    .iter()
                    .any(|package| package.targets(kind).contains(&name)),
                "{place}: cargo {flag} {name}: no such target"
            );
        }
    }
    if let Some(name) = value(&["--test"]) {
        assert!(
            selected
                .iter()
                .any(|package| package.dir.join(format!("tests/{name}")).exists()
                    || package.dir.join(format!("tests/{name}.rs")).exists()),
            "{place}: cargo --test {name}: no such test target"
        );
    }
}

/// Checks `deploy/SCRIPT ARGS` against the usage lines in the script's header
/// (`#   deploy/SCRIPT sub [OPTIONAL] REQUIRED   what it does`).
fn check_script(place: &str, script: &str, args: &[String]) {
    let text = std::fs::read_to_string(repo_root().join(script))
        .unwrap_or_else(|error| panic!("{place}: {script}: {error}"));
    let usages: Vec<Vec<String>> = text
        .lines()
        .take_while(|line| line.starts_with('#'))
        .filter_map(|line| {
            let line = line.trim_start_matches('#').trim();
            let synopsis = line.split("  ").next()?;
            let mut words = synopsis.split_whitespace();
            (words.next()? == script).then(|| words.map(str::to_string).collect())
        })
        .collect();
    assert!(!usages.is_empty(), "{place}: {script} has no usage lines");
    let fits = |usage: &[String]| {
        let mut given = args.iter();
        let mut pending = given.next();
        for token in usage {
            let optional = token.starts_with('[');
            let placeholder = optional
                || token
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c == '.');
            match pending {
                Some(arg) if !placeholder && arg != token => return false,
                Some(_) => pending = given.next(),
                None if optional => {}
                None => return false,
            }
        }
        pending.is_none()
    };
    assert!(
        usages.iter().any(|usage| fits(usage)),
        "{place}: `{script} {}` matches none of its usage lines {usages:?}",
        args.join(" ")
    );
    if script == "deploy/local-cluster.sh"
        && let [command, name, ..] = args
        && command == "relaunch"
    {
        assert!(
            name == "gateway" || name.starts_with("sequencer-") || name.starts_with("shard-s"),
            "{place}: local-cluster.sh starts no process named {name}"
        );
    }
}

/// Parses `ktd-chaos ARGS` and loads what the command names (scenario, `--slo`, inventory).
/// An inline mention (`ktd-chaos drill`) may leave out required flags; it is parsed up to an
/// appended `--help`, as `ktd` commands are.
fn check_chaos(place: &str, kind: Kind, args: &[String]) {
    let argv = || std::iter::once("ktd-chaos".to_string()).chain(args.to_vec());
    let cli = match ChaosCli::try_parse_from(argv()) {
        Ok(cli) => cli,
        Err(error)
            if kind == Kind::Inline
                && matches!(
                    error.kind(),
                    ErrorKind::MissingRequiredArgument
                        | ErrorKind::MissingSubcommand
                        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                ) =>
        {
            let help = ChaosCli::try_parse_from(argv().chain(["--help".to_string()]))
                .expect_err("--help stops the parse");
            assert_eq!(
                help.kind(),
                ErrorKind::DisplayHelp,
                "{place}: ktd-chaos {}: {help}",
                args.join(" ")
            );
            return;
        }
        Err(error) => panic!("{place}: ktd-chaos {}: {error}", args.join(" ")),
    };
    let (scenario, slo, inventory) = match &cli.command {
        ChaosCommand::Run { scenario, slo, .. } => (scenario, slo, None),
        ChaosCommand::Drill {
            scenario,
            slo,
            inventory,
            ..
        } => (scenario, slo, Some(inventory)),
        ChaosCommand::List | ChaosCommand::Replay { .. } => return,
    };
    let mut loaded = Scenario::load(scenario)
        .unwrap_or_else(|error| panic!("{place}: scenario {scenario}: {error}"));
    if let Some(slo) = slo {
        loaded
            .slo
            .apply_overrides(slo)
            .unwrap_or_else(|error| panic!("{place}: --slo {slo}: {error}"));
    }
    if let Some(inventory) = inventory {
        let path = repo_root().join(inventory);
        Inventory::load(&path)
            .and_then(|loaded_inventory| {
                loaded_inventory.check_scenario(&inventory.display().to_string(), &loaded)
            })
            .unwrap_or_else(|error| panic!("{place}: inventory {}: {error}", path.display()));
    }
}

/// The commands `x.sh`'s `main` dispatches on.
fn xsh_commands() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join("x.sh")).expect("x.sh");
    let main = text.split("main() {").nth(1).expect("x.sh has a main");
    main.lines()
        .filter_map(|line| line.trim().split_once(')'))
        .map(|(arms, _)| arms)
        .filter(|arms| {
            !arms.is_empty()
                && arms
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || " |-".contains(c))
        })
        .flat_map(|arms| arms.split('|').map(|arm| arm.trim().to_string()))
        .collect()
}

/// What the checks did, for the summary line and the "nothing was skipped" assertions.
#[derive(Debug, Default)]
struct Tally {
    ran: usize,
    parsed: usize,
    shown: BTreeMap<String, usize>,
}

struct Checker {
    packages: Vec<Package>,
    xsh: BTreeSet<String>,
    /// The `ktd dev` real commands run against.
    dev_addr: String,
    tally: Tally,
}

impl Checker {
    fn check(&mut self, snippet: &Snippet) {
        for program in programs(&snippet.text) {
            self.check_program(snippet, program);
        }
    }

    fn check_program(&mut self, snippet: &Snippet, program: Program) {
        let place = &snippet.place;
        match program {
            Program::Nothing => {}
            Program::Ktd(args) => {
                if snippet.kind == Kind::Checked && ktd_runs_for_real(&args) {
                    run_ktd(place, &args, Some(&self.dev_addr));
                    self.tally.ran += 1;
                } else {
                    run_ktd(place, &args, None);
                    self.tally.parsed += 1;
                }
            }
            Program::Chaos(args) => {
                check_chaos(place, snippet.kind, &args);
                self.tally.parsed += 1;
            }
            Program::Xsh(args) => {
                let (subcommand, rest) = args
                    .split_first()
                    .unwrap_or_else(|| panic!("{place}: ./x.sh without a command"));
                assert!(
                    self.xsh.contains(subcommand),
                    "{place}: ./x.sh has no command {subcommand} (it has {:?})",
                    self.xsh
                );
                match subcommand.as_str() {
                    "dev" => {
                        let args: Vec<String> = std::iter::once("dev".to_string())
                            .chain(rest.to_vec())
                            .collect();
                        run_ktd(place, &args, None);
                    }
                    "ktd" => {
                        run_ktd(place, rest, None);
                    }
                    "chaos" => check_chaos(place, snippet.kind, rest),
                    "bench" => {
                        let (name, bench_args) = rest
                            .split_first()
                            .unwrap_or_else(|| panic!("{place}: ./x.sh bench without a name"));
                        check_bench(place, &self.packages, name, bench_args);
                    }
                    _ => assert!(
                        rest.is_empty(),
                        "{place}: ./x.sh {subcommand} takes no arguments"
                    ),
                }
                self.tally.parsed += 1;
            }
            Program::Cargo(args)
                if args.first().is_some_and(|sub| {
                    ["build", "run", "test", "bench"].contains(&sub.as_str())
                }) =>
            {
                check_cargo(place, &self.packages, &args);
                self.tally.parsed += 1;
            }
            Program::Cargo(args) => {
                let subcommand = args.first().cloned().unwrap_or_default();
                self.check_program(snippet, Program::Other(format!("cargo {subcommand}")));
            }
            Program::Script(script, args) => {
                check_script(place, &script, &args);
                self.tally.parsed += 1;
            }
            Program::Other(name) => {
                assert!(
                    snippet.kind != Kind::Checked,
                    "{place}: `{name}` in a checked block cannot be checked by this test: tag \
                     the block `sh illustrative` or move the command out of it:\n{}",
                    snippet.text
                );
                *self.tally.shown.entry(name).or_default() += 1;
            }
        }
    }
}

#[test]
fn every_documented_command_runs_or_parses() {
    with_deadline(Duration::from_secs(120), || async {
        let root = tempfile::tempdir().expect("temp dir");
        let mut dev = KtdNode::dev(
            KTD,
            root.path(),
            "127.0.0.61",
            &["--epoch-interval", "200ms"],
        );
        dev.spawn(&[]);
        let dev_addr = format!("http://{}", dev.addr);

        tracing::info!("--- extract the commands");
        let mut all = Vec::new();
        for file in doc_files() {
            let text = std::fs::read_to_string(&file).expect("read doc");
            all.extend(snippets(&relative(&file), &text));
        }
        assert!(all.len() > 50, "too few commands found: {all:?}");

        tracing::info!("--- wait for ktd dev at {dev_addr}");
        let started = Instant::now();
        while !Command::new(KTD)
            .args(["--addr", &dev_addr, "epoch"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run ktd epoch")
            .success()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "ktd dev did not answer:\n{}",
                dev.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        tracing::info!("--- run or parse every command, in document order");
        let mut checker = Checker {
            packages: packages(),
            xsh: xsh_commands(),
            dev_addr,
            tally: Tally::default(),
        };
        for snippet in &all {
            checker.check(snippet);
        }
        let tally = checker.tally;
        println!(
            "{} snippets: {} commands run against ktd dev, {} parsed; shown only: {:?}",
            all.len(),
            tally.ran,
            tally.parsed,
            tally.shown
        );
        assert!(
            tally.ran >= 6,
            "the quick-start flow did not run: {tally:?}"
        );
        assert!(tally.parsed >= 50, "too few commands parsed: {tally:?}");
    });
}

#[test]
fn the_checks_see_what_a_shell_would_run() {
    let names = |text: &str| -> Vec<String> {
        programs(text)
            .into_iter()
            .map(|program| format!("{program:?}"))
            .collect()
    };
    assert_eq!(
        names(r#"until ktd admin status --check >/dev/null; do sleep 1; done # wait"#),
        [
            r#"Ktd(["admin", "status", "--check"])"#,
            r#"Other("sleep")"#,
            "Nothing"
        ]
    );
    assert_eq!(
        names(r#"VRF=$($KTD keygen --public-key-of "/tmp/a b") ./x.sh dev &"#),
        [
            r#"Ktd(["keygen", "--public-key-of", "/tmp/a b"])"#,
            r#"Xsh(["dev"])"#
        ]
    );
    assert_eq!(
        names("kill -TERM \"$(cat x.pid)\" 2>&1 && deploy/local-cluster.sh relaunch gateway"),
        [
            r#"Other("cat")"#,
            r#"Other("kill")"#,
            r#"Script("deploy/local-cluster.sh", ["relaunch", "gateway"])"#
        ]
    );
    let markdown = "text `ktd epoch 3\n--wait` and `ktd admin status [-o json]`\n\n\
                    ```sh illustrative\nkubectl apply -k deploy/k8s \\\n  --dry-run\n```\n";
    let found = snippets("t.md", markdown);
    let found: Vec<(&str, Kind, &str)> = found
        .iter()
        .map(|snippet| (snippet.place.as_str(), snippet.kind, snippet.text.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (
                "t.md:5",
                Kind::Illustrative,
                "kubectl apply -k deploy/k8s --dry-run"
            ),
            ("t.md:1", Kind::Inline, "ktd epoch 3 --wait"),
        ]
    );
}

/// The series named in the first column of `docs/metrics.md`'s catalogue table.
fn catalogued_series() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo_root().join("docs/metrics.md")).expect("metrics.md");
    let table = text
        .split("| series | type | labels | process | meaning |")
        .nth(1)
        .expect("the catalogue table");
    table
        .lines()
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .flat_map(|line| {
            let first = line.split('|').nth(1).unwrap_or_default();
            first
                .split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_metrics_catalogue_names_exactly_the_exported_series() {
    let catalogued = catalogued_series();
    let exported = ExportedMetrics::scan();
    let missing: Vec<&String> = exported
        .names()
        .iter()
        .filter(|name| !catalogued.contains(*name))
        .collect();
    let stale: Vec<&String> = catalogued
        .iter()
        .filter(|name| !exported.contains(name))
        .collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/metrics.md: exported but not catalogued: {missing:?}; catalogued but not \
         exported: {stale:?}"
    );
}

#[test]
fn every_alert_rule_has_a_documented_response() {
    let root = repo_root();
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).expect("rules");
    let metrics = std::fs::read_to_string(root.join("docs/metrics.md")).expect("metrics.md");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for alert in alerts {
        assert!(
            metrics.contains(&format!("**{alert}**")),
            "docs/metrics.md says nothing about alert {alert}"
        );
    }
}

/// Every `.rs` and `.md` file of the repository (build output and hidden directories skipped).
fn source_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("dir").flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if path.is_dir() {
                walk(&path, files);
            } else if path
                .extension()
                .is_some_and(|ext| ext == "rs" || ext == "md")
            {
                files.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo_root(), &mut files);
    files
}

/// The section numbers of a Markdown file's headings (`## 4. The epoch pipeline` → `4`,
/// `### 10.1 Checklist` → `10.1`).
fn section_numbers(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter(|line| line.starts_with('#'))
        .filter_map(|line| line.trim_start_matches('#').split_whitespace().next())
        .map(|number| number.trim_end_matches('.').to_string())
        .filter(|number| number.starts_with(|c: char| c.is_ascii_digit()))
        .collect()
}

/// The section numbers cited after each `tag §` in `text`: `akd-spec §3.2–3.3, §10.1` gives
/// 3.2, 3.3 and 10.1.
fn citations(text: &str, tag: &str) -> Vec<String> {
    let mut cited = Vec::new();
    for (index, _) in text.match_indices(&format!("{tag} §")) {
        let mut rest = &text[index + tag.len() + " §".len()..];
        loop {
            let number: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let number = number.trim_end_matches('.').to_string();
            if number.is_empty() {
                break;
            }
            rest = &rest[number.len()..];
            cited.push(number);
            let next = ["–", ", §", "-"]
                .iter()
                .find_map(|separator| rest.strip_prefix(separator));
            match next {
                Some(after) if after.starts_with(|c: char| c.is_ascii_digit()) => rest = after,
                _ => break,
            }
        }
    }
    cited
}

#[test]
fn spec_citations_and_relative_links_resolve() {
    let root = repo_root();
    let design =
        section_numbers(&std::fs::read_to_string(root.join("docs/design.md")).expect("design"));
    let spec =
        section_numbers(&std::fs::read_to_string(root.join("docs/akd-spec.md")).expect("spec"));
    let mut problems = Vec::new();
    let mut cited = 0;
    for file in source_files() {
        let text = std::fs::read_to_string(&file).expect("source");
        let name = relative(&file);
        for (tag, sections, doc) in [
            ("DESIGN", &design, "docs/design.md"),
            ("akd-spec", &spec, "docs/akd-spec.md"),
        ] {
            for section in citations(&text, tag) {
                cited += 1;
                if !sections.contains(&section) {
                    problems.push(format!("{name}: {tag} §{section} is no section of {doc}"));
                }
            }
        }
        if text.contains(&["..", "shared", ""].join("/")) {
            problems.push(format!(
                "{name}: cites a file outside the repository (../shared)"
            ));
        }
        // Recorded benchmark reports link files that were not kept; they are records.
        let written_docs = !name.starts_with("bench-results/");
        if written_docs && file.extension().is_some_and(|ext| ext == "md") {
            for target in text
                .split("](")
                .skip(1)
                .filter_map(|rest| rest.split(')').next())
            {
                let path = target.split('#').next().unwrap_or_default();
                if path.is_empty() || path.contains("://") {
                    continue;
                }
                if !file.parent().expect("dir").join(path).exists() {
                    problems.push(format!("{name}: broken link {target}"));
                }
            }
        }
    }
    assert!(cited >= 20, "only {cited} spec citations found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
