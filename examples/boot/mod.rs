//! Boot support for the bare-metal example guests (x86-64, PVH boot under QEMU or Cloud
//! Hypervisor).
//!
//! An example includes this module and names its entry point:
//!
//! ```ignore
//! #![cfg_attr(target_os = "none", no_std, no_main)]
//!
//! #[cfg(target_os = "none")]
//! mod boot;
//!
//! #[cfg(target_os = "none")]
//! boot::entry!(main);
//!
//! #[cfg(target_os = "none")]
//! fn main(info: &boot::BootInfo) -> ! {
//!     log::info!("hello, cmdline={}", info.cmdline);
//!     boot::exit_success()
//! }
//!
//! #[cfg(not(target_os = "none"))]
//! fn main() {
//!     println!("this is a bare-metal guest: run it with `cargo xtask demo`");
//! }
//! ```
//!
//! # What happens before `main`
//!
//! 1. QEMU (`-kernel`, on `-machine q35` through SeaBIOS, or on `-machine microvm`
//!    through qboot) or Cloud Hypervisor (`--kernel`, directly) finds the
//!    `XEN_ELFNOTE_PHYS32_ENTRY` note in the ELF's `PT_NOTE` segment and starts the
//!    32-bit entry in [`start`](self::start) with `EBX` pointing at the PVH
//!    `hvm_start_info`. The image is linked at 1 MiB by
//!    `linker/x86_64-pvh.ld`.
//! 2. The entry code zeroes `.bss`, identity-maps the first 4 GiB with 2 MiB pages,
//!    enters long mode, switches to a 512 KiB stack and calls into Rust.
//! 3. Rust code initialises COM1 (0x3F8, 115200 8N1, polled), installs an IDT whose
//!    handlers report CPU exceptions and exit with the failure status, copies the
//!    command line, installs a [`log`] logger printing `[LEVEL] message` lines to COM1
//!    (level from `log=<off|error|warn|info|debug|trace>` on the command line, default
//!    `info`), finds the TSC frequency ([`time`]: CPUID, the hypervisor's CPUID leaf or
//!    the PIT; the log line `boot: ... TSC ... MHz (Source)` says which) and calls
//!    `main` with a [`BootInfo`].
//!
//! Memory is identity-mapped (virtual address = physical address) throughout; regions
//! above 4 GiB are mapped on demand ([`paging`]). Interrupts stay disabled: everything
//! polls.
//!
//! # Exit status
//!
//! [`exit`] first prints `boot: exit success` ([`exit_success`]), `boot: exit failure`
//! ([`exit_failure`]) or `boot: exit code 0x..` on COM1, as a line of its own and
//! whatever the log level, so that a test can read the outcome from the serial log
//! where the VMM's exit status says nothing. Then it stops the VM the first way that
//! works:
//!
//! 1. QEMU's `isa-debug-exit` device (start QEMU with
//!    `-device isa-debug-exit,iobase=0xf4,iosize=0x04`): the code written to port 0xF4
//!    makes QEMU exit with status `(code << 1) | 1`:
//!
//!    | call               | code   | QEMU exit status |
//!    |--------------------|--------|------------------|
//!    | [`exit_success`]   | `0x10` | **33**           |
//!    | [`exit_failure`]   | `0x11` | **35**           |
//!
//! 2. Where the write to port 0xF4 went nowhere (Cloud Hypervisor, QEMU without the
//!    device), an ACPI power-off found through the RSDP of the PVH start info
//!    ([`acpi`]): the VMM exits, Cloud Hypervisor with status 0 whatever the guest
//!    meant, hence the line above.
//! 3. Failing both, the CPU halts (or spins, in ring 3, where `hlt` is not allowed) and
//!    the VMM runs on until it is killed.
//!
//! A panic and a CPU exception both print a message on COM1 and call [`exit_failure`].
//! Under QEMU any other status means the guest did not get to say (e.g. 0 after a triple
//! fault with `-no-reboot`, or 1 if the device is missing and QEMU was killed).
//!
//! # Command line
//!
//! The PVH command line (`-append "cid=4 port=1234"`) is [`BootInfo::cmdline`];
//! [`BootInfo::cmdline_value`] looks up `key=value` words in it. The boot code reads
//! `log=<level>` and `ring=3`: with that, `main` runs in ring 3 ([`ring3`]).
//!
//! # Devices
//!
//! [`virtio::find_vsock`] finds the virtio socket device over PCI (q35, Cloud
//! Hypervisor) or virtio-mmio (microvm) and [`hal::BootHal`] is the `virtio_drivers::Hal` to drive it with.
//!
//! # Heap
//!
//! [`heap`] is the global allocator, empty until a guest calls [`heap::init`] with an
//! arena (only the benchmark guest does, for virtio-drivers' socket driver).

// Every example uses a different part of this module.
#![allow(dead_code)]

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the boot module supports x86_64 only (PVH boot under QEMU)");

pub mod acpi;
pub mod config;
pub mod hal;
pub mod heap;
mod idt;
pub mod paging;
pub mod port;
pub mod pvh;
pub mod ring3;
pub mod serial;
mod start;
pub mod time;
pub mod virtio;

use core::arch::asm;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use log::{debug, info, warn, LevelFilter};

/// The code [`exit_success`] writes to `isa-debug-exit`.
pub const EXIT_SUCCESS_CODE: u32 = 0x10;
/// The code [`exit_failure`] writes to `isa-debug-exit`.
pub const EXIT_FAILURE_CODE: u32 = 0x11;
/// QEMU's exit status after [`exit_success`]: `(0x10 << 1) | 1`.
pub const QEMU_STATUS_SUCCESS: i32 = 33;
/// QEMU's exit status after [`exit_failure`] (also after a panic or CPU exception).
pub const QEMU_STATUS_FAILURE: i32 = 35;
/// I/O port of the `isa-debug-exit` device.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The line [`exit_success`] prints before it stops the VM.
pub const EXIT_SUCCESS_LINE: &str = "boot: exit success";
/// The line [`exit_failure`] prints before it stops the VM.
pub const EXIT_FAILURE_LINE: &str = "boot: exit failure";
/// How long [`exit`] waits for the VMM to act on the ACPI power-off before it halts.
const POWER_OFF_WAIT_MICROS: u64 = 1_000_000;

/// The RSDP's physical address from the start info, for the ACPI power-off in [`exit`].
static RSDP_PADDR: AtomicU64 = AtomicU64::new(0);

/// What the boot code hands to the example's `main`.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// The kernel command line (QEMU `-append`), trimmed; empty if there is none.
    pub cmdline: &'static str,
    /// Physical address of the PVH `hvm_start_info` structure (0 if it was invalid).
    pub start_info_paddr: u64,
    /// Physical address of the ACPI RSDP from the start info, 0 if none.
    pub rsdp_paddr: u64,
    /// Bytes of RAM listed in the PVH memory map (0 if there is no map).
    pub ram_bytes: u64,
    /// TSC frequency used by [`time`], in Hz.
    pub tsc_hz: u64,
}

impl BootInfo {
    /// Returns the value of the last `key=value` word of the command line, if any.
    /// `info.cmdline_value("port")` on `"cid=4 port=1234"` is `Some("1234")`.
    pub fn cmdline_value(&self, key: &str) -> Option<&'static str> {
        cmdline_value(self.cmdline, key)
    }
}

fn cmdline_value(cmdline: &'static str, key: &str) -> Option<&'static str> {
    cmdline
        .split_ascii_whitespace()
        .rev()
        .filter_map(|word| word.split_once('='))
        .find_map(|(name, value)| (name == key).then_some(value))
}

/// Defines the guest's entry point: `boot::entry!(main);` with
/// `fn main(info: &boot::BootInfo) -> !`. The boot code calls `main` once the machine is
/// set up (see the [module documentation](self)).
macro_rules! entry {
    ($main:path) => {
        /// Called by the PVH entry code on the boot stack; never returns.
        #[unsafe(no_mangle)]
        extern "C" fn __vsock_guest_boot_entry(start_info_paddr: u64) -> ! {
            $crate::boot::start(start_info_paddr, $main)
        }
    };
}
pub(crate) use entry;

/// Sets up serial output, exception handlers, logging and the clock, then calls `main`.
/// Called by the function [`entry!`] defines; not for direct use.
pub fn start(start_info_paddr: u64, main: fn(&BootInfo) -> !) -> ! {
    serial::init();
    idt::init();

    let start_info = pvh::read(start_info_paddr);
    let cmdline = start_info.map_or("", |s| pvh::copy_cmdline(s.cmdline_paddr));
    let level = cmdline_value(cmdline, "log");
    serial::init_logger(
        level
            .and_then(|l| l.parse().ok())
            .unwrap_or(LevelFilter::Info),
    );
    if let Some(level) = level.filter(|l| l.parse::<LevelFilter>().is_err()) {
        warn!("boot: unknown log level {level:?}; using info");
    }
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

    RSDP_PADDR.store(start_info.map_or(0, |s| s.rsdp_paddr), Ordering::Relaxed);

    let (tsc_hz, source) = time::calibrate();
    info!(
        "boot: {} MiB RAM, TSC {}.{:03} MHz ({source:?})",
        ram_bytes >> 20,
        tsc_hz / 1_000_000,
        tsc_hz / 1_000 % 1_000
    );
    if source == time::TscSource::Guess {
        warn!("boot: no CPUID leaf and no PIT gave the TSC frequency; timeouts may be off");
    }

    if cmdline_value(cmdline, "ring") == Some("3") {
        ring3::enter();
        info!("boot: running in ring 3");
    }

    let info = BootInfo {
        cmdline,
        start_info_paddr: if start_info.is_some() {
            start_info_paddr
        } else {
            0
        },
        rsdp_paddr: start_info.map_or(0, |s| s.rsdp_paddr),
        ram_bytes,
        tsc_hz,
    };
    main(&info)
}

/// Prints the outcome line, then stops the VM: through `isa-debug-exit` (QEMU exits
/// with status `(code << 1) | 1`), else through an ACPI power-off, else by halting for
/// good (see the [module documentation](self#exit-status)).
pub fn exit(code: u32) -> ! {
    static EXITING: AtomicBool = AtomicBool::new(false);
    // A second call (a fault while powering off, say) only halts: the outcome is out.
    if !EXITING.swap(true, Ordering::Relaxed) {
        // Not through the lock: `exit` may be called while it is held (a panic).
        let mut out = serial::SerialPort::unlocked();
        let _ = match code {
            EXIT_SUCCESS_CODE => writeln!(out, "{EXIT_SUCCESS_LINE}"),
            EXIT_FAILURE_CODE => writeln!(out, "{EXIT_FAILURE_LINE}"),
            _ => writeln!(out, "boot: exit code {code:#x}"),
        };
        // SAFETY: port 0xF4 is QEMU's isa-debug-exit device (or nothing); writing to it
        // has no effect on this program's memory.
        unsafe { port::outl(DEBUG_EXIT_PORT, code) };
        // Still running: there is no isa-debug-exit.
        let result = acpi::power_off(RSDP_PADDR.load(Ordering::Relaxed));
        // (Before calibration there is no clock to wait with.)
        if result.is_ok() && time::tsc_hz() != 0 {
            time::delay_micros(POWER_OFF_WAIT_MICROS);
        }
        let _ = match result {
            Ok(()) => writeln!(out, "boot: the VMM ignored the ACPI power-off; halting"),
            Err(e) => writeln!(out, "boot: no ACPI power-off ({e}); halting"),
        };
    }
    halt_forever()
}

/// Stops the CPU for good: `hlt` with interrupts off in ring 0; in ring 3, where `hlt`
/// faults, a spin loop.
fn halt_forever() -> ! {
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

/// Prints [`EXIT_SUCCESS_LINE`] and exits; under QEMU with status 33 (code 0x10).
pub fn exit_success() -> ! {
    exit(EXIT_SUCCESS_CODE)
}

/// Prints [`EXIT_FAILURE_LINE`] and exits; under QEMU with status 35 (code 0x11).
pub fn exit_failure() -> ! {
    exit(EXIT_FAILURE_CODE)
}

static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        // Panicked while reporting a panic: just stop.
        exit_failure();
    }
    // Not through the lock: the panic may have happened while it was held.
    let mut out = serial::SerialPort::unlocked();
    let _ = match info.location() {
        Some(location) => write!(
            out,
            "\n[PANIC] panicked at {location}: {}\n",
            info.message()
        ),
        None => write!(out, "\n[PANIC] panicked: {}\n", info.message()),
    };
    exit_failure()
}
