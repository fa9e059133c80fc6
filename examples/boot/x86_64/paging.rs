//! Identity mapping of physical regions above 4 GiB.
//!
//! The entry code identity-maps the first 4 GiB with 2 MiB pages, which covers RAM
//! below 4 GiB, the q35 ECAM window (0xB000_0000), the 32-bit PCI hole and the
//! virtio-mmio slots of `microvm`. Anything above that — in practice 64-bit PCI BARs —
//! must be mapped before use with [`identity_map`], which adds 2 MiB identity pages
//! (cache-disabled, as such regions are MMIO) using page-table pages from a small
//! static pool. [`crate::boot::hal::BootHal::mmio_phys_to_virt`] calls it for every BAR region
//! the virtio transport maps.

use core::cell::UnsafeCell;

use spin::Mutex;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
/// Ring 3 may use the page (see [`super::ring3`]).
const USER: u64 = 1 << 2;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
const PAGE_2M: u64 = 2 << 20;
/// The x86-64 4-level paging limit on physical (here: identity) addresses is 2^52, but
/// with 4-level paging only 2^48 of virtual address space exists.
const MAX_ADDRESS: u64 = 1 << 47;

/// Number of page-table pages available for mappings above 4 GiB. Each page directory
/// covers 1 GiB; each PDPT covers 512 GiB.
const POOL_PAGES: usize = 16;

#[repr(C, align(4096))]
struct Table([u64; 512]);

struct Pool(UnsafeCell<[Table; POOL_PAGES]>);

// SAFETY: the pool's pages are handed out under the `NEXT` lock and are only accessed
// through the page-table walk in `identity_map`, which runs under the same lock.
unsafe impl Sync for Pool {}

static POOL: Pool = Pool(UnsafeCell::new([const { Table([0; 512]) }; POOL_PAGES]));
/// Index of the next unused pool page; also serialises all page-table updates.
static NEXT: Mutex<usize> = Mutex::new(0);

/// Why a region could not be mapped.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum MapError {
    /// The region reaches beyond the 48-bit address space of 4-level paging.
    OutOfRange,
    /// The static pool of page-table pages is used up.
    NoTablePages,
}

/// Makes sure `paddr..paddr + size` is identity-mapped (readable and writable). Regions
/// below 4 GiB are always mapped; regions above get 2 MiB cache-disabled pages.
/// Mapping an already-mapped region again is a no-op.
pub fn identity_map(paddr: u64, size: u64) -> Result<(), MapError> {
    let end = paddr.checked_add(size.max(1)).ok_or(MapError::OutOfRange)?;
    if end <= 1 << 32 {
        return Ok(());
    }
    if end > MAX_ADDRESS {
        return Err(MapError::OutOfRange);
    }
    let mut next = NEXT.lock();
    // The boot code's PML4 (what CR3 holds; CR3 cannot be read from ring 3).
    let pml4 = (&raw const boot_pml4) as u64;
    let mut page = paddr & !(PAGE_2M - 1);
    while page < end {
        let pdpt = next_table(pml4, (page >> 39) & 511, &mut next)?;
        let pd = next_table(pdpt, (page >> 30) & 511, &mut next)?;
        let entry = (pd + 8 * ((page >> 21) & 511)) as *mut u64;
        // SAFETY: `pd` is a page directory reachable from CR3 (from the boot code or the
        // pool), identity-mapped, and page-table updates are serialised by `NEXT`.
        unsafe {
            if entry.read_volatile() & PRESENT == 0 {
                entry.write_volatile(
                    page | PRESENT | WRITABLE | USER | HUGE | WRITE_THROUGH | CACHE_DISABLE,
                );
            }
        }
        page += PAGE_2M;
    }
    // Only not-present entries changed, and the CPU caches no translation or
    // paging-structure entry that is not present: nothing to flush (which ring 3 could
    // not do anyway).
    Ok(())
}

/// Returns the physical address of the table that entry `index` of `table` points to,
/// creating it from the pool if the entry is not present.
fn next_table(table: u64, index: u64, next: &mut usize) -> Result<u64, MapError> {
    let entry = (table + 8 * index) as *mut u64;
    // SAFETY: `table` is a paging structure reachable from CR3, identity-mapped; updates
    // are serialised by the `NEXT` lock held by the caller.
    let value = unsafe { entry.read_volatile() };
    if value & PRESENT != 0 {
        // A 1 GiB page (PS in a PDPT entry) is not created by this module or the entry
        // code, so a present entry here always points at a table.
        return Ok(value & ADDRESS_MASK);
    }
    if *next >= POOL_PAGES {
        return Err(MapError::NoTablePages);
    }
    // SAFETY: page `*next` of the pool has not been handed out yet (the index only grows,
    // under the lock); it is zero, as `.bss` was zeroed at boot.
    let new = unsafe { (*POOL.0.get()).as_mut_ptr().add(*next) } as u64;
    *next += 1;
    // SAFETY: as above for `entry`; `new` is a zeroed, 4 KiB-aligned, identity-mapped page.
    unsafe { entry.write_volatile(new | PRESENT | WRITABLE | USER) };
    Ok(new)
}

unsafe extern "C" {
    /// The PML4 the entry code built and loaded into CR3 ([`super::start`]).
    static boot_pml4: u8;
}
