//! A soak: many host clients at once against the echo guest (examples/echo.rs) for a
//! while, each picking at random what to do next, as a crowd of real clients would:
//!
//! - **echo**: a random size up to 512 KiB, echoed byte-exact, then an orderly close;
//! - **reset mid-transfer**: some data sent and part of it read back, then the socket is
//!   closed with `SO_LINGER` 0 and echoed bytes unread;
//! - **connect and vanish**: `CONNECT`, then gone after the answer (or before it, where
//!   the peer survives that: [`SoakConfig::vanish_before_answer`]);
//! - **slow reader**: asks the source service for up to 256 KiB and reads it in small
//!   pieces with pauses, checking every byte.
//!
//! Every exchange that completes must be byte-exact and at the end the guest still
//! echoes. A connect the guest refuses is counted, not failed on, and its client pauses:
//! the guest refuses when its backlog is full, which peers that never report a client's
//! reset (vhost-device-vsock 0.3.0) can cause until the echo's idle timeout aborts those
//! connections.

use crate::host::{self, Connect};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Largest echo exchange.
const MAX_ECHO: u64 = 512 * 1024;
/// Largest amount a slow reader asks the source for.
const MAX_SOURCE: u64 = 256 * 1024;
/// Bytes in flight per echo connection (see [`host::echo_exchange`]).
const ECHO_WINDOW: u64 = 64 * 1024;
/// How long any one exchange may go without progress.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connect may wait for the guest.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the echo guest is.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// The Unix socket host programs reach the guest through (`CONNECT <port>`).
    pub uds: PathBuf,
    /// The echo service's port.
    pub echo_port: u32,
    /// The source service's port.
    pub source_port: u32,
    /// How hard to push it.
    pub load: Load,
    /// Whether vanishing clients may also go before the guest's answer. Not through
    /// vhost-device-vsock 0.3.0: its worker thread panics writing `OK <port>` to a host
    /// socket that is gone (`vsock_conn.rs`: `write_all(..).unwrap()` on EPIPE), and the
    /// guest's device is dead from then on.
    pub vanish_before_answer: bool,
}

/// How hard a soak pushes.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    /// Clients at once.
    pub clients: usize,
    /// How long new exchanges start.
    pub duration: Duration,
    /// Seed of the clients' choices (printed, so a run can be repeated).
    pub seed: u64,
    /// How often each kind of client is picked, relative to the others (see [`Kind`]).
    pub mix: Mix,
}

/// What a client does in one round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Echo a random size byte-exact.
    Echo,
    /// Send, read part of the echo, close with `SO_LINGER` 0.
    Reset,
    /// `CONNECT`, then gone.
    Vanish,
    /// Read the source service slowly.
    Slow,
}

/// Weights of the kinds of clients, in the order of [`Kind`].
#[derive(Clone, Copy, Debug)]
pub struct Mix(pub [u32; 4]);

impl Mix {
    /// Half echoes, the rest shared out.
    pub const DEFAULT: Mix = Mix([50, 15, 15, 20]);

    /// Only `kinds`, equally often.
    pub fn only(kinds: &[Kind]) -> Mix {
        let mut weights = [0; 4];
        for &kind in kinds {
            weights[kind as usize] = 1;
        }
        Mix(weights)
    }

    fn pick(&self, rng: &mut fastrand::Rng) -> Kind {
        let total: u32 = self.0.iter().sum();
        let mut at = rng.u32(0..total.max(1));
        for (kind, weight) in [Kind::Echo, Kind::Reset, Kind::Vanish, Kind::Slow]
            .into_iter()
            .zip(self.0)
        {
            if at < weight {
                return kind;
            }
            at -= weight;
        }
        Kind::Echo
    }
}

/// What the clients did.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// Echo exchanges completed byte-exact.
    pub echoes: u64,
    /// Bytes echoed in them (each way).
    pub echo_bytes: u64,
    /// Connections reset mid-transfer.
    pub resets: u64,
    /// Connections abandoned right after `CONNECT`.
    pub vanished: u64,
    /// Slow source reads completed byte-exact.
    pub slow_reads: u64,
    /// Connects the guest refused (its backlog was full).
    pub refused: u64,
    /// What went wrong, one line each.
    pub failures: Vec<String>,
}

impl SoakReport {
    /// One line for the test output.
    pub fn summary(&self, elapsed: Duration) -> String {
        format!(
            "{} echoes ({:.1} MiB each way), {} resets mid-transfer, {} connect-and-vanish, \
             {} slow source reads in {:.0} s; {} connects refused, {} failures",
            self.echoes,
            self.echo_bytes as f64 / (1 << 20) as f64,
            self.resets,
            self.vanished,
            self.slow_reads,
            elapsed.as_secs_f64(),
            self.refused,
            self.failures.len()
        )
    }
}

/// The clients' shared tally.
#[derive(Default)]
struct Tally {
    echoes: AtomicU64,
    echo_bytes: AtomicU64,
    resets: AtomicU64,
    vanished: AtomicU64,
    slow_reads: AtomicU64,
    refused: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// A connect the guest refused: a client's round ends there, without failing.
#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the guest refused the connection")
    }
}

impl std::error::Error for Refused {}

/// Runs the soak; returns what happened (failures included, not as an error).
pub fn run(config: &SoakConfig) -> Result<SoakReport> {
    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + config.load.duration;
    let clients: Vec<_> = (0..config.load.clients)
        .map(|client| {
            let config = config.clone();
            let tally = Arc::clone(&tally);
            thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(config.load.seed ^ (client as u64) << 32);
                let mut round = 0u64;
                while Instant::now() < deadline {
                    let seed = config.load.seed.wrapping_add((client as u64) << 40 | round);
                    round += 1;
                    let outcome = match config.load.mix.pick(&mut rng) {
                        Kind::Echo => echo(&config, &tally, &mut rng, seed),
                        Kind::Reset => reset_mid_transfer(&config, &tally, &mut rng, seed),
                        Kind::Vanish => vanish(&config, &tally, &mut rng),
                        Kind::Slow => slow_reader(&config, &tally, &mut rng),
                    };
                    if let Err(e) = outcome {
                        if e.is::<Refused>() {
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                            thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                        let line = format!("client {client} round {round}: {e:#}");
                        tally
                            .failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(line);
                    }
                }
            })
        })
        .collect();
    for client in clients {
        if client.join().is_err() {
            bail!("a soak client panicked");
        }
    }
    let failures = std::mem::take(&mut *tally.failures.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(SoakReport {
        echoes: tally.echoes.load(Ordering::Relaxed),
        echo_bytes: tally.echo_bytes.load(Ordering::Relaxed),
        resets: tally.resets.load(Ordering::Relaxed),
        vanished: tally.vanished.load(Ordering::Relaxed),
        slow_reads: tally.slow_reads.load(Ordering::Relaxed),
        refused: tally.refused.load(Ordering::Relaxed),
        failures,
    })
}

fn connect(uds: &Path, port: u32) -> Result<UnixStream> {
    match host::connect(uds, port, CONNECT_TIMEOUT)? {
        Connect::Accepted(stream) => Ok(stream),
        Connect::Refused => Err(Refused.into()),
    }
}

/// A random size up to `max`, small ones more often than large ones.
fn random_size(rng: &mut fastrand::Rng, max: u64) -> u64 {
    let scale = rng.u32(0..=max.ilog2());
    rng.u64(1..=(1u64 << scale).min(max))
}

fn echo(config: &SoakConfig, tally: &Tally, rng: &mut fastrand::Rng, seed: u64) -> Result<()> {
    let total = random_size(rng, MAX_ECHO);
    let stream = connect(&config.uds, config.echo_port)?;
    host::echo_exchange(stream, seed, total, ECHO_WINDOW, STALL_TIMEOUT)
        .with_context(|| format!("echo of {total} bytes"))?;
    tally.echoes.fetch_add(1, Ordering::Relaxed);
    tally.echo_bytes.fetch_add(total, Ordering::Relaxed);
    Ok(())
}

/// Closes `stream` so that the peer gets a reset, not an orderly end: `SO_LINGER` 0.
fn close_with_reset(stream: UnixStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from a live local value; the
    // fd is open (owned by `stream`, which outlives the call).
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

fn reset_mid_transfer(
    config: &SoakConfig,
    tally: &Tally,
    rng: &mut fastrand::Rng,
    seed: u64,
) -> Result<()> {
    let mut stream = connect(&config.uds, config.echo_port)?;
    stream.set_read_timeout(Some(STALL_TIMEOUT))?;
    let sent = rng.u64(1024..=32 * 1024);
    let mut data = vec![0u8; sent as usize];
    host::fill_pattern(seed, 0, &mut data);
    stream.write_all(&data)?;
    // Read part of the echo back and check it, leave the rest unread.
    let want = rng.u64(1..=sent / 2) as usize;
    let mut back = vec![0u8; want];
    stream
        .read_exact(&mut back)
        .context("reading the start of the echo before the reset")?;
    if back != data[..want] {
        bail!("the echo before the reset differs");
    }
    close_with_reset(stream);
    tally.resets.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

fn vanish(config: &SoakConfig, tally: &Tally, rng: &mut fastrand::Rng) -> Result<()> {
    if config.vanish_before_answer && rng.bool() {
        // Gone before the answer.
        let mut stream = UnixStream::connect(&config.uds)
            .with_context(|| format!("connecting to {}", config.uds.display()))?;
        stream.write_all(format!("CONNECT {}\n", config.echo_port).as_bytes())?;
        drop(stream);
    } else {
        drop(connect(&config.uds, config.echo_port)?);
    }
    tally.vanished.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

fn slow_reader(config: &SoakConfig, tally: &Tally, rng: &mut fastrand::Rng) -> Result<()> {
    let total = random_size(rng, MAX_SOURCE);
    let mut stream = connect(&config.uds, config.source_port)?;
    stream.set_read_timeout(Some(STALL_TIMEOUT))?;
    stream.write_all(format!("{total}\n").as_bytes())?;
    let got = host::read_source(&mut stream, || {
        (
            rng.usize(1..=8 * 1024),
            Duration::from_millis(rng.u64(1..=20)),
        )
    })
    .with_context(|| format!("slow read of {total}"))?;
    if got != total {
        bail!("the source closed after {got} of {total} bytes");
    }
    tally.slow_reads.fetch_add(1, Ordering::Relaxed);
    Ok(())
}
