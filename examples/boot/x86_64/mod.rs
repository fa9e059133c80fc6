//! The x86-64 part of the boot support: PVH boot under QEMU (`q35`, `microvm`) or Cloud
//! Hypervisor.
//!
//! # What happens before `main`
//!
//! 1. QEMU (`-kernel`, on `-machine q35` through SeaBIOS, or on `-machine microvm`
//!    through qboot) or Cloud Hypervisor (`--kernel`, directly) finds the
//!    `XEN_ELFNOTE_PHYS32_ENTRY` note in the ELF's `PT_NOTE` segment and starts the
//!    32-bit entry in [`start`](self::start) with `EBX` pointing at the PVH
//!    `hvm_start_info`. The image is linked at 1 MiB by `linker/x86_64-pvh.ld`.
//! 2. The entry code zeroes `.bss`, identity-maps the first 4 GiB with 2 MiB pages,
//!    enters long mode, switches to a 512 KiB stack and calls into Rust.
//! 3. The common code initialises COM1 (0x3F8, 115200 8N1, polled, [`uart`]), installs
//!    an IDT whose handlers report CPU exceptions and exit with the failure status
//!    ([`idt`]), copies the PVH command line and installs the logger; then [`init`]
//!    reads the PVH memory map, finds the TSC frequency ([`tsc`]: CPUID, the hypervisor's
//!    CPUID leaf or the PIT; the log line `boot: ... TSC ... MHz (Source)` says which),
//!    picks the `memcpy` ([`memcpy`]: a loop of 64-bit moves, or with `memcpy=rep` the
//!    string moves) and, with `ring=3`, drops to ring 3 ([`ring3`]).
//!
//! Memory is identity-mapped (virtual address = physical address) throughout; regions
//! above 4 GiB are mapped on demand ([`paging`]). Interrupts stay disabled except while a
//! guest that sleeps halts ([`interrupts`], [`irq_route`], used by
//! [`crate::boot::wait`]).
//!
//! # Stopping the VM
//!
//! [`stop`] stops the VM the first way that works:
//!
//! 1. QEMU's `isa-debug-exit` device (start QEMU with
//!    `-device isa-debug-exit,iobase=0xf4,iosize=0x04`): the code written to port 0xF4
//!    makes QEMU exit with status `(code << 1) | 1`, so 33 for
//!    [`crate::boot::exit_success`] (code 0x10) and 35 for
//!    [`crate::boot::exit_failure`] (0x11).
//! 2. Where the write to port 0xF4 went nowhere (Cloud Hypervisor, QEMU without the
//!    device), an ACPI power-off found through the RSDP of the PVH start info
//!    ([`acpi`]): the VMM exits, Cloud Hypervisor with status 0 whatever the guest
//!    meant, hence the outcome line the common code prints first.
//! 3. Failing both, the CPU halts (or spins, in ring 3, where `hlt` is not allowed) and
//!    the VMM runs on until it is killed.
//!
//! Under QEMU any other status means the guest did not get to say (e.g. 0 after a triple
//! fault with `-no-reboot`, or 1 if the device is missing and QEMU was killed).

pub mod acpi;
pub mod devices;
mod idt;
pub mod interrupts;
pub mod irq_route;
pub mod memcpy;
pub mod msix;
pub mod paging;
pub mod port;
pub mod pvh;
pub mod ring3;
mod start;
pub mod tsc;
pub mod uart;

use core::arch::asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use log::{debug, info, warn};
use virtio_drivers::transport::SomeTransport;

use crate::boot::{cmdline_value, serial, time};

/// I/O port of the `isa-debug-exit` device.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// How long [`stop`] waits for the VMM to act on the ACPI power-off before it halts.
const POWER_OFF_WAIT_MICROS: u64 = 1_000_000;

/// The RSDP's physical address from the start info, for the ACPI power-off in [`stop`].
static RSDP_PADDR: AtomicU64 = AtomicU64::new(0);

/// What the x86-64 boot found, beside what every architecture finds
/// ([`crate::boot::BootInfo`]).
#[derive(Clone, Copy, Debug)]
pub struct Platform {
    /// Physical address of the PVH `hvm_start_info` structure (0 if it was invalid).
    pub start_info_paddr: u64,
    /// Physical address of the ACPI RSDP from the start info, 0 if none.
    pub rsdp_paddr: u64,
}

/// Installs the exception handlers. Called once by the boot code, after the UART is set
/// up and before anything else.
pub fn init_exceptions() {
    idt::init();
}

/// The kernel command line from the PVH start info (copied), empty if there is none.
pub fn cmdline(start_info_paddr: u64) -> &'static str {
    pvh::read(start_info_paddr).map_or("", |s| pvh::copy_cmdline(s.cmdline_paddr))
}

/// Reads the PVH start info, starts the clock and, with `ring=3` on the command line,
/// drops to ring 3. Returns the RAM size and what the boot found. Called once by the
/// boot code, with the logger installed.
pub fn init(start_info_paddr: u64, cmdline: &'static str) -> (u64, Platform) {
    let start_info = pvh::read(start_info_paddr);
    if start_info.is_none() {
        warn!("boot: no valid PVH start info at {start_info_paddr:#x}");
    }
    let mut ram_bytes = 0;
    if let Some(start_info) = start_info {
        debug!(
            "boot: PVH start info at {start_info_paddr:#x}, version {}, cmdline at {:#x}, RSDP at {:#x}",
            start_info.version, start_info.cmdline_paddr, start_info.rsdp_paddr
        );
        for index in 0..start_info.memmap_entries {
            if let Some(entry) = start_info.memmap_entry(index) {
                debug!(
                    "boot:   memory {:#012x}..{:#012x} type {}",
                    entry.addr,
                    entry.addr + entry.size,
                    entry.kind
                );
                if entry.kind == 1 {
                    ram_bytes += entry.size;
                }
            }
        }
    }
    let rsdp_paddr = start_info.map_or(0, |s| s.rsdp_paddr);
    RSDP_PADDR.store(rsdp_paddr, Ordering::Relaxed);

    let (tsc_hz, source) = tsc::calibrate();
    time::start(tsc_hz);
    info!(
        "boot: {} MiB RAM, TSC {}.{:03} MHz ({source:?})",
        ram_bytes >> 20,
        tsc_hz / 1_000_000,
        tsc_hz / 1_000 % 1_000
    );
    if source == tsc::TscSource::Guess {
        warn!("boot: no CPUID leaf and no PIT gave the TSC frequency; timeouts may be off");
    }

    memcpy::use_string_moves(cmdline_value(cmdline, "memcpy") == Some("rep"));
    info!("boot: memcpy by {}", memcpy::name());

    if cmdline_value(cmdline, "ring") == Some("3") {
        ring3::enter();
        info!("boot: running in ring 3");
    }
    let platform = Platform {
        start_info_paddr: if start_info.is_some() {
            start_info_paddr
        } else {
            0
        },
        rsdp_paddr,
    };
    (ram_bytes, platform)
}

/// The clock's counter: the TSC.
pub fn counter() -> u64 {
    tsc::rdtsc()
}

/// Makes sure `paddr..paddr + size` is mapped as uncached memory ([`paging`]).
pub fn map_mmio(paddr: u64, size: u64) -> Result<(), paging::MapError> {
    paging::identity_map(paddr, size)
}

/// The device's interrupt as [`enable_device_interrupt`] routed it.
#[derive(Clone, Copy, Debug)]
pub enum RoutedInterrupt {
    /// A level-triggered line through the IOAPIC, maybe shared: the device's interrupt
    /// status says whether it was the device's, and acknowledging it lowers the line.
    Gsi(u32),
    /// An edge-triggered message, the device's alone; it does not use its interrupt
    /// status.
    Msix(msix::MsixRoute),
}

impl RoutedInterrupt {
    /// Whether the main loop acknowledges an interrupt at the device (reads its interrupt
    /// status) before the EOI.
    pub fn is_acknowledged_at_device(&self) -> bool {
        matches!(self, RoutedInterrupt::Gsi(_))
    }
}

impl core::fmt::Display for RoutedInterrupt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RoutedInterrupt::Gsi(gsi) => write!(f, "GSI {gsi}"),
            RoutedInterrupt::Msix(route) => route.fmt(f),
        }
    }
}

/// Routes the interrupt of the device [`find_vsock`] found to this CPU and sets up the
/// timer ([`interrupts`], [`irq_route`], [`msix`]): how, or why the guest has to poll.
/// Under MSI-X the device's queues are mapped to the entry later, by
/// [`finish_device_interrupt`].
pub fn enable_device_interrupt(cmdline: &str) -> Result<RoutedInterrupt, &'static str> {
    let line = irq_route::device_line(cmdline)?;
    if !interrupts::init() {
        return Err("the local APIC cannot be mapped");
    }
    match line {
        irq_route::DeviceLine::Gsi(gsi) => {
            if !interrupts::route(gsi) {
                return Err("the IOAPIC cannot be mapped");
            }
            Ok(RoutedInterrupt::Gsi(gsi))
        }
        irq_route::DeviceLine::Msix(bdf) => msix::enable(bdf).map(RoutedInterrupt::Msix),
    }
}

/// What routing the device's interrupt leaves until the driver has set the device up:
/// under MSI-X, mapping its queues to the table entry ([`msix::map_queues`]). Call it
/// after the driver's bring-up and before the first sleep; later calls do nothing.
pub fn finish_device_interrupt() -> Result<(), &'static str> {
    msix::map_queues()
}

/// Whether the device interrupted since the last call ([`interrupts`]).
pub fn take_device_interrupt() -> bool {
    interrupts::take_device_interrupt()
}

/// Ends the device's interrupt, once the device is acknowledged ([`interrupts`]).
pub fn end_device_interrupt() {
    interrupts::end_device_interrupt();
}

/// Halts until an interrupt or the clock's `deadline` (µs); whether the timer fired.
pub fn halt(deadline: Option<u64>) -> bool {
    interrupts::halt(deadline)
}

/// Finds the virtio socket device ([`devices`]).
pub fn find_vsock() -> Option<SomeTransport<'static>> {
    devices::find_vsock()
}

/// Stops the VM with the exit `code` (see [Stopping the VM](self#stopping-the-vm));
/// the common code has printed the outcome line.
pub fn stop(code: u32) -> ! {
    // SAFETY: port 0xF4 is QEMU's isa-debug-exit device (or nothing); writing to it has
    // no effect on this program's memory.
    unsafe { port::outl(DEBUG_EXIT_PORT, code) };
    // Still running: there is no isa-debug-exit.
    let result = acpi::power_off(RSDP_PADDR.load(Ordering::Relaxed));
    // (Before calibration there is no clock to wait with.)
    if result.is_ok() && time::counter_hz() != 0 {
        time::delay_micros(POWER_OFF_WAIT_MICROS);
    }
    let mut out = serial::SerialPort::unlocked();
    let _ = match result {
        Ok(()) => writeln!(out, "boot: the VMM ignored the ACPI power-off; halting"),
        Err(e) => writeln!(out, "boot: no ACPI power-off ({e}); halting"),
    };
    halt_forever()
}

/// Stops the CPU for good: `hlt` with interrupts off in ring 0; in ring 3, where `hlt`
/// faults, a spin loop.
pub fn halt_forever() -> ! {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    loop {
        if cs & 3 == 0 {
            // SAFETY: halting with interrupts disabled just stops the CPU.
            unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
        } else {
            core::hint::spin_loop();
        }
    }
}
