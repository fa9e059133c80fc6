//! The entry point: from QEMU's ELF loader to Rust, with the MMU and caches on.
//!
//! State on entry (QEMU `-M virt -kernel image.elf`): the CPU at `_start` (the ELF entry)
//! at EL1, or at EL2 with `-M virt,virtualization=on`; MMU and caches off, interrupts
//! masked. No register is promised to hold anything: for an ELF image QEMU does not pass
//! the device tree in `x0` (it does so only for a Linux `Image`); it writes the device
//! tree to the start of RAM (0x4000_0000) when the image lies above it, which
//! `linker/aarch64-virt.ld` arranges (the image starts at 0x4020_0000, leaving QEMU 2 MiB
//! for the tree).
//!
//! The code below, in order:
//!
//! 1. at EL2, makes EL1 an AArch64 EL with its own controls (`HCR_EL2.RW`, no traps of
//!    the timer or FP) and drops to EL1 with `eret`, interrupts masked;
//! 2. allows FP/SIMD at EL1 (`CPACR_EL1.FPEN`: compiled Rust copies with SIMD registers);
//! 3. zeroes `.bss` (`__bss_start..__bss_end`, 4 KiB aligned; `.noinit`, the DMA pool of
//!    [`crate::boot::hal`], is left as it is) and switches to a 512 KiB stack in it;
//! 4. builds the identity map of the first 1 TiB (`T0SZ` = 24: one level-0 table with
//!    two entries, two level-1 tables of 512 1 GiB blocks each): 1 GiB..256 GiB, where
//!    `virt` has its RAM, is normal write-back cacheable, inner shareable memory
//!    (`MAIR` index 1); everything else (flash, GIC, UART, virtio-mmio, PCIe ECAM and
//!    windows) is device-nGnRE memory (index 0), never executable;
//! 5. sets `MAIR_EL1`, `TCR_EL1` (4 KiB granule, 40-bit physical addresses, walks
//!    cacheable and inner shareable, `TTBR1` walks off) and `TTBR0_EL1`, invalidates
//!    the TLB, and turns on the MMU with the data and instruction caches
//!    (`SCTLR_EL1.M | C | I`, alignment checks off);
//! 6. calls the `extern "C"` function `__vsock_guest_boot_entry(dtb_paddr: u64) -> !`,
//!    which the [`entry!`](crate::boot::entry) macro defines in the example, with the
//!    device tree's address (0x4000_0000 if a tree is there, else what `x0` held).
//!
//! Under QEMU (TCG or KVM) the writes made with the MMU off need no cache maintenance;
//! on hardware the tables and `.bss` would need invalidating before the caches go on.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU8, Ordering};

/// Size of the boot stack, in bytes. It lives in `.bss` and has no guard page.
pub const STACK_SIZE: usize = 512 * 1024;
/// Where QEMU puts the device tree for an ELF image linked above it: the start of RAM.
pub const DTB_PADDR: u64 = 0x4000_0000;

/// `MAIR_EL1`: attribute 0 device-nGnRE (0x04), attribute 1 normal write-back
/// read/write-allocate, inner and outer (0xff).
const MAIR: u64 = 0x04 | (0xff << 8);
/// `TCR_EL1`: T0SZ = 24 (1 TiB), IRGN0 = ORGN0 = write-back, SH0 inner shareable,
/// TG0 4 KiB, EPD1 (no TTBR1 walks), IPS = 40 bits.
const TCR: u64 = 24 | (1 << 8) | (1 << 10) | (3 << 12) | (1 << 23) | (2 << 32);
/// `SCTLR_EL1`: the RES1 bits, M (MMU), C (data cache), I (instruction cache).
const SCTLR: u64 = 0x30d0_0800 | 1 | (1 << 2) | (1 << 12);
/// A 1 GiB block of normal memory: valid block, AttrIndx 1, EL1 read/write, inner
/// shareable, access flag.
const BLOCK_NORMAL: u64 = 0x1 | (1 << 2) | (3 << 8) | (1 << 10);
/// A 1 GiB block of device memory: valid block, AttrIndx 0, access flag, PXN and UXN.
const BLOCK_DEVICE: u64 = 0x1 | (1 << 10) | (1 << 53) | (1 << 54);

global_asm!(
    r#"
    .pushsection .bss.boot_page_tables, "aw", @nobits
    .balign 4096
boot_l0:
    .skip 4096
boot_l1:
    .skip 2 * 4096
    .popsection

    .pushsection .bss.boot_stack, "aw", @nobits
    .balign 16
boot_stack_bottom:
    .skip {stack_size}
boot_stack_top:
    .popsection

    .pushsection .text.boot_start, "ax", @progbits
    .global _start
_start:
    mov x19, x0                     /* what the loader left in x0 */
    msr daifset, #0xf
    mrs x9, CurrentEL
    lsr x9, x9, #2
    mov x20, x9                     /* the entry EL, stored once .bss is zeroed */
    cmp x9, #2
    b.ne 1f

    /* ---- EL2: EL1 is AArch64, its timer and FP untrapped; drop to EL1h. ---- */
    mov x9, #(1 << 31)              /* HCR_EL2.RW */
    msr hcr_el2, x9
    mov x9, #3                      /* CNTHCTL_EL2: EL1PCTEN | EL1PCEN */
    msr cnthctl_el2, x9
    msr cntvoff_el2, xzr
    mov x9, #0x33ff                 /* CPTR_EL2: RES1 bits, no traps */
    msr cptr_el2, x9
    mov x9, #0x3c5                  /* SPSR: D, A, I, F masked, EL1h */
    msr spsr_el2, x9
    adr x9, 1f
    msr elr_el2, x9
    eret

1:  /* ---- EL1. ---- */
    mov x9, #(3 << 20)              /* CPACR_EL1.FPEN: no FP/SIMD traps */
    msr cpacr_el1, x9
    isb

    /* Zero .bss (both ends 4 KiB aligned). */
    ldr x9, =__bss_start
    ldr x10, =__bss_end
2:  cmp x9, x10
    b.hs 3f
    stp xzr, xzr, [x9], #16
    b 2b
3:
    ldr x9, ={entry_el}
    strb w20, [x9]
    ldr x9, =boot_stack_top
    mov sp, x9

    /* L0[0] -> boot_l1, L0[1] -> boot_l1 + 4 KiB (table descriptors). */
    ldr x9, =boot_l0
    ldr x10, =boot_l1
    orr x11, x10, #3
    str x11, [x9]
    add x11, x11, #4096
    str x11, [x9, #8]

    /* 1024 blocks of 1 GiB: [1, 256) normal, the rest device. */
    mov x11, #0                     /* block index */
    ldr x12, ={normal}
    ldr x13, ={device}
4:  lsl x14, x11, #30
    cmp x11, #1
    b.lo 5f
    cmp x11, #256
    b.hs 5f
    orr x14, x14, x12
    b 6f
5:  orr x14, x14, x13
6:  str x14, [x10, x11, lsl #3]
    add x11, x11, #1
    cmp x11, #1024
    b.lo 4b

    ldr x9, ={mair}
    msr mair_el1, x9
    ldr x9, ={tcr}
    msr tcr_el1, x9
    ldr x9, =boot_l0
    msr ttbr0_el1, x9
    dsb ish
    tlbi vmalle1
    dsb ish
    isb
    ldr x9, ={sctlr}
    msr sctlr_el1, x9
    isb

    /* The device tree: at the start of RAM if its magic is there, else x0's value. */
    ldr x9, ={dtb}
    ldr w10, [x9]
    ldr w11, =0xedfe0dd0            /* 0xd00dfeed, big-endian, read little-endian */
    cmp w10, w11
    csel x0, x9, x19, eq
    mov x29, xzr
    mov x30, xzr
    bl __vsock_guest_boot_entry
7:  wfi
    b 7b
    .popsection
"#,
    stack_size = const STACK_SIZE,
    normal = const BLOCK_NORMAL,
    device = const BLOCK_DEVICE,
    mair = const MAIR,
    tcr = const TCR,
    sctlr = const SCTLR,
    dtb = const DTB_PADDR,
    entry_el = sym ENTRY_EL,
);

/// The exception level `_start` was entered at, stored by the entry code.
static ENTRY_EL: AtomicU8 = AtomicU8::new(0);

/// The exception level the guest was entered at (1, or 2 before it dropped to 1).
pub fn entry_el() -> u8 {
    ENTRY_EL.load(Ordering::Relaxed)
}
