//! Reading the PVH `hvm_start_info` structure handed over in `EBX`.
//!
//! Layout (Xen `arch-x86/hvm/start_info.h`), all little-endian:
//!
//! | offset | field           | notes                                   |
//! |--------|-----------------|-----------------------------------------|
//! | 0      | magic: u32      | 0x336ec578                              |
//! | 4      | version: u32    |                                         |
//! | 8      | flags: u32      |                                         |
//! | 12     | nr_modules: u32 |                                         |
//! | 16     | modlist_paddr   | u64                                     |
//! | 24     | cmdline_paddr   | u64, NUL-terminated string, 0 if none   |
//! | 32     | rsdp_paddr      | u64, ACPI RSDP, 0 if none               |
//! | 40     | memmap_paddr    | u64, version >= 1                       |
//! | 48     | memmap_entries  | u32, version >= 1                       |

use core::cell::UnsafeCell;

/// The magic number at the start of `hvm_start_info`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Longest command line kept; longer ones are truncated.
pub const CMDLINE_MAX: usize = 4096;

/// The parts of the start info the boot code uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct StartInfo {
    /// Structure version.
    pub version: u32,
    /// Physical address of the command line, 0 if none.
    pub cmdline_paddr: u64,
    /// Physical address of the ACPI RSDP, 0 if none.
    pub rsdp_paddr: u64,
    /// Physical address of the E820-style memory map, 0 if none.
    pub memmap_paddr: u64,
    /// Number of memory map entries.
    pub memmap_entries: u32,
}

/// Reads the start info at `paddr`; `None` if the pointer is null or the magic is wrong.
pub fn read(paddr: u64) -> Option<StartInfo> {
    if paddr == 0 {
        return None;
    }
    let base = paddr as *const u8;
    // SAFETY: the PVH loader passes the address of a start info structure in RAM below
    // 4 GiB, which is identity-mapped; unaligned reads are used so no alignment is assumed.
    unsafe {
        let u32_at = |offset: usize| base.add(offset).cast::<u32>().read_unaligned();
        let u64_at = |offset: usize| base.add(offset).cast::<u64>().read_unaligned();
        if u32_at(0) != START_INFO_MAGIC {
            return None;
        }
        let version = u32_at(4);
        let (memmap_paddr, memmap_entries) = if version >= 1 {
            (u64_at(40), u32_at(48))
        } else {
            (0, 0)
        };
        Some(StartInfo {
            version,
            cmdline_paddr: u64_at(24),
            rsdp_paddr: u64_at(32),
            memmap_paddr,
            memmap_entries,
        })
    }
}

/// One entry of the PVH memory map.
#[derive(Clone, Copy, Debug)]
pub struct MemmapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type (1 = RAM, 2 = reserved, 3 = ACPI reclaimable, ...).
    pub kind: u32,
}

impl StartInfo {
    /// Returns memory map entry `index`, if it exists.
    pub fn memmap_entry(&self, index: u32) -> Option<MemmapEntry> {
        if self.memmap_paddr == 0 || index >= self.memmap_entries {
            return None;
        }
        let entry = (self.memmap_paddr + 24 * u64::from(index)) as *const u8;
        // SAFETY: the loader provides `memmap_entries` 24-byte entries at `memmap_paddr`,
        // in identity-mapped RAM below 4 GiB.
        unsafe {
            Some(MemmapEntry {
                addr: entry.cast::<u64>().read_unaligned(),
                size: entry.add(8).cast::<u64>().read_unaligned(),
                kind: entry.add(16).cast::<u32>().read_unaligned(),
            })
        }
    }
}

struct CmdlineBuffer(UnsafeCell<[u8; CMDLINE_MAX]>);

// SAFETY: written once by `copy_cmdline` during boot, before anything reads it.
unsafe impl Sync for CmdlineBuffer {}

static CMDLINE: CmdlineBuffer = CmdlineBuffer(UnsafeCell::new([0; CMDLINE_MAX]));

/// Copies the NUL-terminated command line at `paddr` into a static buffer (so that
/// nothing the loader left in low memory needs to stay intact) and returns it; empty if
/// `paddr` is 0. Invalid UTF-8 ends the string early. Must be called only once.
pub fn copy_cmdline(paddr: u64) -> &'static str {
    if paddr == 0 {
        return "";
    }
    let source = paddr as *const u8;
    let buffer = CMDLINE.0.get().cast::<u8>();
    let mut len = 0;
    while len < CMDLINE_MAX {
        // SAFETY: the command line is a NUL-terminated string in identity-mapped RAM;
        // reading stops at the NUL or at CMDLINE_MAX bytes.
        let byte = unsafe { source.add(len).read() };
        if byte == 0 {
            break;
        }
        // SAFETY: `len < CMDLINE_MAX`, and the buffer is only written here, once, before
        // any reference to it exists.
        unsafe { buffer.add(len).write(byte) };
        len += 1;
    }
    // SAFETY: the first `len` bytes were initialised above and are never written again,
    // so a shared 'static view of them is sound.
    let bytes = unsafe { core::slice::from_raw_parts(buffer, len) };
    crate::boot::cmdline_text(bytes)
}
