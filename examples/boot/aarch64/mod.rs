//! The aarch64 part of the boot support: QEMU `-M virt`, entered at EL1 (or EL2, dropped
//! to EL1) from QEMU's `-kernel` ELF loader.
//!
//! # What happens before `main`
//!
//! 1. QEMU loads the ELF at its link address (0x4020_0000, `linker/aarch64-virt.ld`),
//!    writes the device tree to the start of RAM (0x4000_0000) and starts `_start`.
//! 2. The entry code ([`start`](self::start)) drops from EL2 to EL1 if need be, allows
//!    FP/SIMD, zeroes `.bss`, switches to a 512 KiB stack, identity-maps the first
//!    1 TiB with 1 GiB blocks (RAM normal cacheable, the rest device memory), turns on
//!    the MMU and caches and calls into Rust with the device tree's address.
//! 3. The common code initialises the PL011 ([`uart`]), installs the exception vectors
//!    ([`exceptions`]: they report and exit with the failure status), copies
//!    `/chosen/bootargs` ([`dtb`]) and installs the logger; then [`init`] reads the RAM
//!    size and the PSCI conduit from the device tree and starts the clock on the generic
//!    timer's virtual counter (`CNTVCT_EL0`, frequency `CNTFRQ_EL0`).
//!
//! Memory is identity-mapped throughout; interrupts stay masked: everything polls. There
//! is no ring 3 here (`ring=3` is ignored with a warning).
//!
//! # Stopping the VM
//!
//! [`stop`] stops the VM the first way that works:
//!
//! 1. Semihosting `SYS_EXIT` (start QEMU with `-semihosting`, or
//!    `-semihosting-config enable=on,target=native`) with the status `(code << 1) | 1`,
//!    so QEMU exits with 33 for [`crate::boot::exit_success`] and 35 for
//!    [`crate::boot::exit_failure`], as on x86-64.
//! 2. Without semihosting the `hlt #0xf000` is an undefined instruction; the exception
//!    handler sees that the guest is exiting and calls PSCI `SYSTEM_OFF` through the
//!    conduit the device tree names (`hvc` on `virt` by default): QEMU exits with 0, and
//!    only the outcome line the common code prints tells the outcome.
//! 3. Failing both, the CPU waits for interrupts that never come.

pub mod devices;
pub mod dtb;
mod exceptions;
mod start;
pub mod uart;

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use log::{debug, info, warn};
use virtio_drivers::transport::SomeTransport;

use crate::boot::{cmdline_value, time};
use dtb::Fdt;

/// The end of the boot code's identity map: the first 1 TiB.
pub const MAPPED_LIMIT: u64 = 1 << 40;

/// PSCI `SYSTEM_OFF` (SMC32 calling convention).
const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;
/// Semihosting operation `SYS_EXIT`.
const SYS_EXIT: u64 = 0x18;
/// `ADP_Stopped_ApplicationExit`: `SYS_EXIT`'s reason for an exit with a status.
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x2_0026;

/// The device tree's address, for [`fdt`] (0 when there is none).
static DTB_PADDR: AtomicU64 = AtomicU64::new(0);
/// Whether PSCI is called with `smc` rather than `hvc` (`/psci/method`).
static PSCI_SMC: AtomicBool = AtomicBool::new(false);

/// What the aarch64 boot found, beside what every architecture finds
/// ([`crate::boot::BootInfo`]).
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    /// Physical address of the device tree (0 if there was no valid one).
    pub dtb_paddr: u64,
    /// The exception level the guest was entered at (1, or 2 before it dropped to 1).
    pub entry_el: u8,
}

/// The device tree the boot code found, if any.
pub fn fdt() -> Option<Fdt> {
    // SAFETY: `DTB_PADDR` is 0 or the address of a tree in RAM below the image, which
    // nothing in the guest writes.
    unsafe { Fdt::from_paddr(DTB_PADDR.load(Ordering::Relaxed)) }
}

/// Installs the exception vectors. Called once by the boot code, after the UART is set
/// up and before anything else.
pub fn init_exceptions() {
    exceptions::init();
}

/// The kernel command line from the device tree's `/chosen/bootargs` (copied), empty if
/// there is none. Also remembers where the tree is, for [`init`] and [`devices`].
pub fn cmdline(dtb_paddr: u64) -> &'static str {
    DTB_PADDR.store(dtb_paddr, Ordering::Relaxed);
    fdt().map_or("", |fdt| dtb::copy_cmdline(&fdt))
}

/// Reads the RAM size and the PSCI conduit from the device tree and starts the clock.
/// Returns the RAM size and what the boot found. Called once by the boot code, with the
/// logger installed.
pub fn init(dtb_paddr: u64, cmdline: &'static str) -> (u64, Platform) {
    let fdt = fdt();
    let mut ram_bytes = 0;
    match &fdt {
        Some(fdt) => {
            ram_bytes = dtb::ram_bytes(fdt);
            fdt.for_each_property(|p| {
                if p.path == ["psci"] && p.name == "method" {
                    PSCI_SMC.store(p.as_str() == Some("smc"), Ordering::Relaxed);
                }
            });
            debug!("boot: device tree at {dtb_paddr:#x}, {} bytes", fdt.size());
        }
        None => {
            DTB_PADDR.store(0, Ordering::Relaxed);
            warn!("boot: no device tree at {dtb_paddr:#x}");
        }
    }
    let hz = counter_frequency();
    time::start(hz);
    let el = start::entry_el();
    info!(
        "boot: {} MiB RAM, generic timer {}.{:03} MHz, entered at EL{el}",
        ram_bytes >> 20,
        hz / 1_000_000,
        hz / 1_000 % 1_000
    );
    if cmdline_value(cmdline, "ring") == Some("3") {
        warn!("boot: ring=3 is not offered on aarch64; running at EL1");
    }
    let platform = Platform {
        dtb_paddr: if fdt.is_some() { dtb_paddr } else { 0 },
        entry_el: el,
    };
    (ram_bytes, platform)
}

/// The generic timer's frequency (`CNTFRQ_EL0`), in Hz.
fn counter_frequency() -> u64 {
    let hz: u64;
    // SAFETY: reading CNTFRQ_EL0 has no side effects.
    unsafe { asm!("mrs {}, cntfrq_el0", out(reg) hz, options(nomem, nostack, preserves_flags)) };
    hz
}

/// The clock's counter: the generic timer's virtual count (`CNTVCT_EL0`), read after an
/// `isb` so that it is not read ahead of the code before it.
pub fn counter() -> u64 {
    let ticks: u64;
    // SAFETY: `isb` and reading CNTVCT_EL0 (accessible at EL1) have no side effects.
    unsafe {
        asm!("isb", "mrs {}, cntvct_el0", out(reg) ticks, options(nomem, nostack, preserves_flags))
    };
    ticks
}

/// An MMIO region outside the boot code's map (above 1 TiB).
#[derive(Clone, Copy, Debug)]
pub struct OutsideMap {
    /// The region's physical address.
    pub paddr: u64,
    /// Its size in bytes.
    pub size: u64,
}

/// Checks that `paddr..paddr + size` lies in the identity map; everything outside RAM
/// there is device memory already.
pub fn map_mmio(paddr: u64, size: u64) -> Result<(), OutsideMap> {
    match paddr.checked_add(size) {
        Some(end) if end <= MAPPED_LIMIT => Ok(()),
        _ => Err(OutsideMap { paddr, size }),
    }
}

/// Finds the virtio socket device ([`devices`]).
pub fn find_vsock() -> Option<SomeTransport<'static>> {
    devices::find_vsock()
}

/// Stops the VM with the exit `code` (see [Stopping the VM](self#stopping-the-vm));
/// the common code has printed the outcome line.
pub fn stop(code: u32) -> ! {
    let block: [u64; 2] = [ADP_STOPPED_APPLICATION_EXIT, (u64::from(code) << 1) | 1];
    // SAFETY: the semihosting call `SYS_EXIT` (`hlt #0xf000` with the operation in x0 and
    // the parameter block's address in x1) makes QEMU exit; QEMU only reads the block.
    // Without semihosting the instruction is undefined and the exception handler, seeing
    // that the guest is exiting, powers off.
    unsafe {
        asm!(
            "hlt #0xf000",
            in("x0") SYS_EXIT,
            in("x1") block.as_ptr(),
            options(nostack, readonly)
        )
    };
    power_off()
}

/// PSCI `SYSTEM_OFF` through the device tree's conduit; halts if it returns.
pub fn power_off() -> ! {
    // SAFETY: PSCI SYSTEM_OFF either powers the machine off or returns an error; it does
    // not touch this program's memory.
    unsafe {
        if PSCI_SMC.load(Ordering::Relaxed) {
            asm!("smc #0", inout("x0") PSCI_SYSTEM_OFF => _, options(nomem, nostack));
        } else {
            asm!("hvc #0", inout("x0") PSCI_SYSTEM_OFF => _, options(nomem, nostack));
        }
    }
    halt_forever()
}

/// Stops the CPU for good: `wfi` with interrupts masked, in a loop.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: masking interrupts and waiting for one only stops the CPU.
        unsafe { asm!("msr daifset, #0xf", "wfi", options(nomem, nostack)) };
    }
}
