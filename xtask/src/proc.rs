//! Processes the stacks start: spawned detached (their own process group, so they
//! outlive `cargo xtask up` and ignore the terminal's Ctrl-C), tracked by pid files,
//! stopped by pid.

use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use std::os::unix::process::CommandExt;

/// Starts `cmd` in its own process group with stdout and stderr appended to `log`,
/// and records its pid in `pid_file`.
pub fn spawn_detached(cmd: &mut Command, log: &Path, pid_file: &Path) -> Result<u32> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {:?}", cmd.get_program()))?;
    let pid = child.id();
    fs::write(pid_file, format!("{pid}\n"))?;
    Ok(pid)
}

pub fn read_pid(pid_file: &Path) -> Option<u32> {
    fs::read_to_string(pid_file)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// True when `pid` runs and is not a zombie, and its command line mentions `name`
/// (so a recycled pid is never mistaken for ours).
pub fn alive(pid: u32, name: &str) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|s| s.split_whitespace().next());
    if matches!(state, Some("Z" | "X")) {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline).contains(name)
}

fn signal(pid: u32, sig: &str) {
    // `kill` the command keeps this crate free of `unsafe`.
    drop(
        Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .stderr(Stdio::null())
            .status(),
    );
}

/// Sends `sig`, waits up to `grace` for the process to exit, then SIGKILLs it.
pub async fn stop(pid: u32, name: &str, sig: &str, grace: Duration) -> Result<()> {
    if !alive(pid, name) {
        return Ok(());
    }
    let gone = || async { !alive(pid, name) };
    let every = Duration::from_millis(50);
    signal(pid, sig);
    if tidemark_launch::until(grace, every, gone).await {
        return Ok(());
    }
    signal(pid, "KILL");
    if tidemark_launch::until(Duration::from_secs(5), every, gone).await {
        return Ok(());
    }
    bail!("{name} (pid {pid}) survived SIGKILL")
}

/// Runs a command to completion, failing with its output when it fails.
/// Cargo, for a build or test run started by xtask, in the environment a shell's
/// `cargo` would have. `cargo xtask` runs xtask through `cargo run`, which gives
/// it `CARGO_MANIFEST_DIR` (xtask's folder) and the other `CARGO_PKG_*`-style
/// variables of a running crate; passed on, they reach every build script, and
/// `ring`'s tracks `CARGO_MANIFEST_DIR`: its fingerprint changed between a plain
/// `cargo build --release` and xtask's, so each rebuilt `ring` and everything
/// above it (polars included, ~35 min on two cores).
pub fn cargo() -> Command {
    let mut command = Command::new(env!("CARGO"));
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&name)
        {
            command.env_remove(name);
        }
    }
    command
}

pub fn run(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    stdout_of(cmd, &output)
}

/// A finished command's standard output, or an error with all it printed.
fn stdout_of(cmd: &Command, output: &std::process::Output) -> Result<String> {
    if !output.status.success() {
        bail!(
            "{:?} {:?} failed ({}):\n{}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The last `n` lines of a file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A process's peak resident memory so far (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    tidemark_platform::metrics::peak_resident_bytes(Some(pid))
}

/// Like [`run`], also returning the child's peak resident memory in bytes, read
/// from `/proc` every 20 ms while it runs (the high-water mark only rises, so
/// the last reading is the peak up to its last 20 ms).
pub async fn run_measured(cmd: Command) -> Result<(String, u64)> {
    let mut child = tokio::process::Command::from(cmd);
    let running = child
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {:?}", child.as_std().get_program()))?;
    let pid = running.id().context("the child has no pid")?;
    let output = running.wait_with_output();
    tokio::pin!(output);
    let mut peak = 0;
    let output = loop {
        if let Some(p) = peak_rss(pid) {
            peak = peak.max(p);
        }
        tokio::select! {
            output = &mut output => break output?,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    Ok((stdout_of(child.as_std(), &output)?, peak))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_measured_run_returns_its_output_and_peak_memory() {
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            "import time; x = bytearray(60_000_000); time.sleep(0.3); print('done')",
        ]);
        let (out, peak) = run_measured(cmd).await.unwrap();
        assert_eq!(out, "done\n");
        assert!(peak >= 60_000_000, "peak {peak}");

        let mut failing = Command::new("sh");
        failing.args(["-c", "echo oops >&2; exit 3"]);
        let error = run_measured(failing).await.unwrap_err().to_string();
        assert!(error.contains("oops") && error.contains('3'), "{error}");
    }
}
