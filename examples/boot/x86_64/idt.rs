//! A minimal IDT for the 32 CPU exceptions: each one prints what happened on COM1 and
//! exits QEMU with the failure status (see [`crate::boot::exit_failure`]) instead of letting
//! the CPU triple-fault (which, with `-no-reboot`, would make QEMU exit with status 0).
//! Two exceptions that are not the end: a general protection fault on port I/O from
//! ring 3, which the #GP entry does in ring 0 (see [`super::ring3`]), and an invalid
//! opcode on the halt's `int $0x81` from ring 3, which the #UD entry turns into the halt
//! (some hypervisors refuse software interrupts from ring 3; see [`super::interrupts`]).
//!
//! The table has all 256 vectors; [`set_gate`] installs the handlers of the interrupts
//! the examples sleep on ([`super::interrupts`]). Interrupts are enabled only while the
//! CPU halts there.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::fmt::Write;

use crate::boot::serial::SerialPort;

/// What the exception stubs push, lowest address first.
#[repr(C)]
struct ExceptionFrame {
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

// One 16-byte stub per vector, starting at `boot_exception_stubs`. The CPU pushes an
// error code for vectors 8, 10-14, 17, 21, 29 and 30; the other stubs push a 0 so that
// the frame always has the same layout.
global_asm!(
    r#"
    .macro BOOT_EXC_NOERR vec
    .balign 16
    push $0
    push $\vec
    jmp boot_exception_common
    .endm
    .macro BOOT_EXC_ERR vec
    .balign 16
    push $\vec
    jmp boot_exception_common
    .endm

    .pushsection .text.boot_exceptions, "ax", @progbits
    .balign 16
    .global boot_exception_stubs
boot_exception_stubs:
    BOOT_EXC_NOERR 0
    BOOT_EXC_NOERR 1
    BOOT_EXC_NOERR 2
    BOOT_EXC_NOERR 3
    BOOT_EXC_NOERR 4
    BOOT_EXC_NOERR 5
    BOOT_EXC_NOERR 6
    BOOT_EXC_NOERR 7
    BOOT_EXC_ERR 8
    BOOT_EXC_NOERR 9
    BOOT_EXC_ERR 10
    BOOT_EXC_ERR 11
    BOOT_EXC_ERR 12
    BOOT_EXC_ERR 13
    BOOT_EXC_ERR 14
    BOOT_EXC_NOERR 15
    BOOT_EXC_NOERR 16
    BOOT_EXC_ERR 17
    BOOT_EXC_NOERR 18
    BOOT_EXC_NOERR 19
    BOOT_EXC_NOERR 20
    BOOT_EXC_ERR 21
    BOOT_EXC_NOERR 22
    BOOT_EXC_NOERR 23
    BOOT_EXC_NOERR 24
    BOOT_EXC_NOERR 25
    BOOT_EXC_NOERR 26
    BOOT_EXC_NOERR 27
    BOOT_EXC_NOERR 28
    BOOT_EXC_ERR 29
    BOOT_EXC_ERR 30
    BOOT_EXC_NOERR 31

    /* #GP from ring 3 on `in`/`out` through DX, 8, 16 (0x66 prefix) or 32 bits wide
     * (the forms boot::port uses): the port access is done here, in ring 0, and the
     * program goes on after the instruction. Some hypervisors (kvm_pvm) do not give
     * ring 3 the IOPL it was granted (see boot::ring3). Anything else goes to the
     * report above. On entry: error code at 0(%rsp), then RIP, CS, RFLAGS, RSP, SS. */
    .balign 16
    .global boot_gp_entry
boot_gp_entry:
    testb $3, 16(%rsp)
    jz 9f
    push %rcx
    mov 16(%rsp), %rcx
    cmpb $0xec, (%rcx)
    je 5f
    cmpb $0xee, (%rcx)
    je 6f
    cmpb $0xed, (%rcx)
    je 7f
    cmpb $0xef, (%rcx)
    je 8f
    cmpw $0xed66, (%rcx)
    je 10f
    cmpw $0xef66, (%rcx)
    je 11f
    pop %rcx
9:
    jmp boot_exception_stubs + 16 * 13
5:
    inb %dx, %al
    jmp 1f
6:
    outb %al, %dx
    jmp 1f
7:
    inl %dx, %eax
    jmp 1f
8:
    outl %eax, %dx
    jmp 1f
10:
    inw %dx, %ax
    incq 16(%rsp)
    jmp 1f
11:
    outw %ax, %dx
    incq 16(%rsp)
1:
    incq 16(%rsp)
    pop %rcx
    add $8, %rsp
    iretq

    /* #UD from ring 3 on `int $0x81` (bytes CD 81), the halt's software interrupt
     * (boot::interrupts): kvm_pvm does not deliver a software interrupt from ring 3
     * through its gate but raises #UD. The frame is the one the gate would have pushed
     * (no error code), so the halt entry runs on it, returning after the instruction.
     * Anything else goes to the report above. On entry: RIP at 0(%rsp), then CS. */
    .balign 16
    .global boot_ud_entry
boot_ud_entry:
    testb $3, 8(%rsp)
    jz 12f
    push %rcx
    mov 8(%rsp), %rcx
    cmpw $0x81cd, (%rcx)
    pop %rcx
    jne 12f
    addq $2, (%rsp)
    jmp boot_halt_entry
12:
    jmp boot_exception_stubs + 16 * 6

boot_exception_common:
    mov %rsp, %rdi
    and $-16, %rsp
    call {handler}
4:
    cli
    hlt
    jmp 4b
    .popsection
"#,
    handler = sym exception_handler,
    options(att_syntax)
);

unsafe extern "C" {
    /// The first of the 32 exception stubs above, each 16 bytes long.
    static boot_exception_stubs: u8;
    /// The #GP entry that does ring 3's port I/O.
    static boot_gp_entry: u8;
    /// The #UD entry that halts for ring 3's `int $0x81`.
    static boot_ud_entry: u8;
}

/// A 64-bit interrupt gate descriptor.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const EMPTY: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn interrupt_gate(handler: u64) -> Gate {
        Self::gate_at(handler, 0)
    }

    /// An interrupt gate that code at privilege level `dpl` may reach with `int`.
    fn gate_at(handler: u64, dpl: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: 0x08, // the 64-bit code segment of the boot GDT
            ist: 0,
            type_attr: 0x8e | (dpl & 3) << 5, // present, DPL, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[Gate; 256]>);

// SAFETY: the table is written once, by `init`, before anything could read it
// concurrently (the guest is single-threaded with interrupts off).
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([Gate::EMPTY; 256]));

/// The operand of `lidt` and `lgdt`: a table's last byte offset and its address.
#[repr(C, packed)]
pub struct TablePointer {
    limit: u16,
    base: u64,
}

impl TablePointer {
    /// Points at a table of type `T` at `base`.
    pub fn to<T>(base: u64) -> Self {
        TablePointer {
            limit: (size_of::<T>() - 1) as u16,
            base,
        }
    }
}

/// Fills and loads the IDT. Called once by the boot code.
pub fn init() {
    let stubs = core::ptr::addr_of!(boot_exception_stubs) as u64;
    let table = IDT.0.get();
    for vector in 0..32 {
        // SAFETY: `init` runs once, before the IDT is loaded, and nothing else holds a
        // reference into the table.
        unsafe { (*table)[vector] = Gate::interrupt_gate(stubs + 16 * vector as u64) };
    }
    let gp_entry = core::ptr::addr_of!(boot_gp_entry) as u64;
    // SAFETY: as above.
    unsafe { (*table)[13] = Gate::interrupt_gate(gp_entry) };
    let ud_entry = core::ptr::addr_of!(boot_ud_entry) as u64;
    // SAFETY: as above.
    unsafe { (*table)[6] = Gate::interrupt_gate(ud_entry) };
    let pointer = TablePointer::to::<[Gate; 256]>(table as u64);
    // SAFETY: the pointer describes a valid, 'static IDT whose gates point at the stubs
    // above, in the code segment loaded by the boot code.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) };
}

/// Points `vector` (32 or above) at `handler`, reachable with `int` from privilege level
/// `dpl` (0: interrupts only; 3: also a software interrupt from ring 3).
///
/// # Safety
///
/// `handler` must be an interrupt entry that ends with `iretq` and preserves every
/// register it changes; interrupts must be disabled (the examples keep them disabled
/// except inside the halt entry, which does not call this).
pub unsafe fn set_gate(vector: u8, handler: u64, dpl: u8) {
    assert!(vector >= 32, "vectors below 32 are the CPU's exceptions");
    let table = IDT.0.get();
    // SAFETY: interrupts are disabled (the caller's contract) and the guest runs on one
    // CPU, so nothing reads the gate while it is written.
    unsafe { (*table)[usize::from(vector)] = Gate::gate_at(handler, dpl) };
}

const NAMES: [&str; 32] = [
    "divide error",
    "debug",
    "NMI",
    "breakpoint",
    "overflow",
    "bound range exceeded",
    "invalid opcode",
    "device not available",
    "double fault",
    "coprocessor segment overrun",
    "invalid TSS",
    "segment not present",
    "stack-segment fault",
    "general protection fault",
    "page fault",
    "reserved",
    "x87 floating-point error",
    "alignment check",
    "machine check",
    "SIMD floating-point error",
    "virtualization exception",
    "control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "hypervisor injection",
    "VMM communication",
    "security exception",
    "reserved",
];

extern "C" fn exception_handler(frame: &ExceptionFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    let mut out = SerialPort::unlocked();
    let name = NAMES.get(frame.vector as usize).copied().unwrap_or("?");
    let _ = write!(
        out,
        "\n[ERROR] CPU exception {} ({name}), error code {:#x}, rip {:#x}, rsp {:#x}, \
         rflags {:#x}, cs {:#x}, ss {:#x}, cr2 {:#x}\n",
        frame.vector, frame.error_code, frame.rip, frame.rsp, frame.rflags, frame.cs, frame.ss, cr2
    );
    crate::boot::exit_failure()
}
