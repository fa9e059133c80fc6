//! The TSC, the counter behind [`crate::boot::time`] on x86-64, and where its frequency
//! comes from.
//!
//! # Where the TSC frequency comes from
//!
//! [`calibrate`] tries, in order, and the boot log line `boot: ... TSC ... MHz (Source)`
//! names the [`TscSource`] it used:
//!
//! 1. **CPUID leaf 0x15** (TSC/crystal ratio times the crystal frequency) or **0x16**
//!    (processor base frequency in MHz), when the CPU reports them. Intel CPUs do; AMD
//!    CPUs and QEMU's default CPU models leave them empty or out of range.
//! 2. **The hypervisor leaf 0x40000010** (the "VMware" timing leaf; EAX = TSC frequency
//!    in kHz), when CPUID.1:ECX bit 31 says a hypervisor is present and its maximum leaf
//!    (EAX of 0x40000000) reaches 0x40000010. Cloud Hypervisor sets it whenever the
//!    host's TSC is invariant; QEMU only with `-cpu ...,vmware-cpuid-freq=on,+invtsc`.
//! 3. **PIT channel 0**: programmed in mode 0 (one-shot, count 0xFFFF), its counter
//!    polled with latch commands (port 0x43/0x40) for about 10 ms (11 932 PIT ticks at
//!    1.193182 MHz), the TSC read at the first and the last observed counter change.
//!    Channel 0 is used rather than channel 2 because channel 2's gate and output live
//!    behind port 0x61, which QEMU implements in the PC speaker device, and `microvm`
//!    has no PC speaker while it does have a PIT. Reading the counter needs no gate and
//!    no interrupt (interrupts stay off) and works the same under TCG and KVM (in-kernel
//!    PIT). Mode 0 also stops the firmware's periodic 18.2 Hz timer interrupt, which
//!    nobody handles. A PIT whose counter does not move for [`PIT_STUCK_POLLS`] polls
//!    and [`PIT_STUCK_TSC_TICKS`] TSC ticks (milliseconds at any real TSC frequency; a
//!    working PIT moves every 0.84 us) is taken to be absent: Cloud Hypervisor and
//!    `microvm,pit=off` have none, and under a VMM each port read is an exit, so the
//!    give-up must come after few polls (it used to take 50 000, 5 s under Cloud
//!    Hypervisor).
//! 4. **A guess** of 1 GHz, with a warning.
//!
//! Under QEMU (q35 and microvm, TCG and KVM with the default CPU model) steps 1 and 2
//! find nothing and the PIT is used; under Cloud Hypervisor step 2 gives the frequency
//! and the PIT is never touched. The TSC is constant-rate on the hosts these VMMs run
//! on; under TCG QEMU derives it from the host's TSC and the PIT from the host clock, so
//! the two agree.

use core::arch::asm;

use super::port::{inb, outb};

const PIT_HZ: u64 = 1_193_182;
/// PIT ticks in the calibration window (10 ms).
const CALIBRATION_TICKS: u32 = 11_932;
/// TSC ticks without the PIT counter moving after which the PIT is considered absent (with
/// [`PIT_STUCK_POLLS`]): 5 ms at 1 GHz, 1 ms at 5 GHz. A working PIT changes its count
/// every 0.84 us.
pub const PIT_STUCK_TSC_TICKS: u64 = 5_000_000;
/// Polls without the PIT counter moving after which it is considered absent (with
/// [`PIT_STUCK_TSC_TICKS`]). Each poll is three port accesses, each an exit to the VMM or
/// a call into QEMU's device model, so this many polls take longer than the 0.84 us
/// between two counts of a working PIT, while a VMM that stalls the guest once (a cold
/// start, a busy host) cannot make a working PIT look stuck. Under `kvm_pvm`, where an
/// exit from ring 0 costs about 80 us, they take about 25 ms.
pub const PIT_STUCK_POLLS: u32 = 100;
/// The hypervisor CPUID leaf with the TSC frequency in kHz in EAX.
const HYPERVISOR_TIMING_LEAF: u32 = 0x4000_0010;

/// Where the TSC frequency came from.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum TscSource {
    /// CPUID leaf 0x15 or 0x16.
    Cpuid,
    /// The hypervisor's CPUID leaf 0x40000010.
    HypervisorCpuid,
    /// Measured against PIT channel 0.
    Pit,
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

/// Watches for a PIT counter that does not move: [`StuckWatch::stuck`] is true once the
/// counter has stayed the same for [`PIT_STUCK_POLLS`] polls and [`PIT_STUCK_TSC_TICKS`].
struct StuckWatch {
    since: u64,
    polls: u32,
}

impl StuckWatch {
    fn new() -> Self {
        StuckWatch {
            since: rdtsc(),
            polls: 0,
        }
    }

    /// The counter moved: start watching afresh.
    fn moved(&mut self) {
        *self = StuckWatch::new();
    }

    /// The counter did not move on this poll; true when it is time to give up.
    fn stuck(&mut self) -> bool {
        self.polls = self.polls.saturating_add(1);
        self.polls >= PIT_STUCK_POLLS && rdtsc().wrapping_sub(self.since) > PIT_STUCK_TSC_TICKS
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
    let mut watch = StuckWatch::new();
    loop {
        let now = read_pit_counter();
        if now != last {
            last = now;
            break;
        }
        if watch.stuck() {
            return None;
        }
    }
    let tsc_start = rdtsc();
    let mut elapsed: u32 = 0;
    watch.moved();
    while elapsed < CALIBRATION_TICKS {
        let now = read_pit_counter();
        // The counter counts down and wraps; a window shorter than a full turn (55 ms)
        // between two polls is all this needs.
        let delta = last.wrapping_sub(now);
        if delta == 0 {
            if watch.stuck() {
                return None;
            }
            continue;
        }
        watch.moved();
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

/// The TSC frequency from the hypervisor leaf 0x40000010, if a hypervisor offers it.
fn tsc_hz_from_hypervisor() -> Option<u64> {
    let (_, _, features, _) = cpuid(1);
    if features & (1 << 31) == 0 {
        return None;
    }
    let (max_leaf, ..) = cpuid(0x4000_0000);
    if !(HYPERVISOR_TIMING_LEAF..0x4001_0000).contains(&max_leaf) {
        return None;
    }
    let (tsc_khz, ..) = cpuid(HYPERVISOR_TIMING_LEAF);
    (tsc_khz != 0).then(|| u64::from(tsc_khz) * 1_000)
}

/// Finds the TSC frequency (see the [module documentation](self) for the order). Called
/// once by the boot code, which starts [`crate::boot::time`] with it; returns the
/// frequency and where it came from.
pub fn calibrate() -> (u64, TscSource) {
    if let Some(hz) = tsc_hz_from_cpuid() {
        (hz, TscSource::Cpuid)
    } else if let Some(hz) = tsc_hz_from_hypervisor() {
        (hz, TscSource::HypervisorCpuid)
    } else if let Some(hz) = calibrate_with_pit() {
        (hz, TscSource::Pit)
    } else {
        (1_000_000_000, TscSource::Guess)
    }
}
