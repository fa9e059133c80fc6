//! The PL011 UART of QEMU `virt` at 0x0900_0000, polled: what [`crate::boot::serial`]
//! writes its bytes to on aarch64. Transmission only, no interrupts; the wait for room
//! in the transmit FIFO is bounded, so a missing UART does not hang the guest.

/// Physical address of the PL011's registers on QEMU `virt`.
pub const PL011_BASE: usize = 0x0900_0000;

const DR: usize = 0x00; // data
const FR: usize = 0x18; // flags
const FR_TXFF: u32 = 1 << 5; // transmit FIFO full
const LCR_H: usize = 0x2c; // line control
const CR: usize = 0x30; // control
const IMSC: usize = 0x38; // interrupt mask

fn register(offset: usize) -> *mut u32 {
    (PL011_BASE + offset) as *mut u32
}

/// Writes one byte, waiting (bounded) for room in the transmit FIFO.
pub fn write_byte(byte: u8) {
    for _ in 0..100_000 {
        // SAFETY: the PL011's flag register, in the device-memory part of the identity
        // map (or physical memory before the MMU is on); reading it has no side effects.
        if unsafe { register(FR).read_volatile() } & FR_TXFF == 0 {
            break;
        }
        core::hint::spin_loop();
    }
    // SAFETY: writing the data register sends the byte; nothing else uses the PL011.
    unsafe { register(DR).write_volatile(u32::from(byte)) };
}

/// Enables the UART and its transmitter with FIFOs, 8 data bits, interrupts masked. The
/// baud rate is left as it is (QEMU ignores it).
pub fn init() {
    // SAFETY: the PL011's control registers; nothing else in the guest uses the UART.
    unsafe {
        register(CR).write_volatile(0);
        register(IMSC).write_volatile(0);
        register(LCR_H).write_volatile((3 << 5) | (1 << 4)); // 8 bits, FIFOs on
        register(CR).write_volatile((1 << 8) | 1); // TXE, UARTEN
    }
}
