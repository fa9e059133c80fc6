//! The Linux sibling suite of `cargo xtask test`: a stock Linux guest (Debian 12's
//! kernel and its `vmw_vsock_virtio_transport`, see `linux.rs`) and our example guests in
//! one vhost-device-vsock sibling group, on q35.
//!
//! One backend serves three CIDs: the echo example (3), configured for Linux with
//! [`LINUX_RECIPE`]; a slot (4) where the client example boots, and at the end an echo
//! guest with the default `Config`; and Linux (5). Linux boots once: its test program
//! (`linux-peer control`, see `linux-peer/src/main.rs`) connects to a host listener and
//! runs the commands the tests send, one line each, answering `ok <detail>` or
//! `fail <why>`, so every Linux-side case runs in that one boot.
//!
//! When Debian's kernel cannot be fetched (no `apt-get`, no network, nothing cached) the
//! suite prints one `skip` line and counts as skipped, never as passed.

use crate::cargo_tasks::build_example;
use crate::linux::{self, LinuxGuest, KERNEL_CMDLINE};
use crate::qemu_tests::{guest_log_clean, BOOT_TIMEOUT, ECHO_PORT, ECHO_READY, GUEST_CID};
use crate::setup::Tools;
use crate::vm::{run_dir, Accel, Backend, Guest, GuestConfig, Machine, GUEST_EXIT_SUCCESS};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// The `Config` words our guests need to talk to a Linux sibling through
/// vhost-device-vsock 0.3.0, which puts a sibling's packet whole into one receive buffer
/// and truncates what does not fit. Measured with Debian 12's 6.1.0-57 kernel:
/// - `rx=65580`: Linux sends packets of up to 64 KiB of payload (65,580 bytes with the
///   44-byte header) when the peer's credit allows it;
/// - the other way nothing: Linux's receive buffers take 3,776 bytes, header included
///   (3,732 of payload), and so does `Config::sibling_packet_size` by default; a packet
///   of 3,777 bytes is dropped by Linux, leaving a gap in its stream.
pub const LINUX_RECIPE: &str = "rx=65580";
/// Linux's CID.
pub const LINUX_CID: u32 = 5;
/// The slot where the client example and the default-config echo guest boot.
const SLOT_CID: u32 = 4;
/// The host port Linux's test program takes its commands from.
const CONTROL_PORT: u32 = 9999;
/// The port of Linux's echo server (`linux-peer serve`).
const LINUX_ECHO_PORT: u32 = 7000;
/// Bytes of the bulk transfers.
const BULK: u64 = 4 << 20;
/// How long Linux may take from QEMU's start to its control connection.
const LINUX_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long one command may take (each has its own stall timeouts inside Linux).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the client example may run.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a default-config bulk transfer may take to end in a reset (B44).
const RESET_WITHIN: Duration = Duration::from_secs(30);
/// How long Linux may take to power off after `exit`.
const POWER_OFF_TIMEOUT: Duration = Duration::from_secs(30);
/// Hard limit on every QEMU and backend process of the suite.
const PROCESS_LIMIT: Duration = Duration::from_secs(1200);
/// Time the backend gets after a guest is up before the first connection to it (see
/// `qemu_tests::BACKEND_SETTLE`).
const BACKEND_SETTLE: Duration = Duration::from_millis(500);
/// How long a QEMU started in the slot must run to count as started (see
/// `LinuxRun::start_in_slot`).
const SLOT_SETTLE: Duration = Duration::from_millis(300);
/// How often `LinuxRun::start_in_slot` tries.
const SLOT_ATTEMPTS: u32 = 3;

/// What the suite counted.
#[derive(Debug, Default)]
pub struct Tally {
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed.
    pub failed: usize,
    /// Tests that did not run because the Linux guest could not be had.
    pub skipped: usize,
}

/// The booted guests, the backend and Linux's control connection.
struct LinuxRun {
    tools: Tools,
    dir: PathBuf,
    accel: Accel,
    backend: Backend,
    echo: Guest,
    linux: Guest,
    control: Control,
    echo_kernel: PathBuf,
    client_kernel: PathBuf,
}

/// A Linux test; returns a line of detail on success.
type LinuxTest = fn(&mut LinuxRun) -> Result<String>;

/// The tests, in the order they run against one Linux boot.
const TESTS: &[(&str, LinuxTest)] = &[
    ("linux_pingpong_1000_with_echo_guest", pingpong),
    ("linux_100_connections_to_echo_guest", concurrent),
    ("linux_half_closes_echo_guest_echoes_rest", half_close),
    ("linux_drops_connections_mid_transfer", drops_mid_transfer),
    ("linux_bulk_echoed_by_echo_guest", bulk_echo),
    ("linux_bulk_from_echo_guest_source", bulk_source),
    ("client_guest_line_echoed_by_linux", client_line),
    ("client_guest_bulk_both_ways_with_linux", client_bulk),
    (
        "default_config_bulk_from_linux_resets_b44",
        default_config_resets,
    ),
    ("echo_guest_log_has_no_errors", echo_log_clean),
];

/// Runs the suite on q35 with `accel`.
pub fn run(tools: &Tools, accel: Accel) -> Result<Tally> {
    println!("\n=== Linux sibling tests on q35 ({accel})");
    let mut tally = Tally::default();
    let cache = match linux::fetch() {
        Ok(cache) => cache,
        Err(e) => {
            println!(
                "skip linux/*: Debian's kernel cannot be fetched, so the {} Linux tests did not run: {e:#}",
                TESTS.len() + 2
            );
            tally.skipped = TESTS.len() + 2;
            return Ok(tally);
        }
    };
    let guest = linux::build(cache).context("building the Linux guest")?;
    let echo_kernel = build_example("echo", crate::vm::Arch::X86_64)?;
    let client_kernel = build_example("client", crate::vm::Arch::X86_64)?;
    let started = Instant::now();
    let mut run = match LinuxRun::boot(tools, accel, &guest, echo_kernel, client_kernel) {
        Ok(run) => run,
        Err(e) => {
            println!("FAIL linux/boot: {e:#}");
            tally.failed += 1 + TESTS.len() + 1;
            return Ok(tally);
        }
    };
    println!(
        "ok   linux/boot (kernel {}; {:.1}s from QEMU's start to linux-peer's control connection{})",
        guest.release,
        started.elapsed().as_secs_f64(),
        run.modules_loaded()
            .map_or_else(String::new, |s| format!(", modules loaded at {s}s of guest time"))
    );
    tally.passed += 1;
    for (name, test) in TESTS {
        let started = Instant::now();
        match test(&mut run) {
            Ok(detail) => {
                tally.passed += 1;
                println!(
                    "ok   linux/{name} ({detail}; {:.1}s)",
                    started.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                tally.failed += 1;
                println!("FAIL linux/{name}: {e:#}");
            }
        }
    }
    match run.power_off() {
        Ok(detail) => {
            tally.passed += 1;
            println!("ok   linux/powers_off ({detail})");
        }
        Err(e) => {
            tally.failed += 1;
            println!("FAIL linux/powers_off: {e:#}");
        }
    }
    run.stop();
    if tally.failed > 0 {
        run.print_logs();
    }
    println!(
        "linux: the suite took {:.0}s",
        started.elapsed().as_secs_f64()
    );
    Ok(tally)
}

/// Linux's end of the control connection.
struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    /// Sends `command` and waits up to `timeout` for its answer: the detail of `ok`, an
    /// error for `fail`.
    fn ask(&mut self, command: &str, timeout: Duration) -> Result<String> {
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .with_context(|| format!("sending {command:?} to Linux"))?;
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => bail!("Linux closed the control connection at {command:?}"),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("no answer to {command:?} within {}s", timeout.as_secs())
            }
            Err(e) => return Err(e).context("reading Linux's answer"),
        }
        let line = line.trim_end();
        if let Some(detail) = line.strip_prefix("ok ") {
            Ok(detail.to_string())
        } else if let Some(why) = line.strip_prefix("fail ") {
            bail!("{command:?}: {why}")
        } else {
            bail!("{command:?}: unexpected answer {line:?}")
        }
    }
}

/// Waits up to `timeout` for one connection on `listener` (non-blocking).
fn accept_within(
    listener: &UnixListener,
    timeout: Duration,
    linux: &mut Guest,
) -> Result<UnixStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !linux.is_running() {
                    bail!(
                        "Linux stopped before it connected; serial log:\n{}",
                        tail(&linux.serial_log(), 40)
                    );
                }
                if Instant::now() >= deadline {
                    bail!(
                        "Linux did not connect within {}s; serial log:\n{}",
                        timeout.as_secs(),
                        tail(&linux.serial_log(), 40)
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).context("waiting for Linux's control connection"),
        }
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl LinuxRun {
    /// Starts the backend, the echo guest (configured for Linux) and Linux, and waits for
    /// both: the echo guest listening, Linux's test program on the control connection.
    fn boot(
        tools: &Tools,
        accel: Accel,
        guest: &LinuxGuest,
        echo_kernel: PathBuf,
        client_kernel: PathBuf,
    ) -> Result<Self> {
        let dir = run_dir("test-linux")?;
        let backend = Backend::start(
            tools,
            &dir,
            &[GUEST_CID, SLOT_CID, LINUX_CID],
            None,
            PROCESS_LIMIT,
        )?;
        let slot = |cid: u32| {
            backend
                .guest(cid)
                .cloned()
                .with_context(|| format!("backend has no slot for cid {cid}"))
        };
        let linux_slot = slot(LINUX_CID)?;
        let control_path = PathBuf::from(format!("{}_{CONTROL_PORT}", linux_slot.uds.display()));
        let _ = std::fs::remove_file(&control_path);
        let listener = UnixListener::bind(&control_path)
            .with_context(|| format!("binding {}", control_path.display()))?;
        let echo_config = GuestConfig {
            kernel: echo_kernel.clone(),
            machine: Machine::Q35,
            accel,
            cmdline: LINUX_RECIPE.to_string(),
            initrd: None,
            limit: PROCESS_LIMIT,
        };
        let mut echo = Guest::start(tools, &dir, &slot(GUEST_CID)?, &echo_config)?;
        let linux_config = GuestConfig {
            kernel: guest.kernel.clone(),
            machine: Machine::Q35,
            accel,
            cmdline: format!("{KERNEL_CMDLINE} -- control port={CONTROL_PORT}"),
            initrd: Some(guest.initrd.clone()),
            limit: PROCESS_LIMIT,
        };
        let mut linux = Guest::start(tools, &dir, &linux_slot, &linux_config)?;
        echo.wait_for_serial(ECHO_READY, BOOT_TIMEOUT)?;
        let stream = accept_within(&listener, LINUX_BOOT_TIMEOUT, &mut linux)?;
        let _ = std::fs::remove_file(&control_path);
        let control = Control {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        Ok(LinuxRun {
            tools: tools.clone(),
            dir,
            accel,
            backend,
            echo,
            linux,
            control,
            echo_kernel,
            client_kernel,
        })
    }

    /// The guest time at which `/init` had loaded the modules, from its log line.
    fn modules_loaded(&self) -> Option<String> {
        let log = self.linux.serial_log();
        let (_, rest) = log.split_once("init: modules loaded after ")?;
        Some(rest.split_whitespace().next()?.to_string())
    }

    fn ask(&mut self, command: &str) -> Result<String> {
        self.control.ask(command, COMMAND_TIMEOUT)
    }

    /// Boots `kernel` in the slot (CID 4) with `cmdline`.
    ///
    /// When a guest's QEMU exits, vhost-device-vsock 0.3.0 builds that slot's backend
    /// anew and binds its vhost-user socket again; a QEMU started in between finds no
    /// socket and exits at once. So this waits for the socket, and starts QEMU again
    /// (up to [`SLOT_ATTEMPTS`] times) when it exits within [`SLOT_SETTLE`].
    fn start_in_slot(&self, kernel: &Path, cmdline: &str, limit: Duration) -> Result<Guest> {
        let Some(slot) = self.backend.guest(SLOT_CID).cloned() else {
            bail!("backend has no slot for cid {SLOT_CID}");
        };
        let config = GuestConfig {
            kernel: kernel.to_path_buf(),
            machine: Machine::Q35,
            accel: self.accel,
            cmdline: cmdline.to_string(),
            initrd: None,
            limit,
        };
        let mut attempt = 1;
        loop {
            let deadline = Instant::now() + SLOT_SETTLE * 10;
            while !slot.vhost_socket.exists() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let mut guest = Guest::start(&self.tools, &self.dir, &slot, &config)?;
            thread::sleep(SLOT_SETTLE);
            if guest.is_running() || attempt == SLOT_ATTEMPTS {
                return Ok(guest);
            }
            attempt += 1;
        }
    }

    /// Runs the client example in the slot with `cmdline`; fails unless it exits with
    /// success. Returns its serial log.
    fn run_client(&self, cmdline: &str) -> Result<String> {
        let mut client = self.start_in_slot(
            &self.client_kernel,
            cmdline,
            CLIENT_TIMEOUT + Duration::from_secs(10),
        )?;
        let status = client.wait_exit(CLIENT_TIMEOUT);
        client.stop();
        let log = client.serial_log();
        let code = status.and_then(|s| s.code());
        if code != Some(GUEST_EXIT_SUCCESS) {
            bail!("the client exited with {code:?}; serial log:\n{log}");
        }
        Ok(log)
    }

    /// Asks Linux's test program to finish and waits for the machine to power off.
    fn power_off(&mut self) -> Result<String> {
        self.control
            .ask("exit", COMMAND_TIMEOUT)
            .context("asking linux-peer to exit")?;
        let started = Instant::now();
        match self.linux.wait_exit(POWER_OFF_TIMEOUT) {
            Some(status) if status.success() => Ok(format!(
                "QEMU exited with status 0, {:.1}s after exit",
                started.elapsed().as_secs_f64()
            )),
            Some(status) => bail!("QEMU exited with {status}"),
            None => bail!(
                "Linux did not power off within {}s",
                POWER_OFF_TIMEOUT.as_secs()
            ),
        }
    }

    fn stop(&mut self) {
        self.linux.stop();
        self.echo.stop();
        self.backend.stop();
    }

    fn print_logs(&self) {
        println!(
            "--- Linux serial log (last 80 lines):\n{}",
            tail(&self.linux.serial_log(), 80)
        );
        println!(
            "--- echo guest serial log (last 80 lines):\n{}",
            tail(&self.echo.serial_log(), 80)
        );
        println!("--- backend log:\n{}", self.backend.log());
    }
}

fn pingpong(run: &mut LinuxRun) -> Result<String> {
    run.ask(&format!(
        "pingpong cid={GUEST_CID} port={ECHO_PORT} rounds=1000"
    ))
}

fn concurrent(run: &mut LinuxRun) -> Result<String> {
    // At most 32 open at once: the echo guest's listen backlog is 32, and a slow guest
    // (TCG on a busy machine) can take a whole burst of connects in one poll before it
    // accepts any; beyond the backlog it answers RST, as TCP does. With 64 at once, 27 of
    // 100 were refused in one run beside other QEMU work.
    run.ask(&format!(
        "concurrent cid={GUEST_CID} port={ECHO_PORT} count=100 open=32 bytes=200"
    ))
}

fn half_close(run: &mut LinuxRun) -> Result<String> {
    run.ask(&format!(
        "halfclose cid={GUEST_CID} port={ECHO_PORT} bytes=65536"
    ))
}

/// Linux drops two connections mid-transfer (a close with `SO_LINGER` 0 and a process
/// that exits) while three others echo; checks what Linux's trace says it sent: a
/// SHUTDOWN with both flags (0x3) first, and an RST either way at the end.
fn drops_mid_transfer(run: &mut LinuxRun) -> Result<String> {
    let detail = run.ask(&format!("abandon cid={GUEST_CID} port={ECHO_PORT}"))?;
    for case in ["SO_LINGER 0 close: ", "process exit: "] {
        let Some((_, packets)) = detail.split_once(case) else {
            bail!("no packet trace for the {case:?} case: {detail}");
        };
        let packets = packets.split(';').next().unwrap_or("");
        if !packets.starts_with("sent SHUTDOWN(0x3)") {
            bail!("Linux's first control packet after the {case}was not SHUTDOWN(0x3): {packets}");
        }
        if !packets.contains("RST") {
            bail!("no RST ended the connection after the {case}: {packets}");
        }
    }
    Ok(detail)
}

fn bulk_echo(run: &mut LinuxRun) -> Result<String> {
    run.ask(&format!(
        "echo cid={GUEST_CID} port={ECHO_PORT} bytes={BULK}"
    ))
}

fn bulk_source(run: &mut LinuxRun) -> Result<String> {
    run.ask(&format!(
        "source cid={GUEST_CID} port={} bytes={BULK}",
        ECHO_PORT + 1
    ))
}

/// Checks that Linux's echo server finished exactly one connection, having echoed
/// `bytes` bytes up to the client's end of stream.
fn served_one(run: &mut LinuxRun, bytes: u64) -> Result<String> {
    let report = run.ask("served")?;
    let expected = format!("echoed {bytes} bytes, end of stream");
    if !report.starts_with("1 connections: ") || !report.contains(&expected) {
        bail!("Linux's echo server reports {report:?}, expected one connection that {expected}");
    }
    Ok(report)
}

/// Our client guest, with the default `Config`, sends its line to Linux's echo server.
fn client_line(run: &mut LinuxRun) -> Result<String> {
    run.ask(&format!("serve port={LINUX_ECHO_PORT}"))?;
    let log = run.run_client(&format!("cid={LINUX_CID} port={LINUX_ECHO_PORT}"))?;
    let expected = format!("client: got back \"hello from {SLOT_CID}\"");
    if !log.contains(&expected) {
        bail!("the client did not print {expected:?}; serial log:\n{log}");
    }
    let line = format!("hello from {SLOT_CID}\n").len() as u64;
    served_one(run, line)?;
    Ok(format!(
        "guest {SLOT_CID} -> Linux {LINUX_CID}:{LINUX_ECHO_PORT} with the default Config, line echoed, exit 33"
    ))
}

/// Our client guest, configured with [`LINUX_RECIPE`], echoes [`BULK`] bytes through
/// Linux's echo server.
fn client_bulk(run: &mut LinuxRun) -> Result<String> {
    let log = run.run_client(&format!(
        "cid={LINUX_CID} port={LINUX_ECHO_PORT} bulk={BULK} {LINUX_RECIPE}"
    ))?;
    let Some(result) = log
        .lines()
        .find_map(|line| line.split_once("client: bulk ").map(|(_, rest)| rest))
    else {
        bail!("the client printed no bulk result; serial log:\n{log}");
    };
    let line = format!("hello from {SLOT_CID}\n").len() as u64;
    served_one(run, line + BULK)?;
    Ok(format!("{LINUX_RECIPE}: {result}"))
}

/// With the default `Config` (16 KiB receive buffers), Linux's 64 KiB packets do not fit
/// and vhost-device-vsock truncates them: the connection must end in a reset on both
/// sides (B44) within [`RESET_WITHIN`], not hang.
fn default_config_resets(run: &mut LinuxRun) -> Result<String> {
    let mut echo = run.start_in_slot(&run.echo_kernel, "", PROCESS_LIMIT)?;
    let result = (|| -> Result<String> {
        echo.wait_for_serial(ECHO_READY, BOOT_TIMEOUT)?;
        thread::sleep(BACKEND_SETTLE);
        let linux_side = run.ask(&format!(
            "expect-reset cid={SLOT_CID} port={ECHO_PORT} bytes={BULK} seconds={}",
            RESET_WITHIN.as_secs()
        ))?;
        // Our side: the echo guest's connection ended with ConnectionReset.
        let deadline = Instant::now() + Duration::from_secs(5);
        let ours = loop {
            let log = echo.serial_log();
            if let Some(line) = log.lines().find(|line| {
                line.contains(&format!("echo: {LINUX_CID}:")) && line.contains("ended after")
            }) {
                break line.to_string();
            }
            if Instant::now() >= deadline {
                bail!(
                    "Linux saw a reset ({linux_side}) but the echo guest logged no end of the connection; serial log:\n{}",
                    tail(&log, 40)
                );
            }
            thread::sleep(Duration::from_millis(100));
        };
        if !ours.contains("reset") {
            bail!("the echo guest's connection did not end in a reset: {ours}");
        }
        Ok(format!("Linux: {linux_side}; echo guest: {}", ours.trim()))
    })();
    if result.is_err() {
        println!(
            "--- default-config echo guest serial log (last 40 lines):\n{}",
            tail(&echo.serial_log(), 40)
        );
    }
    echo.stop();
    result
}

fn echo_log_clean(run: &mut LinuxRun) -> Result<String> {
    guest_log_clean(&mut run.echo, "echo guest")
}
