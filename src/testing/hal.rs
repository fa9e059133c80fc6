//! Host memory standing in for DMA memory, with a table from simulated physical addresses
//! back to the allocations.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::vec::Vec;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

struct Region {
    paddr: PhysAddr,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the table only stores pointers; every access through them happens under the
// table's lock or in the single-threaded device model of the test that owns the region.
unsafe impl Send for Region {}

struct Table {
    regions: Vec<Region>,
    next_paddr: PhysAddr,
}

static TABLE: Mutex<Table> = Mutex::new(Table {
    regions: Vec::new(),
    next_paddr: 0x4000_0000,
});

fn table() -> std::sync::MutexGuard<'static, Table> {
    TABLE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A [`Hal`] for host tests: DMA pages come from the host allocator and get unique
/// simulated physical addresses.
#[derive(Debug)]
pub struct FakeHal;

impl FakeHal {
    /// A pointer to `len` bytes at simulated physical address `paddr`, if they lie inside
    /// one live DMA allocation.
    pub fn phys_to_ptr(paddr: PhysAddr, len: usize) -> Option<NonNull<u8>> {
        let table = table();
        let region = table
            .regions
            .iter()
            .find(|r| paddr >= r.paddr && (paddr - r.paddr) as usize + len <= r.len)?;
        let offset = (paddr - region.paddr) as usize;
        // In bounds of the allocation, checked above; provenance comes from `region.ptr`.
        NonNull::new(region.ptr.as_ptr().wrapping_add(offset))
    }

    /// Number of live DMA allocations (for leak checks).
    pub fn live_allocations() -> usize {
        table().regions.len()
    }
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned memory from the global allocator that no
// one else references until `dma_dealloc` returns it; the other methods only translate.
unsafe impl Hal for FakeHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let len = pages.max(1) * PAGE_SIZE;
        let Ok(layout) = Layout::from_size_align(len, PAGE_SIZE) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a non-zero size.
        let Some(ptr) = NonNull::new(unsafe { alloc_zeroed(layout) }) else {
            return (0, NonNull::dangling());
        };
        let mut table = table();
        let paddr = table.next_paddr;
        // Leave a guard page between regions so overruns do not land in a neighbour.
        table.next_paddr += (len + PAGE_SIZE) as PhysAddr;
        table.regions.push(Region { paddr, ptr, len });
        (paddr, ptr)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let mut table = table();
        let Some(position) = table
            .regions
            .iter()
            .position(|r| r.paddr == paddr && r.ptr == vaddr && r.len == pages * PAGE_SIZE)
        else {
            return -1;
        };
        let region = table.regions.swap_remove(position);
        let Ok(layout) = Layout::from_size_align(region.len, PAGE_SIZE) else {
            return -1;
        };
        // SAFETY: the region was allocated by `dma_alloc` with this layout and is freed once
        // (it was just removed from the table).
        unsafe { dealloc(region.ptr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        FakeHal::phys_to_ptr(paddr, size).unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        // The driver shares no buffers of its own: all its DMA memory comes from dma_alloc.
        // Report the buffer's own address; the model never dereferences it.
        buffer.cast::<u8>().as_ptr().addr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
