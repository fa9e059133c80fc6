//! The guests' `memcpy`: blocks of eight 64-bit moves, in place of the `rep movsq` of
//! compiler_builtins' `memcpy` for `x86_64-unknown-none`.
//!
//! Under QEMU's binary translator (TCG) a `rep movs` instruction runs one iteration per
//! pass through its translated block, and copies at about half the speed of a loop of
//! plain moves: the bench guest's reference copy of 4 MiB took 5.3 to 6.1 ms with
//! `rep movsq` and 2.3 to 3.0 ms with this loop (2 vCPUs at 2.1 GHz, QEMU 7.2). On
//! hardware it can be the other way round for data in cache (fast string moves copy a
//! cache line per step), so a kernel picks its `memcpy` for where it runs; this is the
//! example guests' pick, since they run under TCG most of the time. Every copy of the
//! guest takes it: the driver's (`send` into transmit memory, `recv` out of receive
//! memory), virtio-drivers' (its `recv` copies twice) and the applications'.
//!
//! `memcpy=rep` on the command line puts compiler_builtins' way back (the same three
//! string moves), to compare the two; the boot log names the one in use.
//!
//! compiler_builtins defines its `memcpy` as a weak symbol, so this strong one replaces
//! it at link time. The loops are written in assembly so that the compiler cannot turn
//! them back into a call to `memcpy`.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// Whether [`memcpy`] uses the string moves (`memcpy=rep`) instead of the word loop.
static STRING_MOVES: AtomicBool = AtomicBool::new(false);

/// Makes [`memcpy`] copy with `rep movsb`/`rep movsq` (`true`) or with the loop of
/// 64-bit moves (`false`, the default).
pub fn use_string_moves(string_moves: bool) {
    STRING_MOVES.store(string_moves, Ordering::Relaxed);
}

/// Which copy [`memcpy`] uses, for the boot log.
pub fn name() -> &'static str {
    if STRING_MOVES.load(Ordering::Relaxed) {
        "rep movsq"
    } else {
        "64-bit moves, 8 per step"
    }
}

/// C's `memcpy`: copies `len` bytes from `src` to `dest` and returns `dest`.
///
/// # Safety
///
/// As C's: `src` is valid for reads and `dest` for writes of `len` bytes, and the two do
/// not overlap.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, len: usize) -> *mut u8 {
    if STRING_MOVES.load(Ordering::Relaxed) {
        let head = ((dest as usize).wrapping_neg() % 8).min(len);
        let rest = len - head;
        // SAFETY: the caller's contract: `len` bytes readable at `src`, writable at
        // `dest`, not overlapping. The moves go forward (the direction flag is clear, as
        // the ABI requires at every call): first the bytes up to `dest`'s 8-byte
        // alignment, then words, then the last bytes.
        unsafe {
            asm!(
                "mov rcx, {head}",
                "rep movsb",
                "mov rcx, {rest}",
                "shr rcx, 3",
                "rep movsq",
                "mov rcx, {rest}",
                "and rcx, 7",
                "rep movsb",
                head = in(reg) head,
                rest = in(reg) rest,
                inout("rdi") dest => _,
                inout("rsi") src => _,
                out("rcx") _,
                options(nostack),
            );
        }
    } else {
        // SAFETY: as above; the loop reads each source byte once and writes each
        // destination byte once, in 64-byte blocks of eight 8-byte moves, then 8-byte
        // moves, then single bytes. Unaligned 8-byte moves are allowed on x86-64.
        unsafe {
            asm!(
                "mov rcx, {len}",
                "shr rcx, 6",
                "jz 3f",
                "2:",
                "mov rax, [rsi]",
                "mov r8, [rsi + 8]",
                "mov r9, [rsi + 16]",
                "mov r10, [rsi + 24]",
                "mov [rdi], rax",
                "mov [rdi + 8], r8",
                "mov [rdi + 16], r9",
                "mov [rdi + 24], r10",
                "mov rax, [rsi + 32]",
                "mov r8, [rsi + 40]",
                "mov r9, [rsi + 48]",
                "mov r10, [rsi + 56]",
                "mov [rdi + 32], rax",
                "mov [rdi + 40], r8",
                "mov [rdi + 48], r9",
                "mov [rdi + 56], r10",
                "add rsi, 64",
                "add rdi, 64",
                "dec rcx",
                "jnz 2b",
                "3:",
                "mov rcx, {len}",
                "and rcx, 63",
                "shr rcx, 3",
                "jz 5f",
                "4:",
                "mov rax, [rsi]",
                "mov [rdi], rax",
                "add rsi, 8",
                "add rdi, 8",
                "dec rcx",
                "jnz 4b",
                "5:",
                "mov rcx, {len}",
                "and rcx, 7",
                "jz 7f",
                "6:",
                "mov al, [rsi]",
                "mov [rdi], al",
                "inc rsi",
                "inc rdi",
                "dec rcx",
                "jnz 6b",
                "7:",
                len = in(reg) len,
                inout("rdi") dest => _,
                inout("rsi") src => _,
                out("rcx") _,
                out("rax") _,
                out("r8") _,
                out("r9") _,
                out("r10") _,
                options(nostack),
            );
        }
    }
    dest
}
