//! A monotonic microsecond clock over the architecture's counter: the TSC on x86-64 (its
//! frequency found at boot by `arch::tsc`), the generic timer's virtual counter
//! (`CNTVCT_EL0`, its frequency in `CNTFRQ_EL0`) on aarch64.

use core::sync::atomic::{AtomicU64, Ordering};

use super::arch;

/// Counter ticks per second, set by [`start`].
static HZ: AtomicU64 = AtomicU64::new(0);
/// The counter at [`start`]: [`now_micros`] counts from there.
static BASE: AtomicU64 = AtomicU64::new(0);
/// Microseconds per counter tick in fixed point, [`FRACTION_BITS`] of them after the
/// point, set by [`start`]: a read of the clock multiplies and shifts, where dividing by
/// the frequency would call the 128-bit division, hundreds of instructions under TCG on
/// every poll of a spinning guest. Off by at most one part in 2^28 at 3 GHz (a
/// microsecond in 4.5 minutes).
static MICROS_PER_TICK: AtomicU64 = AtomicU64::new(0);
/// Fraction bits of [`MICROS_PER_TICK`]: 10^6 · 2^40 still fits 64 bits, for any
/// frequency of 1 Hz or more.
const FRACTION_BITS: u32 = 40;

/// Starts the clock with the counter's frequency. Called once by the boot code.
pub fn start(hz: u64) {
    HZ.store(hz, Ordering::Relaxed);
    let micros_per_tick = (1_000_000u128 << FRACTION_BITS)
        .checked_div(u128::from(hz))
        .unwrap_or(0);
    MICROS_PER_TICK.store(
        u64::try_from(micros_per_tick).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    BASE.store(arch::counter(), Ordering::Relaxed);
}

/// The counter's frequency in Hz (0 before the boot code started the clock).
pub fn counter_hz() -> u64 {
    HZ.load(Ordering::Relaxed)
}

/// Microseconds since the boot code started the clock. Monotonic; 0 before that.
pub fn now_micros() -> u64 {
    let micros_per_tick = MICROS_PER_TICK.load(Ordering::Relaxed);
    let ticks = arch::counter().saturating_sub(BASE.load(Ordering::Relaxed));
    ((u128::from(ticks) * u128::from(micros_per_tick)) >> FRACTION_BITS) as u64
}

/// Busy-waits for at least `micros` microseconds.
pub fn delay_micros(micros: u64) {
    let end = now_micros().saturating_add(micros);
    while now_micros() < end {
        core::hint::spin_loop();
    }
}
