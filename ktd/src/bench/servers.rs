//! Which local server processes `ktd bench` samples for CPU and RSS: `--server-pid NAME=PID`
//! and the `NAME.pid` files of `--server-pid-dir` (the local cluster's).

use anyhow::Context;

/// Parses `NAME=PID`.
pub fn parse_server_pid(text: &str) -> Result<(String, i32), String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected NAME=PID"))?;
    let pid = pid
        .parse::<i32>()
        .ok()
        .filter(|pid| *pid > 0)
        .ok_or_else(|| format!("{text:?}: {pid:?} is not a process id"))?;
    Ok((name.to_string(), pid))
}

/// `NAME.pid` files in `dir` → (NAME, pid).
pub fn server_pids(dir: &std::path::Path) -> anyhow::Result<Vec<(String, i32)>> {
    let mut servers = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".pid"))
        else {
            continue;
        };
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let pid = text
            .trim()
            .parse::<i32>()
            .with_context(|| format!("{}: not a process id", path.display()))?;
        servers.push((name.to_string(), pid));
    }
    servers.sort();
    Ok(servers)
}
