//! Cargo invocations: building the bare-metal guests and the host-side checks and tests.

use crate::process;
use crate::setup::{cargo, project_root};
use crate::vm::Arch;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// The x86-64 target of the example guests.
pub const GUEST_TARGET: &str = "x86_64-unknown-none";
/// The aarch64 target of the example guests (QEMU `virt`).
const OTHER_TARGET: &str = "aarch64-unknown-none";

/// Builds example `name` for `arch` (release) and returns the ELF's path.
pub fn build_example(name: &str, arch: Arch) -> Result<PathBuf> {
    let target = arch.target();
    println!("build: example {name} for {target}");
    let mut command = cargo();
    command.args([
        "build",
        "--quiet",
        "--release",
        "--target",
        target,
        "--example",
        name,
    ]);
    // The async echo guest needs the driver's `async` feature (Cargo.toml).
    if name == "async_echo" {
        command.args(["--features", "async"]);
    }
    process::run(&mut command)?;
    let elf = project_root()
        .join("target")
        .join(target)
        .join("release")
        .join("examples")
        .join(name);
    anyhow::ensure!(elf.exists(), "{} missing after the build", elf.display());
    Ok(elf)
}

/// One host-side step of `cargo xtask test`.
pub struct Step {
    /// What it checks, for the summary.
    pub name: String,
    command: Command,
}

impl Step {
    fn cargo(name: &str, args: &[&str]) -> Self {
        let mut command = cargo();
        command.args(args);
        Step {
            name: name.to_string(),
            command,
        }
    }

    /// Runs the step; `Ok(false)` when it ran and failed.
    pub fn run(mut self) -> Result<bool> {
        println!("\n=== {}", self.name);
        let status = self
            .command
            .status()
            .with_context(|| format!("running {:?}", self.command))?;
        Ok(status.success())
    }
}

/// The host-side steps: formatting, lints (the guest examples for both bare-metal
/// targets), builds for both bare-metal targets, host unit
/// and device-model tests (with doctests), docs, and the same tests under Miri when asked.
pub fn host_steps(miri: bool) -> Vec<Step> {
    let mut steps = vec![
        Step::cargo("rustfmt", &["fmt", "--all", "--check"]),
        Step::cargo(
            "clippy (host, all targets)",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--quiet",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    // Both bare-metal targets: the examples linted (with the async guest), the library
    // built.
    for target in [GUEST_TARGET, OTHER_TARGET] {
        steps.push(Step::cargo(
            &format!("clippy (guest examples, {target})"),
            &[
                "clippy",
                "--release",
                "--quiet",
                "--target",
                target,
                "--examples",
                "--features",
                "async",
                "--",
                "-D",
                "warnings",
            ],
        ));
        steps.push(Step::cargo(
            &format!("library build for {target}"),
            &["build", "--quiet", "--lib", "--target", target],
        ));
    }
    steps.push(Step::cargo(
        "host tests (unit, device model, doctests)",
        &["test", "--workspace", "--all-features"],
    ));
    let mut doc = Step::cargo(
        "documentation (no warnings)",
        &["doc", "--quiet", "--no-deps", "--all-features", "--lib"],
    );
    doc.command.env("RUSTDOCFLAGS", "-D warnings");
    steps.push(doc);
    if miri {
        steps.push(miri_step());
    }
    steps
}

/// The fuzz targets' stable replay: fixed pseudo-random inputs and every saved input
/// (`fuzz/regressions/`), as tests of the `fuzz/` crate.
pub fn fuzz_replay_step() -> Step {
    let mut command = cargo();
    command.args([
        "test",
        "--release",
        "--quiet",
        "--manifest-path",
        "fuzz/Cargo.toml",
    ]);
    Step {
        name: "fuzz targets replayed (stable)".to_string(),
        command,
    }
}

/// Fuzz targets in `fuzz/`, each run briefly under libFuzzer.
pub const FUZZ_TARGETS: &[&str] = &["rx_packets", "config_space"];

/// `cargo fuzz run <target>` for `seconds`, with the pinned cargo-fuzz and nightly.
pub fn fuzz_step(cargo_fuzz: &std::path::Path, target: &str, seconds: u32) -> Step {
    let mut command = Command::new(cargo_fuzz);
    command
        .current_dir(project_root().join("fuzz"))
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env("RUSTUP_TOOLCHAIN", "nightly")
        .args(["fuzz", "run", target, "--"])
        .arg(format!("-max_total_time={seconds}"));
    Step {
        name: format!("fuzz {target} for {seconds}s (nightly)"),
        command,
    }
}

/// The library's host tests under Miri, on the nightly toolchain.
fn miri_step() -> Step {
    let mut command = nightly_cargo();
    command
        .args([
            "miri",
            "test",
            "--features",
            "testing,async",
            "--lib",
            "--tests",
        ])
        // Miri's isolation forbids the clock and randomness proptest would like. Under
        // Miri one property case takes about a minute, so each property runs one case
        // there (the plain host run above does 1,000).
        .env("MIRIFLAGS", "-Zmiri-disable-isolation")
        .env("PROPTEST_CASES", "1");
    Step {
        name: "host tests under Miri (nightly)".to_string(),
        command,
    }
}

/// Makes sure `cargo +nightly miri` works: adds Miri to an installed nightly toolchain,
/// installing a minimal nightly only when there is none (an existing nightly is not
/// updated).
pub fn ensure_miri() -> Result<()> {
    let has_nightly = nightly_cargo()
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if has_nightly {
        println!("setup: adding miri and rust-src to the nightly toolchain");
        process::run(Command::new("rustup").args([
            "component",
            "add",
            "miri",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    } else {
        println!("setup: installing a minimal nightly toolchain with miri and rust-src");
        process::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "miri,rust-src",
        ]))?;
    }
    process::run(nightly_cargo().args(["miri", "setup"]))
}

/// `cargo +nightly` in the repository root, free of the pinned toolchain's environment.
fn nightly_cargo() -> Command {
    let mut command = Command::new("cargo");
    command
        .arg("+nightly")
        .current_dir(project_root())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC");
    command
}
