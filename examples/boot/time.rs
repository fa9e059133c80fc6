//! A monotonic microsecond clock: the TSC, calibrated once at boot against the PIT.
//!
//! # How the TSC frequency is measured
//!
//! The boot code programs PIT channel 0 in mode 0 (one-shot, count 0xFFFF) and polls its
//! counter with latch commands (port 0x43/0x40) for about 10 ms (11 932 PIT ticks at
//! 1.193182 MHz), reading the TSC at the first and the last observed counter change.
//! Channel 0 is used rather than channel 2 because channel 2's gate and output live
//! behind port 0x61, which QEMU implements in the PC speaker device — and `microvm`
//! has no PC speaker, while it does have a PIT (`-machine microvm,pit=on` is the
//! default). Reading the counter needs no gate and no interrupt (interrupts stay off),
//! and works the same under TCG and KVM (in-kernel PIT). Mode 0 also stops the
//! firmware's periodic 18.2 Hz timer interrupt, which nobody handles.
//!
//! If the PIT does not count (e.g. `microvm,pit=off`), the frequency comes from CPUID
//! leaf 0x15 (TSC/crystal ratio) or 0x16 (base frequency), and failing those a guess of
//! 1 GHz is used with a warning.
//!
//! The TSC is constant-rate on the hosts QEMU runs on; under TCG QEMU derives it from
//! the host's TSC and the PIT from the host clock, so the two agree.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use super::port::{inb, outb};

/// TSC ticks per second, measured by [`calibrate`].
static TSC_HZ: AtomicU64 = AtomicU64::new(0);
/// TSC value at the time of calibration: `now_micros` counts from there.
static TSC_BASE: AtomicU64 = AtomicU64::new(0);

const PIT_HZ: u64 = 1_193_182;
/// PIT ticks in the calibration window (10 ms).
const CALIBRATION_TICKS: u32 = 11_932;
/// Polls without seeing the PIT counter move before it is considered absent. A working
/// PIT changes its count every 0.84 us, far less than 50 000 polls take.
const PIT_STUCK_LIMIT: u32 = 50_000;

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum TscSource {
    /// Measured against PIT channel 0.
    Pit,
    /// CPUID leaf 0x15 or 0x16.
    Cpuid,
    /// Nothing worked: 1 GHz assumed.
    Guess,
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    let low: u32;
    let high: u32;
    // SAFETY: `rdtsc` only writes EDX:EAX (CR4.TSD is clear, so it is allowed).
    unsafe {
        asm!("rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (u64::from(high) << 32) | u64::from(low)
}

/// Latches and reads the current count of PIT channel 0.
fn read_pit_counter() -> u16 {
    // SAFETY: a latch command for channel 0 followed by reading its two count bytes;
    // channel 0 is owned by this module.
    unsafe {
        outb(0x43, 0x00);
        let low = inb(0x40);
        let high = inb(0x40);
        u16::from_le_bytes([low, high])
    }
}

fn calibrate_with_pit() -> Option<u64> {
    // SAFETY: channel 0, lobyte/hibyte access, mode 0, binary; initial count 0xFFFF.
    unsafe {
        outb(0x43, 0x30);
        outb(0x40, 0xff);
        outb(0x40, 0xff);
    }
    // Start on a counter edge (this also detects a PIT that does not count).
    let mut last = read_pit_counter();
    let mut polls = 0;
    loop {
        let now = read_pit_counter();
        if now != last {
            last = now;
            break;
        }
        polls += 1;
        if polls > PIT_STUCK_LIMIT {
            return None;
        }
    }
    let tsc_start = rdtsc();
    let mut elapsed: u32 = 0;
    polls = 0;
    while elapsed < CALIBRATION_TICKS {
        let now = read_pit_counter();
        // The counter counts down and wraps; a window shorter than a full turn (55 ms)
        // between two polls is all this needs.
        let delta = last.wrapping_sub(now);
        if delta == 0 {
            polls += 1;
            if polls > PIT_STUCK_LIMIT {
                return None;
            }
            continue;
        }
        polls = 0;
        elapsed += u32::from(delta);
        last = now;
    }
    let tsc_ticks = rdtsc().wrapping_sub(tsc_start);
    let hz = u128::from(tsc_ticks) * u128::from(PIT_HZ) / u128::from(elapsed);
    u64::try_from(hz).ok().filter(|&hz| hz > 0)
}

fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid(leaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

fn tsc_hz_from_cpuid() -> Option<u64> {
    let (max_leaf, ..) = cpuid(0);
    if max_leaf >= 0x15 {
        let (denominator, numerator, crystal_hz, _) = cpuid(0x15);
        if denominator != 0 && numerator != 0 && crystal_hz != 0 {
            return Some(u64::from(crystal_hz) * u64::from(numerator) / u64::from(denominator));
        }
    }
    if max_leaf >= 0x16 {
        let (base_mhz, ..) = cpuid(0x16);
        if base_mhz & 0xffff != 0 {
            return Some(u64::from(base_mhz & 0xffff) * 1_000_000);
        }
    }
    None
}

/// Measures the TSC frequency and starts the clock. Called once by the boot code before
/// `main`; returns the frequency and where it came from.
pub fn calibrate() -> (u64, TscSource) {
    let (hz, source) = if let Some(hz) = calibrate_with_pit() {
        (hz, TscSource::Pit)
    } else if let Some(hz) = tsc_hz_from_cpuid() {
        (hz, TscSource::Cpuid)
    } else {
        (1_000_000_000, TscSource::Guess)
    };
    TSC_HZ.store(hz, Ordering::Relaxed);
    TSC_BASE.store(rdtsc(), Ordering::Relaxed);
    (hz, source)
}

/// The TSC frequency in Hz (0 before calibration).
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Microseconds since the clock was calibrated at boot. Monotonic; 0 before calibration.
pub fn now_micros() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return 0;
    }
    let ticks = rdtsc().saturating_sub(TSC_BASE.load(Ordering::Relaxed));
    (u128::from(ticks) * 1_000_000 / u128::from(hz)) as u64
}

/// Busy-waits for at least `micros` microseconds.
pub fn delay_micros(micros: u64) {
    let end = now_micros().saturating_add(micros);
    while now_micros() < end {
        core::hint::spin_loop();
    }
}
