//! Tests that boot the example guests in QEMU and check them from the host through
//! `vhost-device-vsock`.
//!
//! On each machine one backend serves two guests in one sibling group: the echo example
//! (CID 3), which stays up for all tests, and a slot (CID 4) where the client example
//! boots, once against a host listener and once against the echo guest.

use crate::cargo_tasks::build_example;
use crate::host::{self, Connect};
use crate::setup::Tools;
use crate::soak::{self, SoakConfig};
use crate::vm::{run_dir, Accel, Backend, Guest, GuestConfig, Machine, GUEST_EXIT_SUCCESS};
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
/// The host port the client example connects to by default.
const CLIENT_HOST_PORT: u32 = 4321;
/// A port nobody listens on.
const UNUSED_PORT: u32 = 4444;
/// How long a guest may take from QEMU's start to listening (TCG is slow to boot).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection may wait for the guest's answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an echo may go without progress.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the client example may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Hard limit on every QEMU and backend process of a test run.
const PROCESS_LIMIT: Duration = Duration::from_secs(900);
/// Bytes in flight per echo connection (see [`host::echo_exchange`]).
const ECHO_WINDOW: u64 = 64 * 1024;

/// Time the backend gets, after the guest is up, to finish setting up its queues.
///
/// QEMU sends the vhost-user queue set-up messages when the guest's driver starts the
/// device, without waiting for the backend to process them, so a guest can print that it
/// listens before vhost-device-vsock has its queues. A host connection that arrives in
/// that window makes vhost-device-vsock 0.3.0's worker thread fail and stop serving the
/// guest for good. Waiting a moment before the first connection avoids the window.
const BACKEND_SETTLE: Duration = Duration::from_millis(500);

/// The echo guest booted on one machine, with its backend.
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
    /// Boots the echo example on `machine` and waits until it listens. With
    /// `client_slot`, the backend also has a sibling slot for [`EchoVm::run_client`].
    pub fn boot(
        tools: &Tools,
        machine: Machine,
        accel: Accel,
        kernel: &Path,
        run: &str,
        client_slot: bool,
    ) -> Result<Self> {
        Self::boot_with_cmdline(tools, machine, accel, kernel, run, client_slot, "")
    }

    /// [`EchoVm::boot`] with `cmdline` for the guest.
    pub fn boot_with_cmdline(
        tools: &Tools,
        machine: Machine,
        accel: Accel,
        kernel: &Path,
        run: &str,
        client_slot: bool,
        cmdline: &str,
    ) -> Result<Self> {
        let dir = run_dir(run)?;
        let cids: &[u32] = if client_slot {
            &[GUEST_CID, CLIENT_CID]
        } else {
            &[GUEST_CID]
        };
        let backend = Backend::start(tools, &dir, cids, None, PROCESS_LIMIT)?;
        let Some(slot) = backend.guest(GUEST_CID).cloned() else {
            bail!("backend has no slot for cid {GUEST_CID}");
        };
        let config = GuestConfig {
            kernel: kernel.to_path_buf(),
            machine,
            accel,
            cmdline: cmdline.to_string(),
            initrd: None,
            limit: PROCESS_LIMIT,
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

    /// The Unix socket host programs reach the echo guest through.
    pub fn uds(&self) -> &Path {
        &self.guest.slot.uds
    }

    /// Boots `kernel` in the client slot with `cmdline` and waits for it to exit; returns
    /// QEMU's exit status (`None` if it had to be stopped) and the serial log.
    fn run_client(&self, kernel: &Path, cmdline: &str) -> Result<(Option<i32>, String)> {
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
        Ok((status.and_then(|s| s.code()), client.serial_log()))
    }

    /// Stops QEMU, then the backend.
    pub fn stop(&mut self) {
        self.guest.stop();
        self.backend.stop();
    }
}

/// What the tests need besides the booted echo guest.
struct Kernels {
    client: PathBuf,
}

/// A QEMU test; returns a line of detail on success.
type QemuTest = fn(&mut EchoVm, &Kernels) -> Result<String>;

/// The tests, in the order they run against one echo guest.
const TESTS: &[(&str, QemuTest)] = &[
    ("echo_one_message", echo_one_message),
    ("echo_3_concurrent_1mib_patterned", echo_3_concurrent_1mib),
    ("echo_20_sequential_connections", echo_20_sequential),
    ("echo_64_concurrent_256kib", echo_64_concurrent_256kib),
    (
        "unused_port_refused_then_still_serving",
        unused_port_refused,
    ),
    ("host_stops_reading_guest_send_blocks", host_stops_reading),
    (
        "host_closes_mid_transfer_others_continue",
        host_closes_mid_transfer,
    ),
    ("client_to_host_listener_exits_0", client_to_host_listener),
    ("client_to_sibling_echo_guest", client_to_sibling_echo),
    (
        "client_in_ring3_to_sibling_echo_guest",
        client_in_ring3_to_sibling_echo,
    ),
    ("guest_log_has_no_errors", guest_log_has_no_errors),
];

/// Runs every QEMU test on every machine in `machines`; returns (passed, failed).
pub fn run_all(tools: &Tools, accel: Accel, machines: &[Machine]) -> Result<(usize, usize)> {
    let echo_kernel = build_example("echo")?;
    let kernels = Kernels {
        client: build_example("client")?,
    };
    let mut passed = 0;
    let mut failed = 0;
    for &machine in machines {
        println!("\n=== QEMU tests on {machine} ({accel})");
        let started = Instant::now();
        let run = format!("test-{machine}");
        let mut vm = match EchoVm::boot(tools, machine, accel, &echo_kernel, &run, true) {
            Ok(vm) => vm,
            Err(e) => {
                println!("FAIL {machine}/boot_echo_guest: {e:#}");
                failed += 1 + TESTS.len();
                continue;
            }
        };
        println!(
            "ok   {machine}/boot_echo_guest ({:.1}s to listening)",
            started.elapsed().as_secs_f64()
        );
        passed += 1;
        let failed_before = failed;
        for (name, test) in TESTS {
            let started = Instant::now();
            match test(&mut vm, &kernels) {
                Ok(detail) => {
                    passed += 1;
                    println!(
                        "ok   {machine}/{name} ({detail}; {:.1}s)",
                        started.elapsed().as_secs_f64()
                    );
                }
                Err(e) => {
                    failed += 1;
                    println!("FAIL {machine}/{name}: {e:#}");
                }
            }
        }
        vm.stop();
        if failed > failed_before {
            println!(
                "--- serial log of the {machine} echo guest:\n{}",
                vm.guest.serial_log()
            );
            println!("--- backend log:\n{}", vm.backend.log());
        }
    }
    Ok((passed, failed))
}

/// Echoes `total` patterned bytes on each of `count` concurrent connections.
fn concurrent_echoes(vm: &EchoVm, count: u64, total: u64) -> Result<String> {
    let started = Instant::now();
    let streams = (0..count)
        .map(|_| host::connect_accepted(vm.uds(), ECHO_PORT, CONNECT_TIMEOUT))
        .collect::<Result<Vec<_>>>()?;
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(seed, stream)| {
            thread::spawn(move || {
                host::echo_exchange(stream, seed as u64, total, ECHO_WINDOW, STALL_TIMEOUT)
            })
        })
        .collect();
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
    Ok(format!(
        "{count} x {} KiB each way, byte-exact, {:.2} MiB/s echoed",
        total / 1024,
        (count * total) as f64 / seconds / (1 << 20) as f64
    ))
}

fn echo_one_message(vm: &mut EchoVm, _: &Kernels) -> Result<String> {
    concurrent_echoes(vm, 1, 100)
}

fn echo_3_concurrent_1mib(vm: &mut EchoVm, _: &Kernels) -> Result<String> {
    concurrent_echoes(vm, 3, 1 << 20)
}

fn echo_64_concurrent_256kib(vm: &mut EchoVm, _: &Kernels) -> Result<String> {
    concurrent_echoes(vm, 64, 256 * 1024)
}

fn echo_20_sequential(vm: &mut EchoVm, _: &Kernels) -> Result<String> {
    for round in 0..20u64 {
        let stream = host::connect_accepted(vm.uds(), ECHO_PORT, CONNECT_TIMEOUT)?;
        host::echo_exchange(
            stream,
            100 + round,
            4096 + round * 37,
            ECHO_WINDOW,
            STALL_TIMEOUT,
        )
        .map_err(|e| e.context(format!("connection {round}")))?;
    }
    Ok("20 connections one after another".to_string())
}

fn unused_port_refused(vm: &mut EchoVm, _: &Kernels) -> Result<String> {
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
fn host_stops_reading(vm: &mut EchoVm, _: &Kernels) -> Result<String> {
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
        let log = vm.guest.serial_log();
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
fn host_closes_mid_transfer(vm: &mut EchoVm, _: &Kernels) -> Result<String> {
    const TOTAL: u64 = 512 * 1024;
    let mut abandoned = host::connect_accepted(vm.uds(), ECHO_PORT, CONNECT_TIMEOUT)?;
    let streams = (0..3)
        .map(|_| host::connect_accepted(vm.uds(), ECHO_PORT, CONNECT_TIMEOUT))
        .collect::<Result<Vec<_>>>()?;
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(seed, stream)| {
            thread::spawn(move || {
                host::echo_exchange(stream, 50 + seed as u64, TOTAL, ECHO_WINDOW, STALL_TIMEOUT)
            })
        })
        .collect();
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
fn client_to_host_listener(vm: &mut EchoVm, kernels: &Kernels) -> Result<String> {
    let Some(slot) = vm.backend.guest(CLIENT_CID).cloned() else {
        bail!("no client slot");
    };
    let path = PathBuf::from(format!("{}_{CLIENT_HOST_PORT}", slot.uds.display()));
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
    let (status, log) = vm.run_client(&kernels.client, "")?;
    let _ = std::fs::remove_file(&path);
    let received = host
        .join()
        .map_err(|_| anyhow::anyhow!("host listener panicked"))??;
    if received != format!("hello from {CLIENT_CID}\n") {
        bail!("the host received {received:?}");
    }
    if status != Some(GUEST_EXIT_SUCCESS) {
        bail!("the client exited with {status:?}; serial log:\n{log}");
    }
    if !log.contains("client: got back \"hello from the host\"") {
        bail!("the client did not print the host's line; serial log:\n{log}");
    }
    Ok(format!(
        "host got {received:?}; guest printed the reply and exited 33"
    ))
}

/// The client example in the sibling guest talks to the echo guest by CID.
fn client_to_sibling_echo(vm: &mut EchoVm, kernels: &Kernels) -> Result<String> {
    client_echoed_by_sibling(vm, kernels, "")
}

/// The same, with the client in ring 3 after boot (`ring=3`, what the benchmark guest
/// does): serial output, the device's registers and `isa-debug-exit` from ring 3.
fn client_in_ring3_to_sibling_echo(vm: &mut EchoVm, kernels: &Kernels) -> Result<String> {
    let detail = client_echoed_by_sibling(vm, kernels, "ring=3")?;
    Ok(format!("ring 3, {detail}"))
}

/// Runs the client against the echo guest with `extra` on its command line; checks that
/// it got its line back and exited 33, and, with `ring=3`, that it said it ran there.
fn client_echoed_by_sibling(vm: &mut EchoVm, kernels: &Kernels, extra: &str) -> Result<String> {
    let cmdline = format!("cid={GUEST_CID} port={ECHO_PORT} {extra}");
    let (status, log) = vm.run_client(&kernels.client, &cmdline)?;
    if extra.contains("ring=3") && !log.contains("boot: running in ring 3") {
        bail!("the client did not say it runs in ring 3; serial log:\n{log}");
    }
    if status != Some(GUEST_EXIT_SUCCESS) {
        bail!("the client exited with {status:?}; serial log:\n{log}");
    }
    let expected = format!("client: got back \"hello from {CLIENT_CID}\"");
    if !log.contains(&expected) {
        bail!("the client did not print {expected:?}; serial log:\n{log}");
    }
    Ok(format!(
        "guest {CLIENT_CID} -> guest {GUEST_CID}:{ECHO_PORT}, line echoed, exit 33"
    ))
}

fn guest_log_has_no_errors(vm: &mut EchoVm, _: &Kernels) -> Result<String> {
    guest_log_clean(&mut vm.guest, "guest")
}

/// Checks that `guest` still runs and its serial log has no `[PANIC]` or `[ERROR]` line;
/// prints its warnings, each prefixed with `who`.
pub fn guest_log_clean(guest: &mut Guest, who: &str) -> Result<String> {
    if !guest.is_running() {
        bail!("the {who} is no longer running");
    }
    let log = guest.serial_log();
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
    for warning in &warnings {
        println!("     {who}: {warning}");
    }
    Ok(format!(
        "still running, {} log lines, {} warnings, no errors",
        log.lines().count(),
        warnings.len()
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
    let kernel = build_example("echo")?;
    let mut vm =
        EchoVm::boot_with_cmdline(tools, machine, accel, &kernel, "soak", false, guest_args)?;
    println!(
        "soak: {} clients for {} s against the echo guest on {machine} ({accel}), seed {}, mix {:?}",
        load.clients,
        load.duration.as_secs(),
        load.seed,
        load.mix
    );
    let started = Instant::now();
    let report = soak::run(&SoakConfig {
        uds: vm.uds().to_path_buf(),
        echo_port: ECHO_PORT,
        source_port: SOURCE_PORT,
        load,
        vanish_before_answer: false,
    })?;
    println!("soak: {}", report.summary(started.elapsed()));
    for failure in report.failures.iter().take(20) {
        println!("soak:   {failure}");
    }
    let after = concurrent_echoes(&vm, 4, 64 * 1024);
    match &after {
        Ok(detail) => println!("soak: afterwards the guest still echoes: {detail}"),
        Err(e) => println!("soak: afterwards the guest does not echo: {e:#}"),
    }
    let running = vm.guest.is_running();
    vm.stop();
    let log = vm.guest.serial_log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("[PANIC]") || line.contains("[ERROR]"))
        .collect();
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains("[WARN]")).collect();
    println!(
        "soak: guest {}, {} log lines, {} warnings, {} errors (serial log in {})",
        if running {
            "still running"
        } else {
            "stopped by itself"
        },
        log.lines().count(),
        warnings.len(),
        errors.len(),
        vm.dir.display()
    );
    for line in errors.iter().chain(warnings.iter()).take(20) {
        println!("soak:   guest: {line}");
    }
    Ok(report.failures.is_empty() && after.is_ok() && running && errors.is_empty())
}
