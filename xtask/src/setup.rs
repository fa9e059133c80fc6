//! Everything the host needs, installed on first use: the pinned Rust toolchain, QEMU
//! from Debian, and the vhost-user backend from crates.io in a folder of the project's.

use crate::process;
use crate::vm::Arch;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The host backend crate, pinned.
pub const BACKEND_CRATE: &str = "vhost-device-vsock";
/// Its version: the newest release on crates.io when this was written.
pub const BACKEND_VERSION: &str = "0.3.0";
/// The Debian package that provides `qemu-system-x86_64`.
const QEMU_PACKAGE: &str = "qemu-system-x86";
/// The QEMU binary.
const QEMU_BINARY: &str = "qemu-system-x86_64";
/// The Debian package that provides `qemu-system-aarch64`.
const QEMU_AARCH64_PACKAGE: &str = "qemu-system-arm";
/// The QEMU binary for the aarch64 guests.
pub const QEMU_AARCH64_BINARY: &str = "qemu-system-aarch64";

/// Host programs the VM runs need.
#[derive(Clone, Debug)]
pub struct Tools {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `qemu-system-aarch64`, when it is installed (or could be installed).
    pub qemu_aarch64: Option<PathBuf>,
    /// `vhost-device-vsock`.
    pub backend: PathBuf,
}

impl Tools {
    /// The QEMU binary for `arch` (for aarch64 without one, its bare name, which fails
    /// to start with a clear message).
    pub fn qemu_for(&self, arch: Arch) -> PathBuf {
        match arch {
            Arch::X86_64 => self.qemu.clone(),
            Arch::Aarch64 => self
                .qemu_aarch64
                .clone()
                .unwrap_or_else(|| QEMU_AARCH64_BINARY.into()),
        }
    }
}

/// The repository root (the parent of `xtask/`).
pub fn project_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Where xtask installs host tools: `target/tools`, never the user's global cargo.
pub fn tools_dir() -> PathBuf {
    project_root().join("target").join("tools")
}

/// A `cargo` command in the repository root, using the cargo that runs xtask.
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(project_root());
    command
}

/// What `rust-toolchain.toml` names.
#[derive(Debug, Default, serde::Deserialize)]
struct PinnedToolchain {
    channel: String,
    #[serde(default)]
    targets: Vec<String>,
    #[serde(default)]
    components: Vec<String>,
}

/// Installs what `rust-toolchain.toml` names: the toolchain, then its targets and
/// components one by one. `rustup toolchain install` leaves a toolchain that already
/// exists as it is (one linked to stable, say, without the bare-metal targets), so the
/// targets and components are added explicitly whatever state it is in.
pub fn ensure_toolchain() -> Result<()> {
    let path = project_root().join("rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    #[derive(serde::Deserialize)]
    struct File {
        toolchain: PinnedToolchain,
    }
    let pinned = toml::from_str::<File>(&text)
        .with_context(|| format!("parsing {}", path.display()))?
        .toolchain;
    println!("setup: rustup toolchain install (as rust-toolchain.toml names)");
    let rustup = || {
        let mut command = Command::new("rustup");
        command.current_dir(project_root());
        command
    };
    process::run(rustup().args(["toolchain", "install"]))?;
    if !pinned.targets.is_empty() {
        println!("setup: rustup target add {}", pinned.targets.join(" "));
        process::run(
            rustup()
                .args(["target", "add", "--toolchain", &pinned.channel])
                .args(&pinned.targets),
        )?;
    }
    if !pinned.components.is_empty() {
        println!(
            "setup: rustup component add {}",
            pinned.components.join(" ")
        );
        process::run(
            rustup()
                .args(["component", "add", "--toolchain", &pinned.channel])
                .args(&pinned.components),
        )?;
    }
    Ok(())
}

/// Finds `qemu-system-x86_64`, installing it with apt-get when it is missing and we run
/// as root.
pub fn ensure_qemu() -> Result<PathBuf> {
    ensure_apt_binary(QEMU_BINARY, QEMU_PACKAGE)
}

/// Finds `qemu-system-aarch64`, installing Debian's `qemu-system-arm` when it is missing
/// and we run as root.
pub fn ensure_qemu_aarch64() -> Result<PathBuf> {
    ensure_apt_binary(QEMU_AARCH64_BINARY, QEMU_AARCH64_PACKAGE)
}

/// Finds `valgrind` (for `cargo xtask bench work`), installing Debian's `valgrind` when
/// it is missing and we run as root.
pub fn ensure_valgrind() -> Result<PathBuf> {
    ensure_apt_binary("valgrind", "valgrind")
}

/// Finds `binary` on `PATH`, installing Debian's `package` with apt-get when it is
/// missing and we run as root; otherwise fails with the apt-get line to run.
fn ensure_apt_binary(binary: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = find_in_path(binary) {
        return Ok(path);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        bail!(
            "{binary} is not installed. Install it with:\n    \
             sudo apt-get install -y --no-install-recommends {package}\n\
             and run this command again."
        );
    }
    println!("setup: {binary} is missing; installing Debian's {package}");
    let apt = |args: &[&str]| {
        process::run(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    apt(&["update", "-q"])?;
    apt(&["install", "-y", "-q", "--no-install-recommends", package])?;
    find_in_path(binary).with_context(|| format!("{binary} still missing after apt-get"))
}

/// Finds the pinned backend in `target/tools`, installing it with `cargo install` first.
pub fn ensure_backend() -> Result<PathBuf> {
    ensure_crate_binary(BACKEND_CRATE, BACKEND_VERSION)
}

/// cargo-fuzz, for the fuzzing step of the tests.
const CARGO_FUZZ_CRATE: &str = "cargo-fuzz";
/// Its pinned version.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Finds the pinned cargo-fuzz in `target/tools`, installing it first.
pub fn ensure_cargo_fuzz() -> Result<PathBuf> {
    ensure_crate_binary(CARGO_FUZZ_CRATE, CARGO_FUZZ_VERSION)
}

/// The binary of crate `name` at `version` in `target/tools/bin`, installed from
/// crates.io with `cargo install --locked` when it is missing or another version.
fn ensure_crate_binary(name: &str, version: &str) -> Result<PathBuf> {
    let root = tools_dir();
    let binary = root.join("bin").join(name);
    if binary.exists() && installed_version(&root, name).as_deref() == Some(version) {
        return Ok(binary);
    }
    println!(
        "setup: installing {name} {version} from crates.io into {}",
        root.display()
    );
    process::run(
        cargo()
            .args(["install", "--locked", "--quiet", "--force"])
            .args([name, "--version", version, "--root"])
            .arg(&root),
    )?;
    anyhow::ensure!(
        binary.exists(),
        "{} missing after cargo install",
        binary.display()
    );
    Ok(binary)
}

/// The version of crate `name` recorded by `cargo install` in `<root>/.crates.toml`.
fn installed_version(root: &Path, name: &str) -> Option<String> {
    let manifest = std::fs::read_to_string(root.join(".crates.toml")).ok()?;
    let prefix = format!("\"{name} ");
    let start = manifest.find(&prefix)? + prefix.len();
    let version = manifest[start..].split_whitespace().next()?;
    Some(version.to_string())
}

/// The first file named `binary` in a folder of `PATH`.
pub fn find_in_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// Installs whatever is missing and prints the versions in use, and whether Cloud
/// Hypervisor is there (see [`crate::ch::find`]).
pub fn ensure_all() -> Result<Tools> {
    ensure_toolchain()?;
    let qemu = ensure_qemu()?;
    let backend = ensure_backend()?;
    let qemu_version = process::output(Command::new(&qemu).arg("--version"))?;
    println!(
        "setup: {} ({})",
        qemu_version.lines().next().unwrap_or("unknown version"),
        qemu.display()
    );
    // The aarch64 guests are optional: without their QEMU their suites print skip lines.
    let qemu_aarch64 = match ensure_qemu_aarch64() {
        Ok(path) => {
            let version = process::output(Command::new(&path).arg("--version"))?;
            println!(
                "setup: {} ({})",
                version.lines().next().unwrap_or("unknown version"),
                path.display()
            );
            Some(path)
        }
        Err(e) => {
            println!("setup: no {QEMU_AARCH64_BINARY}, so the aarch64 tests will skip: {e:#}");
            None
        }
    };
    println!(
        "setup: {BACKEND_CRATE} {BACKEND_VERSION} ({})",
        backend.display()
    );
    // Not installed by xtask (not on crates.io, not in Debian 12): found or not.
    match crate::ch::find() {
        Ok(binary) => println!(
            "setup: {} ({})",
            crate::ch::version(&binary),
            binary.display()
        ),
        Err(why) => println!("setup: {why}; the Cloud Hypervisor tests will be skipped"),
    }
    Ok(Tools {
        qemu,
        qemu_aarch64,
        backend,
    })
}
