//! Interrupts for the guests that sleep ([`crate::boot::wait`]): the local APIC (xAPIC,
//! MMIO at 0xFEE0_0000) and its timer, the IOAPIC that carries the device's line (or
//! nothing between the device and the LAPIC, under MSI-X: [`super::msix`]), and the
//! halt.
//!
//! - **Vectors.** The device's line is vector [`DEVICE_VECTOR`] (0x40), the LAPIC timer
//!   [`TIMER_VECTOR`] (0x50, a higher priority class, so a device interrupt in service
//!   never holds it back), spurious interrupts 0xFF. Their entries only set a flag (the
//!   timer's also ends its interrupt): the driver is not interrupt-safe, so the main loop
//!   does the rest.
//! - **Level-triggered lines, ended by the main loop.** The device's line stays raised
//!   until the driver acknowledges the interrupt (`VsockDevice::ack_interrupt` reads or
//!   writes the device's interrupt status). Its entry therefore does not write the EOI:
//!   the vector stays in service, which holds back every further interrupt of its
//!   priority class, until the main loop has acknowledged the device and calls
//!   [`end_device_interrupt`]; by then the line is low and the IOAPIC does not send it
//!   again. No masking, no storm. An MSI-X message (edge-triggered) takes the same entry
//!   and the same EOI, without the acknowledgement: one that comes while the vector is in
//!   service waits in the LAPIC's IRR and is delivered after the EOI.
//! - **Halting.** Interrupts are disabled everywhere but in the halt entry, software
//!   interrupt [`HALT_VECTOR`] (0x81, reachable from ring 3, where `hlt` is not allowed):
//!   with interrupts still off it looks at the two flags, and only when both are clear
//!   does it `sti; hlt` (`sti` takes effect after the next instruction, so an interrupt
//!   that is already pending wakes the `hlt` rather than slipping in before it). So an
//!   interrupt that came after the main loop last looked is never slept through. Where
//!   the hypervisor answers `int` from ring 3 with #UD (`kvm_pvm`), the #UD entry of
//!   [`super::idt`] runs the halt entry instead.
//! - **Timer.** One-shot LAPIC timer, divide by 1, its frequency measured against the
//!   TSC at [`init`]; armed at the deadline the main loop gives [`halt`]. (TSC-deadline
//!   mode would save the calibration; QEMU's TCG CPU models do not offer it.)
//! - **Legacy PIC.** Both 8259s are masked (SeaBIOS leaves some lines open, and their
//!   vectors would land on CPU exceptions), and LINT0 (their ExtINT) too.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use log::info;

use super::idt;
use super::port::outb;
use crate::boot::time;

/// Physical address of the local APIC's registers (xAPIC mode).
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Physical address of the (first) IOAPIC.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// Physical address of microvm's second IOAPIC (GSIs 24 to 47).
pub const IOAPIC2_BASE: u64 = 0xfec1_0000;
/// The device's vector.
pub const DEVICE_VECTOR: u8 = 0x40;
/// The LAPIC timer's vector.
pub const TIMER_VECTOR: u8 = 0x50;
/// The halt entry's vector (`int 0x81`).
pub const HALT_VECTOR: u8 = 0x81;
/// The spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

const LAPIC_ID: u64 = 0x20;
const LAPIC_TPR: u64 = 0x80;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_LVT_LINT0: u64 = 0x350;
const LAPIC_TIMER_INITIAL: u64 = 0x380;
const LAPIC_TIMER_CURRENT: u64 = 0x390;
const LAPIC_TIMER_DIVIDE: u64 = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;

/// Set by the device's entry, taken by [`take_device_interrupt`].
static DEVICE_FIRED: AtomicBool = AtomicBool::new(false);
/// Set by the timer's entry, cleared when the timer is armed.
static TIMER_FIRED: AtomicBool = AtomicBool::new(false);
/// LAPIC timer ticks per millisecond, measured by [`init`] (0: not set up).
static TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .pushsection .text.boot_interrupts, "ax", @progbits
    .balign 16
    .global boot_irq_device
boot_irq_device:
    movb $1, {device}(%rip)
    iretq

    .balign 16
    .global boot_irq_timer
boot_irq_timer:
    movb $1, {timer}(%rip)
    push %rax
    mov $0xfee000b0, %eax
    movl $0, (%rax)
    pop %rax
    iretq

    .balign 16
    .global boot_irq_spurious
boot_irq_spurious:
    iretq

    .balign 16
    .global boot_halt_entry
boot_halt_entry:
    cmpb $0, {device}(%rip)
    jne 1f
    cmpb $0, {timer}(%rip)
    jne 1f
    sti
    hlt
    cli
1:
    iretq
    .popsection
"#,
    device = sym DEVICE_FIRED,
    timer = sym TIMER_FIRED,
    options(att_syntax)
);

unsafe extern "C" {
    static boot_irq_device: u8;
    static boot_irq_timer: u8;
    static boot_irq_spurious: u8;
    static boot_halt_entry: u8;
}

fn lapic_read(register: u64) -> u32 {
    // SAFETY: the LAPIC's registers are mapped (`init`); reading these has no side effect
    // on memory.
    unsafe { ((LAPIC_BASE + register) as *const u32).read_volatile() }
}

fn lapic_write(register: u64, value: u32) {
    // SAFETY: the LAPIC's registers are mapped (`init`); the examples' boot code is the
    // only user of the LAPIC.
    unsafe { ((LAPIC_BASE + register) as *mut u32).write_volatile(value) }
}

fn ioapic_write(base: u64, register: u32, value: u32) {
    // SAFETY: the IOAPIC's index and data registers (offsets 0 and 0x10) are mapped
    // (`route`); nothing else uses it, and interrupts are off between the two writes.
    unsafe {
        (base as *mut u32).write_volatile(register);
        ((base + 0x10) as *mut u32).write_volatile(value);
    }
}

/// Sets up the LAPIC, its timer and the vectors, masks the legacy PIC. Call once, in
/// ring 0, with interrupts disabled (before `ring=3` takes effect, or from the boot
/// code). Returns `false` when the LAPIC cannot be mapped.
pub fn init() -> bool {
    if super::paging::identity_map(LAPIC_BASE, 0x1000).is_err() {
        return false;
    }
    // SAFETY: masking every line of both 8259 PICs (ports 0x21, 0xA1) only stops them
    // from interrupting; nothing in the examples uses them.
    unsafe {
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
    // SAFETY: each stub above is an interrupt entry ending in `iretq` that changes no
    // register it does not restore; interrupts are disabled here.
    unsafe {
        idt::set_gate(DEVICE_VECTOR, &raw const boot_irq_device as u64, 0);
        idt::set_gate(TIMER_VECTOR, &raw const boot_irq_timer as u64, 0);
        idt::set_gate(SPURIOUS_VECTOR, &raw const boot_irq_spurious as u64, 0);
        idt::set_gate(HALT_VECTOR, &raw const boot_halt_entry as u64, 3);
    }
    lapic_write(LAPIC_SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
    lapic_write(LAPIC_TIMER_DIVIDE, 0b1011); // divide by 1
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    lapic_write(LAPIC_TIMER_INITIAL, u32::MAX);
    time::delay_micros(2_000);
    let elapsed = u64::from(u32::MAX - lapic_read(LAPIC_TIMER_CURRENT));
    lapic_write(LAPIC_TIMER_INITIAL, 0);
    lapic_write(LAPIC_LVT_TIMER, u32::from(TIMER_VECTOR)); // one-shot, unmasked
    let per_ms = (elapsed / 2).max(1);
    TICKS_PER_MS.store(per_ms, Ordering::Relaxed);
    info!(
        "boot: LAPIC id {}, timer {}.{:03} MHz",
        lapic_id(),
        per_ms / 1000,
        per_ms % 1000
    );
    true
}

/// This CPU's local APIC ID (xAPIC: 8 bits), the destination of its interrupts. Call it
/// after [`init`].
pub fn lapic_id() -> u32 {
    lapic_read(LAPIC_ID) >> 24
}

/// Routes `gsi` (level-triggered, active high) to [`DEVICE_VECTOR`] on this CPU through
/// the IOAPIC that has it (GSI 0-23 the first, 24-47 microvm's second). Returns `false`
/// when its IOAPIC cannot be mapped.
pub fn route(gsi: u32) -> bool {
    let (base, pin) = if gsi < 24 {
        (IOAPIC_BASE, gsi)
    } else {
        (IOAPIC2_BASE, gsi - 24)
    };
    if super::paging::identity_map(base, 0x1000).is_err() {
        return false;
    }
    ioapic_write(base, 0x11 + 2 * pin, lapic_id() << 24);
    // Fixed delivery, physical destination, active high, level-triggered, unmasked.
    ioapic_write(base, 0x10 + 2 * pin, u32::from(DEVICE_VECTOR) | 1 << 15);
    true
}

/// Whether the device interrupted since the last call; clears the flag. After `true`,
/// acknowledge the device, then call [`end_device_interrupt`].
pub fn take_device_interrupt() -> bool {
    DEVICE_FIRED.swap(false, Ordering::Relaxed)
}

/// Ends the device's interrupt at the LAPIC (EOI), once the device has been acknowledged
/// and its line is low.
pub fn end_device_interrupt() {
    lapic_write(LAPIC_EOI, 0);
}

/// Halts until an interrupt, or until the clock ([`time::now_micros`]) reaches
/// `deadline` when there is one; returns at once if the device interrupted meanwhile.
/// Returns whether the timer fired. Works in ring 0 and ring 3.
pub fn halt(deadline: Option<u64>) -> bool {
    TIMER_FIRED.store(false, Ordering::Relaxed);
    if let Some(deadline) = deadline {
        let micros = deadline.saturating_sub(time::now_micros()).max(1);
        let ticks = (micros.saturating_mul(TICKS_PER_MS.load(Ordering::Relaxed)) / 1000)
            .clamp(1, u64::from(u32::MAX));
        lapic_write(LAPIC_TIMER_INITIAL, ticks as u32);
    }
    // SAFETY: vector 0x81 is the halt entry (`init`), reachable from ring 3; it returns
    // with every register as it was and interrupts disabled.
    unsafe { asm!("int 0x81", options(nostack)) };
    let fired = TIMER_FIRED.load(Ordering::Relaxed);
    if deadline.is_some() && !fired {
        lapic_write(LAPIC_TIMER_INITIAL, 0);
    }
    fired
}
