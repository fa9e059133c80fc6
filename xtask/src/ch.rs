//! Guests under Cloud Hypervisor, with its built-in virtio-vsock device.
//!
//! Cloud Hypervisor is not on crates.io or in Debian 12, so xtask does not install it; it
//! looks for the binary in `CLOUD_HYPERVISOR`, then on `PATH`, then at
//! `../shared/tools/cloud-hypervisor` beside the repository (see [`find`]). It needs
//! `/dev/kvm`.
//!
//! Each guest gets its own VM and vsock device: the device's host side is a Unix socket
//! that speaks the same `CONNECT <port>\n` / `OK <port>\n` protocol as vhost-device-vsock
//! (a guest connection to host port P arrives on `<socket>_P`). There are no siblings:
//! two Cloud Hypervisor guests cannot reach each other over vsock.

use crate::process;
use crate::setup::{find_in_path, project_root};
use crate::vm::{self, VmProcess};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The environment variable that names the Cloud Hypervisor binary.
pub const ENV: &str = "CLOUD_HYPERVISOR";
/// The binary's name on `PATH`.
const BINARY: &str = "cloud-hypervisor";
/// Guest RAM.
const GUEST_RAM: &str = "256M";

/// Finds Cloud Hypervisor: `CLOUD_HYPERVISOR=path` if set, else `cloud-hypervisor` on
/// `PATH`, else `../shared/tools/cloud-hypervisor` relative to the repository root.
/// `Err` says why there is none to use (also when `/dev/kvm` does not open).
pub fn find() -> Result<PathBuf, String> {
    let binary = if let Some(path) = std::env::var_os(ENV) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(format!("{ENV}={} is not a file", path.display()));
        }
        path
    } else if let Some(path) = find_in_path(BINARY) {
        path
    } else {
        let shared = project_root()
            .join("..")
            .join("shared")
            .join("tools")
            .join(BINARY);
        if !shared.is_file() {
            return Err(format!(
                "no Cloud Hypervisor: {ENV} is not set, {BINARY} is not on PATH and {} does not exist",
                shared.display()
            ));
        }
        shared
    };
    let (_, kvm_opens) = vm::virtualisation();
    if !kvm_opens {
        return Err(format!(
            "{} needs /dev/kvm, which does not open",
            binary.display()
        ));
    }
    Ok(binary)
}

/// The first line of `cloud-hypervisor --version`.
pub fn version(binary: &Path) -> String {
    process::output(Command::new(binary).arg("--version"))
        .ok()
        .and_then(|out| out.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown version".to_string())
}

/// One guest under Cloud Hypervisor: serial log in `<dir>/serial-<name>.log`, the VMM's
/// own messages in `<dir>/ch-<name>.log`, the vsock device's host socket
/// `<dir>/<name>.vsock`.
pub struct ChVm {
    /// The Cloud Hypervisor process and the guest's serial log.
    pub vm: VmProcess,
    /// The vsock device's host-side Unix socket.
    pub uds: PathBuf,
    vmm_log: PathBuf,
}

impl ChVm {
    /// Boots `kernel` with `cmdline` (one vCPU, 256 MiB); the VMM is killed after
    /// `limit` at the latest.
    pub fn start(
        binary: &Path,
        dir: &Path,
        name: &str,
        cid: u32,
        kernel: &Path,
        cmdline: &str,
        limit: Duration,
    ) -> Result<Self> {
        let serial = dir.join(format!("serial-{name}.log"));
        let vmm_log = dir.join(format!("ch-{name}.log"));
        let uds = dir.join(format!("{name}.vsock"));
        let _ = std::fs::remove_file(&uds);
        let mut command = Command::new(binary);
        command
            .arg("--kernel")
            .arg(kernel)
            .args(["--cmdline", cmdline])
            .args(["--cpus", "boot=1"])
            .args(["--memory", &format!("size={GUEST_RAM}")])
            .arg("--serial")
            .arg(format!("file={}", serial.display()))
            .args(["--console", "off"])
            .arg("--vsock")
            .arg(format!("cid={cid},socket={}", uds.display()));
        let log_file = std::fs::File::create(&vmm_log)?;
        command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let vm = VmProcess::spawn(
            &format!("cloud-hypervisor ({name})"),
            format!("Cloud Hypervisor guest {name} (cid {cid})"),
            command,
            serial,
            limit,
        )?;
        Ok(ChVm { vm, uds, vmm_log })
    }

    /// The VMM's own messages so far, without its warnings about BAR moves (it logs one
    /// for every BAR the guest sizes; see README's quirks).
    pub fn vmm_log(&self) -> String {
        vm::read_lossy(&self.vmm_log)
            .lines()
            .filter(|line| !line.contains("Failed moving device BAR"))
            .map(|line| format!("{line}\n"))
            .collect()
    }
}
