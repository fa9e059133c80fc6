//! The guests' global allocator: a linked-list heap over an arena the guest hands over.
//!
//! The bare-metal examples are built with `virtio-drivers`' `alloc` feature (the benchmark
//! guest runs its socket driver, which allocates), and a binary that links `alloc` must
//! name a global allocator. So every example has one, but it starts **empty**: until the
//! guest calls [`init`], every allocation fails (and so panics). The examples that need
//! no heap (echo, client, probe; vsock-guest itself never allocates) never call it.

use core::sync::atomic::{AtomicBool, Ordering};

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

static INITIALISED: AtomicBool = AtomicBool::new(false);

/// Makes `arena` the heap. Only the first call has an effect; it returns whether this
/// call set the heap up.
pub fn init(arena: &'static mut [u8]) -> bool {
    if INITIALISED.swap(true, Ordering::AcqRel) {
        return false;
    }
    // SAFETY: `arena` is a `'static` exclusive borrow, so the memory is valid for the
    // rest of the program and nothing else uses it; the flag above makes this the only
    // initialisation.
    unsafe { HEAP.lock().init(arena.as_mut_ptr(), arena.len()) };
    true
}

/// Bytes of the heap in use.
pub fn used() -> usize {
    HEAP.lock().used()
}

/// Bytes of the heap (0 before [`init`]).
pub fn size() -> usize {
    HEAP.lock().size()
}
