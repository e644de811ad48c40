//! Installs what the stacks need and is missing: servers from Debian packages,
//! the S3-compatible server and the test runner from crates.io (pinned).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use tidemark_launch::{cargo_bin, is_root, postgres_bin_dir, which};

use crate::proc::run;

/// The S3-compatible server: s3s-fs, pinned (0.15+ needs a newer rustc).
pub const S3S_FS_VERSION: &str = "0.14.1";

/// The test runner the suite's schedule (`.config/nextest.toml`, which needs 0.9.91
/// or newer for test priorities) is written for.
pub const NEXTEST_VERSION: &str = "0.9.143";

struct Package {
    /// Debian package.
    apt: &'static str,
    installed: fn() -> bool,
}

const PACKAGES: &[Package] = &[
    Package {
        apt: "postgresql",
        installed: || postgres_bin_dir().is_some(),
    },
    Package {
        apt: "redis-server",
        installed: || which("redis-server").is_some(),
    },
    Package {
        apt: "clickhouse-server",
        installed: || which("clickhouse-server").is_some(),
    },
    Package {
        apt: "clickhouse-client",
        installed: || which("clickhouse-client").is_some(),
    },
    Package {
        apt: "prometheus",
        installed: || which("prometheus").is_some(),
    },
    Package {
        apt: "prometheus-alertmanager",
        installed: || which("prometheus-alertmanager").is_some(),
    },
    // Replicas of ingest and serving behind a load balancer (RELIABILITY.md R20).
    Package {
        apt: "haproxy",
        installed: || which("haproxy").is_some(),
    },
    // ClickHouse's replicas are coordinated by ZooKeeper (with its Java runtime).
    Package {
        apt: "zookeeper",
        installed: || std::path::Path::new("/usr/share/java/zookeeper.jar").exists(),
    },
    // The page's test drives Chromium through its WebDriver.
    Package {
        apt: "chromium",
        installed: || which("chromium").is_some(),
    },
    Package {
        apt: "chromium-driver",
        installed: || which("chromedriver").is_some(),
    },
    Package {
        apt: "docker-compose",
        installed: || which("docker-compose").is_some(),
    },
    // Virtualenvs for the PyPI tools: schemathesis (tests), DuckDB (benchmarks).
    Package {
        apt: "python3-venv",
        installed: || run(Command::new("python3").args(["-c", "import ensurepip, venv"])).is_ok(),
    },
];

/// Schemathesis from PyPI, pinned: the API fuzzer the tests run against each
/// OpenAPI spec (RELIABILITY.md R14).
pub const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// Installs schemathesis into `.tidemark/tools/schemathesis` if it is not there,
/// and returns the path of its command.
pub fn schemathesis() -> Result<PathBuf> {
    let venv = tidemark_launch::workspace_root().join(".tidemark/tools/schemathesis");
    let st = venv.join("bin/schemathesis");
    let version = SCHEMATHESIS.split("==").nth(1).unwrap_or_default();
    if run(Command::new(&st).arg("--version")).is_ok_and(|v| v.contains(version)) {
        return Ok(st);
    }
    eprintln!("xtask: installing {SCHEMATHESIS} from PyPI (~15 s)");
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args(["install", "--quiet", SCHEMATHESIS]))?;
    Ok(st)
}

fn s3s_fs_installed() -> bool {
    cargo_bin("s3s-fs").exists()
        && run(Command::new("cargo").args(["install", "--list"]))
            .is_ok_and(|list| list.contains(&format!("s3s-fs v{S3S_FS_VERSION}:")))
}

pub fn nextest_installed() -> bool {
    run(Command::new("cargo").args(["nextest", "--version"])).is_ok()
}

/// cargo-nextest, which runs the suite on its schedule: timing figures alone,
/// CPU-heavy tests two at a time. Best effort: without it `cargo xtask test` runs
/// `cargo test`, unscheduled.
fn ensure_nextest() {
    if nextest_installed() {
        return;
    }
    eprintln!("xtask: installing cargo-nextest {NEXTEST_VERSION} (cargo install, a few minutes)");
    let installed = Command::new("cargo")
        .args([
            "install",
            &format!("cargo-nextest@{NEXTEST_VERSION}"),
            "--locked",
        ])
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!(
            "xtask: cargo-nextest could not be installed; the suite runs under `cargo test` \
             without its schedule (timing figures may be measured beside other tests)"
        );
    }
}

/// Installs whatever is missing; without root, prints the exact commands instead.
pub fn ensure() -> Result<()> {
    ensure_nextest();
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|p| !(p.installed)())
        .map(|p| p.apt)
        .collect();
    let need_s3 = !s3s_fs_installed();
    if missing.is_empty() && !need_s3 {
        return Ok(());
    }
    let apt_line = format!(
        "apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    let cargo_line =
        format!("cargo install s3s-fs@{S3S_FS_VERSION} --features binary --locked --force");
    if !is_root() {
        let mut msg = String::from("Tidemark needs these installed first (run as root):\n");
        if !missing.is_empty() {
            msg += &format!("  sudo apt-get update && sudo {apt_line}\n");
        }
        if need_s3 {
            msg += &format!("  {cargo_line}\n");
        }
        bail!(msg);
    }
    if !missing.is_empty() {
        eprintln!("xtask: installing {} (apt-get)", missing.join(", "));
        // Keep Debian from starting system-wide copies of these servers: the stacks
        // run their own on other ports.
        let policy = PathBuf::from("/usr/sbin/policy-rc.d");
        let own_policy = !policy.exists();
        if own_policy {
            std::fs::write(&policy, "#!/bin/sh\nexit 101\n")?;
            run(Command::new("chmod").args(["+x", "/usr/sbin/policy-rc.d"]))?;
        }
        let result = run(Command::new("apt-get").args(["update", "-qq"])).and_then(|_| {
            run(Command::new("sh")
                .arg("-c")
                .arg(format!("{apt_line} -qq"))
                .env("DEBIAN_FRONTEND", "noninteractive"))
        });
        if own_policy {
            std::fs::remove_file(&policy)?;
        }
        result?;
    }
    if need_s3 {
        eprintln!("xtask: installing s3s-fs {S3S_FS_VERSION} (cargo install, ~2 minutes)");
        let status = Command::new("cargo")
            .args([
                "install",
                &format!("s3s-fs@{S3S_FS_VERSION}"),
                "--features",
                "binary",
                "--locked",
                "--force",
            ])
            .env_remove("CARGO_TARGET_DIR")
            .status()?;
        if !status.success() {
            bail!("cargo install s3s-fs failed");
        }
    }
    Ok(())
}
