//! The test program of the Linux guest that `cargo xtask test` boots as a sibling of the
//! example guests (`xtask/src/linux.rs` builds the guest, `xtask/src/linux_tests.rs` runs
//! the tests). It runs in a Debian 12 kernel's initramfs as `/linux-peer`, started by
//! `/init` with the words after `--` on the kernel command line, and prints to the serial
//! console. It uses Linux's own vsock stack (`vmw_vsock_virtio_transport`) through
//! `AF_VSOCK` sockets.
//!
//! Two ways to run it:
//!
//! - `linux-peer control port=<p>`: connect to the host (CID 2) port `p` and run one
//!   command per line received, answering each with one line, `ok <detail>` or
//!   `fail <why>`, until `exit` or the end of the stream. This is how the tests drive it,
//!   so that one boot runs every case.
//! - `linux-peer <command> [key=value ...]`: run one command, print its result, exit.
//!
//! Commands, with their `key=value` words (defaults in brackets; `cid` has none):
//!
//! | command | what |
//! | --- | --- |
//! | `pingpong cid port=[1234] rounds=[1000]` | one byte there and back `rounds` times on one connection; the median and 90th percentile round trip |
//! | `concurrent cid port=[1234] count=[100] open=[32] bytes=[200]` | `count` connections, at most `open` at a time, each echoing `bytes` bytes |
//! | `halfclose cid port=[1234] bytes=[65536]` | writes `bytes`, shuts down its write side (`SHUT_WR`), then reads the whole echo up to the peer's end of stream |
//! | `abandon cid port=[1234] bytes=[262144]` | three echo connections of `bytes` each, while a fourth is closed mid-transfer with `SO_LINGER` 0 and a fifth is left open by a child process that exits; then one more echo |
//! | `echo cid port=[1234] bytes=[4194304]` | bulk: `bytes` through the echo service, checked byte by byte; MB/s |
//! | `source cid port=[1235] bytes=[4194304]` | bulk one way: asks the echo guest's source service for `bytes` and checks them; MB/s |
//! | `expect-reset cid port=[1234] bytes=[4194304] seconds=[30]` | the echo bulk, expecting the connection to be reset within `seconds`: Linux's trace must show an RST arriving |
//! | `serve port=[7000]` | an echo server, one thread per connection: in the background in the control loop, in the foreground (until power-off) when run by itself |
//! | `served count=[1] seconds=[10]` | the connections the server finished since the last `served`, with the bytes echoed, once `count` have finished or after `seconds` |
//! | `exit` | ends the control loop |
//!
//! Every socket has read and write timeouts, so a stalled transfer fails instead of
//! hanging.

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::socket::{setsockopt, sockopt::Linger};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::Shutdown;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use vsock::{VsockListener, VsockStream, VMADDR_CID_ANY, VMADDR_CID_HOST};

/// How long a read or write may wait before the workload counts as stalled.
const STALL: Duration = Duration::from_secs(20);
/// The echo guest's echo service.
const ECHO_PORT: u32 = 1234;
/// The echo guest's source service.
const SOURCE_PORT: u32 = 1235;
/// The port `serve` listens on by default.
const SERVE_PORT: u32 = 7000;
/// Largest read or write of the workloads.
const CHUNK: usize = 64 * 1024;
/// How long `control` keeps trying to reach the host.
const CONTROL_CONNECT: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let line = args.join(" ");
    let result = if args.first().map(String::as_str) == Some("control") {
        Words::parse(&line).and_then(|words| control(words.number("port", None)?))
    } else if args.first().map(String::as_str) == Some("serve") {
        // By hand: serve in the foreground until the machine is stopped.
        Server::default().start(&line).map(|()| loop {
            thread::park();
        })
    } else if args.is_empty() {
        Err(anyhow!(
            "usage: linux-peer control port=<p> | linux-peer <command> [key=value ...]"
        ))
    } else {
        run_command(&line).map(|detail| say(&format!("ok {detail}")))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(&format!("fail {e:#}"));
            ExitCode::FAILURE
        }
    }
}

/// Prints one line to the console, prefixed so it stands out among kernel messages.
fn say(line: &str) {
    println!("linux-peer: {line}");
}

/// The control loop: commands from the host, one per line, each answered with one line.
fn control(port: u32) -> Result<()> {
    let deadline = Instant::now() + CONTROL_CONNECT;
    let stream = loop {
        match VsockStream::connect_with_cid_port(VMADDR_CID_HOST, port) {
            Ok(stream) => break stream,
            Err(e) if Instant::now() < deadline => {
                say(&format!("control: host port {port}: {e}; trying again"));
                thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e).context(format!("connecting to host port {port}")),
        }
    };
    say(&format!("control: connected to host port {port}"));
    let mut answers = stream.try_clone()?;
    let server = Server::default();
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading a command")?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        say(&format!("> {line}"));
        let answer = match line.split_whitespace().next() {
            Some("exit") => {
                answers.write_all(b"ok bye\n")?;
                say("control: exit");
                return Ok(());
            }
            Some("serve") => server.start(line).map(|()| "listening".into()),
            Some("served") => server.take_report(line),
            _ => run_command(line),
        };
        let answer = match answer {
            Ok(detail) => format!("ok {detail}"),
            Err(e) => format!("fail {:#}", e).replace('\n', " / "),
        };
        say(&answer);
        answers.write_all(format!("{answer}\n").as_bytes())?;
    }
    say("control: the host closed the connection");
    Ok(())
}

/// Runs one client-side command; returns its one-line detail.
fn run_command(line: &str) -> Result<String> {
    let words = Words::parse(line)?;
    let cid = || words.number("cid", None);
    match words.command {
        "pingpong" => pingpong(
            cid()?,
            words.number("port", Some(ECHO_PORT))?,
            words.number("rounds", Some(1000))?,
        ),
        "concurrent" => concurrent(
            cid()?,
            words.number("port", Some(ECHO_PORT))?,
            words.number("count", Some(100))?,
            words.number("open", Some(32))?,
            words.number("bytes", Some(200))?,
        ),
        "halfclose" => half_close(
            cid()?,
            words.number("port", Some(ECHO_PORT))?,
            words.number("bytes", Some(65536))?,
        ),
        "abandon" => abandon(
            cid()?,
            words.number("port", Some(ECHO_PORT))?,
            words.number("bytes", Some(256 * 1024))?,
        ),
        "abandon-child" => abandon_child(cid()?, words.number("port", Some(ECHO_PORT))?),
        "echo" => bulk_echo(
            cid()?,
            words.number("port", Some(ECHO_PORT))?,
            words.number("bytes", Some(4 << 20))?,
        ),
        "source" => source(
            cid()?,
            words.number("port", Some(SOURCE_PORT))?,
            words.number("bytes", Some(4 << 20))?,
        ),
        "expect-reset" => expect_reset(
            cid()?,
            words.number("port", Some(ECHO_PORT))?,
            words.number("bytes", Some(4 << 20))?,
            Duration::from_secs(words.number("seconds", Some(30))?),
        ),
        "served" | "exit" | "control" => {
            bail!("{} works in the control loop only", words.command)
        }
        other => bail!("unknown command {other:?}"),
    }
}

/// A command line: the command and its `key=value` words.
struct Words<'a> {
    command: &'a str,
    values: BTreeMap<&'a str, &'a str>,
}

impl<'a> Words<'a> {
    fn parse(line: &'a str) -> Result<Self> {
        let mut words = line.split_whitespace();
        let command = words.next().ok_or_else(|| anyhow!("empty command"))?;
        let values = words
            .map(|word| {
                word.split_once('=')
                    .ok_or_else(|| anyhow!("{word:?} is not key=value"))
            })
            .collect::<Result<_>>()?;
        Ok(Words { command, values })
    }

    /// The number after `key=`, else `default`; an error when neither is there.
    fn number<T: std::str::FromStr>(&self, key: &str, default: Option<T>) -> Result<T> {
        match self.values.get(key) {
            Some(value) => value
                .parse()
                .map_err(|_| anyhow!("{key}={value} is not a number")),
            None => default.ok_or_else(|| anyhow!("{key}= is missing")),
        }
    }
}

/// Connects to `cid:port` with the stall timeouts set.
fn connect(cid: u32, port: u32) -> Result<VsockStream> {
    let stream = VsockStream::connect_with_cid_port(cid, port)
        .with_context(|| format!("connecting to {cid}:{port}"))?;
    stream.set_read_timeout(Some(STALL))?;
    stream.set_write_timeout(Some(STALL))?;
    Ok(stream)
}

/// Byte `offset` of the test pattern of stream `seed`: it depends on the position, so a
/// lost, repeated or reordered chunk shows.
fn pattern(seed: u64, offset: u64) -> u8 {
    let mixed = (offset ^ seed.rotate_left(29)).wrapping_mul(0x2545_F491_4F6C_DD1D);
    (mixed >> 40) as u8 ^ (offset >> 12) as u8
}

fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = pattern(seed, offset + i as u64);
    }
}

/// Checks `buf`, which holds stream bytes from `offset` on, against `expected`.
fn check(buf: &[u8], offset: u64, expected: impl Fn(u64) -> u8) -> Result<()> {
    for (i, &byte) in buf.iter().enumerate() {
        let at = offset + i as u64;
        let want = expected(at);
        if byte != want {
            bail!("byte {at} differs: got {byte:#04x}, expected {want:#04x}");
        }
    }
    Ok(())
}

/// A read error in words, with the stall case named.
fn read_failed(e: std::io::Error, got: u64, total: u64) -> anyhow::Error {
    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
        anyhow!(
            "stalled: nothing for {}s after {got} of {total} bytes",
            STALL.as_secs()
        )
    } else {
        anyhow!("read failed after {got} of {total} bytes: {e}")
    }
}

fn megabytes_per_second(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

fn pingpong(cid: u32, port: u32, rounds: usize) -> Result<String> {
    let mut stream = connect(cid, port)?;
    let mut times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let byte = [round as u8];
        let mut back = [0u8];
        let started = Instant::now();
        stream.write_all(&byte)?;
        stream
            .read_exact(&mut back)
            .with_context(|| format!("round {round}"))?;
        times.push(started.elapsed());
        if back != byte {
            bail!("round {round}: sent {:#04x}, got {:#04x}", byte[0], back[0]);
        }
    }
    stream.shutdown(Shutdown::Both)?;
    times.sort();
    let micros = |at: usize| times.get(at).map_or(0, |t| t.as_micros());
    Ok(format!(
        "{rounds} round trips of 1 byte, median {} us, p90 {} us",
        micros(rounds / 2),
        micros(rounds * 9 / 10)
    ))
}

/// Sends `total` bytes of the pattern of `seed` while reading the echo back and checking
/// it; returns the time it took.
fn echo_exchange(stream: VsockStream, seed: u64, total: u64) -> Result<Duration> {
    let started = Instant::now();
    let mut writer = stream.try_clone()?;
    let sender = thread::spawn(move || -> Result<()> {
        let mut chunk = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(CHUNK as u64) as usize;
            fill(seed, sent, &mut chunk[..n]);
            writer
                .write_all(&chunk[..n])
                .with_context(|| format!("write failed after {sent} of {total} bytes"))?;
            sent += n as u64;
        }
        Ok(())
    });
    let mut reader = stream;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    let received = (|| -> Result<()> {
        while got < total {
            let n = match reader.read(&mut buf) {
                Ok(0) => bail!("the peer closed after echoing {got} of {total} bytes"),
                Ok(n) => n,
                Err(e) => return Err(read_failed(e, got, total)),
            };
            check(&buf[..n], got, |at| pattern(seed, at))?;
            got += n as u64;
        }
        Ok(())
    })();
    if received.is_err() {
        // Unblock the sender.
        let _ = reader.shutdown(Shutdown::Both);
    }
    let sent = sender
        .join()
        .map_err(|_| anyhow!("the sending thread panicked"))?;
    received?;
    sent?;
    let elapsed = started.elapsed();
    // The echo is complete: close our side and expect the peer's end of stream.
    reader.shutdown(Shutdown::Write)?;
    match reader.read(&mut buf) {
        Ok(0) => Ok(elapsed),
        Ok(n) => bail!("{n} unexpected bytes after the echo"),
        Err(e) => bail!("waiting for the peer's end of stream: {e}"),
    }
}

fn bulk_echo(cid: u32, port: u32, bytes: u64) -> Result<String> {
    let elapsed = echo_exchange(connect(cid, port)?, 1, bytes)?;
    Ok(format!(
        "{bytes} bytes each way byte-exact in {:.2}s, {:.2} MB/s each way",
        elapsed.as_secs_f64(),
        megabytes_per_second(bytes, elapsed)
    ))
}

fn concurrent(cid: u32, port: u32, count: u64, open: u64, bytes: u64) -> Result<String> {
    let next = AtomicU64::new(0);
    let errors = Mutex::new(Vec::new());
    let started = Instant::now();
    thread::scope(|scope| {
        for _ in 0..open.min(count) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= count {
                    return;
                }
                let result = connect(cid, port)
                    .and_then(|stream| echo_exchange(stream, 1000 + index, bytes + index));
                if let Err(e) = result {
                    if let Ok(mut errors) = errors.lock() {
                        errors.push(format!("connection {index}: {e:#}"));
                    }
                }
            });
        }
    });
    let errors = errors.into_inner().unwrap_or_default();
    if !errors.is_empty() {
        bail!("{} of {count} failed: {}", errors.len(), errors.join("; "));
    }
    Ok(format!(
        "{count} connections, at most {open} open at once, {bytes}+ bytes each echoed byte-exact, in {:.2}s",
        started.elapsed().as_secs_f64()
    ))
}

fn half_close(cid: u32, port: u32, bytes: u64) -> Result<String> {
    let mut stream = connect(cid, port)?;
    let mut data = vec![0u8; bytes as usize];
    fill(7, 0, &mut data);
    stream.write_all(&data)?;
    stream.shutdown(Shutdown::Write)?;
    let mut echoed = Vec::new();
    match stream.read_to_end(&mut echoed) {
        Ok(_) => {}
        Err(e) => return Err(read_failed(e, echoed.len() as u64, bytes)),
    }
    if echoed.len() as u64 != bytes {
        bail!(
            "after SHUT_WR got {} of {bytes} bytes, then end of stream",
            echoed.len()
        );
    }
    check(&echoed, 0, |at| pattern(7, at))?;
    Ok(format!(
        "wrote {bytes} bytes, SHUT_WR, read all {bytes} back byte-exact, then the peer's end of stream"
    ))
}

/// Starts an echo and leaves it halfway: 32 KiB written, 1 KiB read back, 32 KiB more.
fn half_an_echo(stream: &mut VsockStream) -> Result<()> {
    let mut chunk = vec![0u8; 32 * 1024];
    fill(99, 0, &mut chunk);
    stream.write_all(&chunk)?;
    let mut some = [0u8; 1024];
    stream.read_exact(&mut some)?;
    stream.write_all(&chunk)?;
    Ok(())
}

fn abandon(cid: u32, port: u32, bytes: u64) -> Result<String> {
    let trace = PacketTrace::start();
    if let Err(e) = &trace {
        say(&format!("abandon: no packet trace: {e:#}"));
    }
    let workers: Vec<_> = (0..3)
        .map(|seed| {
            let stream = connect(cid, port)?;
            Ok(thread::spawn(move || {
                echo_exchange(stream, 50 + seed, bytes)
            }))
        })
        .collect::<Result<_>>()?;
    // Closed mid-transfer with SO_LINGER 0, as a program that wants a reset does.
    let mut lingered = connect(cid, port)?;
    let lingered_port = lingered.local_addr()?.port();
    half_an_echo(&mut lingered)?;
    setsockopt(
        &lingered,
        Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .context("setting SO_LINGER 0")?;
    drop(lingered);
    // Left open by a process that exits.
    let me = std::env::current_exe().context("finding /proc/self/exe")?;
    let child = std::process::Command::new(me)
        .args([
            "abandon-child",
            &format!("cid={cid}"),
            &format!("port={port}"),
        ])
        .output()
        .context("running the abandoning child")?;
    let child_out = String::from_utf8_lossy(&child.stdout);
    print!("{child_out}");
    if !child.status.success() {
        bail!("the abandoning child failed: {}", child.status);
    }
    let child_port: u32 = child_out
        .split_whitespace()
        .find_map(|word| word.strip_prefix("port=")?.parse().ok())
        .ok_or_else(|| anyhow!("the abandoning child did not say its port"))?;
    for (index, worker) in workers.into_iter().enumerate() {
        worker
            .join()
            .map_err(|_| anyhow!("echo {index} panicked"))?
            .with_context(|| format!("echo {index} beside the abandoned connections"))?;
    }
    echo_exchange(connect(cid, port)?, 60, 1000).context("an echo afterwards")?;
    let mut detail = format!(
        "3 x {bytes} bytes echoed byte-exact beside one connection closed mid-transfer with SO_LINGER 0 and one left open by an exiting process; a new echo works"
    );
    if let Ok(trace) = trace {
        // Both abandoned connections are over once an RST went either way; Linux resets
        // by itself after its close timeout (8 s) at the latest.
        let deadline = Instant::now() + Duration::from_secs(12);
        let ports = [lingered_port, child_port];
        let packets = loop {
            let packets = trace.packets()?;
            let over = |port: u32| {
                packets
                    .iter()
                    .any(|p| p.local_port == port && p.op == "RST")
            };
            if ports.iter().all(|&port| over(port)) || Instant::now() >= deadline {
                break packets;
            }
            thread::sleep(Duration::from_millis(200));
        };
        detail.push_str(&format!(
            "; Linux's packets: SO_LINGER 0 close: {}; process exit: {}",
            PacketTrace::summary(&packets, lingered_port),
            PacketTrace::summary(&packets, child_port)
        ));
    }
    Ok(detail)
}

/// The child of `abandon`: half an echo, then exit with the connection open.
fn abandon_child(cid: u32, port: u32) -> Result<String> {
    let mut stream = connect(cid, port)?;
    let local = stream.local_addr()?.port();
    half_an_echo(&mut stream)?;
    say(&format!(
        "abandon-child: exiting with the connection from port={local} open"
    ));
    std::process::exit(0);
}

/// One packet of Linux's virtio vsock transport, from its trace events.
struct TracedPacket {
    /// Seconds since boot.
    time: f64,
    /// Whether Linux sent it (else received it).
    sent: bool,
    /// Linux's port of the connection.
    local_port: u32,
    /// `REQUEST`, `RW`, `SHUTDOWN`, `RST`, ...
    op: String,
    /// The flags, as the trace prints them (`0x3`).
    flags: String,
}

/// Linux's own record of what its virtio vsock transport sends and receives: the
/// trace events of `vmw_vsock_virtio_transport_common` (system `vsock`:
/// `virtio_transport_alloc_pkt` for every
/// packet it builds, `virtio_transport_recv_pkt` for every packet it takes), read from
/// tracefs, which `/init` mounts. The events are switched off again when this is dropped.
struct PacketTrace;

impl PacketTrace {
    const DIR: &'static str = "/sys/kernel/tracing";
    const EVENTS: &'static str = "events/vsock/enable";

    /// Empties the trace buffer and switches the events on.
    fn start() -> Result<Self> {
        std::fs::write(format!("{}/trace", Self::DIR), "").context("clearing the trace")?;
        std::fs::write(format!("{}/{}", Self::DIR, Self::EVENTS), "1").with_context(|| {
            let systems: Vec<String> = std::fs::read_dir(format!("{}/events", Self::DIR))
                .map(|dir| {
                    dir.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                        .filter(|name| name.contains("vsock") || name.contains("virtio"))
                        .collect()
                })
                .unwrap_or_default();
            format!("enabling the vsock trace events (event systems: {systems:?})")
        })?;
        Ok(PacketTrace)
    }

    /// The packets traced so far.
    fn packets(&self) -> Result<Vec<TracedPacket>> {
        let text = std::fs::read_to_string(format!("{}/trace", Self::DIR))?;
        Ok(text.lines().filter_map(Self::parse).collect())
    }

    /// Parses `<task> [cpu] <flags> 12.345678: virtio_transport_alloc_pkt: 5:1 -> 3:1234
    /// len=0 type=STREAM op=SHUTDOWN flags=0x3`.
    fn parse(line: &str) -> Option<TracedPacket> {
        let (head, event) = line.split_once(": virtio_transport_")?;
        let time = head
            .split_whitespace()
            .last()?
            .trim_end_matches(':')
            .parse()
            .ok()?;
        let (kind, rest) = event.split_once(": ")?;
        let sent = kind == "alloc_pkt";
        let mut words = rest.split_whitespace();
        let src = words.next()?;
        words.next()?; // ->
        let dst = words.next()?;
        let port_of = |addr: &str| addr.split_once(':')?.1.parse::<u32>().ok();
        let local_port = if sent { port_of(src)? } else { port_of(dst)? };
        let value = |key: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_string)
        };
        Some(TracedPacket {
            time,
            sent,
            local_port,
            op: value("op=")?,
            flags: value("flags=").unwrap_or_default(),
        })
    }

    /// The SHUTDOWN and RST packets of the connection on Linux's `port`, in order, with
    /// their time after the first of them.
    fn summary(packets: &[TracedPacket], port: u32) -> String {
        let control: Vec<&TracedPacket> = packets
            .iter()
            .filter(|p| p.local_port == port && (p.op == "SHUTDOWN" || p.op == "RST"))
            .collect();
        let Some(first) = control.first() else {
            return format!("no SHUTDOWN or RST traced for port {port}");
        };
        control
            .iter()
            .map(|p| {
                let flags = if p.op == "SHUTDOWN" {
                    format!("({})", p.flags)
                } else {
                    String::new()
                };
                format!(
                    "{} {}{flags} +{:.3}s",
                    if p.sent { "sent" } else { "got" },
                    p.op,
                    p.time - first.time
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Drop for PacketTrace {
    fn drop(&mut self) {
        let _ = std::fs::write(format!("{}/{}", Self::DIR, Self::EVENTS), "0");
    }
}

/// Byte `offset` of the echo guest's source service (`source_byte` in examples/echo.rs).
fn source_byte(offset: u64) -> u8 {
    (offset as u8) ^ ((offset >> 8) as u8).wrapping_mul(31) ^ ((offset >> 16) as u8).wrapping_mul(7)
}

fn source(cid: u32, port: u32, bytes: u64) -> Result<String> {
    let mut stream = connect(cid, port)?;
    let started = Instant::now();
    stream.write_all(format!("{bytes}\n").as_bytes())?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) => return Err(read_failed(e, got, bytes)),
        };
        if n == 0 {
            break;
        }
        check(&buf[..n], got, source_byte)?;
        got += n as u64;
    }
    let elapsed = started.elapsed();
    if got != bytes {
        bail!("the source closed after {got} of {bytes} bytes");
    }
    Ok(format!(
        "{bytes} bytes from the source byte-exact in {:.2}s, {:.2} MB/s",
        elapsed.as_secs_f64(),
        megabytes_per_second(bytes, elapsed)
    ))
}

/// The echo bulk, which must end in a reset within `within`: Linux's trace must show an
/// RST arriving for the connection. (Linux reports a peer's RST on an established
/// connection as the end of the stream to `read` and as `EPIPE` to `write`, not as
/// `ECONNRESET`, so only the trace tells a reset from a close.)
fn expect_reset(cid: u32, port: u32, bytes: u64, within: Duration) -> Result<String> {
    let trace = PacketTrace::start()?;
    let stream = connect(cid, port)?;
    let local_port = stream.local_addr()?.port();
    let timeout = within.max(Duration::from_secs(1));
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let started = Instant::now();
    let outcome = echo_exchange(stream, 3, bytes);
    let elapsed = started.elapsed();
    let reset = trace
        .packets()?
        .into_iter()
        .find(|p| p.local_port == local_port && !p.sent && p.op == "RST");
    match (outcome, reset) {
        (Ok(_), _) => bail!("the transfer of {bytes} bytes completed without a reset"),
        (Err(e), Some(_)) if elapsed <= within => Ok(format!(
            "Linux got an RST, the transfer ended after {:.1}s: {e:#}",
            elapsed.as_secs_f64()
        )),
        (Err(e), reset) => bail!(
            "no reset within {}s ({}): {e:#} (after {:.1}s)",
            within.as_secs(),
            if reset.is_some() {
                "an RST came too late"
            } else {
                "Linux got no RST"
            },
            elapsed.as_secs_f64()
        ),
    }
}

/// The background echo server of `serve`, and what it has served.
#[derive(Default, Clone)]
struct Server {
    /// One line per finished connection, taken by `served`.
    finished: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Listens on the port `line` names and serves every connection in its own thread.
    fn start(&self, line: &str) -> Result<()> {
        let port = Words::parse(line)?.number("port", Some(SERVE_PORT))?;
        let listener = VsockListener::bind_with_cid_port(VMADDR_CID_ANY, port)
            .with_context(|| format!("listening on port {port}"))?;
        let server = self.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => {
                        let server = server.clone();
                        thread::spawn(move || server.serve(stream));
                    }
                    Err(e) => say(&format!("serve: accept failed: {e}")),
                }
            }
        });
        Ok(())
    }

    /// Echoes one connection until the peer's end of stream, then closes it.
    fn serve(&self, mut stream: VsockStream) {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| format!("{}:{}", a.cid(), a.port()));
        let _ = stream.set_read_timeout(Some(STALL));
        let _ = stream.set_write_timeout(Some(STALL));
        let mut buf = vec![0u8; CHUNK];
        let mut echoed = 0u64;
        let end = loop {
            match stream.read(&mut buf) {
                Ok(0) => break "end of stream".to_string(),
                Ok(n) => {
                    if let Err(e) = stream.write_all(&buf[..n]) {
                        break format!("write failed: {e}");
                    }
                    echoed += n as u64;
                }
                Err(e) => break format!("read failed: {e}"),
            }
        };
        let report = format!("{peer} echoed {echoed} bytes, {end}");
        say(&format!("serve: {report}"));
        if let Ok(mut finished) = self.finished.lock() {
            finished.push(report);
        }
    }

    /// The connections finished since the last call, `; `-separated, once as many as
    /// `line` counts (`count=`) have finished or its `seconds=` have passed: a peer that
    /// closed may be a moment ahead of the thread that serves it.
    fn take_report(&self, line: &str) -> Result<String> {
        let words = Words::parse(line)?;
        let count: usize = words.number("count", Some(1))?;
        let deadline = Instant::now() + Duration::from_secs(words.number("seconds", Some(10))?);
        let finished = loop {
            let mut finished = self
                .finished
                .lock()
                .map_err(|_| anyhow!("a serving thread panicked"))?;
            if finished.len() >= count || Instant::now() >= deadline {
                break std::mem::take(&mut *finished);
            }
            drop(finished);
            thread::sleep(Duration::from_millis(20));
        };
        Ok(format!(
            "{} connections: {}",
            finished.len(),
            finished.join("; ")
        ))
    }
}
