//! Facts about the machine: where binaries are, whether we are root, free ports.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (where `.tidemark/` and `target/` live).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root exists")
}

/// A free loopback port (racy in theory: another process may take it before the
/// server binds it; fine for local stacks and tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
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
