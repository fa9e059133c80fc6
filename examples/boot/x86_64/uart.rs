//! The first 16550 UART (COM1, I/O port 0x3F8), polled: what [`crate::boot::serial`]
//! writes its bytes to on x86-64.
//!
//! Only transmission is used, without interrupts. The transmitter is polled (bounded, so
//! a missing UART does not hang the guest): when the line status register says it is
//! empty, as many bytes follow as its FIFO holds (16 on a 16550A, which QEMU and Cloud
//! Hypervisor emulate; 1 if [`init`] finds no FIFO). That is one status read per 16
//! bytes instead of one per byte, which counts under a VMM where every port access is
//! an exit (Cloud Hypervisor; nested `kvm_pvm` in ring 3, where each one also traps to
//! the #GP handler of [`super::idt`]).

use core::sync::atomic::{AtomicU8, Ordering};

use super::port::{inb, outb};

/// I/O base of COM1.
pub const COM1: u16 = 0x3f8;

const THR: u16 = 0; // transmit holding register (DLAB = 0)
const DLL: u16 = 0; // divisor latch low (DLAB = 1)
const IER: u16 = 1; // interrupt enable (DLAB = 0)
const DLM: u16 = 1; // divisor latch high (DLAB = 1)
const FCR: u16 = 2; // FIFO control (write)
const IIR: u16 = 2; // interrupt identification (read)
/// IIR bits 6-7: both set when the FIFOs are enabled (16550A).
const IIR_FIFOS_ENABLED: u8 = 0xc0;
/// Bytes the transmit FIFO of a 16550A holds.
const FIFO_SIZE: u8 = 16;
const LCR: u16 = 3; // line control
const MCR: u16 = 4; // modem control
const LSR: u16 = 5; // line status
const LSR_THR_EMPTY: u8 = 1 << 5;

/// How many bytes the transmitter takes after it was last seen empty ([`init`] sets it).
static TX_CAPACITY: AtomicU8 = AtomicU8::new(1);
/// How many more bytes it takes before the line status must be read again.
static TX_ROOM: AtomicU8 = AtomicU8::new(0);

/// Writes one byte, waiting (bounded) for the transmitter to have room for it.
pub fn write_byte(byte: u8) {
    let mut room = TX_ROOM.load(Ordering::Relaxed);
    if room == 0 {
        for _ in 0..100_000 {
            // SAFETY: reading the line status register of COM1 has no side effects.
            if unsafe { inb(COM1 + LSR) } & LSR_THR_EMPTY != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        // Empty (or given up on): the whole FIFO is free.
        room = TX_CAPACITY.load(Ordering::Relaxed);
    }
    // SAFETY: writing the transmit holding register of COM1 sends the byte.
    unsafe { outb(COM1 + THR, byte) };
    TX_ROOM.store(room - 1, Ordering::Relaxed);
}

/// Programs COM1 for 115200 baud, 8 data bits, no parity, 1 stop bit, FIFOs on,
/// interrupts off, and notes whether the FIFOs are there.
pub fn init() {
    // SAFETY: these are the standard 16550 initialisation writes to COM1's registers;
    // nothing else in the guest uses COM1.
    unsafe {
        outb(COM1 + IER, 0x00); // no interrupts
        outb(COM1 + LCR, 0x80); // DLAB on
        outb(COM1 + DLL, 0x01); // divisor 1: 115200 baud
        outb(COM1 + DLM, 0x00);
        outb(COM1 + LCR, 0x03); // DLAB off, 8N1
        outb(COM1 + FCR, 0xc7); // FIFOs on and cleared, 14-byte threshold
        outb(COM1 + MCR, 0x03); // DTR, RTS (OUT2 off: no interrupts)
    }
    // SAFETY: reading the interrupt identification register has no effect here (no
    // interrupts are enabled, so none is acknowledged).
    let iir = unsafe { inb(COM1 + IIR) };
    let capacity = if iir & IIR_FIFOS_ENABLED == IIR_FIFOS_ENABLED {
        FIFO_SIZE
    } else {
        1
    };
    TX_CAPACITY.store(capacity, Ordering::Relaxed);
    TX_ROOM.store(0, Ordering::Relaxed);
}
