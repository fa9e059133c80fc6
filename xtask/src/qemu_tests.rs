//! Tests that boot the example guests in a VMM and check them from the host through the
//! vsock device's host-side Unix socket: QEMU with `vhost-device-vsock` (q35 and
//! microvm) and Cloud Hypervisor with its own vsock device. The same test functions run
//! against every VMM, through [`EchoGuest`].
//!
//! Under QEMU, on each machine one backend serves two guests in one sibling group: the
//! echo example (CID 3), which stays up for all tests, and a slot (CID 4) where the
//! client example boots, once against a host listener and once against the echo guest.
//! Under Cloud Hypervisor the echo guest (CID 3) and the client (CID 4) are two VMs, each
//! with its own device; there is no path between guests, so the sibling tests do not
//! run there. Both guests run in ring 3 there (`ring=3`), as the CPU runs ring-3 code
//! natively under nested `kvm_pvm`.

use crate::cargo_tasks::build_example;
use crate::ch::{self, ChVm};
use crate::host::{self, Connect};
use crate::setup::Tools;
use crate::soak::{self, SoakConfig};
use crate::vm::{run_dir, Accel, Arch, Backend, Guest, GuestConfig, Machine, GUEST_EXIT_SUCCESS};
use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// The echo guest's CID.
pub const GUEST_CID: u32 = 3;
/// The CID of the second guest, where the client example boots.
const CLIENT_CID: u32 = 4;
/// The port the echo example listens on.
pub const ECHO_PORT: u32 = 1234;
/// The echo example's source service (see `examples/echo.rs`).
const SOURCE_PORT: u32 = 1235;
/// What the echo example prints once it listens.
pub const ECHO_READY: &str = "listening on port 1234";
/// What `boot::exit_success` prints before it stops the VM (`examples/boot/mod.rs`).
const GUEST_SAYS_SUCCESS: &str = "boot: exit success";
/// The host port the client example connects to by default.
const CLIENT_HOST_PORT: u32 = 4321;
/// A port nobody listens on.
const UNUSED_PORT: u32 = 4444;
/// How long a guest may take from the VMM's start to listening (TCG is slow to boot).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection may wait for the guest's answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an echo may go without progress.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the client example may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Hard limit on every VMM and backend process of a test run, before the rounds of the
/// repeated test are added ([`process_limit`]).
pub const PROCESS_LIMIT: Duration = Duration::from_secs(900);
/// Bytes in flight per echo connection through vhost-device-vsock (see
/// [`host::echo_exchange`]: its flush quirk). Cloud Hypervisor needs no such limit.
const QEMU_ECHO_WINDOW: u64 = 64 * 1024;
/// Rounds of 64 concurrent echoes of 256 KiB under QEMU unless `--rounds` says otherwise.
pub const QEMU_ROUNDS: u32 = 1;
/// The same on aarch64 `virt-pci`: the barriers of the queues only show their worth on
/// a weakly ordered CPU, so this is where the echo is repeated (issue 14).
pub const AARCH64_ROUNDS: u32 = 20;
/// The same under Cloud Hypervisor, whose credit arithmetic caught a bug only every few
/// rounds (issue 12).
pub const CH_ROUNDS: u32 = 3;
/// Round trips of the 1-byte ping-pong.
const PING_PONGS: usize = 1000;
/// Connections of the connect/close test.
const CONNECT_CLOSE_CYCLES: u32 = 200;
/// The echo guest's command line under QEMU: connections that moved nothing for 5 s are
/// aborted (`examples/echo.rs`), as vhost-device-vsock never reports a host client's
/// reset (README, quirks) and the soak resets many.
const QEMU_ECHO_ARGS: &str = "idle=5";
/// The Cloud Hypervisor guests' command line: ring 3 (`examples/boot/ring3.rs`), where
/// nested `kvm_pvm` runs the guest's code on the CPU instead of emulating it.
const CH_GUEST_ARGS: &str = "ring=3";
/// The echo guest's under Cloud Hypervisor: ring 3, and the same idle timeout as under
/// QEMU.
const CH_ECHO_ARGS: &str = "ring=3 idle=5";
/// Host clients of the soak.
const SOAK_CLIENTS: usize = 24;

/// Time the backend gets, after the guest is up, to finish setting up its queues.
///
/// QEMU sends the vhost-user queue set-up messages when the guest's driver starts the
/// device, without waiting for the backend to process them, so a guest can print that it
/// listens before vhost-device-vsock has its queues. A host connection that arrives in
/// that window makes vhost-device-vsock 0.3.0's worker thread fail and stop serving the
/// guest for good. Waiting a moment before the first connection avoids the window.
const BACKEND_SETTLE: Duration = Duration::from_millis(500);

/// The hard limit of a run with `rounds` rounds of the repeated test.
fn process_limit(rounds: u32) -> Duration {
    PROCESS_LIMIT + Duration::from_secs(60) * rounds
}

/// A booted echo guest that host programs reach through a Unix socket, under some VMM,
/// and a place to boot the client example beside it.
pub trait EchoGuest {
    /// The host-side Unix socket of the echo guest's vsock device (`CONNECT <port>`).
    fn uds(&self) -> &Path;
    /// The echo guest's serial log so far.
    fn serial_log(&self) -> String;
    /// Whether the echo guest's VMM is still running.
    fn is_running(&mut self) -> bool;
    /// The Unix socket prefix where the client guest's connections to host port P
    /// arrive (as `<prefix>_P`).
    fn client_uds(&self) -> PathBuf;
    /// Boots the client example with `cmdline` and waits for its outcome.
    fn run_client(&mut self, kernel: &Path, cmdline: &str) -> Result<ClientRun>;
    /// Whether a client guest can reach the echo guest by CID.
    fn has_siblings(&self) -> bool;
    /// Whether the guests can run in ring 3 (`ring=3`, x86-64 only).
    fn has_ring3(&self) -> bool;
    /// The most bytes an echo may have in flight (sent, not yet echoed) on one
    /// connection: what the host side copes with.
    fn echo_window(&self) -> u64;
    /// Whether a host client may vanish between `CONNECT` and the answer without harm
    /// (see [`SoakConfig::vanish_before_answer`]).
    fn survives_early_vanish(&self) -> bool;
    /// What the VMM and its backend logged, for a failure report.
    fn vmm_logs(&self) -> String;
    /// Stops the VMM (and its backend).
    fn stop(&mut self);
}

/// How a client guest ended.
pub struct ClientRun {
    /// Whether it reported success, in the way its VMM lets it (QEMU: exit status 33 and
    /// the serial line; Cloud Hypervisor: the serial line and the VMM's exit after the
    /// guest's ACPI power-off).
    pub success: bool,
    /// What that was read from, for messages.
    pub how: String,
    /// Its serial log.
    pub log: String,
}

/// The echo guest booted on one QEMU machine, with its backend.
pub struct EchoVm {
    /// The backend, stopped last.
    pub backend: Backend,
    /// The echo guest.
    pub guest: Guest,
    tools: Tools,
    dir: PathBuf,
    machine: Machine,
    accel: Accel,
}

impl EchoVm {
    /// Boots the echo example on `machine` with `cmdline` and waits until it listens. With
    /// `client_slot`, the backend also has a sibling slot for [`EchoGuest::run_client`].
    /// QEMU and the backend are killed after `limit` at the latest.
    #[allow(clippy::too_many_arguments)]
    pub fn boot(
        tools: &Tools,
        machine: Machine,
        accel: Accel,
        kernel: &Path,
        run: &str,
        client_slot: bool,
        cmdline: &str,
        limit: Duration,
    ) -> Result<Self> {
        let dir = run_dir(run)?;
        let cids: &[u32] = if client_slot {
            &[GUEST_CID, CLIENT_CID]
        } else {
            &[GUEST_CID]
        };
        let backend = Backend::start(tools, &dir, cids, None, limit)?;
        let Some(slot) = backend.guest(GUEST_CID).cloned() else {
            bail!("backend has no slot for cid {GUEST_CID}");
        };
        let config = GuestConfig {
            kernel: kernel.to_path_buf(),
            machine,
            accel,
            cmdline: cmdline.to_string(),
            initrd: None,
            limit,
        };
        let mut guest = Guest::start(tools, &dir, &slot, &config)?;
        guest.wait_for_serial(ECHO_READY, BOOT_TIMEOUT)?;
        thread::sleep(BACKEND_SETTLE);
        Ok(EchoVm {
            backend,
            guest,
            tools: tools.clone(),
            dir,
            machine,
            accel,
        })
    }
}

impl EchoGuest for EchoVm {
    fn uds(&self) -> &Path {
        &self.guest.slot.uds
    }

    fn serial_log(&self) -> String {
        self.guest.serial_log()
    }

    fn is_running(&mut self) -> bool {
        self.guest.is_running()
    }

    fn client_uds(&self) -> PathBuf {
        self.backend
            .guest(CLIENT_CID)
            .map_or_else(PathBuf::new, |slot| slot.uds.clone())
    }

    fn run_client(&mut self, kernel: &Path, cmdline: &str) -> Result<ClientRun> {
        let Some(slot) = self.backend.guest(CLIENT_CID).cloned() else {
            bail!("backend has no slot for cid {CLIENT_CID}");
        };
        let config = GuestConfig {
            kernel: kernel.to_path_buf(),
            machine: self.machine,
            accel: self.accel,
            cmdline: cmdline.to_string(),
            initrd: None,
            limit: CLIENT_TIMEOUT + Duration::from_secs(10),
        };
        let mut client = Guest::start(&self.tools, &self.dir, &slot, &config)?;
        let status = client.wait_exit(CLIENT_TIMEOUT);
        client.stop();
        let log = client.serial_log();
        let code = status.and_then(|s| s.code());
        Ok(ClientRun {
            success: code == Some(GUEST_EXIT_SUCCESS) && log.contains(GUEST_SAYS_SUCCESS),
            how: match code {
                Some(code) => format!("QEMU exit status {code}"),
                None => "QEMU stopped at the time limit".to_string(),
            },
            log,
        })
    }

    fn has_siblings(&self) -> bool {
        true
    }

    fn has_ring3(&self) -> bool {
        self.machine.arch() == Arch::X86_64
    }

    fn echo_window(&self) -> u64 {
        QEMU_ECHO_WINDOW
    }

    fn survives_early_vanish(&self) -> bool {
        false
    }

    fn vmm_logs(&self) -> String {
        format!("--- backend log:\n{}", self.backend.log())
    }

    fn stop(&mut self) {
        self.guest.stop();
        self.backend.stop();
    }
}

/// The echo guest under Cloud Hypervisor, and where the client guest boots.
pub struct ChEcho {
    /// The echo guest's VM.
    pub echo: ChVm,
    binary: PathBuf,
    dir: PathBuf,
}

impl ChEcho {
    /// Boots the echo example under Cloud Hypervisor `binary` and waits until it listens.
    /// `args` is its command line.
    pub fn boot(
        binary: &Path,
        kernel: &Path,
        run: &str,
        args: &str,
        limit: Duration,
    ) -> Result<Self> {
        let dir = run_dir(run)?;
        let mut echo = ChVm::start(binary, &dir, "echo", GUEST_CID, kernel, args, limit)?;
        echo.vm.wait_for_serial(ECHO_READY, BOOT_TIMEOUT)?;
        Ok(ChEcho {
            echo,
            binary: binary.to_path_buf(),
            dir,
        })
    }
}

impl EchoGuest for ChEcho {
    fn uds(&self) -> &Path {
        &self.echo.uds
    }

    fn serial_log(&self) -> String {
        self.echo.vm.serial_log()
    }

    fn is_running(&mut self) -> bool {
        self.echo.vm.is_running()
    }

    fn client_uds(&self) -> PathBuf {
        self.dir.join("client.vsock")
    }

    fn run_client(&mut self, kernel: &Path, cmdline: &str) -> Result<ClientRun> {
        let mut client = ChVm::start(
            &self.binary,
            &self.dir,
            "client",
            CLIENT_CID,
            kernel,
            &format!("{CH_GUEST_ARGS} {cmdline}"),
            CLIENT_TIMEOUT + Duration::from_secs(10),
        )?;
        debug_assert_eq!(client.uds, self.client_uds());
        let status = client.vm.wait_exit(CLIENT_TIMEOUT);
        client.vm.stop();
        let log = client.vm.serial_log();
        let said = log
            .lines()
            .find(|line| line.starts_with("boot: exit "))
            .map(str::to_string);
        Ok(ClientRun {
            success: status.is_some() && said.as_deref() == Some(GUEST_SAYS_SUCCESS),
            how: format!(
                "serial: {}; Cloud Hypervisor {}",
                said.as_deref().unwrap_or("no `boot: exit` line"),
                if status.is_some() {
                    "exited"
                } else {
                    "stopped at the time limit"
                }
            ),
            log,
        })
    }

    fn has_siblings(&self) -> bool {
        false
    }

    fn has_ring3(&self) -> bool {
        true
    }

    /// No limit: the host writes as fast as the device takes it, and credit alone paces
    /// the echo (which is how issue 12's credit bug showed).
    fn echo_window(&self) -> u64 {
        u64::MAX
    }

    fn survives_early_vanish(&self) -> bool {
        true
    }

    fn vmm_logs(&self) -> String {
        format!("--- Cloud Hypervisor log:\n{}", self.echo.vmm_log())
    }

    fn stop(&mut self) {
        self.echo.vm.stop();
    }
}

/// What the tests need besides the booted echo guest.
struct Kernels {
    client: PathBuf,
}

/// How the guests of a suite wait for work (`wait=` on their command line,
/// `examples/boot/wait.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Wait {
    /// Halted until the device interrupts or a deadline (the guests' default).
    Irq,
    /// Spinning on `poll`.
    Poll,
}

impl Wait {
    /// The word on the guests' command line.
    pub fn arg(self) -> &'static str {
        match self {
            Wait::Irq => "wait=irq",
            Wait::Poll => "wait=poll",
        }
    }
}

/// Which suites `cargo xtask test` runs and which of their tests.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Wait modes of the x86-64 QEMU and Cloud Hypervisor suites; empty: `irq` on every
    /// machine and `poll` on q35, `irq` under Cloud Hypervisor. The aarch64 suites poll
    /// whatever this says.
    pub waits: Vec<Wait>,
    /// Only the tests whose name contains this text (the boot always runs).
    pub only: Option<String>,
}

impl Selection {
    fn runs(&self, name: &str) -> bool {
        self.only.as_deref().is_none_or(|text| name.contains(text))
    }

    /// The wait modes of the Cloud Hypervisor suites: those asked for, else `irq`.
    fn waits_under_ch(&self) -> Vec<Wait> {
        if self.waits.is_empty() {
            vec![Wait::Irq]
        } else {
            self.waits.clone()
        }
    }

    /// The wait modes of the suites on `machine`.
    fn waits_on(&self, machine: Machine) -> Vec<Wait> {
        if machine.arch() == Arch::Aarch64 {
            // The aarch64 boot support routes no interrupts: its guests poll.
            vec![Wait::Poll]
        } else if !self.waits.is_empty() {
            self.waits.clone()
        } else if machine == Machine::Q35 {
            vec![Wait::Irq, Wait::Poll]
        } else {
            vec![Wait::Irq]
        }
    }
}

/// What every test gets besides the echo guest.
pub struct TestInputs {
    kernels: Kernels,
    /// How the guests of this suite wait.
    wait: Wait,
    /// Which tests run.
    selection: Selection,
    /// The echo guest is `examples/async_echo.rs` (echo service only): only
    /// [`ASYNC_TESTS`] run.
    async_guest: bool,
    /// Rounds of the repeated 64 x 256 KiB echo.
    rounds: u32,
    /// The soak's length and seed; `None`: no soak in this suite.
    soak: Option<(Duration, u64)>,
}

impl TestInputs {
    /// The inputs of a suite of the echo example (`async_guest` false) whose client guest
    /// is `client`.
    fn echo(
        client: &Path,
        wait: Wait,
        selection: &Selection,
        rounds: u32,
        soak: Option<(Duration, u64)>,
    ) -> Self {
        TestInputs {
            kernels: Kernels {
                client: client.to_path_buf(),
            },
            wait,
            selection: selection.clone(),
            async_guest: false,
            rounds,
            soak,
        }
    }
}

/// A VM test; returns a line of detail on success.
type VmTest = fn(&mut dyn EchoGuest, &TestInputs) -> Result<String>;

/// One test, and what it needs besides the echo guest.
struct TestCase {
    name: &'static str,
    run: VmTest,
    needs: Needs,
}

/// What a test needs besides the echo guest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// Nothing.
    Nothing,
    /// A sibling guest (the client reaching the echo guest by CID).
    Siblings,
    /// A soak in this suite ([`TestInputs::soak`]).
    Soak,
    /// Guests that halt (`wait=irq`).
    Irq,
    /// A sibling guest that runs in ring 3 (x86-64 only).
    SiblingsInRing3,
}

const fn test(name: &'static str, run: VmTest) -> TestCase {
    TestCase {
        name,
        run,
        needs: Needs::Nothing,
    }
}

const fn sibling_test(name: &'static str, run: VmTest) -> TestCase {
    TestCase {
        name,
        run,
        needs: Needs::Siblings,
    }
}

/// The tests, in the order they run against one echo guest.
const TESTS: &[TestCase] = &[
    test("echo_one_message", echo_one_message),
    test("echo_3_concurrent_1mib_patterned", echo_3_concurrent_1mib),
    test("echo_20_sequential_connections", echo_20_sequential),
    test("echo_64_concurrent_256kib", echo_64_concurrent_256kib),
    test("ping_pong_1_byte_1000_round_trips", ping_pong),
    test("connect_close_200_sequential", connect_close),
    test(
        "unused_port_refused_then_still_serving",
        unused_port_refused,
    ),
    test("host_stops_reading_guest_send_blocks", host_stops_reading),
    test(
        "host_closes_mid_transfer_others_continue",
        host_closes_mid_transfer,
    ),
    test("client_to_host_listener_exits_0", client_to_host_listener),
    sibling_test("client_to_sibling_echo_guest", client_to_sibling_echo),
    TestCase {
        name: "client_in_ring3_to_sibling_echo_guest",
        run: client_in_ring3_to_sibling_echo,
        needs: Needs::SiblingsInRing3,
    },
    TestCase {
        name: "soak_mixed_host_clients",
        run: soak_mixed_host_clients,
        needs: Needs::Soak,
    },
    TestCase {
        name: "guest_halts_when_idle",
        run: guest_halts_when_idle,
        needs: Needs::Irq,
    },
    test("guest_log_has_no_errors", guest_log_has_no_errors),
];

/// The tests of the async echo guest's suite: those of the echo service.
const ASYNC_TESTS: &[&str] = &[
    "echo_one_message",
    "echo_3_concurrent_1mib_patterned",
    "echo_20_sequential_connections",
    "echo_64_concurrent_256kib",
    "ping_pong_1_byte_1000_round_trips",
    "connect_close_200_sequential",
    "unused_port_refused_then_still_serving",
    "host_closes_mid_transfer_others_continue",
    "guest_halts_when_idle",
    "guest_log_has_no_errors",
];

/// What the VM suites counted.
#[derive(Default)]
pub struct Tally {
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed.
    pub failed: usize,
    /// Tests that did not run because their VMM could not be had.
    pub skipped: usize,
}

/// Runs every test that fits against `guest`, labelled `label`, then stops it;
/// prints a line per test and the guest's and VMM's logs when one failed.
fn run_suite(label: &str, guest: &mut dyn EchoGuest, inputs: &TestInputs, tally: &mut Tally) {
    let failed_before = tally.failed;
    for case in TESTS {
        let suite = Suite {
            siblings: guest.has_siblings(),
            ring3: guest.has_ring3(),
            soak: inputs.soak.is_some(),
            wait: inputs.wait,
        };
        if !case_runs(case, suite)
            || !inputs.selection.runs(case.name)
            || (inputs.async_guest && !ASYNC_TESTS.contains(&case.name))
        {
            continue;
        }
        let started = Instant::now();
        match (case.run)(guest, inputs) {
            Ok(detail) => {
                tally.passed += 1;
                println!(
                    "ok   {label}/{} ({detail}; {:.1}s)",
                    case.name,
                    started.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                tally.failed += 1;
                println!("FAIL {label}/{}: {e:#}", case.name);
            }
        }
    }
    guest.stop();
    if tally.failed > failed_before {
        println!(
            "--- serial log of the {label} echo guest:\n{}",
            guest.serial_log()
        );
        println!("{}", guest.vmm_logs());
    }
}

/// What a suite offers its tests.
#[derive(Clone, Copy)]
struct Suite {
    /// A client guest can reach the echo guest by CID.
    siblings: bool,
    /// The guests can run in ring 3.
    ring3: bool,
    /// The suite has a soak.
    soak: bool,
    /// How the suite's guests wait.
    wait: Wait,
}

/// Whether `case` belongs in `suite`.
fn case_runs(case: &TestCase, suite: Suite) -> bool {
    match case.needs {
        Needs::Nothing => true,
        Needs::Siblings => suite.siblings,
        Needs::Soak => suite.soak,
        Needs::Irq => suite.wait == Wait::Irq,
        Needs::SiblingsInRing3 => suite.siblings && suite.ring3,
    }
}

/// The tests of a suite, the boot included.
fn suite_size(suite: Suite, selection: &Selection) -> usize {
    1 + TESTS
        .iter()
        .filter(|case| case_runs(case, suite) && selection.runs(case.name))
        .count()
}

/// Counts a failed boot: the boot itself and every test that could not run.
fn boot_failed(label: &str, error: &anyhow::Error, size: usize, tally: &mut Tally) {
    println!("FAIL {label}/boot_echo_guest: {error:#}");
    tally.failed += size;
}

/// How long the soak runs in each suite that has one (q35 and Cloud Hypervisor), by
/// default.
pub const SOAK_SECONDS: u64 = 60;

/// A seed for the soak's clients from the clock (printed by the soak, so a run can be
/// repeated with `cargo xtask soak --seed`).
fn soak_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Runs every test under QEMU on every machine in `machines`, in the wait modes of
/// `selection`, with `rounds` rounds of the repeated echo (`None`: [`QEMU_ROUNDS`],
/// [`AARCH64_ROUNDS`] on `virt-pci`), and on q35 and virt-pci (`irq`, else the first
/// mode) the soak for `soak_seconds` (0: none). The aarch64 machines run under TCG
/// whatever `accel` says, and print a `skip` line (their tests counted as skipped) when
/// there is no `qemu-system-aarch64`.
pub fn run_qemu(
    tools: &Tools,
    accel: Accel,
    machines: &[Machine],
    rounds: Option<u32>,
    soak_seconds: u64,
    selection: &Selection,
    tally: &mut Tally,
) -> Result<()> {
    let mut kernels: Vec<(Arch, PathBuf, PathBuf)> = Vec::new();
    for &machine in machines {
        let arch = machine.arch();
        if arch == Arch::Aarch64 && tools.qemu_aarch64.is_none() {
            let tests: usize = selection
                .waits_on(machine)
                .into_iter()
                .map(|wait| {
                    suite_size(
                        Suite {
                            siblings: true,
                            ring3: false,
                            soak: machine == Machine::VirtPci && soak_seconds > 0,
                            wait,
                        },
                        selection,
                    )
                })
                .sum();
            println!(
                "\nskip {machine}/*: the {tests} tests on {machine} did not run: no {}",
                crate::setup::QEMU_AARCH64_BINARY
            );
            tally.skipped += tests;
            continue;
        }
        let (echo_kernel, client) = match kernels.iter().find(|(a, _, _)| *a == arch) {
            Some((_, echo, client)) => (echo.clone(), client.clone()),
            None => {
                let echo = build_example("echo", arch)?;
                let client = build_example("client", arch)?;
                kernels.push((arch, echo.clone(), client.clone()));
                (echo, client)
            }
        };
        let rounds = rounds.unwrap_or(if machine == Machine::VirtPci {
            AARCH64_ROUNDS
        } else {
            QEMU_ROUNDS
        });
        let accel = if arch == Arch::Aarch64 {
            Accel::Tcg
        } else {
            accel
        };
        let waits = selection.waits_on(machine);
        for &wait in &waits {
            // The soak runs on one machine per architecture and in one mode: the
            // transport makes no difference to it.
            let soak = (matches!(machine, Machine::Q35 | Machine::VirtPci)
                && soak_seconds > 0
                && (wait == Wait::Irq || !waits.contains(&Wait::Irq)))
            .then(|| (Duration::from_secs(soak_seconds), soak_seed()));
            let suite = Suite {
                siblings: true,
                ring3: arch == Arch::X86_64,
                soak: soak.is_some(),
                wait,
            };
            let inputs = TestInputs::echo(&client, wait, selection, rounds, soak);
            let label = match wait {
                Wait::Irq => machine.to_string(),
                Wait::Poll => format!("{machine}-poll"),
            };
            let how = match arch {
                Arch::X86_64 => accel.to_string(),
                Arch::Aarch64 => "aarch64, tcg thread=multi, 2 vCPUs".to_string(),
            };
            println!("\n=== QEMU tests on {machine} ({how}, {})", wait.arg());
            let started = Instant::now();
            let run = format!("test-{label}");
            let limit = process_limit(rounds) + Duration::from_secs(soak_seconds);
            let mut vm = match EchoVm::boot(
                tools,
                machine,
                accel,
                &echo_kernel,
                &run,
                true,
                &format!("{QEMU_ECHO_ARGS} {}", wait.arg()),
                limit,
            ) {
                Ok(vm) => vm,
                Err(e) => {
                    boot_failed(&label, &e, suite_size(suite, selection), tally);
                    continue;
                }
            };
            println!(
                "ok   {label}/boot_echo_guest ({:.1}s to listening)",
                started.elapsed().as_secs_f64()
            );
            tally.passed += 1;
            run_suite(&label, &mut vm, &inputs, tally);
            println!(
                "=== QEMU tests on {label} took {:.0}s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    if machines.contains(&Machine::Q35) && selection.waits_on(Machine::Q35).contains(&Wait::Irq) {
        let client = match kernels.iter().find(|(arch, _, _)| *arch == Arch::X86_64) {
            Some((_, _, client)) => client.clone(),
            None => build_example("client", Arch::X86_64)?,
        };
        let rounds = rounds.unwrap_or(QEMU_ROUNDS);
        run_async_suite(tools, accel, rounds, selection, &client, tally)?;
    }
    Ok(())
}

/// The async echo guest (`examples/async_echo.rs`, one task per connection) on q35,
/// halting (`wait=irq`): the echo tests of [`ASYNC_TESTS`].
fn run_async_suite(
    tools: &Tools,
    accel: Accel,
    rounds: u32,
    selection: &Selection,
    client: &Path,
    tally: &mut Tally,
) -> Result<()> {
    let kernel = build_example("async_echo", Arch::X86_64)?;
    let wait = Wait::Irq;
    let inputs = TestInputs {
        async_guest: true,
        ..TestInputs::echo(client, wait, selection, rounds, None)
    };
    let label = "q35-async";
    println!(
        "\n=== QEMU tests of the async echo guest on q35 ({accel}, {})",
        wait.arg()
    );
    let started = Instant::now();
    let size = 1 + TESTS
        .iter()
        .filter(|case| ASYNC_TESTS.contains(&case.name) && selection.runs(case.name))
        .count();
    let mut vm = match EchoVm::boot(
        tools,
        Machine::Q35,
        accel,
        &kernel,
        "test-q35-async",
        true,
        wait.arg(),
        process_limit(rounds),
    ) {
        Ok(vm) => vm,
        Err(e) => {
            boot_failed(label, &e, size, tally);
            return Ok(());
        }
    };
    println!(
        "ok   {label}/boot_echo_guest ({:.1}s to listening)",
        started.elapsed().as_secs_f64()
    );
    tally.passed += 1;
    run_suite(label, &mut vm, &inputs, tally);
    println!(
        "=== QEMU tests on {label} took {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Runs every test that fits under Cloud Hypervisor, with `rounds` rounds of the
/// repeated echo and the soak for `soak_seconds` (0: none), once for each wait mode of
/// `selection` (by default `irq`: the guests route the device's MSI-X and halt); a `skip`
/// line (its tests counted as skipped, not passed) when there is no Cloud Hypervisor to
/// run.
pub fn run_ch(
    rounds: u32,
    soak_seconds: u64,
    selection: &Selection,
    tally: &mut Tally,
) -> Result<()> {
    println!("\n=== Cloud Hypervisor tests");
    let waits = selection.waits_under_ch();
    let soak = (soak_seconds > 0).then(|| (Duration::from_secs(soak_seconds), soak_seed()));
    let suite_with = |wait: Wait| Suite {
        siblings: false,
        ring3: true,
        soak: soak.is_some() && wait == waits[0],
        wait,
    };
    let binary = match ch::find() {
        Ok(binary) => binary,
        Err(why) => {
            let tests: usize = waits
                .iter()
                .map(|&wait| suite_size(suite_with(wait), selection))
                .sum();
            println!("skip ch/*: the {tests} Cloud Hypervisor tests did not run: {why}");
            tally.skipped += tests;
            return Ok(());
        }
    };
    println!("ch: {} ({})", ch::version(&binary), binary.display());
    let echo_kernel = build_example("echo", Arch::X86_64)?;
    let client = build_example("client", Arch::X86_64)?;
    for &wait in &waits {
        let suite = suite_with(wait);
        let inputs = TestInputs::echo(
            &client,
            wait,
            selection,
            rounds,
            soak.filter(|_| suite.soak),
        );
        let label = match wait {
            Wait::Irq => "ch",
            Wait::Poll => "ch-poll",
        };
        if waits.len() > 1 {
            println!("\n=== Cloud Hypervisor tests ({})", wait.arg());
        }
        let started = Instant::now();
        let limit = process_limit(rounds) + Duration::from_secs(soak_seconds);
        let echo_args = format!("{CH_ECHO_ARGS} {}", wait.arg());
        let run = format!("test-{label}");
        let mut vm = match ChEcho::boot(&binary, &echo_kernel, &run, &echo_args, limit) {
            Ok(vm) => vm,
            Err(e) => {
                boot_failed(label, &e, suite_size(suite, selection), tally);
                continue;
            }
        };
        let log = vm.serial_log();
        let line_with = |words: &[&str]| {
            log.lines()
                .find(|line| words.iter().all(|word| line.contains(word)))
                .map_or_else(
                    || format!("no `{}` line", words.join(" ")),
                    |line| line.trim().to_string(),
                )
        };
        println!(
            "ok   {label}/boot_echo_guest ({:.1}s to listening; {}; {})",
            started.elapsed().as_secs_f64(),
            line_with(&["boot:", " TSC "]),
            line_with(&["echo: wait="]),
        );
        tally.passed += 1;
        run_suite(label, &mut vm, &inputs, tally);
        println!(
            "=== Cloud Hypervisor tests on {label} took {:.0}s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Echoes `total` patterned bytes on each of `count` concurrent connections.
fn concurrent_echoes(vm: &dyn EchoGuest, count: u64, total: u64) -> Result<String> {
    let (detail, _) = concurrent_echo_rate(vm, count, total)?;
    Ok(detail)
}

/// Opens `count` connections to the echo port, then echoes `total` patterned bytes on
/// each (seeds `first_seed` and up), each in a thread of its own.
fn start_echoes(
    vm: &dyn EchoGuest,
    count: u64,
    first_seed: u64,
    total: u64,
) -> Result<Vec<thread::JoinHandle<Result<()>>>> {
    let window = vm.echo_window();
    let streams = (0..count)
        .map(|_| host::connect_accepted(vm.uds(), ECHO_PORT, CONNECT_TIMEOUT))
        .collect::<Result<Vec<_>>>()?;
    Ok(streams
        .into_iter()
        .zip(first_seed..)
        .map(|(stream, seed)| {
            thread::spawn(move || host::echo_exchange(stream, seed, total, window, STALL_TIMEOUT))
        })
        .collect())
}

/// [`concurrent_echoes`], also returning the rate in MiB/s.
fn concurrent_echo_rate(vm: &dyn EchoGuest, count: u64, total: u64) -> Result<(String, f64)> {
    let started = Instant::now();
    let workers = start_echoes(vm, count, 0, total)?;
    let mut errors = Vec::new();
    for (index, worker) in workers.into_iter().enumerate() {
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("connection {index}: {e:#}")),
            Err(_) => errors.push(format!("connection {index}: worker panicked")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    let seconds = started.elapsed().as_secs_f64();
    let rate = (count * total) as f64 / seconds / (1 << 20) as f64;
    Ok((
        format!(
            "{count} x {} KiB each way, byte-exact, {rate:.2} MiB/s echoed",
            total / 1024
        ),
        rate,
    ))
}

fn echo_one_message(vm: &mut dyn EchoGuest, _: &TestInputs) -> Result<String> {
    concurrent_echoes(vm, 1, 100)
}

fn echo_3_concurrent_1mib(vm: &mut dyn EchoGuest, _: &TestInputs) -> Result<String> {
    concurrent_echoes(vm, 3, 1 << 20)
}

/// 64 concurrent echoes of 256 KiB each, `--rounds` times (by default once under QEMU,
/// three times under Cloud Hypervisor).
fn echo_64_concurrent_256kib(vm: &mut dyn EchoGuest, inputs: &TestInputs) -> Result<String> {
    let mut rates = Vec::new();
    for round in 1..=inputs.rounds {
        let (_, rate) = concurrent_echo_rate(vm, 64, 256 * 1024)
            .map_err(|e| e.context(format!("round {round} of {}", inputs.rounds)))?;
        rates.push(format!("{rate:.2}"));
    }
    Ok(format!(
        "{} round(s) of 64 x 256 KiB each way, byte-exact; MiB/s echoed: {}",
        inputs.rounds,
        rates.join(", ")
    ))
}

/// 1-byte messages echoed one at a time: the round-trip time through the guest.
fn ping_pong(vm: &mut dyn EchoGuest, _: &TestInputs) -> Result<String> {
    let mut stream = host::connect_accepted(vm.uds(), ECHO_PORT, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(STALL_TIMEOUT))?;
    let mut times = Vec::with_capacity(PING_PONGS);
    let mut reply = [0u8; 1];
    for round in 0..PING_PONGS {
        let byte = [round as u8];
        let started = Instant::now();
        stream.write_all(&byte)?;
        stream
            .read_exact(&mut reply)
            .with_context(|| format!("round trip {round}"))?;
        times.push(started.elapsed());
        if reply != byte {
            bail!(
                "round trip {round}: sent {:#04x}, got {:#04x}",
                byte[0],
                reply[0]
            );
        }
    }
    host::finish_and_expect_close(&mut stream)?;
    times.sort();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    Ok(format!(
        "{PING_PONGS} round trips, median {:.1} us, p99 {:.1} us",
        micros(times[PING_PONGS / 2]),
        micros(times[PING_PONGS * 99 / 100])
    ))
}

/// Connections opened and closed one after another, each to the end: the host connects,
/// closes its side, and waits for the guest to close too.
fn connect_close(vm: &mut dyn EchoGuest, _: &TestInputs) -> Result<String> {
    let started = Instant::now();
    for cycle in 0..CONNECT_CLOSE_CYCLES {
        let mut stream = host::connect_accepted(vm.uds(), ECHO_PORT, CONNECT_TIMEOUT)
            .with_context(|| format!("connection {cycle}"))?;
        stream.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        host::finish_and_expect_close(&mut stream)
            .with_context(|| format!("connection {cycle}"))?;
    }
    let per_second = f64::from(CONNECT_CLOSE_CYCLES) / started.elapsed().as_secs_f64();
    concurrent_echoes(vm, 1, 1000).map_err(|e| e.context("echo after the connections"))?;
    Ok(format!(
        "{CONNECT_CLOSE_CYCLES} connect/close cycles, {per_second:.0} per second; still serving"
    ))
}

fn echo_20_sequential(vm: &mut dyn EchoGuest, _: &TestInputs) -> Result<String> {
    for round in 0..20u64 {
        let stream = host::connect_accepted(vm.uds(), ECHO_PORT, CONNECT_TIMEOUT)?;
        host::echo_exchange(
            stream,
            100 + round,
            4096 + round * 37,
            vm.echo_window(),
            STALL_TIMEOUT,
        )
        .map_err(|e| e.context(format!("connection {round}")))?;
    }
    Ok("20 connections one after another".to_string())
}

fn unused_port_refused(vm: &mut dyn EchoGuest, _: &TestInputs) -> Result<String> {
    match host::connect(vm.uds(), UNUSED_PORT, CONNECT_TIMEOUT)? {
        Connect::Refused => {}
        Connect::Accepted(_) => bail!("a connection to port {UNUSED_PORT} was accepted"),
    }
    concurrent_echoes(vm, 1, 1000).map_err(|e| e.context("echo after the refused connection"))?;
    Ok(format!(
        "port {UNUSED_PORT} refused; port {ECHO_PORT} still echoes"
    ))
}

/// The host asks the source for 1 MiB, reads nothing for two seconds (the guest's `send`
/// must block on credit), then reads everything and checks it byte by byte.
fn host_stops_reading(vm: &mut dyn EchoGuest, _: &TestInputs) -> Result<String> {
    const TOTAL: u64 = 1 << 20;
    let mut stream = host::connect_accepted(vm.uds(), SOURCE_PORT, CONNECT_TIMEOUT)?;
    stream.write_all(format!("{TOTAL}\n").as_bytes())?;
    thread::sleep(Duration::from_secs(2));
    stream.set_read_timeout(Some(STALL_TIMEOUT))?;
    let got = host::read_source(&mut stream, || (64 * 1024, Duration::ZERO))
        .context("once the host read again")?;
    if got != TOTAL {
        bail!("the source closed after {got} of {TOTAL} bytes");
    }
    // The guest logs how often its `send` had to wait once the transfer is done (this is
    // the only source connection of the run).
    let marker = format!("source sent {TOTAL} bytes to 2:");
    let deadline = Instant::now() + Duration::from_secs(10);
    let blocked: u64 = loop {
        let log = vm.serial_log();
        if let Some(count) = log
            .lines()
            .find_map(|line| line.split_once(&marker))
            .and_then(|(_, rest)| rest.split_once("send blocked "))
            .and_then(|(_, count)| count.split_whitespace().next()?.parse().ok())
        {
            break count;
        }
        if Instant::now() >= deadline {
            bail!("the guest did not log {marker:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    if blocked == 0 {
        bail!("the guest's send never returned WouldBlock while the host did not read");
    }
    Ok(format!(
        "1 MiB byte-exact after a 2 s pause; guest send blocked {blocked} times"
    ))
}

/// Four echo connections; the host drops one halfway; the other three finish byte-exact
/// and a new connection still works.
fn host_closes_mid_transfer(vm: &mut dyn EchoGuest, _: &TestInputs) -> Result<String> {
    const TOTAL: u64 = 512 * 1024;
    let mut abandoned = host::connect_accepted(vm.uds(), ECHO_PORT, CONNECT_TIMEOUT)?;
    let workers = start_echoes(vm, 3, 50, TOTAL)?;
    // Half a transfer on the abandoned connection, read back partly, then gone.
    let mut chunk = vec![0u8; 32 * 1024];
    host::fill_pattern(99, 0, &mut chunk);
    abandoned.write_all(&chunk)?;
    let mut some = [0u8; 1024];
    abandoned.set_read_timeout(Some(STALL_TIMEOUT))?;
    abandoned.read_exact(&mut some)?;
    abandoned.write_all(&chunk)?;
    drop(abandoned);
    for (index, worker) in workers.into_iter().enumerate() {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("worker {index} panicked"))?
            .map_err(|e| e.context(format!("connection {index}")))?;
    }
    concurrent_echoes(vm, 1, 1000).map_err(|e| e.context("echo after the abandoned connection"))?;
    Ok("3 x 512 KiB byte-exact beside a dropped connection; still serving".to_string())
}

/// A host listener on port 4321 answers the client example's line.
fn client_to_host_listener(vm: &mut dyn EchoGuest, inputs: &TestInputs) -> Result<String> {
    let path = PathBuf::from(format!("{}_{CLIENT_HOST_PORT}", vm.client_uds().display()));
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    listener.set_nonblocking(true)?;
    let host = thread::spawn(move || -> Result<String> {
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        let mut stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).context("waiting for the client's connection"),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while line.last() != Some(&b'\n') {
            if stream.read(&mut byte)? == 0 {
                bail!(
                    "the client closed before a full line: {:?}",
                    String::from_utf8_lossy(&line)
                );
            }
            line.push(byte[0]);
        }
        stream.write_all(b"hello from the host\n")?;
        Ok(String::from_utf8_lossy(&line).into_owned())
    });
    let run = vm.run_client(&inputs.kernels.client, inputs.wait.arg());
    let _ = std::fs::remove_file(&path);
    let run = run?;
    let received = host
        .join()
        .map_err(|_| anyhow::anyhow!("host listener panicked"))??;
    if received != format!("hello from {CLIENT_CID}\n") {
        bail!("the host received {received:?}");
    }
    if !run.success {
        bail!(
            "the client did not succeed ({}); serial log:\n{}",
            run.how,
            run.log
        );
    }
    if !run.log.contains("client: got back \"hello from the host\"") {
        bail!(
            "the client did not print the host's line; serial log:\n{}",
            run.log
        );
    }
    Ok(format!(
        "host got {received:?}; guest printed the reply and exited ({})",
        run.how
    ))
}

/// The client example in the sibling guest talks to the echo guest by CID.
fn client_to_sibling_echo(vm: &mut dyn EchoGuest, inputs: &TestInputs) -> Result<String> {
    client_echoed_by_sibling(vm, inputs, "")
}

/// The same, with the client in ring 3 after boot (`ring=3`, what the benchmark guest
/// does): serial output, the device's registers and `isa-debug-exit` from ring 3.
fn client_in_ring3_to_sibling_echo(vm: &mut dyn EchoGuest, inputs: &TestInputs) -> Result<String> {
    let detail = client_echoed_by_sibling(vm, inputs, "ring=3")?;
    Ok(format!("ring 3, {detail}"))
}

/// Runs the client against the echo guest with `extra` on its command line; checks that
/// it got its line back and exited 33, and, with `ring=3`, that it said it ran there.
fn client_echoed_by_sibling(
    vm: &mut dyn EchoGuest,
    inputs: &TestInputs,
    extra: &str,
) -> Result<String> {
    let cmdline = format!(
        "cid={GUEST_CID} port={ECHO_PORT} {} {extra}",
        inputs.wait.arg()
    );
    let run = vm.run_client(&inputs.kernels.client, &cmdline)?;
    let log = &run.log;
    if extra.contains("ring=3") && !log.contains("boot: running in ring 3") {
        bail!("the client did not say it runs in ring 3; serial log:\n{log}");
    }
    if !run.success {
        bail!(
            "the client did not succeed ({}); serial log:\n{log}",
            run.how
        );
    }
    let expected = format!("client: got back \"hello from {CLIENT_CID}\"");
    if !log.contains(&expected) {
        bail!("the client did not print {expected:?}; serial log:\n{log}");
    }
    Ok(format!(
        "guest {CLIENT_CID} -> guest {GUEST_CID}:{ECHO_PORT}, line echoed, {}",
        run.how
    ))
}

fn guest_log_has_no_errors(vm: &mut dyn EchoGuest, _: &TestInputs) -> Result<String> {
    let running = vm.is_running();
    log_clean(running, &vm.serial_log(), "guest")
}

/// Kinds of warnings [`log_clean`] prints at most.
const MAX_WARNING_KINDS: usize = 12;

/// `warnings` grouped by what they say with the numbers left out, most frequent first:
/// the count of each kind and its first line.
fn warning_kinds<'a>(warnings: &[&'a str]) -> Vec<(usize, &'a str)> {
    let mut kinds: Vec<(String, usize, &str)> = Vec::new();
    for &line in warnings {
        let key: String = line.chars().filter(|c| !c.is_ascii_digit()).collect();
        match kinds.iter_mut().find(|(k, ..)| *k == key) {
            Some((_, count, _)) => *count += 1,
            None => kinds.push((key, 1, line)),
        }
    }
    kinds.sort_by_key(|kind| std::cmp::Reverse(kind.1));
    kinds
        .into_iter()
        .map(|(_, count, line)| (count, line))
        .collect()
}

/// Checks that `guest` still runs and its serial log has no `[PANIC]` or `[ERROR]` line;
/// prints its warnings, each prefixed with `who`.
pub fn guest_log_clean(guest: &mut Guest, who: &str) -> Result<String> {
    let running = guest.is_running();
    log_clean(running, &guest.serial_log(), who)
}

/// Checks that a guest is `running` and `log`, its serial log, has no `[PANIC]` or
/// `[ERROR]` line; prints its warnings, grouped by kind, each prefixed with `who`.
fn log_clean(running: bool, log: &str, who: &str) -> Result<String> {
    if !running {
        bail!("the {who} is no longer running");
    }
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("[PANIC]") || line.contains("[ERROR]"))
        .collect();
    if !errors.is_empty() {
        bail!("the serial log has errors:\n{}", errors.join("\n"));
    }
    // Warnings are how the driver reports bad device input (B10), which
    // vhost-device-vsock occasionally produces, and how the echo example reports a
    // connection the host dropped; they are shown, not failed on.
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains("[WARN]")).collect();
    for (count, example) in warning_kinds(&warnings).into_iter().take(MAX_WARNING_KINDS) {
        println!("     {who}: {count} x {example}");
    }
    Ok(format!(
        "still running, {} log lines, {} warnings, no errors",
        log.lines().count(),
        warnings.len()
    ))
}

/// The soak (see [`soak`](crate::soak)): many host clients at once for the suite's soak
/// time. Passes when every exchange that completed was byte-exact and the guest echoes
/// afterwards; connects refused while the guest's backlog was full are counted.
fn soak_mixed_host_clients(vm: &mut dyn EchoGuest, inputs: &TestInputs) -> Result<String> {
    let Some((duration, seed)) = inputs.soak else {
        bail!("no soak in this suite");
    };
    let load = soak::Load {
        clients: SOAK_CLIENTS,
        duration,
        seed,
        mix: soak::Mix::DEFAULT,
    };
    run_soak(vm, load)
}

/// Runs the soak with `load` against `vm`, then four concurrent echoes; returns what
/// happened, or fails with the soak's failures or when the driver logged a packet it
/// dropped meanwhile.
fn run_soak(vm: &mut dyn EchoGuest, load: soak::Load) -> Result<String> {
    // What the driver dropped, before and after: nothing may be dropped meanwhile.
    let drops = |vm: &dyn EchoGuest| {
        vm.serial_log()
            .lines()
            .filter(|line| line.contains("vsock:") && line.contains("dropping"))
            .count()
    };
    let dropped_before = drops(vm);
    let started = Instant::now();
    let report = soak::run(&SoakConfig {
        uds: vm.uds().to_path_buf(),
        echo_port: ECHO_PORT,
        source_port: SOURCE_PORT,
        load,
        vanish_before_answer: vm.survives_early_vanish(),
    })?;
    let summary = format!(
        "{} clients, seed {}: {}",
        load.clients,
        load.seed,
        report.summary(started.elapsed())
    );
    if !report.failures.is_empty() {
        let shown: Vec<&str> = report
            .failures
            .iter()
            .take(20)
            .map(String::as_str)
            .collect();
        bail!("{summary}:\n{}", shown.join("\n"));
    }
    let after =
        concurrent_echoes(vm, 4, 64 * 1024).context(format!("after the soak ({summary})"))?;
    let dropped = drops(vm) - dropped_before;
    if dropped > 0 {
        bail!("{summary}; the driver logged {dropped} dropped packets meanwhile");
    }
    // Connections the host reset and the device never reported end in the echo guest's
    // idle timeout (README, quirks of vhost-device-vsock).
    let idle_aborts = vm.serial_log().matches("moved nothing for").count();
    Ok(format!(
        "{summary}; {idle_aborts} silent connections aborted by the echo's idle timeout; then {after}"
    ))
}

/// `cargo xtask soak`: boots the echo guest with `guest_args`, runs the soak (see
/// [`soak`](crate::soak)) with `load`, then checks that the guest still echoes and logged
/// no error. Returns whether everything passed.
pub fn soak_by_hand(
    tools: &Tools,
    machine: Machine,
    accel: Accel,
    guest_args: &str,
    load: soak::Load,
) -> Result<bool> {
    let kernel = build_example("echo", machine.arch())?;
    let mut vm = EchoVm::boot(
        tools,
        machine,
        accel,
        &kernel,
        "soak",
        false,
        guest_args,
        PROCESS_LIMIT + load.duration,
    )?;
    println!(
        "soak: the echo guest on {machine} ({accel}) with {guest_args:?}, mix {:?}",
        load.mix
    );
    let soaked = run_soak(&mut vm, load);
    match &soaked {
        Ok(detail) => println!("soak: {detail}"),
        Err(e) => println!("soak: FAIL {e:#}"),
    }
    let log = guest_log_clean(&mut vm.guest, "guest");
    match &log {
        Ok(detail) => println!("soak: guest log: {detail}"),
        Err(e) => println!("soak: guest log: FAIL {e:#}"),
    }
    vm.stop();
    println!("soak: serial log in {}", vm.dir.display());
    Ok(soaked.is_ok() && log.is_ok())
}

/// The counts of one `wait:` statistics line of a guest (`examples/boot/wait.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct WaitCounts {
    loops: u64,
    news: u64,
    spins: u64,
    wakeups: u64,
    halts: u64,
    interrupts: u64,
}

impl WaitCounts {
    /// Reads a `wait: <mode> loops=.. news=.. ...` line.
    fn parse(line: &str) -> Option<Self> {
        let rest = &line[line.find("wait: ")?..];
        let value = |key: &str| -> Option<u64> {
            rest.split_ascii_whitespace()
                .find_map(|word| word.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        };
        Some(WaitCounts {
            loops: value("loops")?,
            news: value("news")?,
            spins: value("spins")?,
            wakeups: value("wakeups")?,
            halts: value("halts")?,
            interrupts: value("interrupts")?,
        })
    }

    fn minus(self, earlier: Self) -> Self {
        WaitCounts {
            loops: self.loops - earlier.loops,
            news: self.news - earlier.news,
            spins: self.spins - earlier.spins,
            wakeups: self.wakeups - earlier.wakeups,
            halts: self.halts - earlier.halts,
            interrupts: self.interrupts - earlier.interrupts,
        }
    }
}

/// The guest's `wait:` statistics lines so far.
fn wait_lines(log: &str) -> Vec<WaitCounts> {
    log.lines().filter_map(WaitCounts::parse).collect()
}

/// Statistics lines a test waits for at most, to find one quiet stretch between two.
const WAIT_LINES_TO_QUIET: usize = 12;

/// With 8 idle host connections open, the echo guest halts instead of spinning: between
/// two of its statistics lines with nothing moving in between (no news, no polling on),
/// it halted, and its loop ran once per halt. A spinning guest shows millions of loops and
/// no halts there. No timing thresholds: only counts the guest logs.
fn guest_halts_when_idle(vm: &mut dyn EchoGuest, _: &TestInputs) -> Result<String> {
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(host::connect_accepted(
            vm.uds(),
            ECHO_PORT,
            CONNECT_TIMEOUT,
        )?);
    }
    let start = wait_lines(&vm.serial_log()).len();
    // The lines come every 2 s of guest time; the limit is only there so that a guest
    // that stopped logging cannot hang the test.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let lines = wait_lines(&vm.serial_log());
        let fresh = lines.get(start..).unwrap_or_default();
        for pair in fresh.windows(2) {
            let delta = pair[1].minus(pair[0]);
            if delta.news == 0 && delta.spins == 0 {
                if delta.halts == 0 || delta.loops > delta.halts + 1 {
                    bail!("a quiet stretch without halting: {delta:?}");
                }
                drop(idle);
                return Ok(format!(
                    "8 idle connections; a quiet stretch: {} loops, {} halts, {} wake-ups, {} interrupts",
                    delta.loops, delta.halts, delta.wakeups, delta.interrupts
                ));
            }
        }
        if fresh.len() > WAIT_LINES_TO_QUIET {
            bail!(
                "no quiet stretch in {} statistics lines: {:?}",
                fresh.len(),
                fresh
                    .windows(2)
                    .map(|p| p[1].minus(p[0]))
                    .collect::<Vec<_>>()
            );
        }
        if Instant::now() > deadline || !vm.is_running() {
            bail!(
                "the guest logged {} statistics lines (is it running? {})",
                fresh.len(),
                vm.is_running()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}
