//! A monotonic microsecond clock over the architecture's counter: the TSC on x86-64 (its
//! frequency found at boot by `arch::tsc`), the generic timer's virtual counter
//! (`CNTVCT_EL0`, its frequency in `CNTFRQ_EL0`) on aarch64.

use core::sync::atomic::{AtomicU64, Ordering};

use super::arch;

/// Counter ticks per second, set by [`start`].
static HZ: AtomicU64 = AtomicU64::new(0);
/// The counter at [`start`]: [`now_micros`] counts from there.
static BASE: AtomicU64 = AtomicU64::new(0);

/// Starts the clock with the counter's frequency. Called once by the boot code.
pub fn start(hz: u64) {
    HZ.store(hz, Ordering::Relaxed);
    BASE.store(arch::counter(), Ordering::Relaxed);
}

/// The counter's frequency in Hz (0 before the boot code started the clock).
pub fn counter_hz() -> u64 {
    HZ.load(Ordering::Relaxed)
}

/// Microseconds since the boot code started the clock. Monotonic; 0 before that.
pub fn now_micros() -> u64 {
    let hz = HZ.load(Ordering::Relaxed);
    if hz == 0 {
        return 0;
    }
    let ticks = arch::counter().saturating_sub(BASE.load(Ordering::Relaxed));
    (u128::from(ticks) * 1_000_000 / u128::from(hz)) as u64
}

/// Busy-waits for at least `micros` microseconds.
pub fn delay_micros(micros: u64) {
    let end = now_micros().saturating_add(micros);
    while now_micros() < end {
        core::hint::spin_loop();
    }
}
