//! The serial console and the `log` backend that writes to it: COM1 (a 16550) on x86-64,
//! the PL011 on aarch64 (the byte-level driver is the architecture's `uart` module).
//! Output only, polled. `\n` is sent as `\r\n`.

use core::fmt::{self, Write};

use log::{LevelFilter, Log, Metadata, Record};
use spin::Mutex;

use super::arch::uart;

/// A handle on the UART. It holds no state, so several can exist; [`SERIAL`] is the
/// shared, locked one that keeps lines from different writers apart.
pub struct SerialPort(());

/// The shared writer used by the logger and [`write_fmt`].
pub static SERIAL: Mutex<SerialPort> = Mutex::new(SerialPort(()));

impl SerialPort {
    /// Returns an unlocked handle, for the panic and exception paths, which must print
    /// even if the lock is held by the code that failed.
    pub fn unlocked() -> Self {
        SerialPort(())
    }

    /// Writes one byte, waiting (bounded) for the transmitter to have room for it.
    pub fn write_byte(&mut self, byte: u8) {
        uart::write_byte(byte);
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

/// Sets the UART up (polled, no interrupts). Called once by the boot code.
pub fn init() {
    uart::init();
}

/// Writes formatted text to the UART under the [`SERIAL`] lock, bypassing the logger:
/// `boot::serial::write_fmt(format_args!("raw {}\n", 42))`.
pub fn write_fmt(args: fmt::Arguments<'_>) {
    // Writing to the UART cannot fail.
    let _ = SERIAL.lock().write_fmt(args);
}

/// The `log` backend: each record becomes one `[LEVEL] message\r\n` line.
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
