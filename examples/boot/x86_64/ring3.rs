//! Running the rest of the guest in ring 3 (`ring=3` on the command line).
//!
//! Some hosts run guests under a software hypervisor that executes the guest's ring-0
//! code by emulation and only its ring-3 code on the CPU (Linux's `kvm_pvm`, the nested
//! KVM of some cloud VMs: there a bare-metal guest in ring 0 fills memory at about
//! 1 MiB/s). [`enter`] drops to ring 3 for good, so that the guest's code runs at the
//! CPU's speed there; the device notifications stay what they are, exits.
//!
//! What ring 3 needs from the boot code, and gets:
//! - user segments and a TSS: a new GDT (the boot GDT's two segments at the same
//!   selectors, then user data 0x18, user code 0x20, the TSS at 0x28), whose TSS gives
//!   the CPU a ring-0 stack for an exception handler ([`super::idt`]);
//! - pages it may touch: the entry code and [`super::paging`] set the user bit in every
//!   paging entry (without SMEP or SMAP that changes nothing for ring 0);
//! - port I/O for COM1, `isa-debug-exit` and the ACPI power-off: `RFLAGS.IOPL` = 3,
//!   and where the hypervisor does not honour that (`kvm_pvm` does not), the #GP entry
//!   of [`super::idt`] does the `in`/`out` in ring 0 and returns after it;
//! - `rdtsc`: allowed while `CR4.TSD` is clear (it is).
//!
//! Nothing the guest does afterwards may need ring 0: no `hlt` (the last resort of
//! [`crate::boot::exit`] spins instead in ring 3), no control registers (the exception
//! handler, which reads CR2, runs in ring 0 on the TSS's stack).

use core::arch::asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use super::idt::TablePointer;

/// Selector of the user data segment, with RPL 3.
const USER_DATA: u64 = 0x18 | 3;
/// Selector of the user 64-bit code segment, with RPL 3.
const USER_CODE: u64 = 0x20 | 3;
/// Selector of the TSS.
const TSS_SELECTOR: u16 = 0x28;
/// `RFLAGS.IOPL` = 3: port I/O from ring 3.
const IOPL_3: u64 = 3 << 12;
/// Bytes of the ring-0 stack exceptions run on.
const KERNEL_STACK_SIZE: usize = 16 * 1024;

/// The 64-bit TSS: only `rsp0` is used.
#[repr(C, packed(4))]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    io_map_base: u16,
}

#[repr(C, align(16))]
struct Tables {
    gdt: [u64; 7],
    tss: Tss,
}

struct Shared(UnsafeCell<Tables>);

// SAFETY: written once by `enter`, before the CPU uses it, on the one CPU the guest runs.
unsafe impl Sync for Shared {}

#[repr(C, align(16))]
struct KernelStack(UnsafeCell<[u8; KERNEL_STACK_SIZE]>);

// SAFETY: only the CPU uses it (as the stack of an exception handler).
unsafe impl Sync for KernelStack {}

/// Zero-initialised, so in `.bss`.
static KERNEL_STACK: KernelStack = KernelStack(UnsafeCell::new([0; KERNEL_STACK_SIZE]));

static TABLES: Shared = Shared(UnsafeCell::new(Tables {
    gdt: [
        0,
        0x00af_9a00_0000_ffff, // 0x08: kernel code, DPL 0, L (as the boot GDT)
        0x00cf_9200_0000_ffff, // 0x10: kernel data, DPL 0 (as the boot GDT)
        0x00cf_f200_0000_ffff, // 0x18: user data, DPL 3
        0x00af_fa00_0000_ffff, // 0x20: user code, DPL 3, L
        0,                     // 0x28: the TSS, filled in by `enter`
        0,
    ],
    tss: Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        io_map_base: size_of::<Tss>() as u16,
    },
}));

static ENTERED: AtomicBool = AtomicBool::new(false);

/// Loads the GDT and TSS above and returns in ring 3, on the same stack, with
/// interrupts still disabled. Call it once, from ring 0.
pub fn enter() {
    if ENTERED.swap(true, Ordering::Relaxed) {
        return;
    }
    let tables = TABLES.0.get();
    // SAFETY: runs once (ENTERED), before anything else uses the tables; the CPU reads
    // them only after the `lgdt` and `ltr` below.
    let gdt_base = unsafe {
        let stack = KERNEL_STACK.0.get() as u64;
        (*tables).tss.rsp[0] = (stack + KERNEL_STACK_SIZE as u64) & !15;
        let tss = &raw const (*tables).tss as u64;
        let limit = size_of::<Tss>() as u64 - 1;
        // Present, DPL 0, type 9 (available 64-bit TSS).
        (*tables).gdt[5] = (limit & 0xffff)
            | ((tss & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((tss >> 24) & 0xff) << 56);
        (*tables).gdt[6] = tss >> 32;
        &raw const (*tables).gdt as u64
    };
    let pointer = TablePointer::to::<[u64; 7]>(gdt_base);
    // SAFETY: the new GDT holds the boot GDT's segments at the same selectors (CS, SS
    // and the data segments stay valid) and a TSS descriptor for a 'static TSS. The
    // `iretq` frame returns to the next instruction in ring 3 with the stack pointer the
    // block started with, so the stack is as the compiler left it; only RAX and RCX are
    // changed, and declared.
    unsafe {
        asm!(
            "lgdt [{pointer}]",
            "ltr {tss:x}",
            "mov rax, rsp",
            "push {ss}",
            "push rax",
            "pushfq",
            "pop rcx",
            "or rcx, {iopl}",
            "push rcx",
            "push {cs}",
            "lea rcx, [rip + 2f]",
            "push rcx",
            "iretq",
            "2:",
            pointer = in(reg) &pointer,
            tss = in(reg) TSS_SELECTOR,
            ss = const USER_DATA,
            cs = const USER_CODE,
            iopl = const IOPL_3,
            out("rax") _,
            out("rcx") _,
        );
    }
}
