//! Boot support for the bare-metal example guests: x86-64 (PVH boot under QEMU `q35` and
//! `microvm`, or Cloud Hypervisor) and aarch64 (QEMU `virt`, entered at EL1 from QEMU's
//! `-kernel` ELF loader).
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
//! # Layout
//!
//! What every architecture shares is here: the entry macro and [`BootInfo`], the exit
//! path and the panic handler, the serial console and logger ([`serial`]), the clock
//! ([`time`]), the virtio `Hal` ([`hal`]), finding the vsock device ([`virtio`]), the
//! driver's `Config` from the command line ([`config`]) and the heap ([`heap`]). What is
//! not is in [`arch`], selected by `cfg(target_arch)`:
//!
//! | | x86-64 (`x86_64/`) | aarch64 (`aarch64/`) |
//! | --- | --- | --- |
//! | entry | PVH note, 32-bit entry, long mode (`start.rs`) | EL1 (or EL2, dropped to EL1) from QEMU's ELF loader (`start.rs`) |
//! | memory | first 4 GiB identity-mapped, 2 MiB pages; more on demand (`paging.rs`) | identity map of the first 1 TiB, 1 GiB blocks: RAM normal cacheable, the rest device memory (`start.rs`) |
//! | exceptions | IDT (`idt.rs`) | `VBAR_EL1` vectors (`exceptions.rs`) |
//! | console | COM1, a 16550 (`uart.rs`) | PL011 at 0x0900_0000 (`uart.rs`) |
//! | command line, RAM | PVH start info (`pvh.rs`) | the device tree QEMU passes (`dtb.rs`) |
//! | clock | TSC, calibrated (`tsc.rs`) | generic timer, `CNTVCT_EL0` / `CNTFRQ_EL0` |
//! | vsock device | PCI (ports or q35 ECAM) or microvm's MMIO slots (`devices.rs`) | the device tree's virtio-mmio slots or PCIe ECAM, BARs assigned by the guest (`devices.rs`) |
//! | exit | `isa-debug-exit`, ACPI power-off (`acpi.rs`) | semihosting `SYS_EXIT`, PSCI `SYSTEM_OFF` |
//! | ring 3 | `ring=3` (`ring3.rs`) | not offered |
//!
//! Each `arch` module's documentation says what happens before `main` there. Memory is
//! identity-mapped (virtual address = physical address) throughout and interrupts stay
//! disabled but while a guest that sleeps halts ([`wait`]; on x86-64 only).
//!
//! # Exit status
//!
//! [`exit`] first prints `boot: exit success` ([`exit_success`]), `boot: exit failure`
//! ([`exit_failure`]) or `boot: exit code 0x..` on the serial console, as a line of its
//! own and whatever the log level, so that a test can read the outcome from the serial
//! log where the VMM's exit status says nothing. Then the architecture stops the VM,
//! under QEMU with an exit status that tells the outcome:
//!
//! | call               | code   | QEMU exit status |
//! |--------------------|--------|------------------|
//! | [`exit_success`]   | `0x10` | **33**           |
//! | [`exit_failure`]   | `0x11` | **35**           |
//!
//! On x86-64 through `isa-debug-exit` (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`,
//! which exits with `(code << 1) | 1`), on aarch64 through semihosting (`-semihosting`),
//! whose `SYS_EXIT` gives QEMU the status itself. Without those devices the VM is powered
//! off (ACPI, PSCI) and only the serial line tells the outcome.
//!
//! A panic and a CPU exception both print a message and call [`exit_failure`].
//!
//! # Command line
//!
//! The kernel command line (`-append "cid=4 port=1234"`: the PVH start info on x86-64,
//! `/chosen/bootargs` of the device tree on aarch64) is [`BootInfo::cmdline`];
//! [`BootInfo::cmdline_value`] looks up `key=value` words in it. The boot code reads
//! `log=<off|error|warn|info|debug|trace>` (default `info`) and, on x86-64, `ring=3`.
//!
//! # Heap
//!
//! [`heap`] is the global allocator, empty until a guest calls [`heap::init`] with an
//! arena (only the benchmark guest does, for virtio-drivers' socket driver).

// Every example uses a different part of this module.
#![allow(dead_code)]

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the boot module supports x86_64 (PVH boot) and aarch64 (QEMU virt) only");

#[cfg_attr(target_arch = "x86_64", path = "x86_64/mod.rs")]
#[cfg_attr(target_arch = "aarch64", path = "aarch64/mod.rs")]
pub mod arch;
pub mod config;
pub mod executor;
pub mod hal;
pub mod heap;
pub mod serial;
pub mod time;
pub mod virtio;
pub mod wait;

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, Ordering};

use log::{warn, LevelFilter};

/// The code [`exit_success`] hands to the architecture's exit.
pub const EXIT_SUCCESS_CODE: u32 = 0x10;
/// The code [`exit_failure`] hands to the architecture's exit.
pub const EXIT_FAILURE_CODE: u32 = 0x11;
/// QEMU's exit status after [`exit_success`].
pub const QEMU_STATUS_SUCCESS: i32 = 33;
/// QEMU's exit status after [`exit_failure`] (also after a panic or CPU exception).
pub const QEMU_STATUS_FAILURE: i32 = 35;
/// The line [`exit_success`] prints before it stops the VM.
pub const EXIT_SUCCESS_LINE: &str = "boot: exit success";
/// The line [`exit_failure`] prints before it stops the VM.
pub const EXIT_FAILURE_LINE: &str = "boot: exit failure";

/// What the boot code hands to the example's `main`.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// The kernel command line (QEMU `-append`), trimmed; empty if there is none.
    pub cmdline: &'static str,
    /// Bytes of RAM the boot information lists (0 if it lists none).
    pub ram_bytes: u64,
    /// The frequency of the clock's counter ([`time`]), in Hz.
    pub counter_hz: u64,
    /// What the architecture's boot found besides ([`arch::Platform`]).
    pub platform: arch::Platform,
}

impl BootInfo {
    /// Returns the value of the last `key=value` word of the command line, if any.
    /// `info.cmdline_value("port")` on `"cid=4 port=1234"` is `Some("1234")`.
    pub fn cmdline_value(&self, key: &str) -> Option<&'static str> {
        cmdline_value(self.cmdline, key)
    }
}

/// The command line a loader copied: its bytes up to the first invalid UTF-8, trimmed.
pub fn cmdline_text(bytes: &'static [u8]) -> &'static str {
    match core::str::from_utf8(bytes) {
        Ok(text) => text.trim(),
        Err(e) => core::str::from_utf8(bytes.get(..e.valid_up_to()).unwrap_or_default())
            .unwrap_or_default()
            .trim(),
    }
}

/// The value of the last `key=value` word of `cmdline`, if any.
pub fn cmdline_value(cmdline: &'static str, key: &str) -> Option<&'static str> {
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
        /// Called by the architecture's entry code on the boot stack, with what its
        /// loader handed over (x86-64: the PVH start info's address; aarch64: the device
        /// tree's); never returns.
        #[unsafe(no_mangle)]
        extern "C" fn __vsock_guest_boot_entry(boot_arg: u64) -> ! {
            $crate::boot::start(boot_arg, $main)
        }
    };
}
pub(crate) use entry;

/// Sets up the serial console, exception handlers, logging, the clock and whatever else
/// the architecture needs, then calls `main`. Called by the function [`entry!`] defines;
/// not for direct use.
pub fn start(boot_arg: u64, main: fn(&BootInfo) -> !) -> ! {
    serial::init();
    arch::init_exceptions();

    let cmdline = arch::cmdline(boot_arg);
    let level = cmdline_value(cmdline, "log");
    serial::init_logger(
        level
            .and_then(|l| l.parse().ok())
            .unwrap_or(LevelFilter::Info),
    );
    if let Some(level) = level.filter(|l| l.parse::<LevelFilter>().is_err()) {
        warn!("boot: unknown log level {level:?}; using info");
    }
    let (ram_bytes, platform) = arch::init(boot_arg, cmdline);
    let info = BootInfo {
        cmdline,
        ram_bytes,
        counter_hz: time::counter_hz(),
        platform,
    };
    main(&info)
}

static EXITING: AtomicBool = AtomicBool::new(false);

/// Whether [`exit`] has begun (an exception handler that fires then only stops the VM).
pub fn exiting() -> bool {
    EXITING.load(Ordering::Relaxed)
}

/// Prints the outcome line, then stops the VM the architecture's way (see the [module
/// documentation](self#exit-status)); `code` is [`EXIT_SUCCESS_CODE`],
/// [`EXIT_FAILURE_CODE`] or another code for QEMU's exit status.
pub fn exit(code: u32) -> ! {
    // A second call (a fault while powering off, say) only halts: the outcome is out.
    if EXITING.swap(true, Ordering::Relaxed) {
        arch::halt_forever();
    }
    // Not through the lock: `exit` may be called while it is held (a panic).
    let mut out = serial::SerialPort::unlocked();
    let _ = match code {
        EXIT_SUCCESS_CODE => writeln!(out, "{EXIT_SUCCESS_LINE}"),
        EXIT_FAILURE_CODE => writeln!(out, "{EXIT_FAILURE_LINE}"),
        _ => writeln!(out, "boot: exit code {code:#x}"),
    };
    arch::stop(code)
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
