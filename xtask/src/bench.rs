//! `cargo xtask bench`: runs the benchmarks and keeps their results under `target/bench/`.

use crate::cargo_tasks::build_example;
use crate::host;
use crate::process;
use crate::qemu_tests::{EchoVm, Wait, ECHO_PORT};
use crate::setup::{self, cargo, project_root, Tools};
use crate::vm::{self, Accel, Arch, Backend, Guest, GuestConfig, Machine, GUEST_EXIT_SUCCESS};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// Runs the host benchmark (`benches/host/`), printing its table and writing
/// `target/bench/host.json`.
pub fn host(quick: bool, full: bool, only: Option<&str>, drivers: &[String]) -> Result<()> {
    let dir = project_root().join("target").join("bench");
    std::fs::create_dir_all(&dir)?;
    let json = dir.join("host.json");
    let mut command = cargo();
    command
        .args(["bench", "--quiet", "--bench", "host", "--"])
        .arg("--json")
        .arg(&json);
    if quick {
        command.arg("--quick");
    }
    if full {
        command.arg("--full");
    }
    if let Some(only) = only {
        command.args(["--only", only]);
    }
    if !drivers.is_empty() {
        command.args(["--driver", &drivers.join(",")]);
    }
    process::run(&mut command)
}

// ---------------------------------------------------------------- QEMU

/// Options of `cargo xtask bench qemu`.
pub struct QemuOptions {
    /// The QEMU machine (virtio-pci on q35, virtio-mmio on microvm).
    pub machine: Machine,
    /// Only this accelerator; by default TCG, and KVM too when /dev/kvm opens.
    pub accel: Option<Accel>,
    /// The smallest sizes the workloads allow (64 MiB transfers).
    pub quick: bool,
    /// Bigger transfers and more repetitions.
    pub full: bool,
    /// Only the workloads whose name contains this text.
    pub only: Option<String>,
    /// Only these drivers (`ours`, `theirs`, `theirs-best`); all when empty.
    pub drivers: Vec<String>,
    /// Runs per workload instead of the default for `quick`/`full`.
    pub repetitions: Option<usize>,
    /// Extra words for the guest's command line (see `examples/bench.rs`).
    pub guest_args: String,
    /// The receive windows vhost-device-vsock advertises per connection, in bytes
    /// (its `tx-buffer-size`): how much guest->host data may be in flight. Every workload
    /// runs at each, in a table of its own.
    pub host_windows: Vec<u32>,
    /// How our driver waits in the guest (`wait=` on its command line): `irq` is the
    /// `ours` column; with `poll`, an `ours poll` driver runs beside it, compared in a
    /// table of its own. Each mode also gets an idle row (the QEMU process's CPU with the
    /// echo guest idle).
    pub waits: Vec<Wait>,
    /// Whether to pin QEMU's vCPU thread to the host's CPU 0 and everything else of the
    /// benchmark (QEMU's other threads, the backend, this program) to the other CPUs
    /// ([`pin_threads`]).
    pub pin: Pin,
}

/// `--pin`: whether the benchmark's threads are pinned ([`pin_threads`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Pin {
    /// Pinned when the host has 2 CPUs or more and the guest one vCPU (x86-64; the
    /// aarch64 `virt` guest has two, which pinning would put on one CPU). The default.
    Auto,
    /// Pinned; an error on a host with one CPU.
    On,
    /// Left to the host's scheduler.
    Off,
}

impl Pin {
    /// Whether to pin on this host, for a guest of `arch`.
    fn resolve(self, arch: Arch) -> Result<bool> {
        let cpus = host_cpus();
        match self {
            Pin::Auto => Ok(cpus >= 2 && arch == Arch::X86_64),
            Pin::On => {
                anyhow::ensure!(
                    cpus >= 2,
                    "--pin on needs 2 CPUs or more, this host has {cpus}"
                );
                Ok(true)
            }
            Pin::Off => Ok(false),
        }
    }
}

/// The host's CPUs, counted once: before [`pin_threads`] first pins this program, whose
/// later counts would follow its own CPU list.
fn host_cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The host's receive windows unless `--host-window` says otherwise: vhost-device-vsock
/// 0.3.0's own default, 64 KiB, what a user who starts it as its README says gets, and
/// 256 KiB, what Linux's vhost-vsock advertises (`VIRTIO_VSOCK_DEFAULT_BUF_SIZE`).
pub const DEFAULT_HOST_WINDOWS: [u32; 2] = [64 * 1024, 256 * 1024];

/// The benchmark guest's CID.
const GUEST_CID: u32 = 3;
/// The port the benchmark guest takes commands on (`examples/bench.rs`).
const CONTROL_PORT: u32 = 5000;
/// What the guest prints once it listens.
const GUEST_READY: &str = "bench: ready";
/// How long a guest may take from QEMU's start to listening.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Time the backend gets after the guest is up (see `qemu_tests::BACKEND_SETTLE`:
/// vhost-device-vsock 0.3.0 fails for good on a connection that arrives earlier).
const BACKEND_SETTLE: Duration = Duration::from_millis(500);
/// How long a connection may wait for the guest's answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a workload may go without any progress.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest may take to log its result line after the host is done.
const RESULT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long QEMU may take to exit once told to.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Hard limit on every QEMU and backend process (the watchdog kills them after it).
const PROCESS_LIMIT: Duration = Duration::from_secs(1800);
/// Untimed round trips before the ping-pong is measured.
const PING_PONG_WARMUP: u64 = 20;
/// Bytes of the untimed transfer after each boot ([`warm_up`]).
const WARM_UP_BYTES: u64 = 64 << 20;
/// Added to the warm-up's `seq=`, so its command differs from every workload's.
const WARM_UP_SEQ: u32 = 1_000_000;

/// A driver configuration the benchmark guest runs (`driver=` on its command line).
#[derive(Clone, Copy, Debug)]
struct Driver {
    /// The guest's `driver=` value, also the key in the JSON results.
    arg: &'static str,
    /// More words for the guest's command line.
    words: &'static str,
    /// What the table calls it.
    label: &'static str,
    /// The settings, for the header.
    settings: &'static str,
}

/// Every driver configuration, ours first; the table compares each of ours with the
/// better of virtio-drivers' two.
const DRIVERS: [Driver; 4] = [
    Driver {
        arg: "ours",
        words: "",
        label: "ours",
        settings: "vsock-guest VsockDevice, Config::default(), 256 KiB receive memory per socket",
    },
    Driver {
        arg: "ours-throughput",
        words: "preset=throughput",
        label: "ours tp",
        settings: "vsock-guest VsockDevice, Config::throughput() (64 KiB + 44 B RX buffers, 1 MiB tx memory, 256 KiB send buffer), 256 KiB receive memory per socket",
    },
    Driver {
        arg: "theirs",
        words: "",
        label: "theirs",
        settings: "virtio-drivers 0.13 VsockConnectionManager::new: 512 B RX buffers, 8-entry queues, 1 KiB per connection; update_credit after every recv",
    },
    Driver {
        arg: "theirs-best",
        words: "",
        label: "theirs best",
        settings: "virtio-drivers 0.13 at its best: 64 KiB + 44 B RX buffers, new_with_capacity(256 KiB); update_credit after every recv",
    },
];

/// Our driver spinning on `poll` (`wait=poll`), beside `ours`, which halts until the
/// device interrupts (`wait=irq`, the guests' default): the `--wait poll` column.
const OURS_POLL: Driver = Driver {
    arg: "ours",
    words: "wait=poll",
    label: "ours poll",
    settings:
        "as ours, spinning on poll (wait=poll) instead of halting until an interrupt or a deadline",
};

/// Host connections held open, idle, while the idle row measures.
const IDLE_CONNECTIONS: usize = 8;
/// How long the idle row measures the QEMU process's CPU time.
const IDLE_MEASURE: Duration = Duration::from_secs(10);

/// What a workload does, driven and timed by the host.
#[derive(Clone, Copy, Debug)]
enum Workload {
    /// The guest sends `total` pattern bytes in `write`-byte writes; the host checks them.
    /// `in_place`: our driver writes each chunk of the pattern straight into its
    /// transmit memory (`send_with`) instead of filling a buffer and `send`ing it;
    /// virtio-drivers, which has no such call, runs its usual (zero-copy) `send`.
    GuestToHost {
        total: u64,
        write: usize,
        in_place: bool,
    },
    /// The host sends `total` pattern bytes in `write`-byte writes; the guest reads them
    /// `write` bytes at a time, checks them and answers. `in_place`: our driver checks
    /// them where they arrived (`recv_with`) instead of copying them out first;
    /// virtio-drivers, which has no such call, reads into a buffer as always.
    HostToGuest {
        total: u64,
        write: usize,
        in_place: bool,
    },
    /// 1-byte round trips, each timed on the host.
    PingPong { round_trips: u64 },
    /// Host connects to the guest and closes, `cycles` times.
    ConnectClose { cycles: u64 },
}

/// One number a workload yields.
#[derive(Clone, Copy, Debug)]
struct Metric {
    /// E.g. "MiB/s".
    unit: &'static str,
    /// Whether a bigger number is better (rates) or a smaller one (times).
    higher_is_better: bool,
}

impl Workload {
    fn name(&self) -> String {
        match *self {
            Workload::GuestToHost {
                total,
                write,
                in_place,
            } => format!(
                "guest->host {} MiB, {} writes{}",
                total >> 20,
                size(write),
                if in_place { ", in place" } else { "" }
            ),
            Workload::HostToGuest {
                total,
                write,
                in_place,
            } => format!(
                "host->guest {} MiB, {} writes{}",
                total >> 20,
                size(write),
                if in_place { ", in place" } else { "" }
            ),
            Workload::PingPong { round_trips } => format!("1-byte ping-pong x {round_trips}"),
            Workload::ConnectClose { cycles } => format!("connect/close x {cycles}"),
        }
    }

    fn metrics(&self) -> &'static [Metric] {
        const RATE: Metric = Metric {
            unit: "MiB/s",
            higher_is_better: true,
        };
        match self {
            Workload::GuestToHost { .. } | Workload::HostToGuest { .. } => &[RATE],
            Workload::PingPong { .. } => &[
                Metric {
                    unit: "median us",
                    higher_is_better: false,
                },
                Metric {
                    unit: "p99 us",
                    higher_is_better: false,
                },
            ],
            Workload::ConnectClose { .. } => &[Metric {
                unit: "cycles/s",
                higher_is_better: true,
            }],
        }
    }

    /// What kicks are counted per: MiB moved or operations done.
    fn kick_unit(&self) -> &'static str {
        match self {
            Workload::GuestToHost { .. } | Workload::HostToGuest { .. } => "MiB",
            Workload::PingPong { .. } => "round trip",
            Workload::ConnectClose { .. } => "cycle",
        }
    }
}

fn size(bytes: usize) -> String {
    if bytes >= 1024 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

/// What the guest logged about one workload (`bench: result "..." ...`).
#[derive(Clone, Debug, Default)]
struct GuestReport {
    /// Every `key=value` of the line.
    fields: BTreeMap<String, String>,
}

impl GuestReport {
    fn number(&self, key: &str) -> Option<u64> {
        self.fields.get(key)?.parse().ok()
    }

    /// The report, or the guest's error when it logged `ok=0`.
    fn checked(self) -> Result<Self> {
        if self.number("ok") != Some(1) {
            bail!(
                "the guest failed: {}",
                self.fields
                    .get("error")
                    .map_or("(no error logged)", String::as_str)
            );
        }
        Ok(self)
    }
}

/// One workload's measurement.
#[derive(Clone, Debug)]
struct Run {
    /// One value per `Workload::metrics`.
    values: Vec<f64>,
    /// Wall time the host measured.
    seconds: f64,
    /// MiB moved or operations done, what kicks are counted per.
    units: f64,
    guest: GuestReport,
    /// Why the run is partial (stopped at the time limit), if it is.
    partial: Option<String>,
    /// The first metric of every run this one is the median of, in the order they ran
    /// (round by round; filled by [`median_run`]): the spread the median hides, and by
    /// its length how many runs there were.
    first_metric_by_round: Vec<f64>,
    /// Per metric, a lower bound of what a driver whose own work (notifications aside)
    /// cost nothing would have measured in the same run ([`quantile_floor`]); empty where
    /// the workload has none.
    floors: Vec<f64>,
    /// Microseconds QEMU's vCPU threads spent runnable but not running during the
    /// workload (waiting on a host run queue; [`vcpu_queued_micros`]), measured on the
    /// host; `None` where the kernel does not say.
    vcpu_queued_us: Option<f64>,
}

impl Run {
    /// A count the guest reported (`kicks_rx`, `driver_us`, ...) per unit of the workload.
    fn per_unit(&self, key: &str) -> Option<f64> {
        let count = self.guest.number(key)? as f64;
        (self.units > 0.0).then(|| count / self.units)
    }

    /// [`Run::vcpu_queued_us`] per unit of the workload.
    fn vcpu_queued_per_unit(&self) -> Option<f64> {
        let queued = self.vcpu_queued_us?;
        (self.units > 0.0).then(|| queued / self.units)
    }
}

/// Microseconds the vCPU threads of QEMU process `pid` have spent runnable but not
/// running so far: the second field of `/proc/PID/task/TID/schedstat` (nanoseconds
/// waiting on a run queue), summed over the threads QEMU names `CPU n/...`
/// (`-name ...,debug-threads=on`). Time a guest lost to the host's other threads (the
/// backend, the host program, QEMU's main loop) on this machine's cores; `None` when
/// there is no such thread or the kernel keeps no schedstat.
fn vcpu_queued_micros(pid: u32) -> Option<f64> {
    let mut queued_ns = 0u64;
    let mut found = false;
    for (_, path, vcpu) in qemu_threads(pid).ok()? {
        if !vcpu {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("schedstat")) else {
            continue;
        };
        let Some(waited) = stat.split_ascii_whitespace().nth(1) else {
            continue;
        };
        queued_ns += waited.parse::<u64>().ok()?;
        found = true;
    }
    found.then(|| queued_ns as f64 / 1000.0)
}

/// `--pin`: gives the vCPU threads of QEMU process `qemu` (named `CPU n/...`) the host's
/// CPU 0, and QEMU's other threads, every thread of the backend `backend` and of this
/// program (the host side of each workload, whose threads inherit it) CPUs 1 to N-1,
/// with `taskset`. On a 2-CPU host with nothing pinned, a guest that halted between
/// workloads came back sharing a core with the backend or the host program for a whole
/// transfer (its vCPU thread runnable but waiting 300 to 600 us per MiB), and a guest
/// that spins never did; pinned, neither does (README, "Benchmarks").
fn pin_threads(qemu: u32, backend: u32) -> Result<()> {
    let cpus = host_cpus();
    anyhow::ensure!(
        cpus >= 2,
        "pinning needs 2 CPUs or more, this host has {cpus}"
    );
    let others = format!("1-{}", cpus - 1);
    let taskset = |cpu_list: &str, pid: u32, all_threads: bool| -> Result<()> {
        let mut command = std::process::Command::new("taskset");
        if all_threads {
            command.arg("--all-tasks");
        }
        let status = command
            .args(["--pid", "--cpu-list", cpu_list, &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .context("running taskset (util-linux)")?;
        anyhow::ensure!(status.success(), "taskset {cpu_list} {pid}: {status}");
        Ok(())
    };
    taskset(&others, std::process::id(), true)?;
    taskset(&others, backend, true)?;
    let mut vcpus = 0;
    for (tid, _, vcpu) in qemu_threads(qemu)? {
        if vcpu {
            vcpus += 1;
            taskset("0", tid, false)?;
        } else {
            taskset(&others, tid, false)?;
        }
    }
    anyhow::ensure!(vcpus > 0, "found no vCPU thread of QEMU (pid {qemu})");
    Ok(())
}

/// The threads of QEMU process `pid`: each one's id, its `/proc/PID/task/TID` directory,
/// and whether it is a vCPU thread (QEMU names those `CPU n/...` with `-name
/// ...,debug-threads=on`).
fn qemu_threads(pid: u32) -> Result<Vec<(u32, std::path::PathBuf, bool)>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).context("listing QEMU's threads")?;
    Ok(tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_string_lossy().parse::<u32>().ok()?;
            let path = task.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            Some((tid, path, name.starts_with("CPU ")))
        })
        .collect())
}

/// Word `index` of the data pattern the guest sends and expects (`examples/bench.rs`):
/// byte `i` of a stream is byte `i % 8` (little-endian) of `pattern_word(i / 8)`.
fn pattern_word(index: u64) -> u64 {
    (index ^ 0x5555_5555_5555_5555)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(29)
}

/// The first `total` bytes of the pattern, computed once before anything is timed: the
/// host then sends slices of it and checks what it receives with a plain comparison, so
/// the unoptimised xtask build costs the measurement nothing.
fn pattern_stream(total: u64) -> Vec<u8> {
    let mut stream = vec![0u8; total.next_multiple_of(8) as usize];
    for (index, word) in stream.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&pattern_word(index as u64).to_le_bytes());
    }
    stream.truncate(total as usize);
    stream
}

/// The first offset in `received` (which starts at stream offset `offset`) that differs
/// from `expected`.
fn first_mismatch(offset: u64, received: &[u8], expected: &[u8]) -> Option<u64> {
    let expected = &expected[offset as usize..offset as usize + received.len()];
    if received == expected {
        return None;
    }
    let at = received.iter().zip(expected).position(|(a, b)| a != b)?;
    Some(offset + at as u64)
}

/// The benchmark guest running one driver, with its backend.
struct BenchVm {
    backend: Backend,
    guest: Guest,
    /// What plain memory work costs in this guest, measured before the driver starts.
    reference: Option<Reference>,
    /// How the guest describes its driver (`bench: driver ...`).
    description: Option<String>,
}

/// The guest's `bench: reference` line: MiB/s of the pattern fill, of the pattern check
/// (guests from before it have none) and of a memcpy.
#[derive(Clone, Copy, Debug)]
struct Reference {
    fill_mib_s: f64,
    check_mib_s: Option<f64>,
    copy_mib_s: f64,
}

impl Reference {
    fn parse(log: &str) -> Option<Self> {
        let rest = log
            .lines()
            .find_map(|line| line.split_once("bench: reference ").map(|(_, r)| r))?;
        let fields = parse_report(rest).ok()?;
        let bytes = fields.number("bytes")? as f64 / (1 << 20) as f64;
        let rate = |key: &str| Some(bytes / (fields.number(key)?.max(1) as f64 / 1e6));
        Some(Reference {
            fill_mib_s: rate("fill_us")?,
            check_mib_s: rate("check_us"),
            copy_mib_s: rate("copy_us")?,
        })
    }
}

/// The benchmark guest runs in ring 3 after boot (`examples/boot/ring3.rs`): nested KVM
/// without vmx/svm (`kvm_pvm`) emulates a guest's ring-0 code, where the guest filled
/// memory at about 1 MiB/s; in ring 3 it runs on the CPU (13 GiB/s). TCG runs it the
/// same either way, so both accelerators use it.
const GUEST_RING: &str = "ring=3";

impl BenchVm {
    fn boot(plan: &Plan<'_>, accel: Accel, driver: Driver, run: &str) -> Result<Self> {
        let Plan {
            tools,
            kernel,
            machine,
            guest_args,
            ..
        } = *plan;
        let dir = vm::run_dir(run)?;
        let backend = Backend::start(
            tools,
            &dir,
            &[GUEST_CID],
            Some(plan.host_window),
            PROCESS_LIMIT,
        )?;
        let Some(slot) = backend.guest(GUEST_CID).cloned() else {
            bail!("backend has no slot for cid {GUEST_CID}");
        };
        let config = GuestConfig {
            kernel: kernel.to_path_buf(),
            machine,
            accel,
            cmdline: format!(
                "driver={} {} port={CONTROL_PORT} {} {guest_args}",
                driver.arg,
                driver.words,
                // aarch64 has no ring 3 (and TCG runs ring 0 as fast).
                if machine.arch() == Arch::X86_64 {
                    GUEST_RING
                } else {
                    ""
                }
            ),
            initrd: None,
            limit: PROCESS_LIMIT,
        };
        let mut guest = Guest::start(tools, &dir, &slot, &config)?;
        guest.wait_for_serial(GUEST_READY, BOOT_TIMEOUT)?;
        if plan.pin {
            pin_threads(guest.pid(), backend.pid())?;
        }
        thread::sleep(BACKEND_SETTLE);
        let log = guest.serial_log();
        let reference = Reference::parse(&log);
        let description = log.lines().find_map(|line| {
            line.split_once("bench: driver ")
                .map(|(_, d)| d.to_string())
        });
        Ok(BenchVm {
            backend,
            guest,
            reference,
            description,
        })
    }

    fn uds(&self) -> &Path {
        &self.guest.slot.uds
    }

    /// Waits for the guest's result line for `command` and parses it.
    fn report(&mut self, command: &str) -> Result<GuestReport> {
        let marker = format!("bench: result \"{command}\" ");
        let deadline = Instant::now() + RESULT_TIMEOUT;
        loop {
            let log = self.guest.serial_log();
            // Only whole lines: the guest may be halfway through writing this one.
            if let Some(rest) = log
                .split_inclusive('\n')
                .filter(|line| line.ends_with('\n'))
                .find_map(|line| line.split_once(&marker).map(|(_, rest)| rest.to_string()))
            {
                return parse_report(&rest);
            }
            if Instant::now() >= deadline || !self.guest.is_running() {
                bail!("the guest did not log {marker:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Tells the guest to exit and waits for QEMU's exit status; stops everything.
    fn exit(mut self) -> Result<()> {
        let result = (|| -> Result<()> {
            let mut stream = host::connect_accepted(self.uds(), CONTROL_PORT, CONNECT_TIMEOUT)?;
            stream.set_read_timeout(Some(STALL_TIMEOUT))?;
            stream.write_all(b"exit\n")?;
            let line = read_line(&mut stream)?;
            anyhow::ensure!(line == "bye", "the guest answered {line:?} to exit");
            drop(stream);
            match self.guest.wait_exit(EXIT_TIMEOUT).and_then(|s| s.code()) {
                Some(GUEST_EXIT_SUCCESS) => Ok(()),
                Some(code) => bail!("QEMU exited with status {code}"),
                None => bail!("QEMU did not exit within {}s", EXIT_TIMEOUT.as_secs()),
            }
        })();
        self.stop();
        result
    }

    fn stop(&mut self) {
        self.guest.stop();
        self.backend.stop();
    }
}

/// Parses `ok=1 bad=0 guest_us=.. kicks_rx=.. ...` (an `error="..."` value may hold
/// spaces).
fn parse_report(rest: &str) -> Result<GuestReport> {
    let mut fields = BTreeMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((value, next)) => (value, next),
                None => (quoted, ""),
            }
        } else {
            after.split_once(' ').unwrap_or((after, ""))
        };
        fields.insert(key.trim().to_string(), value.to_string());
        rest = next.trim_start();
    }
    Ok(GuestReport { fields })
}

/// Reads one `\n`-terminated line, byte by byte (so nothing after it is consumed).
fn read_line(stream: &mut UnixStream) -> Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => bail!(
                "the guest closed after {:?}",
                String::from_utf8_lossy(&line)
            ),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() > 256 => bail!("line too long"),
            Ok(_) => line.push(byte[0]),
            Err(e) if stalled(&e) => bail!("no answer within {}s", STALL_TIMEOUT.as_secs()),
            Err(e) => return Err(e).context("reading a line from the guest"),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn stalled(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn connect(vm: &BenchVm) -> Result<UnixStream> {
    let stream = host::connect_accepted(vm.uds(), CONTROL_PORT, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(STALL_TIMEOUT))?;
    stream.set_write_timeout(Some(STALL_TIMEOUT))?;
    Ok(stream)
}

/// [`run_workload`], with the time QEMU's vCPU thread waited for a host core meanwhile.
fn run_measured(
    vm: &mut BenchVm,
    workload: Workload,
    seq: u32,
    pattern: &[u8],
    limit: Duration,
) -> Result<Run> {
    let queued_before = vcpu_queued_micros(vm.guest.pid());
    let mut outcome = run_workload(vm, workload, seq, pattern, limit);
    if let Ok(run) = outcome.as_mut() {
        let queued_after = vcpu_queued_micros(vm.guest.pid());
        run.vcpu_queued_us = queued_before
            .zip(queued_after)
            .map(|(before, after)| (after - before).max(0.0));
    }
    outcome
}

/// Runs one untimed guest->host transfer in a freshly booted guest, as iperf's `--omit`
/// skips a transfer's start. The first tenth of a second of load after a boot is a
/// transient of the host's scheduler, not of the driver: a guest that halted while it
/// booted finds its vCPU thread sharing a core with the backend or the host program,
/// and on this 2-core machine it waited for that core about a quarter of the time (240 to
/// 300 us per MiB) in whichever workload came first, and 0 to 4 in those after it
/// (2026-12-05). virtio-drivers' guest never halts and kept its core. Every driver gets
/// the same warm-up, whatever the workloads (the pattern always holds its bytes); its
/// figures are printed and not counted.
fn warm_up(vm: &mut BenchVm, accel: Accel, driver: Driver, seq: u32, plan: &Plan<'_>) {
    let workload = Workload::GuestToHost {
        total: WARM_UP_BYTES,
        write: 64 * 1024,
        in_place: false,
    };
    match run_measured(vm, workload, WARM_UP_SEQ + seq, plan.pattern, plan.limit) {
        Ok(run) => println!(
            "  {accel}/{}: warm-up, not counted: {}: {:.1} MiB/s, vCPU queued {:.1} us per MiB",
            driver.arg,
            workload.name(),
            run.values.first().copied().unwrap_or(f64::NAN),
            run.vcpu_queued_per_unit().unwrap_or(f64::NAN),
        ),
        Err(e) => println!("  {accel}/{}: warm-up failed: {e:#}", driver.arg),
    }
}

/// Runs `workload` against the guest of `vm`; `seq` makes its command unique, `pattern`
/// holds at least as many bytes as the workload moves. A workload still running after
/// `limit` is stopped: its result is then measured over what it did by then, and marked
/// partial.
fn run_workload(
    vm: &mut BenchVm,
    workload: Workload,
    seq: u32,
    pattern: &[u8],
    limit: Duration,
) -> Result<Run> {
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let limit_note = |done: String| {
        format!(
            "stopped at the {}s limit after {done}; measured over that",
            limit.as_secs()
        )
    };
    match workload {
        Workload::GuestToHost {
            total,
            write,
            in_place,
        } => {
            let how = if in_place { " in-place" } else { "" };
            let command = format!("send {total} {write}{how} seq={seq}");
            let mut stream = connect(vm)?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            let started = Instant::now();
            stream.write_all(format!("{command}\n").as_bytes())?;
            while got < total && started.elapsed() < limit {
                let want = buf.len().min((total - got) as usize);
                let n = match stream.read(&mut buf[..want]) {
                    Ok(0) => bail!("the guest closed after {got} of {total} bytes"),
                    Ok(n) => n,
                    Err(e) if stalled(&e) => bail!(
                        "stalled: no data for {}s after {got} of {total} bytes",
                        STALL_TIMEOUT.as_secs()
                    ),
                    Err(e) => return Err(e).context("reading the guest's data"),
                };
                if let Some(at) = first_mismatch(got, &buf[..n], pattern) {
                    bail!("byte {at} differs from the pattern");
                }
                got += n as u64;
            }
            let seconds = started.elapsed().as_secs_f64();
            drop(stream);
            let (guest, partial) = if got < total {
                // The guest's send fails when the host goes away: its line has ok=0.
                let guest = vm.report(&command).unwrap_or_default();
                let note = limit_note(format!("{:.1} of {} MiB", mib(got), total >> 20));
                (guest, Some(note))
            } else {
                (vm.report(&command)?.checked()?, None)
            };
            Ok(Run {
                values: vec![mib(got) / seconds],
                seconds,
                units: mib(got),
                guest,
                partial,
                first_metric_by_round: Vec::new(),
                floors: Vec::new(),
                vcpu_queued_us: None,
            })
        }
        Workload::HostToGuest {
            total,
            write,
            in_place,
        } => {
            let how = if in_place { " in-place" } else { "" };
            let command = format!("recv {total} {write}{how} seq={seq}");
            let mut stream = connect(vm)?;
            let mut sent = 0u64;
            let started = Instant::now();
            stream.write_all(format!("{command}\n").as_bytes())?;
            while sent < total && started.elapsed() < limit {
                let n = write.min((total - sent) as usize);
                match stream.write_all(&pattern[sent as usize..sent as usize + n]) {
                    Ok(()) => {}
                    Err(e) if stalled(&e) => bail!(
                        "stalled: the guest took nothing for {}s after {sent} of {total} bytes",
                        STALL_TIMEOUT.as_secs()
                    ),
                    Err(e) => return Err(e).context("sending to the guest"),
                }
                sent += n as u64;
            }
            if sent < total {
                let seconds = started.elapsed().as_secs_f64();
                drop(stream);
                // The guest's read ends early: its line has ok=0 and the bytes it got.
                let guest = vm.report(&command).unwrap_or_default();
                let (moved, note) = match guest.number("bytes") {
                    Some(received) => (
                        received,
                        limit_note(format!(
                            "the guest had received {:.1} of {} MiB",
                            mib(received),
                            total >> 20
                        )),
                    ),
                    None => (
                        sent,
                        limit_note(format!(
                            "{:.1} of {} MiB written to the backend (the guest's count is missing)",
                            mib(sent),
                            total >> 20
                        )),
                    ),
                };
                return Ok(Run {
                    values: vec![mib(moved) / seconds],
                    seconds,
                    units: mib(moved),
                    guest,
                    partial: Some(note),
                    first_metric_by_round: Vec::new(),
                    floors: Vec::new(),
                    vcpu_queued_us: None,
                });
            }
            let answer = read_line(&mut stream)?;
            let seconds = started.elapsed().as_secs_f64();
            drop(stream);
            if answer != format!("ok {total} 0") {
                bail!("the guest answered {answer:?} (expected \"ok {total} 0\")");
            }
            let guest = vm.report(&command)?.checked()?;
            Ok(Run {
                values: vec![mib(total) / seconds],
                seconds,
                units: mib(total),
                guest,
                partial: None,
                first_metric_by_round: Vec::new(),
                floors: Vec::new(),
                vcpu_queued_us: None,
            })
        }
        Workload::PingPong { round_trips } => {
            let command = format!("pingpong seq={seq}");
            let mut stream = connect(vm)?;
            stream.write_all(format!("{command}\n").as_bytes())?;
            let mut times = Vec::with_capacity(round_trips as usize);
            let started = Instant::now();
            let mut done = 0;
            while done < PING_PONG_WARMUP + round_trips && started.elapsed() < limit {
                let byte = [done as u8];
                let sent_at = Instant::now();
                stream.write_all(&byte)?;
                let mut back = [0u8; 1];
                match stream.read(&mut back) {
                    Ok(1) if back == byte => {}
                    Ok(1) => bail!(
                        "round trip {done}: sent {:#04x}, got {:#04x}",
                        byte[0],
                        back[0]
                    ),
                    Ok(_) => bail!("the guest closed after {done} round trips"),
                    Err(e) if stalled(&e) => bail!("stalled at round trip {done}"),
                    Err(e) => return Err(e).context("reading the ping-pong byte"),
                }
                if done >= PING_PONG_WARMUP {
                    times.push(sent_at.elapsed().as_secs_f64() * 1e6);
                }
                done += 1;
            }
            let seconds = started.elapsed().as_secs_f64();
            drop(stream);
            if times.is_empty() {
                bail!("no round trip within {}s", limit.as_secs());
            }
            times.sort_by(f64::total_cmp);
            let guest = vm.report(&command)?.checked()?;
            let partial = (times.len() < round_trips as usize)
                .then(|| limit_note(format!("{} of {round_trips} round trips", times.len())));
            let quantiles = [0.5, 0.99];
            Ok(Run {
                values: quantiles
                    .map(|q| times[quantile_index(times.len(), q)])
                    .to_vec(),
                floors: quantiles
                    .iter()
                    .map_while(|&q| quantile_floor(&times, q, &guest))
                    .collect(),
                seconds,
                units: done as f64,
                guest,
                partial,
                first_metric_by_round: Vec::new(),
                vcpu_queued_us: None,
            })
        }
        Workload::ConnectClose { cycles } => {
            let command = format!("cycles {cycles} seq={seq}");
            let mut control = connect(vm)?;
            control.write_all(format!("{command}\n").as_bytes())?;
            let go = read_line(&mut control)?;
            anyhow::ensure!(go == "go", "the guest answered {go:?} to {command:?}");
            drop(control);
            let started = Instant::now();
            let mut done = 0;
            while done < cycles && started.elapsed() < limit {
                let mut stream = host::connect_accepted(vm.uds(), CONTROL_PORT, CONNECT_TIMEOUT)
                    .with_context(|| format!("cycle {done}"))?;
                stream.set_read_timeout(Some(STALL_TIMEOUT))?;
                stream.shutdown(std::net::Shutdown::Write)?;
                let mut byte = [0u8; 1];
                match stream.read(&mut byte) {
                    Ok(0) => {}
                    Ok(_) => bail!("cycle {done}: the guest sent data"),
                    Err(e) if stalled(&e) => bail!("cycle {done}: the guest did not close"),
                    Err(e) => return Err(e).context(format!("cycle {done}")),
                }
                done += 1;
            }
            let seconds = started.elapsed().as_secs_f64();
            let (guest, partial) = if done < cycles {
                // The guest logs its line after the last cycle only.
                let note = limit_note(format!("{done} of {cycles} cycles"));
                (GuestReport::default(), Some(note))
            } else {
                (vm.report(&command)?.checked()?, None)
            };
            Ok(Run {
                values: vec![done as f64 / seconds],
                seconds,
                units: done as f64,
                guest,
                partial,
                first_metric_by_round: Vec::new(),
                floors: Vec::new(),
                vcpu_queued_us: None,
            })
        }
    }
}

/// An accelerator to run, with what the table says about it.
struct AccelRun {
    accel: Accel,
    note: String,
    /// KVM without hardware virtualisation: every exit is slow.
    nested: bool,
}

/// The accelerators to run: the one asked for, else TCG, and KVM too when /dev/kvm opens.
fn accelerators(requested: Option<Accel>) -> Vec<AccelRun> {
    let (hardware, kvm_opens) = vm::virtualisation();
    let kvm_note = if hardware {
        "KVM with hardware virtualisation (vmx/svm)".to_string()
    } else {
        "KVM, NESTED: /dev/kvm opens but the CPU shows no vmx/svm, so this is nested \
         software virtualisation: exits are expensive; the guest runs in ring 3, where its \
         own code runs at the CPU's speed (ring 0 would be emulated)"
            .to_string()
    };
    let tcg = AccelRun {
        accel: Accel::Tcg,
        note: "TCG, QEMU's binary translator".to_string(),
        nested: false,
    };
    let kvm = AccelRun {
        accel: Accel::Kvm,
        note: kvm_note,
        nested: !hardware,
    };
    match requested {
        Some(Accel::Tcg) => vec![tcg],
        Some(Accel::Kvm) => vec![kvm],
        None if kvm_opens => vec![tcg, kvm],
        None => {
            println!("bench: /dev/kvm does not open; TCG only");
            vec![tcg]
        }
    }
}

/// The workloads, smallest when `quick`.
fn qemu_workloads(quick: bool, full: bool) -> Vec<Workload> {
    let bulk: u64 = if full { 256 << 20 } else { 64 << 20 };
    let (round_trips, cycles) = match (quick, full) {
        (true, _) => (2000, 200),
        (_, true) => (20_000, 2000),
        _ => (10_000, 1000),
    };
    let guest_to_host = |write, in_place| Workload::GuestToHost {
        total: bulk,
        write,
        in_place,
    };
    let host_to_guest = |write, in_place| Workload::HostToGuest {
        total: bulk,
        write,
        in_place,
    };
    vec![
        guest_to_host(64 * 1024, false),
        guest_to_host(4096, false),
        guest_to_host(64 * 1024, true),
        guest_to_host(4096, true),
        host_to_guest(64 * 1024, false),
        host_to_guest(4096, false),
        host_to_guest(64 * 1024, true),
        host_to_guest(4096, true),
        Workload::PingPong { round_trips },
        Workload::ConnectClose { cycles },
    ]
}

type Outcome = std::result::Result<Run, String>;

/// The outcome of a driver that `--driver` left out: shown as "-" in the tables.
const NOT_RUN: &str = "not run (--driver)";

/// What every driver's run shares.
#[derive(Clone, Copy)]
struct Plan<'a> {
    tools: &'a Tools,
    kernel: &'a Path,
    machine: Machine,
    workloads: &'a [Workload],
    /// At least as many pattern bytes as the longest transfer.
    pattern: &'a [u8],
    /// How long one workload may run.
    limit: Duration,
    /// Runs per workload; the median counts.
    repetitions: usize,
    /// Extra words for the guest's command line.
    guest_args: &'a str,
    /// The backend's receive window per connection, in bytes.
    host_window: u32,
    /// Pin the threads after each boot ([`pin_threads`]).
    pin: bool,
}

/// One round of one driver: one outcome per workload (`None` for a workload it skipped).
struct DriverRound {
    outcomes: Vec<Option<Outcome>>,
    /// The guest's memory reference from its first boot.
    reference: Option<Reference>,
    /// How the guest described its driver.
    description: Option<String>,
}

/// Runs every workload not in `skip` once on one driver, booting a fresh guest after a
/// failure.
fn run_driver_round(
    plan: &Plan<'_>,
    accel: Accel,
    driver: Driver,
    round: usize,
    skip: &[bool],
) -> DriverRound {
    let Plan {
        machine,
        workloads,
        pattern,
        limit,
        ..
    } = *plan;
    let mut outcomes = Vec::new();
    let mut reference = None;
    let mut description = None;
    let mut vm: Option<BenchVm> = None;
    for (index, &workload) in workloads.iter().enumerate() {
        if skip.get(index).copied().unwrap_or(false) {
            outcomes.push(None);
            continue;
        }
        if vm.is_none() {
            // By label: `ours` and `ours poll` share their `driver=`.
            let run = format!(
                "bench-{accel}-{machine}-{}-r{round}-w{index}",
                driver.label.replace(' ', "-")
            );
            let started = Instant::now();
            match BenchVm::boot(plan, accel, driver, &run) {
                Ok(mut booted) => {
                    let rate = |r: Option<f64>| r.map_or("?".into(), |r| format!("{r:.0} MiB/s"));
                    println!(
                        "  {accel}/{}: guest up in {:.1}s; in the guest: pattern fill {}, check {}, memcpy {}",
                        driver.arg,
                        started.elapsed().as_secs_f64(),
                        rate(booted.reference.map(|r| r.fill_mib_s)),
                        rate(booted.reference.and_then(|r| r.check_mib_s)),
                        rate(booted.reference.map(|r| r.copy_mib_s)),
                    );
                    reference = reference.or(booted.reference);
                    description = description.or(booted.description.clone());
                    warm_up(
                        &mut booted,
                        accel,
                        driver,
                        (index * 100 + round) as u32,
                        plan,
                    );
                    vm = Some(booted);
                }
                Err(e) => {
                    let error = format!("boot failed: {e:#}");
                    println!("  {accel}/{}: {error}", driver.arg);
                    outcomes.extend((index..workloads.len()).map(|i| {
                        (!skip.get(i).copied().unwrap_or(false)).then(|| Err(error.clone()))
                    }));
                    return DriverRound {
                        outcomes,
                        reference,
                        description,
                    };
                }
            }
        }
        let Some(running) = vm.as_mut() else {
            break;
        };
        let seq = (index * 100 + round) as u32;
        let outcome = run_measured(running, workload, seq, pattern, limit);
        match &outcome {
            Ok(run) => {
                let values: Vec<String> = workload
                    .metrics()
                    .iter()
                    .zip(&run.values)
                    .map(|(metric, value)| format!("{value:.1} {}", metric.unit))
                    .collect();
                println!(
                    "  {accel}/{}: {}: {} in {:.2}s; per {}: kicks rx {:.2}, tx {:.2}, {:.1} us in the driver, {:.1} us busy, vCPU queued {:.1} us{}",
                    driver.arg,
                    workload.name(),
                    values.join(", "),
                    run.seconds,
                    workload.kick_unit(),
                    run.per_unit("kicks_rx").unwrap_or(f64::NAN),
                    run.per_unit("kicks_tx").unwrap_or(f64::NAN),
                    run.per_unit("driver_us").unwrap_or(f64::NAN),
                    run.per_unit("busy_us").unwrap_or(f64::NAN),
                    run.vcpu_queued_per_unit().unwrap_or(f64::NAN),
                    run.partial
                        .as_ref()
                        .map_or(String::new(), |note| format!(" (PARTIAL: {note})")),
                );
            }
            Err(e) => {
                println!(
                    "  {accel}/{}: {}: FAILED: {e:#}",
                    driver.arg,
                    workload.name()
                );
                let log = running.guest.serial_log();
                let tail: Vec<&str> = log.lines().rev().take(8).collect();
                for line in tail.iter().rev() {
                    println!("      guest: {line}");
                }
                // Whatever state the guest is in, the next workload gets a fresh one. (A
                // run stopped at the limit ends its connection like any other.)
                running.stop();
                vm = None;
            }
        }
        outcomes.push(Some(outcome.map_err(|e| format!("{e:#}"))));
    }
    if let Some(running) = vm {
        if let Err(e) = running.exit() {
            println!("  {accel}/{}: exit: {e:#}", driver.arg);
        }
    }
    DriverRound {
        outcomes,
        reference,
        description,
    }
}

/// One driver's results over every round.
struct DriverResults {
    /// One per workload.
    outcomes: Vec<Outcome>,
    /// The guest's memory reference from its first boot.
    reference: Option<Reference>,
    /// How the guest described its driver.
    description: Option<String>,
}

/// Runs `plan.repetitions` rounds; each round runs every selected driver once through
/// every workload, one driver after the other, so that a slow spell of the machine
/// (this VM has them, lasting seconds to minutes) falls on every driver's runs alike
/// rather than on all runs of one. A workload that failed, or stopped at the time limit,
/// is not run again for that driver. Returns one `DriverResults` per entry of `drivers`
/// (`None`: not selected).
fn run_rounds(plan: &Plan<'_>, accel: Accel, drivers: &[Option<Driver>]) -> Vec<DriverResults> {
    let workloads = plan.workloads.len();
    let mut runs: Vec<Vec<Vec<Run>>> = drivers
        .iter()
        .map(|_| vec![Vec::new(); workloads])
        .collect();
    let mut failures: Vec<Vec<Option<String>>> =
        drivers.iter().map(|_| vec![None; workloads]).collect();
    let mut references: Vec<Option<Reference>> = drivers.iter().map(|_| None).collect();
    let mut descriptions: Vec<Option<String>> = drivers.iter().map(|_| None).collect();
    for round in 0..plan.repetitions {
        for (slot, driver) in drivers.iter().enumerate() {
            let Some(driver) = *driver else {
                continue;
            };
            let skip: Vec<bool> = (0..workloads)
                .map(|w| {
                    failures[slot][w].is_some()
                        || runs[slot][w].iter().any(|run| run.partial.is_some())
                })
                .collect();
            if skip.iter().all(|&s| s) {
                continue;
            }
            let result = run_driver_round(plan, accel, driver, round, &skip);
            references[slot] = references[slot].or(result.reference);
            descriptions[slot] = descriptions[slot].take().or(result.description);
            for (w, outcome) in result.outcomes.into_iter().enumerate() {
                match outcome {
                    Some(Ok(run)) => runs[slot][w].push(run),
                    Some(Err(e)) => failures[slot][w] = Some(e),
                    None => {}
                }
            }
        }
    }
    drivers
        .iter()
        .enumerate()
        .map(|(slot, driver)| {
            let outcomes = (0..workloads)
                .map(|w| {
                    if driver.is_none() {
                        return Err(NOT_RUN.to_string());
                    }
                    if let Some(e) = failures[slot][w].take() {
                        return Err(e);
                    }
                    median_run(plan.workloads[w], std::mem::take(&mut runs[slot][w]))
                })
                .collect();
            DriverResults {
                outcomes,
                reference: references[slot],
                description: descriptions[slot].take(),
            }
        })
        .collect()
}

/// Where quantile `q` of `len` sorted samples is read: the nearest rank.
fn quantile_index(len: usize, q: f64) -> usize {
    ((len.saturating_sub(1)) as f64 * q).round() as usize
}

/// The guest's quantiles of its work per busy stretch (`examples/bench.rs`): the key
/// and, in thousandths, the share of stretches that took no longer.
const WORK_QUANTILES: [(&str, u64); 5] = [
    ("work_p50_ns", 500),
    ("work_p90_ns", 900),
    ("work_p99_ns", 990),
    ("work_p999_ns", 999),
    ("work_max_ns", 1000),
];

/// A lower bound of quantile `q` of the round trips (µs, `sorted`) that a driver whose
/// own work cost nothing (the same packets, the same notifications) would have measured
/// in this run, from the guest's quantiles of its work per busy stretch
/// (`work_p<..>_ns=`, `examples/bench.rs`): each round trip's echo is one stretch, and
/// its work there is at most the stretch's. Where at most `m` stretches took longer than
/// `w`, at most `m` round trips lose more than `w` to a zero-cost driver, so at most
/// `j + m` of its round trips are shorter than the `j`-th round trip here less `w`, and
/// its round trip of rank `k` is at least the one of rank `k - m` here less `w`. The
/// best of the guest's quantiles; `None` without them.
fn quantile_floor(sorted: &[f64], q: f64, guest: &GuestReport) -> Option<f64> {
    let stretches = guest.number("work_stretches")?;
    let rank = quantile_index(sorted.len(), q);
    WORK_QUANTILES
        .iter()
        .filter_map(|&(key, thousandths)| {
            let work_us = guest.number(key)? as f64 / 1e3;
            let longer = usize::try_from(stretches * (1000 - thousandths) / 1000).ok()?;
            let here = sorted.get(rank.checked_sub(longer)?)?;
            Some((here - work_us).max(0.0))
        })
        .max_by(f64::total_cmp)
}

/// The run with the median first metric, its other metrics replaced by their own
/// medians: a ping-pong's p99 is the median of the runs' p99s, not the p99 of the run
/// whose median was the median. The counters (kicks, busy time, ...) stay that run's.
fn median_run(workload: Workload, mut runs: Vec<Run>) -> Outcome {
    let first_metric_by_round: Vec<f64> = runs
        .iter()
        .filter_map(|run| run.values.first().copied())
        .collect();
    let better_first = workload.metrics()[0].higher_is_better;
    runs.sort_by(|a, b| {
        let order = a.values[0].total_cmp(&b.values[0]);
        if better_first {
            order.reverse()
        } else {
            order
        }
    });
    let count = runs.len();
    let metric_medians: Vec<f64> = (0..workload.metrics().len())
        .map(|index| {
            middle(
                runs.iter()
                    .filter_map(|run| run.values.get(index).copied())
                    .collect(),
            )
            .unwrap_or(f64::NAN)
        })
        .collect();
    // A median of lower bounds is a lower bound of the median; none unless every run has
    // that bound.
    let floor_medians: Vec<f64> = (0..runs.first().map_or(0, |run| run.floors.len()))
        .map_while(|index| {
            middle(
                runs.iter()
                    .map(|run| run.floors.get(index).copied())
                    .collect::<Option<_>>()?,
            )
        })
        .collect();
    let mut median = runs
        .into_iter()
        .nth(count / 2)
        .ok_or_else(|| "no run".to_string())?;
    for (value, metric_median) in median.values.iter_mut().zip(metric_medians).skip(1) {
        *value = metric_median;
    }
    median.floors = floor_medians;
    median.first_metric_by_round = first_metric_by_round;
    Ok(median)
}

/// The middle of `values` once sorted (the upper one of an even count); `None` when empty.
fn middle(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// How many times better `ours` is than the better of `theirs` (None when ours, or every
/// one of theirs, failed or did not run).
fn ratio_to_better(
    metric: Metric,
    ours: &Outcome,
    theirs: &[&Outcome],
    index: usize,
) -> Option<f64> {
    theirs
        .iter()
        .filter_map(|theirs| ratio(metric, ours, theirs, index))
        .min_by(f64::total_cmp)
}

fn ratio(metric: Metric, ours: &Outcome, theirs: &Outcome, index: usize) -> Option<f64> {
    let ours = ours.as_ref().ok()?.values[index];
    let theirs = theirs.as_ref().ok()?.values[index];
    Some(if metric.higher_is_better {
        ours / theirs
    } else {
        theirs / ours
    })
}

/// `cargo xtask bench qemu`: the workloads on every driver and accelerator, a table per
/// accelerator, and `target/bench/qemu.json` (`qemu-aarch64.json` for the aarch64
/// machines, which run under TCG only).
pub fn qemu(options: &QemuOptions) -> Result<()> {
    let tools = setup::ensure_all()?;
    let arch = options.machine.arch();
    if arch == Arch::Aarch64 && tools.qemu_aarch64.is_none() {
        bail!(
            "no {}: install Debian's qemu-system-arm",
            setup::QEMU_AARCH64_BINARY
        );
    }
    let kernel = build_example("bench", arch)?;
    let workloads: Vec<Workload> = qemu_workloads(options.quick, options.full)
        .into_iter()
        .filter(|w| {
            options
                .only
                .as_ref()
                .is_none_or(|only| w.name().contains(only.as_str()))
        })
        .collect();
    anyhow::ensure!(!workloads.is_empty(), "no workload matches --only");
    let machine = options.machine;
    let longest = workloads
        .iter()
        .map(|w| match *w {
            Workload::GuestToHost { total, .. } | Workload::HostToGuest { total, .. } => total,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    // The warm-up after each boot moves bulk data even when the workloads do not.
    let pattern = pattern_stream(longest.max(WARM_UP_BYTES));
    // Every workload is bounded: the slowest (virtio-drivers' defaults from host to guest)
    // need about a minute on TCG for 64 MiB, and far longer on nested KVM, where each of
    // their thousands of exits per MiB costs about 80 us.
    let repetitions = options
        .repetitions
        .unwrap_or(match (options.quick, options.full) {
            (true, _) => 1,
            (_, true) => 5,
            _ => 3,
        })
        .max(1);
    for name in &options.drivers {
        anyhow::ensure!(
            DRIVERS.iter().any(|d| d.arg == name),
            "unknown driver {name:?} (ours, ours-throughput, theirs, theirs-best)"
        );
    }
    let selected = |driver: &Driver| {
        options.drivers.is_empty() || options.drivers.iter().any(|d| d == driver.arg)
    };
    let limit_for = |nested: bool| {
        // On nested KVM virtio-drivers' defaults move under 1 MiB/s host->guest (an exit
        // per 512-byte buffer): a minute per workload shows their rate (a run stopped at
        // the limit is measured over what it did) without taking hours.
        Duration::from_secs(match (options.quick, options.full, nested) {
            (true, _, false) => 90,
            (true, _, true) => 20,
            (false, _, true) => 60,
            (_, true, _) => 600,
            _ => 240,
        })
    };
    let pin = options.pin.resolve(arch)?;
    println!("bench: guest {} on {machine}", kernel.display());
    for driver in DRIVERS {
        println!("bench: {:<12} {}", driver.label, driver.settings);
    }
    let mut json_runs = Vec::new();
    let mut tables = Vec::new();
    for AccelRun {
        accel,
        note,
        nested,
    } in match arch {
        Arch::X86_64 => accelerators(options.accel),
        Arch::Aarch64 => vec![AccelRun {
            accel: Accel::Tcg,
            note: "TCG with thread=multi, aarch64 virt, 2 x cortex-a72".to_string(),
            nested: false,
        }],
    } {
        for &host_window in &options.host_windows {
            let plan = Plan {
                tools: &tools,
                kernel: &kernel,
                machine,
                workloads: &workloads,
                pattern: &pattern,
                limit: limit_for(nested),
                repetitions,
                guest_args: &options.guest_args,
                host_window,
                pin,
            };
            println!(
                "\n=== {accel} ({note}), host window {} KiB",
                host_window / 1024
            );
            println!(
                "  every workload stops after {}s at most (then measured over what it did, marked *)",
                plan.limit.as_secs()
            );
            let started = Instant::now();
            let mut drivers: Vec<Option<Driver>> = DRIVERS
                .iter()
                .map(|&driver| selected(&driver).then_some(driver))
                .collect();
            let poll = options.waits.contains(&Wait::Poll) && selected(&DRIVERS[0]);
            drivers.push(poll.then_some(OURS_POLL));
            let results = run_rounds(&plan, accel, &drivers);
            let reference = results.iter().find_map(|r| r.reference);
            let descriptions: Vec<String> = results
                .iter()
                .filter_map(|r| r.description.clone())
                .collect();
            let mut outcomes: Vec<Vec<Outcome>> = results.into_iter().map(|r| r.outcomes).collect();
            let poll_outcomes = outcomes.pop().unwrap_or_default();
            println!(
                "  {accel}: all drivers in {:.0}s",
                started.elapsed().as_secs_f64()
            );
            let mut table = render_table(&plan, accel, &note, reference, &outcomes);
            if !descriptions.is_empty() {
                let _ = writeln!(table, "\nthe drivers, as the guest describes them:");
            }
            for description in &descriptions {
                let _ = writeln!(table, "  {description}");
            }
            let idle: Vec<(Wait, Result<f64>)> = options
                .waits
                .iter()
                .map(|&wait| (wait, idle_cpu(&tools, accel, machine, wait)))
                .collect();
            table.push_str(&render_wait_table(
                &plan,
                &outcomes[0],
                poll.then_some(&poll_outcomes[..]),
                &idle,
            ));
            println!("\n{table}");
            tables.push(table);
            let mut run = json_run(machine, accel, &note, &workloads, &outcomes);
            if let Some(r) = reference {
                run["guest_reference_mib_s"] = serde_json::json!({
                    "pattern_fill": r.fill_mib_s,
                    "pattern_check": r.check_mib_s,
                    "memcpy": r.copy_mib_s,
                });
            }
            run["nested_virtualisation"] = nested.into();
            run["drivers_as_the_guest_reported"] = descriptions.clone().into();
            run["workload_limit_seconds"] = plan.limit.as_secs().into();
            run["host_window_bytes"] = plan.host_window.into();
            run["pinned"] = plan.pin.into();
            run["idle_qemu_cpu_percent"] = idle
                .iter()
                .map(|(wait, cpu)| {
                    (
                        format!("{wait:?}").to_lowercase(),
                        cpu.as_ref().ok().copied().into(),
                    )
                })
                .collect::<serde_json::Map<String, serde_json::Value>>()
                .into();
            run["ours_poll"] = poll_outcomes
                .iter()
                .zip(&workloads)
                .map(|(outcome, workload)| {
                    serde_json::json!({
                        "workload": workload.name(),
                        "values": outcome.as_ref().ok().map(|run| run.values.clone()),
                    })
                })
                .collect::<Vec<_>>()
                .into();
            json_runs.push(run);
        }
    }
    if tables.len() > 1 {
        println!("=== all results again, one table per accelerator\n");
        for table in &tables {
            println!("{table}");
        }
    }
    let dir = project_root().join("target").join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(match arch {
        Arch::X86_64 => "qemu.json",
        Arch::Aarch64 => "qemu-aarch64.json",
    });
    let json = serde_json::json!({
        "benchmark": "qemu",
        "machine": machine.to_string(),
        "quick": options.quick,
        "full": options.full,
        "drivers": DRIVERS.iter().map(|d| serde_json::json!({
            "name": d.arg, "settings": d.settings,
        })).collect::<Vec<_>>(),
        "runs": json_runs,
    });
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("results written to {}", path.display());
    Ok(())
}

/// `lowest–highest` of `values` (one value alone; `-` for none).
fn spread(values: &[f64]) -> String {
    let lowest = values.iter().copied().min_by(f64::total_cmp);
    let highest = values.iter().copied().max_by(f64::total_cmp);
    match (lowest, highest) {
        (Some(lowest), Some(highest)) if lowest == highest => number(lowest),
        (Some(lowest), Some(highest)) => format!("{}–{}", number(lowest), number(highest)),
        _ => "-".to_string(),
    }
}

/// Three significant digits at least, one decimal at most above 100.
fn number(value: f64) -> String {
    match value.abs() {
        v if v >= 100.0 => format!("{value:.1}"),
        v if v >= 10.0 => format!("{value:.2}"),
        _ => format!("{value:.3}"),
    }
}

fn render_table(
    plan: &Plan<'_>,
    accel: Accel,
    note: &str,
    reference: Option<Reference>,
    outcomes: &[Vec<Outcome>],
) -> String {
    let (machine, workloads) = (plan.machine, plan.workloads);
    let mut out = String::new();
    let mut notes: Vec<String> = Vec::new();
    let mut failures = 0;
    let mut cell =
        |outcome: &Outcome, index: usize, driver: Driver, workload: Workload| match outcome {
            Ok(Run {
                partial: Some(partial),
                values,
                ..
            }) => {
                if index == 0 {
                    notes.push(format!(
                        "* {} on {}: {partial}",
                        driver.label,
                        workload.name()
                    ));
                }
                format!("{}*", number(values[index]))
            }
            Ok(run) => number(run.values[index]),
            Err(e) if e == NOT_RUN => "-".to_string(),
            Err(e) => {
                failures += 1;
                let tag = format!("[{failures}]");
                notes.push(format!(
                    "{tag} {} on {}: {e}",
                    driver.label,
                    workload.name()
                ));
                format!("failed{tag}")
            }
        };
    let _ = writeln!(
        out,
        "QEMU benchmark: -machine {machine} -accel {accel} ({note})"
    );
    let _ = writeln!(
        out,
        "times measured on the host; {} per workload; each workload stopped after {}s at most",
        if plan.repetitions == 1 {
            "one run".to_string()
        } else {
            format!(
                "median of {} runs (in rounds: each driver once, then again)",
                plan.repetitions
            )
        },
        plan.limit.as_secs()
    );
    let _ = writeln!(
        out,
        "host: vhost-device-vsock with a receive window of {} KiB per connection (tx-buffer-size)",
        plan.host_window / 1024
    );
    let _ = writeln!(
        out,
        "host: {}",
        if plan.pin {
            "pinned: QEMU's vCPU thread on CPU 0, its other threads, the backend and this program on the others"
        } else {
            "not pinned (--pin off, one CPU, or a guest of two vCPUs): the host's scheduler places every thread"
        }
    );
    if let Some(r) = reference {
        let _ = writeln!(
            out,
            "reference, in the guest before any driver runs: pattern fill {:.0} MiB/s, check {}, memcpy {:.0} MiB/s",
            r.fill_mib_s,
            r.check_mib_s.map_or("?".into(), |c| format!("{c:.0} MiB/s")),
            r.copy_mib_s
        );
    }
    let _ = writeln!(
        out,
        "{:<56} {:>12} {:>12} {:>12} {:>12} {:>7} {:>7}",
        "workload",
        DRIVERS[0].label,
        DRIVERS[1].label,
        DRIVERS[2].label,
        DRIVERS[3].label,
        "x",
        "tp x"
    );
    for (w, &workload) in workloads.iter().enumerate() {
        for (index, &metric) in workload.metrics().iter().enumerate() {
            // Report each failure once, on the workload's first metric.
            let cells: Vec<String> = DRIVERS
                .iter()
                .zip(outcomes)
                .map(|(driver, outcomes)| match (&outcomes[w], index) {
                    (Err(e), _) if e == NOT_RUN => "-".to_string(),
                    (Err(_), i) if i > 0 => "failed".to_string(),
                    (outcome, _) => cell(outcome, index, *driver, workload),
                })
                .collect();
            let show = |r: Option<f64>| r.map_or("-".to_string(), |r| format!("{r:.2}x"));
            let theirs = [&outcomes[2][w], &outcomes[3][w]];
            let _ = writeln!(
                out,
                "{:<56} {:>12} {:>12} {:>12} {:>12} {:>7} {:>7}",
                format!("{} ({})", workload.name(), metric.unit),
                cells[0],
                cells[1],
                cells[2],
                cells[3],
                show(ratio_to_better(metric, &outcomes[0][w], &theirs, index)),
                show(ratio_to_better(metric, &outcomes[1][w], &theirs, index)),
            );
        }
    }
    let _ = writeln!(
        out,
        "x, tp x = how many times better ours, ours tp is than the better of theirs and theirs best: ours/theirs for rates, theirs/ours for times"
    );
    if plan.repetitions > 1 {
        let _ = writeln!(
            out,
            "\nthe spread the medians hide: the first metric's lowest and highest of the runs (their values round by round are in the JSON)"
        );
        rows(
            &mut out,
            workloads,
            outcomes,
            |workload| format!("{} ({})", workload.name(), workload.metrics()[0].unit),
            |run| spread(&run.first_metric_by_round),
        );
    }
    let _ = writeln!(
        out,
        "\nkicks (guest->device notifications, counted on the guest), rx/tx per unit"
    );
    let _ = writeln!(
        out,
        "{:<56} {:>16} {:>16} {:>16} {:>16}",
        "workload (per unit)",
        DRIVERS[0].label,
        DRIVERS[1].label,
        DRIVERS[2].label,
        DRIVERS[3].label
    );
    per_unit_rows(&mut out, workloads, outcomes, |run| {
        format!(
            "{:.2}/{:.2}",
            run.per_unit("kicks_rx").unwrap_or(f64::NAN),
            run.per_unit("kicks_tx").unwrap_or(f64::NAN)
        )
    });
    let _ = writeln!(
        out,
        "\nguest time inside the driver's calls (poll, send, recv, accept, close; timed in the guest; without the application's work and the waits a zero-copy call runs inside it), us per unit"
    );
    per_unit_rows(&mut out, workloads, outcomes, |run| {
        run.per_unit("driver_us").map_or("?".to_string(), number)
    });
    let _ = writeln!(
        out,
        "\nof that, in the notifications themselves (the write to the device's notify register, which traps to QEMU), us per unit"
    );
    per_unit_rows(&mut out, workloads, outcomes, |run| {
        run.per_unit("kick_us").map_or("?".to_string(), number)
    });
    let _ = writeln!(
        out,
        "\nthe application's own work on the data (filling buffers with the pattern, checking what arrived; the same code for every driver), us per unit"
    );
    per_unit_rows(&mut out, workloads, outcomes, |run| {
        run.per_unit("app_us").map_or("?".to_string(), number)
    });
    let _ = writeln!(
        out,
        "\nguest busy/waiting, us per unit: busy = the guest's loop in stretches that moved something (accepted, sent or read), waiting = the rest of the workload's time, spent waiting for the device or the peer (theirs waits inside its blocking send, which counts as busy)"
    );
    per_unit_rows(&mut out, workloads, outcomes, |run| {
        match (run.per_unit("busy_us"), run.per_unit("guest_us")) {
            (Some(busy), Some(total)) => {
                format!("{}/{}", number(busy), number((total - busy).max(0.0)))
            }
            _ => "?".to_string(),
        }
    });
    device_floor_rows(&mut out, workloads, outcomes);
    let _ = writeln!(
        out,
        "\nhost: QEMU's vCPU thread runnable but not running (waiting for one of the host's cores, from /proc/PID/task/TID/schedstat), us per unit"
    );
    per_unit_rows(&mut out, workloads, outcomes, |run| {
        run.vcpu_queued_per_unit().map_or("?".to_string(), number)
    });
    let _ = writeln!(
        out,
        "\ncredit packets, updates received/requests sent per unit (counted by our driver; '-' where the driver does not count them)"
    );
    per_unit_rows(&mut out, workloads, outcomes, |run| {
        match (
            run.per_unit("credit_updates_rx"),
            run.per_unit("credit_requests_tx"),
        ) {
            (Some(updates), Some(requests)) => format!("{updates:.2}/{requests:.2}"),
            _ => "-".to_string(),
        }
    });
    let _ = writeln!(
        out,
        "\nreceived bytes that went through a socket's receive buffer (copied in, then out by recv) instead of straight to recv, KiB per unit (counted by our driver; '-' where the driver does not count them)"
    );
    per_unit_rows(&mut out, workloads, outcomes, |run| {
        run.per_unit("rx_buffered_bytes")
            .map_or("-".to_string(), |bytes| number(bytes / 1024.0))
    });
    if !notes.is_empty() {
        let _ = writeln!(out);
        for note in notes {
            let _ = writeln!(out, "{note}");
        }
    }
    out
}

/// The device side's floor of a run, per unit: the time the guest waited for the device or
/// the peer, plus its notifications (see [`device_floor_rows`]). An estimate from means,
/// not a bound. `None` when the guest did not report the times.
fn device_side_floor(run: &Run) -> Option<f64> {
    let total = run.per_unit("guest_us")?;
    let busy = run.per_unit("busy_us")?;
    let kicks = run.per_unit("kick_us")?;
    Some((total - busy).max(0.0) + kicks)
}

/// A strict lower bound, per unit, of the time a run would have taken had the driver's own
/// work cost nothing: its time less everything spent inside the driver's calls, but the
/// notifications (a driver of no cost sends the same packets with the same kicks). What is
/// left is the application's work (the pattern fill, the checks), the bench's loop and
/// the waiting for the device; since the driver's time also holds the polls that found
/// nothing while the guest waited, the bound errs low, never high. `None` when the guest
/// did not report the times.
fn all_but_driver_floor(run: &Run) -> Option<f64> {
    let total = run.per_unit("guest_us")?;
    let driver = run.per_unit("driver_us")?;
    let kicks = run.per_unit("kick_us")?;
    Some((total - driver).max(0.0) + kicks)
}

/// The device side's floor for our two configurations: per unit, the time the guest
/// waited for the device or the peer plus the time its notifications took (the trap to
/// QEMU and the backend's wake-up), which no work of the driver's shortens; and the most
/// times better than the better of virtio-drivers' settings that a driver whose own work
/// cost nothing, sending the same packets with the same kicks, could then be. Where that
/// bound is under 2x the backend, not the driver, is the limit. From means; for the
/// ping-pong's median and p99 also the rows of [`quantile_floor`], lower bounds of each
/// quantile, and for the other workloads the row of [`all_but_driver_floor`], which
/// leaves the application's own work in (where that bound is under 2x, no driver could
/// reach 2x in that run).
fn device_floor_rows(out: &mut String, workloads: &[Workload], outcomes: &[Vec<Outcome>]) {
    let _ = writeln!(
        out,
        "\nthe device side's floor, us per unit = waiting + notifications; and in brackets the most x a driver whose own work cost nothing could reach against the better of theirs and theirs best (from means; the ping-pong's quantiles from the guest's work per round trip; 'all but the driver's own time' = the workload's time less the driver's calls but their notifications, the application's work left in: a strict bound)"
    );
    let _ = writeln!(
        out,
        "{:<56} {:>16} {:>16}",
        "workload (per unit)", DRIVERS[0].label, DRIVERS[1].label
    );
    for (w, &workload) in workloads.iter().enumerate() {
        let metrics = workload.metrics();
        let Some(&first) = metrics.first() else {
            continue;
        };
        // The better of virtio-drivers' settings for metric `index`.
        let theirs_best = |index: usize| {
            let metric = metrics[index];
            outcomes[2..]
                .iter()
                .filter_map(|outcomes| Some(*outcomes[w].as_ref().ok()?.values.get(index)?))
                .reduce(|a, b| {
                    if metric.higher_is_better == (a > b) {
                        a
                    } else {
                        b
                    }
                })
        };
        // A floor (per unit, or the metric's own value) and its bound.
        let floor_cell = |floor: f64, metric: Metric, theirs: Option<f64>| {
            let bound = theirs.filter(|_| floor > 0.0).map(|theirs| {
                if metric.higher_is_better {
                    1e6 / floor / theirs
                } else {
                    theirs / floor
                }
            });
            match bound {
                Some(bound) => format!("{} ({bound:.2}x)", number(floor)),
                None => number(floor),
            }
        };
        // A per-unit floor of the first metric from a run ("?" when the guest did not
        // report what it needs), and its bound.
        let per_unit_cell = |outcome: &Outcome, floor_of: fn(&Run) -> Option<f64>| {
            let Ok(run) = outcome else {
                return "-".to_string();
            };
            match floor_of(run) {
                Some(floor) => floor_cell(floor, first, theirs_best(0)),
                None => "?".to_string(),
            }
        };
        let _ = writeln!(
            out,
            "{:<56} {:>16} {:>16}",
            format!("{} (per {})", workload.name(), workload.kick_unit()),
            per_unit_cell(&outcomes[0][w], device_side_floor),
            per_unit_cell(&outcomes[1][w], device_side_floor),
        );
        let has_quantile_floors = outcomes[..2]
            .iter()
            .any(|outcomes| outcomes[w].as_ref().is_ok_and(|run| !run.floors.is_empty()));
        if !has_quantile_floors {
            // Rates and cycles are means, so a bound of the mean is one of the metric
            // itself (the ping-pong's median and p99 have their own rows below).
            let _ = writeln!(
                out,
                "{:<56} {:>16} {:>16}",
                "  at least, all but the driver's own time",
                per_unit_cell(&outcomes[0][w], all_but_driver_floor),
                per_unit_cell(&outcomes[1][w], all_but_driver_floor),
            );
            continue;
        }
        for (index, &metric) in metrics.iter().enumerate() {
            let quantile_cell = |outcome: &Outcome| match outcome {
                Ok(run) => run.floors.get(index).map_or("?".to_string(), |&floor| {
                    floor_cell(floor, metric, theirs_best(index))
                }),
                Err(_) => "-".to_string(),
            };
            let _ = writeln!(
                out,
                "{:<56} {:>16} {:>16}",
                format!("  {}, at least", metric.unit),
                quantile_cell(&outcomes[0][w]),
                quantile_cell(&outcomes[1][w]),
            );
        }
    }
}

/// One row per workload, one column per driver, each cell `cell` of the driver's run.
fn per_unit_rows(
    out: &mut String,
    workloads: &[Workload],
    outcomes: &[Vec<Outcome>],
    cell: impl Fn(&Run) -> String,
) {
    rows(
        out,
        workloads,
        outcomes,
        |workload| format!("{} (per {})", workload.name(), workload.kick_unit()),
        cell,
    );
}

/// One line per workload, `label` first, then each driver's `cell` (or why it has none).
fn rows(
    out: &mut String,
    workloads: &[Workload],
    outcomes: &[Vec<Outcome>],
    label: impl Fn(Workload) -> String,
    cell: impl Fn(&Run) -> String,
) {
    for (w, &workload) in workloads.iter().enumerate() {
        let cells: Vec<String> = outcomes
            .iter()
            .map(|outcomes| match &outcomes[w] {
                Ok(run) => cell(run),
                Err(e) if e == NOT_RUN => "-".to_string(),
                Err(_) => "failed".to_string(),
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<56} {:>16} {:>16} {:>16} {:>16}",
            label(workload),
            cells[0],
            cells[1],
            cells[2],
            cells[3]
        );
    }
}

fn json_run(
    machine: Machine,
    accel: Accel,
    note: &str,
    workloads: &[Workload],
    outcomes: &[Vec<Outcome>],
) -> serde_json::Value {
    let results: Vec<serde_json::Value> = workloads
        .iter()
        .enumerate()
        .map(|(w, workload)| {
            let per_driver: serde_json::Map<String, serde_json::Value> = DRIVERS
                .iter()
                .zip(outcomes)
                .map(|(driver, outcomes)| {
                    let value = match &outcomes[w] {
                        Ok(run) => serde_json::json!({
                            "values": workload.metrics().iter().zip(&run.values)
                                .map(|(m, v)| (m.unit.to_string(), serde_json::json!(v)))
                                .collect::<serde_json::Map<_, _>>(),
                            "seconds": run.seconds,
                            "kicks_per": workload.kick_unit(),
                            "kicks_rx_per_unit": run.per_unit("kicks_rx"),
                            "kicks_tx_per_unit": run.per_unit("kicks_tx"),
                            "driver_us_per_unit": run.per_unit("driver_us"),
                            "busy_us_per_unit": run.per_unit("busy_us"),
                            "kick_us_per_unit": run.per_unit("kick_us"),
                            "vcpu_queued_us_per_unit": run.vcpu_queued_per_unit(),
                            "credit_updates_rx_per_unit": run.per_unit("credit_updates_rx"),
                            "credit_requests_tx_per_unit": run.per_unit("credit_requests_tx"),
                            "rx_buffered_bytes_per_unit": run.per_unit("rx_buffered_bytes"),
                            "guest": run.guest.fields,
                            "partial": run.partial,
                            "median_of": run.first_metric_by_round.len(),
                            "first_metric_by_round": run.first_metric_by_round,
                        }),
                        Err(e) => serde_json::json!({ "error": e }),
                    };
                    (driver.arg.to_string(), value)
                })
                .collect();
            let ratios: serde_json::Map<String, serde_json::Value> = workload
                .metrics()
                .iter()
                .enumerate()
                .map(|(index, &metric)| {
                    (
                        metric.unit.to_string(),
                        serde_json::json!({
                            "higher_is_better": metric.higher_is_better,
                            "ours_better_by_vs_theirs": ratio(metric, &outcomes[0][w], &outcomes[2][w], index),
                            "ours_better_by_vs_theirs_best": ratio(metric, &outcomes[0][w], &outcomes[3][w], index),
                            "ours_throughput_better_by_vs_theirs": ratio(metric, &outcomes[1][w], &outcomes[2][w], index),
                            "ours_throughput_better_by_vs_theirs_best": ratio(metric, &outcomes[1][w], &outcomes[3][w], index),
                        }),
                    )
                })
                .collect();
            serde_json::json!({
                "workload": workload.name(),
                "drivers": per_driver,
                "ratios": ratios,
            })
        })
        .collect();
    serde_json::json!({
        "machine": machine.to_string(),
        "accel": accel.to_string(),
        "accel_note": note,
        "results": results,
    })
}

/// The QEMU process's CPU time over [`IDLE_MEASURE`] with the echo guest listening and
/// [`IDLE_CONNECTIONS`] idle host connections open, as % of one core; the guest waits
/// as `wait` says.
fn idle_cpu(tools: &Tools, accel: Accel, machine: Machine, wait: Wait) -> Result<f64> {
    let kernel = build_example("echo", machine.arch())?;
    let mut vm = EchoVm::boot(
        tools,
        machine,
        accel,
        &kernel,
        &format!("bench-idle-{accel}-{machine}-{wait:?}"),
        false,
        wait.arg(),
        IDLE_MEASURE * 6,
    )?;
    let mut connections = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        connections.push(host::connect_accepted(
            &vm.guest.slot.uds,
            ECHO_PORT,
            CONNECT_TIMEOUT,
        )?);
    }
    thread::sleep(Duration::from_secs(1));
    let pid = vm.guest.pid();
    let before = cpu_ticks(pid)?;
    let started = Instant::now();
    thread::sleep(IDLE_MEASURE);
    let ticks = cpu_ticks(pid)? - before;
    let seconds = started.elapsed().as_secs_f64();
    drop(connections);
    vm.guest.stop();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let percent = ticks as f64 / hz / seconds * 100.0;
    println!(
        "  {accel}: idle echo guest ({}), {IDLE_CONNECTIONS} idle connections: QEMU used {percent:.3}% of a core over {seconds:.1}s",
        wait.arg()
    );
    Ok(percent)
}

/// User and system CPU time of process `pid` so far, in clock ticks (`/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no ')' in /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Our driver halting (`ours`, `wait=irq`) against spinning (`ours poll`): each metric,
/// the ratio (how many times better halting is), the device interrupts, halts and timer
/// wake-ups per unit, then the idle rows.
fn render_wait_table(
    plan: &Plan<'_>,
    irq: &[Outcome],
    poll: Option<&[Outcome]>,
    idle: &[(Wait, Result<f64>)],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nours halting until an interrupt or a deadline (wait=irq) and spinning on poll (wait=poll)"
    );
    let _ = writeln!(
        out,
        "{:<56} {:>12} {:>12} {:>9} {:>12} {:>10} {:>12} {:>16}",
        "workload",
        "ours irq",
        "ours poll",
        "irq/poll",
        "interrupts",
        "halts",
        "timer wakes",
        "vCPU queued"
    );
    let value = |outcome: Option<&Outcome>, index: usize| match outcome {
        Some(Ok(run)) => number(run.values[index]),
        Some(Err(e)) if e == NOT_RUN => "-".to_string(),
        Some(Err(_)) => "failed".to_string(),
        None => "-".to_string(),
    };
    for (w, &workload) in plan.workloads.iter().enumerate() {
        for (index, &metric) in workload.metrics().iter().enumerate() {
            let ours = &irq[w];
            let spinning = poll.map(|p| &p[w]);
            let per_unit = |key: &str| {
                ours.as_ref()
                    .ok()
                    .and_then(|run| run.per_unit(key))
                    .map_or("-".to_string(), |v| format!("{v:.2}"))
            };
            let queued = |outcome: Option<&Outcome>| {
                outcome
                    .and_then(|outcome| outcome.as_ref().ok())
                    .and_then(Run::vcpu_queued_per_unit)
                    .map_or("-".to_string(), number)
            };
            let _ = writeln!(
                out,
                "{:<56} {:>12} {:>12} {:>9} {:>12} {:>10} {:>12} {:>16}",
                format!("{} ({})", workload.name(), metric.unit),
                value(Some(ours), index),
                value(spinning, index),
                spinning
                    .and_then(|p| ratio(metric, ours, p, index))
                    .map_or("-".to_string(), |r| format!("{r:.2}x")),
                if index == 0 {
                    per_unit("interrupts")
                } else {
                    String::new()
                },
                if index == 0 {
                    per_unit("halts")
                } else {
                    String::new()
                },
                if index == 0 {
                    per_unit("timer_wakes")
                } else {
                    String::new()
                },
                if index == 0 {
                    format!("{}/{}", queued(Some(ours)), queued(spinning))
                } else {
                    String::new()
                },
            );
        }
    }
    for (wait, cpu) in idle {
        let _ = writeln!(
            out,
            "{:<56} {:>12}",
            format!(
                "idle, {IDLE_CONNECTIONS} open connections, {}: QEMU CPU (% of a core)",
                wait.arg()
            ),
            match cpu {
                Ok(percent) => format!("{percent:.3}"),
                Err(e) => format!("failed: {e:#}"),
            }
        );
    }
    let _ = writeln!(
        out,
        "irq/poll = how many times better halting is (rates: irq/poll; times: poll/irq); interrupts, halts and halts the timer ended (a deadline or the backstop) per unit of the workload (MiB, round trip, cycle), counted in the guest from the workload's start to its end; vCPU queued = us per unit QEMU's vCPU thread was runnable but waited for a host core, halting/spinning (host schedstat)"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_line_gives_rates_with_or_without_the_check() {
        let log = "boot\n[INFO] bench: reference fill_us=1000000 check_us=500000 copy_us=250000 bytes=1048576\n";
        let r = Reference::parse(log).expect("a reference line");
        assert_eq!(
            (r.fill_mib_s, r.check_mib_s, r.copy_mib_s),
            (1.0, Some(2.0), 4.0)
        );
        let older = "bench: reference fill_us=1000000 copy_us=250000 bytes=1048576";
        let r = Reference::parse(older).expect("a reference line");
        assert_eq!((r.check_mib_s, r.copy_mib_s), (None, 4.0));
    }

    fn ping_pong_run(median_us: f64, p99_us: f64, busy_us: &str, floors: [f64; 2]) -> Run {
        let mut guest = GuestReport::default();
        guest.fields.insert("busy_us".into(), busy_us.into());
        Run {
            values: vec![median_us, p99_us],
            seconds: 1.0,
            units: 1.0,
            guest,
            partial: None,
            first_metric_by_round: Vec::new(),
            floors: floors.to_vec(),
            vcpu_queued_us: None,
        }
    }

    #[test]
    fn each_metric_is_its_own_median_and_the_counters_are_the_median_runs() {
        let runs = vec![
            ping_pong_run(46.2, 81.2, "1", [40.0, 60.0]),
            ping_pong_run(47.8, 126.5, "2", [41.0, 100.0]),
            ping_pong_run(47.4, 67.0, "3", [39.0, 55.0]),
        ];
        let median = median_run(Workload::PingPong { round_trips: 1 }, runs).unwrap();
        assert_eq!(median.values, [47.4, 81.2]);
        assert_eq!(median.floors, [40.0, 60.0]);
        assert_eq!(median.guest.number("busy_us"), Some(3));
        assert_eq!(median.first_metric_by_round, [46.2, 47.8, 47.4]);
        assert_eq!(spread(&median.first_metric_by_round), "46.20–47.80");
        assert_eq!(spread(&[1033.14]), "1033.1");
        assert_eq!(spread(&[]), "-");
    }

    #[test]
    fn the_floor_of_all_but_the_driver_keeps_the_notifications_and_drops_the_rest_of_its_time() {
        let mut guest = GuestReport::default();
        for (key, value) in [
            ("guest_us", "4000"),
            ("driver_us", "2000"),
            ("kick_us", "100"),
        ] {
            guest.fields.insert(key.into(), value.into());
        }
        let mut run = ping_pong_run(0.0, 0.0, "0", [0.0, 0.0]);
        run.guest = guest.clone();
        run.units = 2.0;
        // Per unit: 2000 in all, 1000 in the driver, 50 of them notifications.
        assert_eq!(all_but_driver_floor(&run), Some(1050.0));
        guest.fields.remove("kick_us");
        run.guest = guest;
        assert_eq!(all_but_driver_floor(&run), None);
    }

    /// A guest report with the work quantiles the guest would log for `work` (ns):
    /// each the smallest value that at most `n (1000 - q) / 1000` stretches exceed.
    fn work_report(work_ns: &[u64]) -> GuestReport {
        let mut sorted = work_ns.to_vec();
        sorted.sort_unstable();
        let n = sorted.len() as u64;
        let mut guest = GuestReport::default();
        guest.fields.insert("work_stretches".into(), n.to_string());
        for (key, thousandths) in WORK_QUANTILES {
            let longer = n * (1000 - thousandths) / 1000;
            let value = sorted[(n - 1 - longer) as usize];
            guest.fields.insert(key.into(), value.to_string());
        }
        guest
    }

    #[test]
    fn the_quantile_floor_takes_the_best_of_the_work_quantiles() {
        let times: Vec<f64> = (1..=100).map(f64::from).collect();
        let mut guest = GuestReport::default();
        for (key, value) in [
            ("work_stretches", 100),
            ("work_p50_ns", 2000),
            ("work_p90_ns", 3000),
            ("work_p99_ns", 5000),
            ("work_p999_ns", 8000),
            ("work_max_ns", 20_000),
        ] {
            guest.fields.insert(key.into(), value.to_string());
        }
        // p99 = rank 98 (99 us). With p99 work: 1 longer stretch, rank 97 (98) - 5 = 93;
        // p999: none longer, 99 - 8 = 91; max: 99 - 20 = 79; p90: rank 88 (89) - 3 = 86.
        assert_eq!(quantile_floor(&times, 0.99, &guest), Some(93.0));
        // Median = rank 50 (51): p50 work leaves 50 longer, rank 0 (1) - 2 = 0 (clamped);
        // p90: rank 40 (41) - 3 = 38; p99: 50 - 5 = 45; p999 and max: 51 - 8 = 43.
        assert_eq!(quantile_floor(&times, 0.5, &guest), Some(45.0));
        assert_eq!(quantile_floor(&times, 0.5, &GuestReport::default()), None);
    }

    #[test]
    fn the_quantile_floor_never_exceeds_a_zero_cost_drivers_quantile() {
        // Round trips and their work drawn from a fixed generator, heavy-tailed both, and
        // paired as drawn: the bound must hold whatever the pairing.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..200 {
            let n = 50 + (next() % 2000) as usize;
            let work_ns: Vec<u64> = (0..n)
                .map(|_| {
                    let tail = if next() % 50 == 0 { 30_000 } else { 0 };
                    1000 + next() % 3000 + tail
                })
                .collect();
            let round_trips: Vec<f64> = work_ns
                .iter()
                .map(|&work| {
                    let device = 40.0 + (next() % 10_000) as f64 / 1000.0;
                    let spike = if next() % 40 == 0 { 60.0 } else { 0.0 };
                    device + spike + work as f64 / 1e3
                })
                .collect();
            let mut zero_cost: Vec<f64> = round_trips
                .iter()
                .zip(&work_ns)
                .map(|(&rtt, &work)| rtt - work as f64 / 1e3)
                .collect();
            zero_cost.sort_by(f64::total_cmp);
            let mut sorted = round_trips.clone();
            sorted.sort_by(f64::total_cmp);
            let guest = work_report(&work_ns);
            for q in [0.5, 0.9, 0.99] {
                let floor = quantile_floor(&sorted, q, &guest).unwrap();
                let actual = zero_cost[quantile_index(n, q)];
                assert!(floor <= actual + 1e-9, "q {q}: floor {floor} > {actual}");
            }
        }
    }
}
