//! `cargo xtask bench work`: the driver's own instructions per operation, counted by
//! callgrind in `benches/driver_work.rs` (a one-byte round trip, a connect/close cycle, an
//! idle turn, a MiB guest→host at the backend's 64 KiB window and at 256 KiB, and a MiB
//! host→guest, read as it arrives and read after a poll took the delivery).
//! Unlike the timed benchmarks, the counts do not move with the machine's load, so a
//! change to the per-poll or per-connection work can be compared between two builds on a
//! busy machine.

use crate::process;
use crate::setup::{cargo, project_root};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One run of `benches/driver_work.rs`.
struct Workload {
    /// The name of its callgrind output (`target/bench/callgrind.<name>.out`).
    name: &'static str,
    /// The program's arguments.
    args: &'static [&'static str],
    /// How many operations the run makes.
    operations: u64,
    /// What one operation is.
    unit: &'static str,
}

/// The workloads: enough operations that bring-up and the first connection are noise.
const WORKLOADS: [Workload; 8] = [
    Workload {
        name: "pingpong",
        args: &["pingpong", "1000"],
        operations: 1000,
        unit: "round trip",
    },
    Workload {
        name: "cycles",
        args: &["cycles", "1000"],
        operations: 1000,
        unit: "connect/close",
    },
    Workload {
        name: "idle",
        args: &["idle", "1000"],
        operations: 1000,
        unit: "turn of recv and poll with nothing arriving",
    },
    Workload {
        name: "bulk-64k",
        args: &["bulk", "16", "65536"],
        operations: 16,
        unit: "MiB guest->host in 64 KiB sends, 64 KiB window",
    },
    Workload {
        name: "bulk-256k",
        args: &["bulk", "16", "262144"],
        operations: 16,
        unit: "MiB guest->host in 64 KiB sends, 256 KiB window",
    },
    Workload {
        name: "bulk-in",
        args: &["bulk-in", "16"],
        operations: 16,
        unit: "MiB host->guest read with recv into 64 KiB",
    },
    Workload {
        name: "bulk-in-woken",
        args: &["bulk-in-woken", "16"],
        operations: 16,
        unit: "MiB host->guest, polled first after each delivery, then read with recv into 64 KiB",
    },
    Workload {
        name: "bulk-in-4k",
        args: &["bulk-in-4k", "16"],
        operations: 16,
        unit: "MiB host->guest read with recv into 4 KiB",
    },
];

/// glibc's large copies with `rep movsb`, which callgrind counts once per byte, would
/// make the copy in `send` the whole count: above this many bytes glibc uses its vector
/// loop instead, whose instructions callgrind counts as the CPU runs them.
const NO_REP_MOVSB: &str = "glibc.cpu.x86_rep_movsb_threshold=4294967295";

/// Builds `benches/driver_work.rs`, runs each workload under callgrind counting only the
/// driver's calls and prints instructions per operation, and for the transfers how many
/// of them were the copies (`memcpy`/`memmove`) and what the program counted. With
/// `base`, the same program also runs against the driver of that git revision, and each
/// line gets its counterpart.
pub fn run(base: Option<&str>) -> Result<()> {
    let valgrind = crate::setup::ensure_valgrind()?;
    let dir = project_root().join("target").join("bench");
    std::fs::create_dir_all(&dir)?;
    let program = build(&project_root(), None)?;
    let base_program = base
        .map(|revision| Ok::<_, anyhow::Error>((revision, build_base(revision, &dir)?)))
        .transpose()?;
    for workload in WORKLOADS {
        count(&valgrind, &program, &workload, &dir, None)?;
        if let Some((revision, program)) = &base_program {
            count(&valgrind, program, &workload, &dir, Some(revision))?;
        }
    }
    Ok(())
}

/// Runs one workload of `program` under callgrind and prints its counts; a base
/// `revision`'s lines and output file are named after it.
fn count(
    valgrind: &Path,
    program: &Path,
    workload: &Workload,
    dir: &Path,
    revision: Option<&str>,
) -> Result<()> {
    let (out, name) = match revision {
        None => (
            dir.join(format!("callgrind.{}.out", workload.name)),
            workload.name.to_string(),
        ),
        Some(revision) => (
            // A revision such as `origin/main` names a file, not a folder.
            dir.join(format!(
                "callgrind.{}.{}.out",
                workload.name,
                revision.replace('/', "_")
            )),
            format!("{revision}:{}", workload.name),
        ),
    };
    let log = process::output(
        Command::new(valgrind)
            .env("GLIBC_TUNABLES", NO_REP_MOVSB)
            .arg("--tool=callgrind")
            .arg("--toggle-collect=driver_work::in_driver*")
            .arg(format!("--callgrind-out-file={}", out.display()))
            .arg(program)
            .args(workload.args),
    )?;
    let profile = std::fs::read_to_string(&out)?;
    let total =
        collected(&profile).with_context(|| format!("no totals in {}:\n{log}", out.display()))?;
    let per_operation = total as f64 / workload.operations as f64;
    println!(
        "{name:>18}: {per_operation:>7.0} instructions in the driver per {} \
         ({total} for {}; callgrind_annotate {})",
        workload.unit,
        workload.operations,
        out.display()
    );
    if workload.args[0].starts_with("bulk") {
        let copies: u64 = self_costs(&profile)
            .iter()
            .filter(|(function, _)| function.contains("memcpy") || function.contains("memmove"))
            .map(|(_, cost)| cost)
            .sum();
        let counted = log
            .lines()
            .find(|line| line.contains("per MiB"))
            .unwrap_or("");
        println!(
            "{:>18}  of them {:.0} in the copies, {:.0} besides; {counted}",
            "",
            copies as f64 / workload.operations as f64,
            total.saturating_sub(copies) as f64 / workload.operations as f64,
        );
    }
    Ok(())
}

/// Checks out `revision` in a worktree under `dir`, puts this `benches/driver_work.rs`
/// into it (with its `[[bench]]` entry where the revision has none) and builds it there.
fn build_base(revision: &str, dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("base-tree");
    let root = project_root();
    if tree.exists() {
        process::output(Command::new("git").current_dir(&root).args([
            "worktree",
            "remove",
            "--force",
            &tree.display().to_string(),
        ]))?;
    }
    process::output(Command::new("git").current_dir(&root).args([
        "worktree",
        "add",
        "--detach",
        &tree.display().to_string(),
        revision,
    ]))?;
    std::fs::create_dir_all(tree.join("benches"))?;
    std::fs::copy(
        root.join("benches").join("driver_work.rs"),
        tree.join("benches").join("driver_work.rs"),
    )?;
    let manifest = tree.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)?;
    if !text.contains("name = \"driver_work\"") {
        std::fs::write(
            &manifest,
            format!(
                "{text}\n[[bench]]\nname = \"driver_work\"\nharness = false\n\
                 required-features = [\"testing\"]\n"
            ),
        )?;
    }
    build(&tree, Some(&dir.join("base-target")))
}

/// Builds the program of the tree at `root` in release mode (into `target_dir` when
/// given) and returns its path.
fn build(root: &Path, target_dir: Option<&Path>) -> Result<PathBuf> {
    let mut command = cargo();
    command.current_dir(root);
    if let Some(target_dir) = target_dir {
        command.env("CARGO_TARGET_DIR", target_dir);
    }
    let output = process::output(command.args([
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

/// Each function's own instructions in a callgrind output file (`fn=` blocks; the cost
/// line after a `calls=` line is the call's, not the caller's own). Function names are
/// compressed: `fn=(id) name` or `cfn=(id) name` the first time, `(id)` after.
fn self_costs(callgrind_out: &str) -> HashMap<String, u64> {
    let mut names: HashMap<&str, &str> = HashMap::new();
    let mut costs: HashMap<String, u64> = HashMap::new();
    let mut function: Option<&str> = None;
    let mut call_cost_next = false;
    for line in callgrind_out.lines() {
        // A called function's line defines its compressed name too.
        if let Some((id, name)) = line
            .strip_prefix("cfn=")
            .and_then(|spec| spec.split_once(' '))
        {
            names.insert(id, name);
            continue;
        }
        if let Some(spec) = line.strip_prefix("fn=") {
            function = Some(match spec.split_once(' ') {
                Some((id, name)) if id.starts_with('(') => {
                    names.insert(id, name);
                    name
                }
                None if spec.starts_with('(') => names.get(spec).copied().unwrap_or(spec),
                _ => spec,
            });
            continue;
        }
        if line.starts_with("calls=") {
            call_cost_next = true;
            continue;
        }
        let is_cost = line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c));
        if !is_cost {
            continue;
        }
        if std::mem::take(&mut call_cost_next) {
            continue;
        }
        let cost = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u64>().ok());
        if let (Some(function), Some(cost)) = (function, cost) {
            *costs.entry(function.to_string()).or_default() += cost;
        }
    }
    costs
}

#[cfg(test)]
mod tests {
    use super::{collected, self_costs};

    #[test]
    fn self_costs_leave_out_what_a_function_spends_in_its_calls() {
        let out = "events: Ir\n\
                   fn=(1) main\n\
                   10 5\n\
                   cfn=(2) memcpy\n\
                   calls=1 0\n\
                   11 300\n\
                   +2 7\n\
                   fn=(2)\n\
                   0 300\n\
                   fn=(1)\n\
                   -1 1\n\
                   totals: 313\n";
        let costs = self_costs(out);
        assert_eq!(costs.get("main"), Some(&13));
        assert_eq!(costs.get("memcpy"), Some(&300));
        assert_eq!(costs.len(), 2);
    }

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
