//! A reader of the flattened device tree (FDT) QEMU hands the guest: just enough to walk
//! its nodes and properties, with every offset and length checked against the blob, so
//! a malformed tree ends the walk instead of faulting.
//!
//! What the boot code reads from it: `/chosen/bootargs` (the command line), the `reg`
//! of `/memory@...` (RAM), and for [`super::devices`] the `virtio,mmio` nodes and the
//! `pci-host-ecam-generic` host bridge.

use core::cell::UnsafeCell;

const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;
/// The largest tree the reader accepts (QEMU's are well below 1 MiB).
const MAX_SIZE: usize = 2 << 20;
/// Nodes deeper than this are skipped.
const MAX_DEPTH: usize = 8;

/// A validated device tree blob in memory.
#[derive(Clone, Copy)]
pub struct Fdt {
    blob: &'static [u8],
    structs: &'static [u8],
    strings: &'static [u8],
}

/// One property met in a walk.
pub struct Property<'a> {
    /// The names of the nodes from the root (exclusive) down to the one holding the
    /// property (`["pcie@10000000"]`); the root's properties have an empty path.
    pub path: &'a [&'static str],
    /// The property's name (`"reg"`).
    pub name: &'static str,
    /// Its value, big-endian cells or a NUL-terminated string.
    pub value: &'static [u8],
}

impl Property<'_> {
    /// The name of the node holding the property (`""` for the root).
    pub fn node(&self) -> &'static str {
        self.path.last().copied().unwrap_or("")
    }

    /// The value as a string, without its NUL (the first string of a string list).
    pub fn as_str(&self) -> Option<&'static str> {
        let end = self.value.iter().position(|&b| b == 0)?;
        core::str::from_utf8(&self.value[..end]).ok()
    }

    /// Whether the value, a list of NUL-terminated strings, contains `wanted`.
    pub fn has_string(&self, wanted: &str) -> bool {
        self.value
            .split(|&b| b == 0)
            .any(|s| s == wanted.as_bytes())
    }
}

fn be32(bytes: &[u8], offset: usize) -> Option<u32> {
    let raw = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]))
}

/// The `index`-th cell group of `cells` 32-bit cells of `value`, as one number (one or
/// two cells; `None` past the end or for wider groups).
pub fn cells(value: &[u8], offset_cells: usize, cells: usize) -> Option<u64> {
    match cells {
        1 => be32(value, offset_cells * 4).map(u64::from),
        2 => {
            let high = be32(value, offset_cells * 4)?;
            let low = be32(value, offset_cells * 4 + 4)?;
            Some((u64::from(high) << 32) | u64::from(low))
        }
        _ => None,
    }
}

impl Fdt {
    /// Reads the header of the tree at `paddr`; `None` if there is no valid tree.
    ///
    /// # Safety
    ///
    /// `paddr` must be 0 or the identity-mapped address of readable memory of at least
    /// the tree header's `totalsize` bytes (up to 2 MiB) that is never written again.
    pub unsafe fn from_paddr(paddr: u64) -> Option<Fdt> {
        if paddr == 0 || paddr % 8 != 0 {
            return None;
        }
        // SAFETY: per the contract, at least the 40-byte header is readable.
        let header = unsafe { core::slice::from_raw_parts(paddr as *const u8, 40) };
        if be32(header, 0)? != FDT_MAGIC {
            return None;
        }
        let total = be32(header, 4)? as usize;
        if !(40..=MAX_SIZE).contains(&total) {
            return None;
        }
        // SAFETY: per the contract, `totalsize` bytes are readable and stay unchanged.
        let blob = unsafe { core::slice::from_raw_parts(paddr as *const u8, total) };
        let range = |offset: u32, size: u32| {
            let start = offset as usize;
            blob.get(start..start.checked_add(size as usize)?)
        };
        let structs = range(be32(header, 8)?, be32(header, 36)?)?;
        let strings = range(be32(header, 12)?, be32(header, 32)?)?;
        Some(Fdt {
            blob,
            structs,
            strings,
        })
    }

    /// The blob's size in bytes.
    pub fn size(&self) -> usize {
        self.blob.len()
    }

    /// Calls `visit` with every property of every node (to a depth of 8), in the tree's
    /// order. The walk stops at the end of the tree or at the first malformed token.
    pub fn for_each_property(&self, mut visit: impl FnMut(&Property<'_>)) {
        let mut path: [&'static str; MAX_DEPTH] = [""; MAX_DEPTH];
        let mut depth = 0usize; // nodes open, the root included
        let mut offset = 0usize;
        let s = self.structs;
        while let Some(token) = be32(s, offset) {
            offset += 4;
            match token {
                FDT_BEGIN_NODE => {
                    let Some(len) = s.get(offset..).and_then(|r| r.iter().position(|&b| b == 0))
                    else {
                        return;
                    };
                    let name = core::str::from_utf8(&s[offset..offset + len]).unwrap_or("?");
                    if (1..=MAX_DEPTH).contains(&depth) {
                        path[depth - 1] = name;
                    }
                    depth += 1;
                    offset = (offset + len + 1 + 3) & !3;
                }
                FDT_END_NODE => {
                    let Some(d) = depth.checked_sub(1) else {
                        return;
                    };
                    depth = d;
                }
                FDT_PROP => {
                    let (Some(len), Some(nameoff)) = (be32(s, offset), be32(s, offset + 4)) else {
                        return;
                    };
                    let start = offset + 8;
                    let Some(value) = s.get(start..start.saturating_add(len as usize)) else {
                        return;
                    };
                    offset = (start + len as usize + 3) & !3;
                    let name = self
                        .strings
                        .get(nameoff as usize..)
                        .and_then(|r| {
                            let end = r.iter().position(|&b| b == 0)?;
                            core::str::from_utf8(&r[..end]).ok()
                        })
                        .unwrap_or("");
                    if (1..=MAX_DEPTH + 1).contains(&depth) {
                        visit(&Property {
                            path: &path[..depth - 1],
                            name,
                            value,
                        });
                    }
                }
                FDT_NOP => {}
                FDT_END => return,
                _ => return,
            }
        }
    }
}

/// The largest command line kept (longer ones are cut).
pub const CMDLINE_MAX: usize = 1024;

struct CmdlineBuffer(UnsafeCell<[u8; CMDLINE_MAX]>);

// SAFETY: the buffer is written once, by `copy_cmdline` on the boot CPU before anything
// reads it, and only read afterwards.
unsafe impl Sync for CmdlineBuffer {}

static CMDLINE: CmdlineBuffer = CmdlineBuffer(UnsafeCell::new([0; CMDLINE_MAX]));

/// Copies `/chosen/bootargs` into a static buffer (cut to [`CMDLINE_MAX`] bytes, at a
/// character boundary) and returns it trimmed; empty without one. Call it once.
pub fn copy_cmdline(fdt: &Fdt) -> &'static str {
    let mut found: &[u8] = &[];
    fdt.for_each_property(|p| {
        if p.path == ["chosen"] && p.name == "bootargs" {
            found = p.value.split(|&b| b == 0).next().unwrap_or(&[]);
        }
    });
    let len = found.len().min(CMDLINE_MAX);
    let buffer = CMDLINE.0.get().cast::<u8>();
    // SAFETY: `len <= CMDLINE_MAX`; the buffer is written only here, once, before any
    // reference to it exists (the boot code calls this once).
    unsafe { core::ptr::copy_nonoverlapping(found.as_ptr(), buffer, len) };
    // SAFETY: the first `len` bytes were initialised above and are never written again.
    let bytes = unsafe { core::slice::from_raw_parts(buffer, len) };
    crate::boot::cmdline_text(bytes)
}

/// The RAM the tree's `memory` nodes list (`reg` with two address and two size cells, as
/// on `virt`), in bytes.
pub fn ram_bytes(fdt: &Fdt) -> u64 {
    let mut total = 0u64;
    fdt.for_each_property(|p| {
        if p.path.len() == 1 && p.node().starts_with("memory") && p.name == "reg" {
            let mut i = 0;
            while let Some(size) = cells(p.value, i + 2, 2) {
                total = total.saturating_add(size);
                i += 4;
            }
        }
    });
    total
}
