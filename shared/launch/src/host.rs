//! Facts about the machine: where binaries are, whether we are root, free ports.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};

/// The workspace root (where `.tidemark/` and `target/` live).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root exists")
}

/// A free loopback port for a server to listen on, drawn at random from below
/// Linux's ephemeral range (32768–60999 by default). `bind(port 0)` would hand out
/// a port from that range and release it, and until the server binds it any
/// outgoing connection on the machine may take it as its local port (a private
/// ClickHouse under the suite's load once never answered; its error log was not
/// kept, and this is the likeliest cause). Still
/// racy in theory (another process may bind the port first); never the same
/// port twice within one process.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    const PORTS: std::ops::Range<u16> = 20_000..32_768;
    let mut given = GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
    let random = RandomState::new();
    let span = u64::from(PORTS.end - PORTS.start);
    let port = (0u32..10_000)
        .map(|draw| PORTS.start + u16::try_from(random.hash_one(draw) % span).expect("in range"))
        .find(|port| !given.contains(port) && TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free loopback port below the ephemeral range");
    given.insert(port);
    port
}

/// The user id and group id of `user`, if the user exists.
pub fn user_ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        out.status.success().then_some(())?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The `nice` value the real-time path (Redis and the speed consumer) runs at
/// when the stacks start it: above everything else on a machine it shares.
///
/// On two cores at 20,000 orders/s offered, Postgres and ingest keep the cores
/// busy, and the kernel's fair share gave Redis and the speed consumer — one
/// runnable task among dozens — too little to keep up, though they needed about
/// a sixth of the machine: the speed layer fell 33–37 s behind in a minute
/// (`bench speed`, 2026-12-04); with these two at −10 (nothing else changed) its lag
/// stayed flat, at most 0.46–0.61 s in four runs. A deployment on shared hosts does the same
/// (systemd's `Nice=`, a container's CPU shares).
pub const REAL_TIME_NICE: i32 = -10;

/// The services on the real-time path (Redis, a server, is the other).
pub const REAL_TIME_SERVICES: [&str; 1] = ["speed"];

/// `command`, which starts Tidemark's `service`, at that service's priority:
/// [`prioritized`] for those on the real-time path, as it is for the others.
pub fn at_service_priority(service: &str, command: Command) -> Command {
    if REAL_TIME_SERVICES.contains(&service) {
        prioritized(command)
    } else {
        command
    }
}

/// `command` to run at [`REAL_TIME_NICE`], through `nice`; as it is when this
/// process may not raise a priority (not root) or `nice` is missing.
pub fn prioritized(command: Command) -> Command {
    let Some(nice) = which("nice").filter(|_| is_root()) else {
        return command;
    };
    let mut wrapped = Command::new(nice);
    wrapped
        .args(["-n", &REAL_TIME_NICE.to_string()])
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// A command on `PATH` (or in `/usr/sbin`, `/usr/bin`).
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Where `cargo install` puts binaries.
pub fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin").join(name)
}

/// The newest installed PostgreSQL's binary directory.
pub fn postgres_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin/initdb")).exists())
        .collect();
    versions.sort_unstable();
    versions
        .last()
        .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prioritized_command_runs_at_the_real_time_nice_with_its_environment() {
        let mut command = Command::new("sleep");
        command.arg("30").env("TIDEMARK_PRIORITY_PROBE", "kept");
        let mut child = prioritized(command).spawn().unwrap();
        let pid = child.id();
        // `nice` execs the command: the pid becomes `sleep` once it has.
        let exec = std::time::Instant::now();
        let (stat, environ) = loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            // Mid-exec the environment reads empty.
            let done = stat.contains("(sleep)") && !environ.is_empty();
            if done || exec.elapsed().as_secs() >= 10 {
                break (stat, environ);
            }
            std::thread::yield_now();
        };
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(stat.contains("(sleep)"), "{stat}");
        // Field 19 of /proc/<pid>/stat, the 17th after the name's ')'.
        let nice: i32 = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .nth(16)
            .unwrap()
            .parse()
            .unwrap();
        let expected = if is_root() { REAL_TIME_NICE } else { 0 };
        assert_eq!(nice, expected);
        assert!(
            String::from_utf8_lossy(&environ).contains("TIDEMARK_PRIORITY_PROBE=kept"),
            "the environment was passed on"
        );
    }

    #[test]
    fn free_ports_are_below_the_ephemeral_range_distinct_and_bindable() {
        let ports: BTreeSet<u16> = (0..200).map(|_| free_port()).collect();
        assert_eq!(ports.len(), 200, "a port was handed out twice");
        for port in ports {
            assert!((20_000..32_768).contains(&port), "{port}");
            TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }
}
