//! x86 I/O port access.

use core::arch::asm;

/// Reads a byte from an I/O port.
///
/// # Safety
///
/// Reading some ports has side effects on devices; the caller must know what the port is.
pub unsafe fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: `in` only touches the named registers; the caller vouches for the port.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes a byte to an I/O port.
///
/// # Safety
///
/// Writing to a port can reconfigure a device; the caller must know what the port is.
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: `out` only touches the named registers; the caller vouches for the port.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a 16-bit value from an I/O port.
///
/// # Safety
///
/// As for [`inb`].
pub unsafe fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: `in` only touches the named registers; the caller vouches for the port.
    unsafe {
        asm!("in ax, dx", out("ax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes a 16-bit value to an I/O port.
///
/// # Safety
///
/// As for [`outb`].
pub unsafe fn outw(port: u16, value: u16) {
    // SAFETY: `out` only touches the named registers; the caller vouches for the port.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a 32-bit value from an I/O port.
///
/// # Safety
///
/// As for [`inb`].
pub unsafe fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: `in` only touches the named registers; the caller vouches for the port.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes a 32-bit value to an I/O port.
///
/// # Safety
///
/// As for [`outb`].
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: `out` only touches the named registers; the caller vouches for the port.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}
