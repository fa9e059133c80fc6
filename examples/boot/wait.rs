//! How the example guests wait for work: halted until the device interrupts or the
//! driver's next deadline (`wait=irq`, the default), or spinning on `poll` (`wait=poll`).
//!
//! A main loop calls [`Waiter::poll`] (which takes a pending interrupt: acknowledges it
//! at the device when it came on a line, ends it, then polls the driver), does its work, and then
//! [`Waiter::idle`], telling it whether the work moved anything and when the loop itself
//! next needs to run. `idle` returns at once while there is news (anything moved, or the
//! driver sent or received packets), and for a window after the last news, polling
//! (halt-polling: a reply that comes within that time costs no interrupt and no
//! wake-up). The window adapts as KVM's halt-polling does: it starts at `spin=<µs>` (200
//! by default), doubles after every halt the device ended within `spin_max=<µs>` (2,000
//! by default; that news would have come while polling a little longer), up to
//! `spin_max`, and starts again at `spin` after a halt longer than that (the guest is
//! idle). On a busy host a halted vCPU thread can wait for a core when it wakes, so a
//! request/response exchange whose pauses now and then outlast 200 µs should not halt
//! in each (`docs/benchmark-log.md`). While the driver holds transmit data
//! (`VsockDevice::tx_memory_in_use`: data waiting for the peer's credit, or packets the
//! device has not returned), a transfer is under way and the device owes news: then the
//! window is `spin_sending=<µs>` (2,000 by default), so that a sender blocked on the
//! peer's window does not halt in every pause of the backend (on a busy host a halted
//! vCPU thread can wait for a core when it wakes; `docs/benchmark-log.md`, "The first
//! workload after a boot"). After that it asks the driver to arm the device's interrupts
//! (`VsockDevice::arm_interrupts`, which looks at the rings once more and says `false`
//! when something landed meanwhile: then the loop polls again) and halts until the
//! interrupt or the earliest deadline: the driver's `poll_at`, the loop's own, the
//! backstop's and the next statistics line's.
//!
//! **Backstop.** Under QEMU 7.2's TCG with one vCPU, the device (vhost-user, another
//! process) can fill the used ring without the interrupt reaching the guest (README,
//! "Quirks": TCG emits no host barrier for the guest's fences, so the backend may read
//! the driver's `used_event` from before the re-arm). So each halt ends at the latest
//! 10 ms after the last news, then 20, 40, ... until 1.28 s of quiet; a poll after such
//! a halt that finds work counts in `backstop_finds`.
//!
//! **Statistics.** Every [`REPORT_MICROS`] the waiter logs one line,
//! `wait: <mode> loops=.. news=.. spins=.. wakeups=.. halts=.. interrupts=..
//! timer_wakes=.. backstop_finds=..` (cumulative counts), so that a test reads from the
//! log that an idle guest halted (in a quiet stretch one loop per halt) instead of
//! spinning (millions of loops, no halts); [`Waiter::report`] logs it on demand (the client does at its end).
//!
//! Interrupts are routed by the architecture: on x86-64 the IOAPIC line of q35's
//! virtio-pci INTx or of microvm's virtio-mmio slot, MSI-X for Cloud Hypervisor's
//! virtio-pci devices (which offer nothing else), and the LAPIC timer
//! (`x86_64/interrupts.rs`, `x86_64/irq_route.rs`, `x86_64/msix.rs`). Under MSI-X the
//! device's queues can only be mapped to the interrupt once the driver has set them up,
//! so the first [`Waiter::idle`] that would sleep does that
//! (`arch::finish_device_interrupt`), before it arms the interrupts; and an MSI-X
//! interrupt is the device's alone and leaves its interrupt status alone, so
//! [`Waiter::poll`] does not acknowledge it at the device, only ends it. Elsewhere, and
//! where the interrupt cannot be routed, the guest logs why and polls.

use log::{info, warn};
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;
use vsock_guest::{Config, Instant, VsockDevice};

use super::{time, BootInfo};

/// How often the statistics line is logged, in µs of guest time.
pub const REPORT_MICROS: u64 = 2_000_000;
/// Halt-polling: how long the loop keeps polling after the last news, by default (µs).
pub const DEFAULT_SPIN_MICROS: u64 = 200;
/// Halt-polling: the longest the loop's window grows to, by default (µs).
pub const DEFAULT_SPIN_MAX_MICROS: u64 = 2_000;
/// Halt-polling while the driver holds transmit data: how long the loop keeps polling
/// after the last news, by default (µs).
pub const DEFAULT_SPIN_SENDING_MICROS: u64 = 2_000;
/// The first backstop after news (µs); it doubles with every halt it ends.
const BACKSTOP_FIRST_MICROS: u64 = 10_000;
/// After this much quiet (µs), no backstop: the guest sleeps until an interrupt or a
/// deadline.
const BACKSTOP_LAST_MICROS: u64 = 1_280_000;

/// How a guest waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Halts until the device interrupts or a deadline (`wait=irq`).
    Irq,
    /// Spins on `poll` (`wait=poll`, or where interrupts cannot be routed).
    Poll,
}

/// What the waiter counted (see the [module documentation](self)).
#[derive(Clone, Copy, Debug, Default)]
pub struct WaitStats {
    /// Calls of [`Waiter::idle`]: iterations of the main loop.
    pub loops: u64,
    /// Of those, the ones with news (something moved).
    pub news: u64,
    /// Of those, the ones without news that polled on in the spin window, or because the
    /// re-arm found work (`arm_interrupts` returned `false`).
    pub spins: u64,
    /// Halts that ended (by any interrupt).
    pub wakeups: u64,
    /// Halts begun.
    pub halts: u64,
    /// Device interrupts taken.
    pub interrupts: u64,
    /// Halts the timer ended.
    pub timer_wakes: u64,
    /// Polls after a halt the backstop ended that found work.
    pub backstop_finds: u64,
    /// Time spent halted (µs).
    pub halted_micros: u64,
}

/// The main loop's way of waiting; see the [module documentation](self).
pub struct Waiter {
    mode: Mode,
    /// Halt-polling's shortest window (µs), `spin=`.
    spin_micros: u64,
    /// Halt-polling's longest window (µs), `spin_max=`.
    spin_max_micros: u64,
    /// Halt-polling's window now (µs): it grows from `spin_micros` towards
    /// `spin_max_micros` while halts end soon (see the module documentation).
    spin_window_micros: u64,
    /// Halt-polling's window while the driver holds transmit data (µs), `spin_sending=`.
    spin_sending_micros: u64,
    stats: WaitStats,
    /// When something last moved (µs).
    last_news: u64,
    /// The driver's packet counts at the last `idle`.
    last_packets: u64,
    /// The last halt ended by the backstop's timer, not by an interrupt.
    backstop_woke: bool,
    /// A device interrupt is acknowledged at the device before its EOI (a line, not a
    /// message).
    acknowledge_at_device: bool,
    /// The routing of the device's interrupt still has its part after the driver's
    /// bring-up to do (`arch::finish_device_interrupt`).
    routing_unfinished: bool,
    /// When the statistics line is next due (µs).
    next_report: u64,
}

impl Waiter {
    /// Reads `wait=irq|poll`, `spin=<µs>` and `spin_sending=<µs>` from the command line,
    /// routes the device's interrupt (call it after `boot::virtio::find_vsock`) and sets
    /// `config.interrupts` when the guest will sleep. Logs the mode.
    pub fn new(who: &str, info: &BootInfo, config: &mut Config) -> Self {
        let spin_micros = info
            .cmdline_value("spin")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_SPIN_MICROS);
        let spin_max_micros = info
            .cmdline_value("spin_max")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_SPIN_MAX_MICROS)
            .max(spin_micros);
        let spin_sending_micros = info
            .cmdline_value("spin_sending")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_SPIN_SENDING_MICROS);
        let mut acknowledge_at_device = false;
        let mode = match info.cmdline_value("wait") {
            Some("poll") => {
                info!("{who}: wait=poll: spinning on poll");
                Mode::Poll
            }
            other => {
                if other.is_some_and(|w| w != "irq") {
                    warn!("{who}: unknown wait={other:?}; using irq");
                }
                match enable(info.cmdline) {
                    Ok(route) => {
                        info!("{who}: wait=irq: halting until {route} or a deadline, spin {spin_micros} to {spin_max_micros} us ({spin_sending_micros} us while sending)");
                        acknowledge_at_device = is_acknowledged_at_device(&route);
                        Mode::Irq
                    }
                    Err(why) => {
                        info!("{who}: wait=irq not possible ({why}); polling instead");
                        Mode::Poll
                    }
                }
            }
        };
        config.interrupts = mode == Mode::Irq;
        let now = time::now_micros();
        Waiter {
            mode,
            spin_micros,
            spin_max_micros,
            spin_window_micros: spin_micros,
            spin_sending_micros,
            stats: WaitStats::default(),
            last_news: now,
            last_packets: 0,
            backstop_woke: false,
            acknowledge_at_device,
            routing_unfinished: mode == Mode::Irq,
            next_report: now + REPORT_MICROS,
        }
    }

    /// How this guest waits.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The counts so far.
    pub fn stats(&self) -> WaitStats {
        self.stats
    }

    /// Takes a pending device interrupt (acknowledge it at the device where that is how
    /// it is done, end it), then polls the driver.
    pub fn poll<H: Hal, T: Transport>(&mut self, device: &mut VsockDevice<'_, H, T>) {
        if self.mode == Mode::Irq && take_device_interrupt() {
            if self.acknowledge_at_device {
                device.ack_interrupt();
            }
            end_device_interrupt();
            self.stats.interrupts += 1;
        }
        device.poll(now());
    }

    /// Called after the loop's work: `moved` says whether it moved anything, `deadline`
    /// when the loop next needs to run without news. Returns at once while there is
    /// news; otherwise halts (`wait=irq`) until an interrupt or the earliest deadline.
    pub fn idle<H: Hal, T: Transport>(
        &mut self,
        device: &mut VsockDevice<'_, H, T>,
        moved: bool,
        deadline: Option<Instant>,
    ) {
        self.stats.loops += 1;
        let now = time::now_micros();
        let stats = device.stats();
        let packets = stats.rx_packets + stats.tx_packets;
        let news = moved || packets != self.last_packets;
        self.last_packets = packets;
        if news {
            self.stats.news += 1;
            if self.backstop_woke {
                self.stats.backstop_finds += 1;
            }
            self.last_news = now;
        }
        self.backstop_woke = false;
        if now >= self.next_report {
            self.report();
            self.next_report = now + REPORT_MICROS;
        }
        if self.mode == Mode::Poll || news {
            return;
        }
        // Halt-polling's window: longer while a transfer is under way.
        let window_micros = if device.tx_memory_in_use() > 0 {
            self.spin_sending_micros
        } else {
            self.spin_window_micros
        };
        if now >= self.last_news + window_micros && self.routing_unfinished {
            self.routing_unfinished = false;
            if let Err(why) = finish_device_interrupt() {
                warn!("wait: the device's interrupt cannot be routed ({why}); polling instead");
                self.mode = Mode::Poll;
                return;
            }
        }
        if now < self.last_news + window_micros || !device.arm_interrupts() {
            self.stats.spins += 1;
            return;
        }
        let quiet = now - self.last_news;
        let backstop =
            (quiet < BACKSTOP_LAST_MICROS).then(|| now + quiet.max(BACKSTOP_FIRST_MICROS));
        let deadlines = [
            device.poll_at().map(|at| at.as_micros()),
            deadline.map(|at| at.as_micros()),
            Some(self.next_report),
        ];
        let earliest = deadlines.into_iter().flatten().min();
        let by_backstop = backstop.is_some_and(|b| earliest.is_none_or(|e| b < e));
        let until = if by_backstop { backstop } else { earliest };
        self.stats.halts += 1;
        let timer = halt(until);
        let halted_micros = time::now_micros().saturating_sub(now);
        self.stats.halted_micros += halted_micros;
        // Adaptive halt-polling: news that ended a halt soon after it began would have
        // been met by polling a little longer, so poll longer next time; a long halt
        // means the guest is idle, and the window starts short again.
        if halted_micros > self.spin_max_micros {
            self.spin_window_micros = self.spin_micros;
        } else if !timer {
            self.spin_window_micros = (self.spin_window_micros * 2).min(self.spin_max_micros);
        }
        self.stats.wakeups += 1;
        if timer {
            self.stats.timer_wakes += 1;
            self.backstop_woke = by_backstop;
        }
    }

    /// Logs the statistics line.
    pub fn report(&self) {
        let s = self.stats;
        info!(
            "wait: {} loops={} news={} spins={} wakeups={} halts={} interrupts={} timer_wakes={} backstop_finds={}",
            match self.mode {
                Mode::Irq => "irq",
                Mode::Poll => "poll",
            },
            s.loops,
            s.news,
            s.spins,
            s.wakeups,
            s.halts,
            s.interrupts,
            s.timer_wakes,
            s.backstop_finds
        );
    }
}

/// The clock as the driver's `Instant`.
pub fn now() -> Instant {
    Instant::from_micros(time::now_micros())
}

#[cfg(target_arch = "x86_64")]
use super::arch::{
    end_device_interrupt, finish_device_interrupt, halt, take_device_interrupt, RoutedInterrupt,
};

#[cfg(target_arch = "x86_64")]
fn enable(cmdline: &str) -> Result<RoutedInterrupt, &'static str> {
    super::arch::enable_device_interrupt(cmdline)
}

#[cfg(target_arch = "x86_64")]
fn is_acknowledged_at_device(route: &RoutedInterrupt) -> bool {
    route.is_acknowledged_at_device()
}

/// No architecture but x86-64 routes an interrupt yet: nothing to describe one with.
#[cfg(not(target_arch = "x86_64"))]
type RoutedInterrupt = core::convert::Infallible;

#[cfg(not(target_arch = "x86_64"))]
fn enable(_cmdline: &str) -> Result<RoutedInterrupt, &'static str> {
    Err("no interrupt routing for this architecture yet")
}

#[cfg(not(target_arch = "x86_64"))]
fn is_acknowledged_at_device(route: &RoutedInterrupt) -> bool {
    match *route {}
}

#[cfg(not(target_arch = "x86_64"))]
fn finish_device_interrupt() -> Result<(), &'static str> {
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
fn take_device_interrupt() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn end_device_interrupt() {}

#[cfg(not(target_arch = "x86_64"))]
fn halt(_deadline: Option<u64>) -> bool {
    false
}
