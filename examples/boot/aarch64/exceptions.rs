//! The exception vectors (`VBAR_EL1`): every exception is reported on the serial console
//! (which vector, `ESR_EL1` with its exception class, `ELR_EL1`, `FAR_EL1`) and the VM
//! exits with the failure status. Interrupts stay masked, so only synchronous exceptions
//! and SErrors are expected; nothing returns.

use core::arch::{asm, global_asm};
use core::fmt::Write;

use crate::boot::{exit_failure, exiting, serial::SerialPort};

global_asm!(
    r#"
    .pushsection .text.boot_vectors, "ax", @progbits
    .balign 2048
    .global boot_vectors
boot_vectors:
    .set vector, 0
    .rept 16
    .balign 128
    mov x0, #vector
    b boot_exception_common
    .set vector, vector + 1
    .endr

boot_exception_common:
    mrs x1, esr_el1
    mrs x2, elr_el1
    mrs x3, far_el1
    bl {handler}
1:  wfi
    b 1b
    .popsection
"#,
    handler = sym exception_handler,
);

const VECTOR_NAMES: [&str; 16] = [
    "synchronous, current EL, SP_EL0",
    "IRQ, current EL, SP_EL0",
    "FIQ, current EL, SP_EL0",
    "SError, current EL, SP_EL0",
    "synchronous, current EL, SP_ELx",
    "IRQ, current EL, SP_ELx",
    "FIQ, current EL, SP_ELx",
    "SError, current EL, SP_ELx",
    "synchronous, lower EL, AArch64",
    "IRQ, lower EL, AArch64",
    "FIQ, lower EL, AArch64",
    "SError, lower EL, AArch64",
    "synchronous, lower EL, AArch32",
    "IRQ, lower EL, AArch32",
    "FIQ, lower EL, AArch32",
    "SError, lower EL, AArch32",
];

/// What `ESR_EL1.EC` names, for the common classes.
fn exception_class(ec: u64) -> &'static str {
    match ec {
        0x00 => "unknown reason",
        0x07 => "FP/SIMD access trapped",
        0x0e => "illegal execution state",
        0x15 => "SVC",
        0x16 => "HVC",
        0x17 => "SMC",
        0x18 => "system register access trapped",
        0x20 | 0x21 => "instruction abort",
        0x22 => "PC alignment fault",
        0x24 | 0x25 => "data abort",
        0x26 => "SP alignment fault",
        0x2f => "SError",
        0x3c => "BRK",
        _ => "other",
    }
}

/// Called by the vectors with the vector's index and the syndrome registers.
extern "C" fn exception_handler(vector: u64, esr: u64, elr: u64, far: u64) -> ! {
    if exiting() {
        // The semihosting exit without semihosting (an undefined instruction), or a fault
        // while exiting: the outcome line is out; power off.
        super::power_off();
    }
    let ec = (esr >> 26) & 0x3f;
    let name = VECTOR_NAMES
        .get(vector as usize)
        .copied()
        .unwrap_or("unknown vector");
    // Not through the lock: the exception may have happened while it was held.
    let mut out = SerialPort::unlocked();
    let _ = write!(
        out,
        "\n[EXCEPTION] {name}: {} (EC {ec:#x}), ESR {esr:#x}, ELR {elr:#x}, FAR {far:#x}\n",
        exception_class(ec)
    );
    exit_failure()
}

/// Points `VBAR_EL1` at the vectors above.
pub fn init() {
    // SAFETY: `boot_vectors` is a 2 KiB aligned table of 16 entries of 128 bytes, each of
    // which calls `exception_handler`, which never returns.
    unsafe {
        asm!(
            "adrp {tmp}, boot_vectors",
            "add {tmp}, {tmp}, :lo12:boot_vectors",
            "msr vbar_el1, {tmp}",
            "isb",
            tmp = out(reg) _,
            options(nostack)
        )
    };
}
