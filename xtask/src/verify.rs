//! `cargo xtask verify`: runs `tidemark-verify` (the reconciliation binary, which
//! needs no source tree) against the running `up` stack, with its addresses and
//! read key.

use std::collections::HashMap;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::stack::{Kind, Stack};

pub fn verify(days: i64) -> Result<()> {
    let stack = Stack::new(Kind::Up);
    let env: HashMap<String, String> = stack.read_env().into_iter().collect();
    let var = |k: &str| {
        env.get(k).cloned().with_context(|| {
            format!(
                "{k} is missing from {}: is the stack up?",
                stack.env_file().display()
            )
        })
    };
    let status = crate::proc::cargo()
        .args(["build", "--quiet", "--bin", "tidemark-verify"])
        .current_dir(&stack.root)
        .status()?;
    if !status.success() {
        bail!("cargo build --bin tidemark-verify failed");
    }
    let status = Command::new(crate::up::binary(&stack, "verify", false))
        .args(["--days", &days.to_string()])
        .envs(crate::up::service_env(&stack, &[]))
        .env("TIDEMARK_VERIFY__SERVING_URL", var("TIDEMARK_SERVING_URL")?)
        .env("TIDEMARK_VERIFY__READ_KEY", var("TIDEMARK_READ_KEY")?)
        .env("TIDEMARK_TELEMETRY__LOG_FILTER", "warn")
        .status()
        .context("running tidemark-verify")?;
    if !status.success() {
        bail!("tidemark-verify found drift or failed ({status})");
    }
    Ok(())
}
