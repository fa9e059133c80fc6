//! Polled output on the first 16550 UART (COM1, I/O port 0x3F8) and the `log` backend
//! that writes to it.
//!
//! Only transmission is used, without interrupts or FIFOs being relied upon: every byte
//! waits for the transmit holding register to be empty (bounded, so a missing UART does
//! not hang the guest). `\n` is sent as `\r\n`.

use core::fmt::{self, Write};

use log::{LevelFilter, Log, Metadata, Record};
use spin::Mutex;

use super::port::{inb, outb};

/// I/O base of COM1.
pub const COM1: u16 = 0x3f8;

const THR: u16 = 0; // transmit holding register (DLAB = 0)
const DLL: u16 = 0; // divisor latch low (DLAB = 1)
const IER: u16 = 1; // interrupt enable (DLAB = 0)
const DLM: u16 = 1; // divisor latch high (DLAB = 1)
const FCR: u16 = 2; // FIFO control
const LCR: u16 = 3; // line control
const MCR: u16 = 4; // modem control
const LSR: u16 = 5; // line status
const LSR_THR_EMPTY: u8 = 1 << 5;

/// A handle on the COM1 UART. It holds no state, so several can exist; [`SERIAL`] is
/// the shared, locked one that keeps lines from different writers apart.
pub struct SerialPort(());

/// The shared COM1 writer used by the logger and [`write_fmt`].
pub static SERIAL: Mutex<SerialPort> = Mutex::new(SerialPort(()));

impl SerialPort {
    /// Returns an unlocked handle, for the panic and exception paths, which must print
    /// even if the lock is held by the code that failed.
    pub fn unlocked() -> Self {
        SerialPort(())
    }

    /// Writes one byte, waiting (bounded) for the transmitter to accept it.
    pub fn write_byte(&mut self, byte: u8) {
        for _ in 0..100_000 {
            // SAFETY: reading the line status register of COM1 has no side effects.
            if unsafe { inb(COM1 + LSR) } & LSR_THR_EMPTY != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        // SAFETY: writing the transmit holding register of COM1 sends the byte.
        unsafe { outb(COM1 + THR, byte) };
    }
}

impl Write for SerialPort {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(byte);
        }
        Ok(())
    }
}

/// Programs COM1 for 115200 baud, 8 data bits, no parity, 1 stop bit, FIFOs on,
/// interrupts off.
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
}

/// Writes formatted text to COM1 under the [`SERIAL`] lock, bypassing the logger:
/// `boot::serial::write_fmt(format_args!("raw {}\n", 42))`.
pub fn write_fmt(args: fmt::Arguments<'_>) {
    // Writing to the UART cannot fail.
    let _ = SERIAL.lock().write_fmt(args);
}

/// The `log` backend: each record becomes one `[LEVEL] message\r\n` line on COM1.
struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

impl Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            let _ = writeln!(SERIAL.lock(), "[{}] {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the serial logger with the given maximum level. Only the first call installs
/// it; later calls just change the level.
pub fn init_logger(level: LevelFilter) {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
