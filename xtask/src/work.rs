//! `cargo xtask bench work`: the driver's own instructions per operation, counted by
//! callgrind in `benches/driver_work.rs` (a one-byte round trip, a connect/close cycle).
//! Unlike the timed benchmarks, the counts do not move with the machine's load, so a
//! change to the per-poll or per-connection work can be compared between two builds on a
//! busy machine.

use crate::process;
use crate::setup::{cargo, project_root};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// Operations per workload: enough that bring-up and the first connection are noise.
const OPERATIONS: u64 = 1000;
/// The workloads of `benches/driver_work.rs` and what one operation is.
const WORKLOADS: [(&str, &str); 3] = [
    ("pingpong", "round trip"),
    ("cycles", "connect/close"),
    ("idle", "turn of recv and poll with nothing arriving"),
];

/// Builds `benches/driver_work.rs`, runs each workload under callgrind counting only the
/// driver's calls and prints instructions per operation.
pub fn run() -> Result<()> {
    let valgrind = crate::setup::ensure_valgrind()?;
    let program = build()?;
    let dir = project_root().join("target").join("bench");
    std::fs::create_dir_all(&dir)?;
    for (workload, unit) in WORKLOADS {
        let out = dir.join(format!("callgrind.{workload}.out"));
        let log = process::output(
            Command::new(&valgrind)
                .arg("--tool=callgrind")
                .arg("--toggle-collect=driver_work::in_driver*")
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg(&program)
                .arg(workload)
                .arg(OPERATIONS.to_string()),
        )?;
        let total = collected(&std::fs::read_to_string(&out)?)
            .with_context(|| format!("no totals in {}:\n{log}", out.display()))?;
        let per_operation = total as f64 / OPERATIONS as f64;
        println!(
            "{workload:>9}: {per_operation:>7.0} instructions in the driver per {unit} \
             ({} for {OPERATIONS}; callgrind_annotate {})",
            total,
            out.display()
        );
    }
    Ok(())
}

/// Builds the program in release mode and returns its path.
fn build() -> Result<PathBuf> {
    let output = process::output(cargo().args([
        "bench",
        "--no-run",
        "--message-format=json",
        "--features",
        "testing",
        "--bench",
        "driver_work",
    ]))?;
    output
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["name"] == "driver_work")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .context("cargo did not name the driver_work executable")
}

/// The instruction count of a callgrind output file (its `totals:` or `summary:` line).
fn collected(callgrind_out: &str) -> Option<u64> {
    callgrind_out.lines().find_map(|line| {
        let value = line
            .strip_prefix("totals:")
            .or_else(|| line.strip_prefix("summary:"))?;
        value.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::collected;

    #[test]
    fn reads_the_totals_line() {
        assert_eq!(
            collected("events: Ir\nfn=main\n1 5\ntotals: 4240015\n"),
            Some(4_240_015)
        );
        assert_eq!(collected("summary: 12\n"), Some(12));
        assert_eq!(collected("events: Ir\n"), None);
    }
}
