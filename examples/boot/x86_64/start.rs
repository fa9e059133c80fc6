//! The PVH entry point: the Xen ELF note, the 32-bit entry, the switch to long mode and
//! the jump into Rust.
//!
//! State on entry (x86/HVM direct boot ABI, "PVH"): 32-bit protected mode with paging
//! off, flat 4 GiB code and data segments, interrupts disabled, and `EBX` holding the
//! physical address of the `hvm_start_info` structure. Nothing else (stack, GDT, IDT,
//! direction flag) may be relied upon.
//!
//! The code below, in order:
//!
//! 1. clears the direction flag and zeroes `.bss` (`__bss_start..__bss_end` from the
//!    linker script, 4-byte multiples) with `rep stosl`, keeping `EBX` intact (the
//!    linker script's `.noinit`, the DMA pool of [`crate::boot::hal`], is left as it is);
//! 2. saves `EBX` in the symbol `PVH_START_INFO` (in `.bss`, hence after the zeroing)
//!    and later passes it to Rust;
//! 3. builds identity-mapped page tables for the first 4 GiB with 2 MiB pages
//!    (one PML4, one PDPT, four page directories, all in `.bss`; every entry with the
//!    user bit, for [`super::ring3`]); regions above 4 GiB are added later, on demand,
//!    by [`super::paging`];
//! 4. enables PAE, SSE state (`CR4.OSFXSR | CR4.OSXMMEXCPT`, `CR0.MP`, clearing
//!    `CR0.EM` — the soft-float target does not need it, but it costs nothing and keeps
//!    any SSE instruction from faulting), `EFER.LME`, then paging;
//! 5. loads a GDT with a 64-bit code segment (0x08) and a data segment (0x10) and far
//!    jumps into 64-bit code;
//! 6. loads the data segments and a 512 KiB stack, and calls the `extern "C"`
//!    function `__vsock_guest_boot_entry(start_info_paddr: u64) -> !`, which the
//!    [`entry!`](crate::boot::entry) macro defines in the example.

use core::arch::global_asm;

/// Size of the boot stack, in bytes. It lives in `.bss` and has no guard page.
pub const STACK_SIZE: usize = 512 * 1024;

global_asm!(
    r#"
    /* ---- The Xen ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), name "Xen". ----
     * QEMU finds it through the PT_NOTE program header and reads the descriptor as a
     * host `size_t`, aligning the name to the segment's p_align: keep the note 4-byte
     * aligned and the descriptor 8 bytes wide (upper half zero). */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4                         /* namesz: "Xen\0" */
    .long 8                         /* descsz */
    .long 18                        /* type: XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4
    .popsection

    /* ---- Page tables and stack: NOBITS, zeroed by the entry code. ---- */
    .pushsection .bss.boot_page_tables, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
    .popsection

    .pushsection .bss.boot_stack, "aw", @nobits
    .balign 16
boot_stack_bottom:
    .skip {stack_size}
boot_stack_top:
    .popsection

    .pushsection .bss.boot_start_info, "aw", @nobits
    .balign 8
    .global PVH_START_INFO
PVH_START_INFO:
    .skip 8
    .popsection

    /* ---- GDT: null, 64-bit code (0x08), data (0x10). ---- */
    .pushsection .data.boot_gdt, "aw", @progbits
    .balign 16
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08: code, present, DPL0, L=1 */
    .quad 0x00cf92000000ffff        /* 0x10: data, present, DPL0, writable, 4 GiB */
boot_gdt_end:
    .balign 4
    .word 0                         /* pad so that the base below is 4-aligned */
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
    .popsection

    /* ---- 32-bit entry. ---- */
    .pushsection .text.pvh_start, "ax", @progbits
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld

    /* Zero .bss (the linker script makes both ends 4 KiB aligned). EBX is kept. */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $2, %ecx
    xor %eax, %eax
    rep stosl

    /* Save the start-info pointer (the upper half stays zero). */
    mov %ebx, PVH_START_INFO

    /* PML4[0] -> PDPT, PDPT[0..4] -> the four page directories (present, writable,
     * user: see boot::ring3). */
    mov $boot_pdpt + 0x7, %eax
    mov %eax, boot_pml4
    mov $boot_pd + 0x7, %eax
    mov $boot_pdpt, %edi
    mov $4, %ecx
1:
    mov %eax, (%edi)
    add $0x1000, %eax
    add $8, %edi
    loop 1b

    /* 2048 PD entries: 2 MiB pages (present, writable, user, PS) covering 0..4 GiB. */
    mov $0x87, %eax
    mov $boot_pd, %edi
    mov $2048, %ecx
2:
    mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 2b

    mov $boot_pml4, %eax
    mov %eax, %cr3

    /* CR4: PAE (5), OSFXSR (9), OSXMMEXCPT (10). */
    mov %cr4, %eax
    or $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    mov %eax, %cr4

    /* EFER.LME. */
    mov $0xc0000080, %ecx
    rdmsr
    or $(1 << 8), %eax
    wrmsr

    /* CR0: clear EM (2), set PE (0), MP (1), PG (31). */
    mov %cr0, %eax
    and $~(1 << 2), %eax
    or $((1 << 31) | (1 << 1) | (1 << 0)), %eax
    mov %eax, %cr0

    lgdt boot_gdt_ptr
    ljmp $0x08, $pvh_start64

    /* ---- 64-bit code. ---- */
    .code64
pvh_start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    lea boot_stack_top(%rip), %rsp
    xor %ebp, %ebp
    mov PVH_START_INFO(%rip), %rdi
    call __vsock_guest_boot_entry
3:
    cli
    hlt
    jmp 3b
    .popsection
"#,
    stack_size = const STACK_SIZE,
    options(att_syntax)
);
