//! Guests under QEMU with the vhost-user vsock backend: choosing the accelerator, starting
//! `vhost-device-vsock` and `qemu-system-x86_64` or `qemu-system-aarch64`, and watching
//! the serial log.

use crate::process::Guarded;
use crate::setup::{project_root, Tools};
use anyhow::{bail, Context, Result};
use std::fmt;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// QEMU's exit status when the guest calls `boot::exit_success` (isa-debug-exit 0x10 on
/// x86-64, semihosting `SYS_EXIT` with 33 on aarch64).
pub const GUEST_EXIT_SUCCESS: i32 = 33;
/// Guest RAM. It must be a shared memfd for the vhost-user backend.
const GUEST_RAM: &str = "256M";
/// How long the backend may take to create its vhost-user socket.
const BACKEND_START_TIMEOUT: Duration = Duration::from_secs(10);

/// The guests' CPU architecture: which examples are built and which QEMU runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// `x86_64-unknown-none` under `qemu-system-x86_64` (q35, microvm).
    #[value(name = "x86_64")]
    X86_64,
    /// `aarch64-unknown-none` under `qemu-system-aarch64 -M virt` (TCG).
    Aarch64,
}

impl Arch {
    /// The Rust target the examples are built for.
    pub fn target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-none",
            Arch::Aarch64 => "aarch64-unknown-none",
        }
    }

    /// The machines the tests run on by default, the PCI one first.
    pub fn machines(self) -> [Machine; 2] {
        match self {
            Arch::X86_64 => [Machine::Q35, Machine::Microvm],
            Arch::Aarch64 => [Machine::VirtPci, Machine::VirtMmio],
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        })
    }
}

/// The QEMU machine, which decides the architecture and the virtio transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Machine {
    /// `-machine q35`: virtio-pci (`vhost-user-vsock-pci`).
    Q35,
    /// `-machine microvm`: virtio-mmio (`vhost-user-vsock-device`).
    Microvm,
    /// aarch64 `-machine virt`: virtio-pci on its PCIe ECAM (`vhost-user-vsock-pci`).
    VirtPci,
    /// aarch64 `-machine virt`: virtio-mmio (`vhost-user-vsock-device`).
    VirtMmio,
}

impl Machine {
    /// The architecture the machine runs.
    pub fn arch(self) -> Arch {
        match self {
            Machine::Q35 | Machine::Microvm => Arch::X86_64,
            Machine::VirtPci | Machine::VirtMmio => Arch::Aarch64,
        }
    }

    /// `machine` if given (it names its architecture), else the first machine of
    /// `arch` (x86-64 when neither is given).
    pub fn pick(machine: Option<Machine>, arch: Option<Arch>) -> Result<Machine> {
        match (machine, arch) {
            (Some(machine), Some(arch)) if machine.arch() != arch => {
                bail!(
                    "--machine {machine} is an {} machine, not {arch}",
                    machine.arch()
                )
            }
            (Some(machine), _) => Ok(machine),
            (None, arch) => Ok(arch.unwrap_or(Arch::X86_64).machines()[0]),
        }
    }
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
            Machine::VirtPci => "virt-pci",
            Machine::VirtMmio => "virt-mmio",
        })
    }
}

/// The QEMU accelerator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// QEMU's binary translator.
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the host offers: whether the CPU shows hardware virtualisation (`vmx`/`svm` in
/// /proc/cpuinfo), and whether /dev/kvm opens for reading and writing.
pub fn virtualisation() -> (bool, bool) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| line.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm_opens = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    (hardware, kvm_opens)
}

/// Picks the accelerator: the one asked for, else KVM only when the CPU has hardware
/// virtualisation (`vmx`/`svm`) and /dev/kvm opens, else TCG. A /dev/kvm without
/// `vmx`/`svm` is software nested virtualisation, where every exit is slow and TCG is
/// faster. Prints the choice and why.
pub fn choose_accel(requested: Option<Accel>) -> Accel {
    if let Some(accel) = requested {
        println!("accel: {accel} (asked for with --accel)");
        return accel;
    }
    let (hardware, kvm_opens) = virtualisation();
    let (accel, why) = match (hardware, kvm_opens) {
        (true, true) => (Accel::Kvm, "the CPU has vmx/svm and /dev/kvm opens"),
        (true, false) => (Accel::Tcg, "/dev/kvm does not open"),
        (false, true) => (
            Accel::Tcg,
            "/dev/kvm opens but the CPU shows no vmx/svm (nested software virtualisation is slower than TCG)",
        ),
        (false, false) => (Accel::Tcg, "no vmx/svm and no /dev/kvm"),
    };
    println!("accel: {accel} ({why}; override with --accel)");
    accel
}

/// A folder for one run's sockets and logs, under `target/xtask/`, emptied first.
pub fn run_dir(name: &str) -> Result<PathBuf> {
    let dir = project_root()
        .join("target")
        .join("xtask")
        .join(format!("{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// One guest's place in the backend.
#[derive(Clone, Debug)]
pub struct GuestSlot {
    /// The guest's CID.
    pub cid: u32,
    /// The vhost-user socket QEMU connects to.
    pub vhost_socket: PathBuf,
    /// The Unix socket host programs use to reach the guest (`CONNECT <port>\n`), and the
    /// prefix of `<path>_<port>` sockets the guest reaches host listeners on.
    pub uds: PathBuf,
}

/// A running `vhost-device-vsock` serving one or more guests.
pub struct Backend {
    process: Guarded,
    guests: Vec<GuestSlot>,
    log: PathBuf,
}

impl Backend {
    /// The backend's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Starts the backend in `dir` for guests with `cids`, all in one sibling group (so
    /// they can reach each other by CID). `host_window` is the receive window the backend
    /// advertises per connection (its `tx-buffer-size`, in bytes); `None` keeps its default
    /// of 64 KiB.
    pub fn start(
        tools: &Tools,
        dir: &Path,
        cids: &[u32],
        host_window: Option<u32>,
        limit: Duration,
    ) -> Result<Self> {
        let guests: Vec<GuestSlot> = cids
            .iter()
            .map(|&cid| GuestSlot {
                cid,
                vhost_socket: dir.join(format!("vhost-{cid}.sock")),
                uds: dir.join(format!("vm-{cid}.vsock")),
            })
            .collect();
        let log = dir.join("backend.log");
        let mut command = Command::new(&tools.backend);
        for guest in &guests {
            command.arg("--vm").arg(format!(
                "guest-cid={},socket={},uds-path={},groups=siblings{}",
                guest.cid,
                guest.vhost_socket.display(),
                guest.uds.display(),
                host_window.map_or_else(String::new, |bytes| format!(",tx-buffer-size={bytes}"))
            ));
        }
        let log_file = std::fs::File::create(&log)?;
        command
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let mut process = Guarded::spawn("vhost-device-vsock", command, limit)?;
        let deadline = Instant::now() + BACKEND_START_TIMEOUT;
        while !guests.iter().all(|g| g.vhost_socket.exists()) {
            if let Some(status) = process.try_status() {
                bail!(
                    "vhost-device-vsock exited at start ({status}):\n{}",
                    read_lossy(&log)
                );
            }
            if Instant::now() >= deadline {
                bail!("vhost-device-vsock did not create its sockets in time");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Backend {
            process,
            guests,
            log,
        })
    }

    /// The slot of the guest with `cid`.
    pub fn guest(&self, cid: u32) -> Option<&GuestSlot> {
        self.guests.iter().find(|g| g.cid == cid)
    }

    /// The backend's log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// Stops the backend.
    pub fn stop(&mut self) {
        self.process.stop();
    }
}

/// How to boot one guest.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// The ELF to boot with `-kernel`.
    pub kernel: PathBuf,
    /// The machine (and so the transport).
    pub machine: Machine,
    /// The accelerator.
    pub accel: Accel,
    /// The kernel command line (`-append`).
    pub cmdline: String,
    /// An initramfs (`-initrd`), for the Linux guest.
    pub initrd: Option<PathBuf>,
    /// Kill QEMU after this long.
    pub limit: Duration,
}

/// A running VMM process with the guest's serial log in a file: what QEMU and Cloud
/// Hypervisor guests have in common.
pub struct VmProcess {
    process: Guarded,
    serial: PathBuf,
    /// How the guest is named in messages, e.g. "guest cid 3".
    label: String,
}

impl VmProcess {
    /// Starts `command` (which must send the guest's serial output to `serial`) as a
    /// guarded child named `name`, killed after `limit`.
    pub fn spawn(
        name: &str,
        label: String,
        command: Command,
        serial: PathBuf,
        limit: Duration,
    ) -> Result<Self> {
        let process = Guarded::spawn(name, command, limit)?;
        Ok(VmProcess {
            process,
            serial,
            label,
        })
    }

    /// The serial log so far.
    pub fn serial_log(&self) -> String {
        read_lossy(&self.serial)
    }

    /// Waits until the serial log contains `needle`; fails when the VMM exits first or
    /// the timeout passes.
    pub fn wait_for_serial(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.serial_log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.process.try_status() {
                bail!(
                    "{} exited ({status}) before printing {needle:?}; serial log:\n{}",
                    self.label,
                    self.serial_log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {}s; serial log:\n{}",
                    self.label,
                    timeout.as_secs(),
                    self.serial_log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `timeout` for the VMM to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_timeout(timeout)
    }

    /// Whether the VMM is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.try_status().is_none()
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops the VMM.
    pub fn stop(&mut self) {
        self.process.stop();
    }
}

/// A running QEMU with its serial log in a file.
pub struct Guest {
    vm: VmProcess,
    /// The guest's place in the backend.
    pub slot: GuestSlot,
}

impl Guest {
    /// Boots `config` attached to `slot` of a running backend; the serial log goes to
    /// `<dir>/serial-<cid>.log`, QEMU's own messages to `<dir>/qemu-<cid>.log`.
    pub fn start(
        tools: &Tools,
        dir: &Path,
        slot: &GuestSlot,
        config: &GuestConfig,
    ) -> Result<Self> {
        let serial = dir.join(format!("serial-{}.log", slot.cid));
        let qemu_log = dir.join(format!("qemu-{}.log", slot.cid));
        let mut command = qemu_command(tools, config, &slot.vhost_socket);
        command
            .arg("-serial")
            .arg(format!("file:{}", serial.display()));
        let log_file = std::fs::File::create(&qemu_log)?;
        command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let vm = VmProcess::spawn(
            &format!("qemu (cid {})", slot.cid),
            format!("guest cid {}", slot.cid),
            command,
            serial,
            config.limit,
        )?;
        Ok(Guest {
            vm,
            slot: slot.clone(),
        })
    }

    /// The serial log so far.
    pub fn serial_log(&self) -> String {
        self.vm.serial_log()
    }

    /// Waits until the serial log contains `needle`; fails when the guest exits first or
    /// the timeout passes.
    pub fn wait_for_serial(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.vm.wait_for_serial(needle, timeout)
    }

    /// Waits up to `timeout` for QEMU to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.vm.wait_exit(timeout)
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        self.vm.is_running()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Stops QEMU.
    pub fn stop(&mut self) {
        self.vm.stop();
    }
}

/// The QEMU command line for `config`, without `-serial`.
///
/// On aarch64 (`virt`): TCG with a thread per vCPU (`-accel tcg,thread=multi`, whatever
/// `config.accel` says: there is no KVM for aarch64 on an x86 host), two Cortex-A72s
/// (the guest runs on the first; the second stays powered off until a PSCI `CPU_ON`,
/// which the guest never makes) and semihosting for the exit status.
pub fn qemu_command(tools: &Tools, config: &GuestConfig, vhost_socket: &Path) -> Command {
    let mut command = Command::new(tools.qemu_for(config.machine.arch()));
    match config.machine.arch() {
        Arch::X86_64 => {
            command
                .args(["-machine", &config.machine.to_string()])
                .args(["-accel", &config.accel.to_string()]);
        }
        Arch::Aarch64 => {
            command
                .args(["-machine", "virt"])
                .args(["-accel", "tcg,thread=multi"])
                .args(["-cpu", "cortex-a72", "-smp", "2"])
                .args(["-semihosting-config", "enable=on,target=native"]);
        }
    }
    command
        // Threads named after their role: the benchmark finds the vCPU threads
        // ("CPU 0/TCG") by name to read their scheduling statistics.
        .args(["-name", "vsock-guest,debug-threads=on"])
        .args(["-m", GUEST_RAM])
        .args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={GUEST_RAM},share=on"),
        ])
        .args(["-machine", "memory-backend=mem"])
        .args([
            "-chardev",
            &format!("socket,id=vsock,path={}", vhost_socket.display()),
        ]);
    match config.machine {
        Machine::Q35 | Machine::VirtPci => {
            command.args(["-device", "vhost-user-vsock-pci,chardev=vsock"]);
        }
        Machine::Microvm | Machine::VirtMmio => {
            command
                .args(["-global", "virtio-mmio.force-legacy=false"])
                .args(["-device", "vhost-user-vsock-device,chardev=vsock"]);
        }
    }
    if config.machine.arch() == Arch::X86_64 {
        command.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    }
    command
        .args(["-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&config.kernel);
    if let Some(initrd) = &config.initrd {
        command.arg("-initrd").arg(initrd);
    }
    if !config.cmdline.is_empty() {
        command.args(["-append", &config.cmdline]);
    }
    command
}

/// A file's contents as text, invalid UTF-8 replaced; empty if it cannot be read.
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}
