//! `cargo xtask bench`: runs the benchmarks and keeps their results under `target/bench/`.

use crate::process;
use crate::setup::{cargo, project_root};
use anyhow::Result;

/// Runs the host benchmark (`benches/host/`), printing its table and writing
/// `target/bench/host.json`.
pub fn host(quick: bool, full: bool, only: Option<&str>) -> Result<()> {
    let dir = project_root().join("target").join("bench");
    std::fs::create_dir_all(&dir)?;
    let json = dir.join("host.json");
    let mut command = cargo();
    command
        .args(["bench", "--quiet", "--bench", "host", "--"])
        .arg("--json")
        .arg(&json);
    if quick {
        command.arg("--quick");
    }
    if full {
        command.arg("--full");
    }
    if let Some(only) = only {
        command.args(["--only", only]);
    }
    process::run(&mut command)
}
