//! Tests that boot the example guests in QEMU and check them from the host through
//! `vhost-device-vsock`.

use crate::cargo_tasks::build_example;
use crate::host::{self, Connect};
use crate::setup::Tools;
use crate::vm::{run_dir, Accel, Backend, Guest, GuestConfig, Machine};
use anyhow::{bail, Result};
use std::thread;
use std::time::{Duration, Instant};

/// The guest CID every single-guest test uses.
pub const GUEST_CID: u32 = 3;
/// The port the echo example listens on.
pub const ECHO_PORT: u32 = 1234;
/// What the echo example prints once it listens.
pub const ECHO_READY: &str = "listening on port 1234";
/// A port nobody listens on.
const UNUSED_PORT: u32 = 4444;
/// How long a guest may take from QEMU's start to listening (TCG is slow to boot).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection may wait for the guest's answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an echo may go without progress.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Hard limit on every QEMU and backend process of a test run.
const PROCESS_LIMIT: Duration = Duration::from_secs(600);
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

/// Waits [`BACKEND_SETTLE`].
pub fn settle_backend() {
    thread::sleep(BACKEND_SETTLE);
}

/// The echo guest booted on one machine, with its backend.
pub struct EchoGuest {
    /// The backend, stopped last.
    pub backend: Backend,
    /// The guest.
    pub guest: Guest,
}

impl EchoGuest {
    /// Boots the echo example on `machine` and waits until it listens.
    pub fn boot(
        tools: &Tools,
        machine: Machine,
        accel: Accel,
        kernel: &std::path::Path,
        run: &str,
    ) -> Result<Self> {
        let dir = run_dir(run)?;
        let backend = Backend::start(tools, &dir, &[GUEST_CID], PROCESS_LIMIT)?;
        let Some(slot) = backend.guest(GUEST_CID).cloned() else {
            bail!("backend has no slot for cid {GUEST_CID}");
        };
        let config = GuestConfig {
            kernel: kernel.to_path_buf(),
            machine,
            accel,
            cmdline: String::new(),
            limit: PROCESS_LIMIT,
        };
        let mut guest = Guest::start(tools, &dir, &slot, &config)?;
        guest.wait_for_serial(ECHO_READY, BOOT_TIMEOUT)?;
        settle_backend();
        Ok(EchoGuest { backend, guest })
    }

    fn uds(&self) -> &std::path::Path {
        &self.guest.slot.uds
    }

    /// Stops QEMU, then the backend.
    pub fn stop(&mut self) {
        self.guest.stop();
        self.backend.stop();
    }
}

/// A test against a booted echo guest; returns a line of detail on success.
type EchoTest = fn(&mut EchoGuest) -> Result<String>;

/// The echo guest's tests, in the order they run.
const ECHO_TESTS: &[(&str, EchoTest)] = &[
    ("echo_one_message", echo_one_message),
    ("echo_3_concurrent_1mib_patterned", echo_3_concurrent_1mib),
    ("echo_8_concurrent", echo_8_concurrent),
    ("echo_20_sequential_connections", echo_20_sequential),
    (
        "unused_port_refused_then_still_serving",
        unused_port_refused,
    ),
    ("guest_log_has_no_errors", guest_log_has_no_errors),
];

/// Runs every QEMU test on every machine in `machines`; returns (passed, failed).
pub fn run_all(tools: &Tools, accel: Accel, machines: &[Machine]) -> Result<(usize, usize)> {
    let kernel = build_example("echo")?;
    let mut passed = 0;
    let mut failed = 0;
    for &machine in machines {
        println!("\n=== QEMU tests on {machine} ({accel})");
        let started = Instant::now();
        let mut echo =
            match EchoGuest::boot(tools, machine, accel, &kernel, &format!("test-{machine}")) {
                Ok(echo) => echo,
                Err(e) => {
                    println!("FAIL {machine}/boot_echo_guest: {e:#}");
                    failed += 1 + ECHO_TESTS.len();
                    continue;
                }
            };
        println!(
            "ok   {machine}/boot_echo_guest ({:.1}s to listening)",
            started.elapsed().as_secs_f64()
        );
        passed += 1;
        for (name, test) in ECHO_TESTS {
            let started = Instant::now();
            match test(&mut echo) {
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
        echo.stop();
        if failed > 0 {
            println!(
                "--- serial log of the {machine} echo guest:\n{}",
                echo.guest.serial_log()
            );
            println!("--- backend log:\n{}", echo.backend.log());
        }
    }
    Ok((passed, failed))
}

/// Echoes `total` patterned bytes on each of `count` concurrent connections.
fn concurrent_echoes(echo: &EchoGuest, count: u64, total: u64) -> Result<String> {
    let started = Instant::now();
    let streams = (0..count)
        .map(|_| host::connect_accepted(echo.uds(), ECHO_PORT, CONNECT_TIMEOUT))
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
            Ok(Ok(_)) => {}
            Ok(Err(e)) => errors.push(format!("connection {index}: {e:#}")),
            Err(_) => errors.push(format!("connection {index}: worker panicked")),
        }
    }
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(format!(
        "{count} x {} KiB byte-exact, {:.2} MiB/s echoed",
        total / 1024,
        (count * total) as f64 / seconds / (1 << 20) as f64
    ))
}

fn echo_one_message(echo: &mut EchoGuest) -> Result<String> {
    concurrent_echoes(echo, 1, 100)
}

fn echo_3_concurrent_1mib(echo: &mut EchoGuest) -> Result<String> {
    concurrent_echoes(echo, 3, 1 << 20)
}

fn echo_8_concurrent(echo: &mut EchoGuest) -> Result<String> {
    concurrent_echoes(echo, 8, 128 * 1024)
}

fn echo_20_sequential(echo: &mut EchoGuest) -> Result<String> {
    for round in 0..20u64 {
        let stream = host::connect_accepted(echo.uds(), ECHO_PORT, CONNECT_TIMEOUT)?;
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

fn unused_port_refused(echo: &mut EchoGuest) -> Result<String> {
    match host::connect(echo.uds(), UNUSED_PORT, CONNECT_TIMEOUT)? {
        Connect::Refused => {}
        Connect::Accepted(_) => bail!("a connection to port {UNUSED_PORT} was accepted"),
    }
    concurrent_echoes(echo, 1, 1000).map_err(|e| e.context("echo after the refused connection"))?;
    Ok(format!(
        "port {UNUSED_PORT} refused; port {ECHO_PORT} still echoes"
    ))
}

fn guest_log_has_no_errors(echo: &mut EchoGuest) -> Result<String> {
    if !echo.guest.is_running() {
        bail!("the guest is no longer running");
    }
    let log = echo.guest.serial_log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("[PANIC]") || line.contains("[ERROR]"))
        .collect();
    if !errors.is_empty() {
        bail!("the serial log has errors:\n{}", errors.join("\n"));
    }
    // Warnings are how the driver reports bad device input (B10), which
    // vhost-device-vsock occasionally produces; they are shown, not failed on.
    let warnings: Vec<&str> = log.lines().filter(|line| line.contains("[WARN]")).collect();
    for warning in &warnings {
        println!("     guest: {warning}");
    }
    Ok(format!(
        "still running, {} log lines, {} warnings, no errors",
        log.lines().count(),
        warnings.len()
    ))
}
