//! [`BootHal`]: the `virtio_drivers::Hal` for the identity-mapped boot environment.

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

use super::arch;

/// Size of the DMA pool, in bytes (32 MiB, in `.bss`).
pub const DMA_POOL_SIZE: usize = 32 << 20;
const DMA_POOL_PAGES: usize = DMA_POOL_SIZE / PAGE_SIZE;

/// The pool's memory. It is left uninitialised: `dma_alloc` zeroes each range it hands
/// out, so the entry code need not clear 32 MiB at boot (under nested `kvm_pvm`, where
/// ring-0 code is emulated, that took about 3 s).
#[repr(C, align(4096))]
struct DmaPool(UnsafeCell<MaybeUninit<[u8; DMA_POOL_SIZE]>>);

// SAFETY: the pool is only accessed through `dma_alloc`, which hands out disjoint ranges
// (the bump index is advanced atomically) and never hands a range out twice.
unsafe impl Sync for DmaPool {}

/// In `.bss.noinit`, which the linker script keeps out of the `.bss` range the entry code
/// zeroes.
#[unsafe(link_section = ".bss.noinit.dma_pool")]
static DMA_POOL: DmaPool = DmaPool(UnsafeCell::new(MaybeUninit::uninit()));
/// Number of pool pages handed out so far.
static DMA_NEXT: AtomicUsize = AtomicUsize::new(0);

/// The virtio HAL of the boot environment, where virtual addresses equal physical ones.
///
/// * DMA memory comes from a bump allocator over a 32 MiB, page-aligned static pool
///   ([`DMA_POOL_SIZE`]). When it is exhausted `dma_alloc` returns `(0, dangling)`, which
///   `virtio_drivers` reports as `Error::DmaError`; it never panics.
/// * `dma_dealloc` does **not** reuse memory: it only returns 0 (success). Drivers are
///   expected to allocate their queues and buffers once; a program that keeps creating
///   and dropping devices will eventually run out of pool.
/// * `mmio_phys_to_virt`, `share` and `unshare` are identities (buffers are shared in
///   place, no bounce buffers). `mmio_phys_to_virt` also makes sure the region is mapped
///   as device memory (`arch::map_mmio`: on x86-64 regions above 4 GiB, such as 64-bit
///   PCI BARs, are mapped on demand; on aarch64 the boot code's map covers every MMIO
///   window of QEMU `virt`).
/// * The device's DMA is taken to be cache-coherent (as it is under QEMU and KVM): the
///   pool is ordinary cacheable memory, and nothing cleans or invalidates caches around
///   a transfer. A machine whose DMA is not coherent needs a `Hal` that does.
pub struct BootHal;

/// Returns how many bytes of the DMA pool have been handed out.
pub fn dma_used() -> usize {
    DMA_NEXT.load(Ordering::Relaxed) * PAGE_SIZE
}

// SAFETY: `dma_alloc` returns zeroed, page-aligned, never-aliased ranges of a static pool
// whose physical address equals its virtual address; `mmio_phys_to_virt` returns the
// (identity-mapped) physical address; `share` returns the physical address of the buffer.
unsafe impl Hal for BootHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let claimed = DMA_NEXT.fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
            next.checked_add(pages).filter(|&end| end <= DMA_POOL_PAGES)
        });
        let Ok(first) = claimed else {
            log::warn!(
                "BootHal: DMA pool exhausted ({pages} pages requested, {} of {DMA_POOL_PAGES} used)",
                DMA_NEXT.load(Ordering::Relaxed)
            );
            return (0, NonNull::dangling());
        };
        // SAFETY: `first + pages <= DMA_POOL_PAGES`, so the offset stays inside the pool.
        let start = unsafe { DMA_POOL.0.get().cast::<u8>().add(first * PAGE_SIZE) };
        // SAFETY: the range `[start, start + pages * PAGE_SIZE)` lies in the pool and was
        // just claimed exclusively by the `fetch_update` above.
        unsafe { start.write_bytes(0, pages * PAGE_SIZE) };
        // The pool lives in `.bss`, far above address 0, so the pointer is non-null.
        let vaddr = NonNull::new(start).unwrap_or(NonNull::dangling());
        (start as PhysAddr, vaddr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // Memory is never reused: see the type's documentation.
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        if let Err(error) = arch::map_mmio(paddr, size as u64) {
            panic!("BootHal: cannot map MMIO region {paddr:#x}+{size:#x}: {error:?}");
        }
        NonNull::new(paddr as *mut u8).expect("BootHal: MMIO region at physical address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
