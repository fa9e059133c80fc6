//! A small executor for the async example guest: a fixed array of up to 64 tasks of one
//! future type, no heap, no dependency.
//!
//! Each task's waker is its index: waking it sets its bit in a ready mask (an atomic, so
//! a waker may be called from anywhere, even twice). [`Executor::run_ready`] polls the
//! tasks whose bit is set, each once, and frees the ones that finished. The kernel's
//! loop drives the device in between and halts when no task is ready
//! ([`crate::boot::wait`]): the driver's `poll` calls the wakers of exactly the sockets
//! that became ready.

use core::future::Future;
use core::pin::Pin;
use core::sync::atomic::{AtomicU64, Ordering};
use core::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

/// Tasks ready to run: bit `i` for task `i`. One executor per guest.
static READY: AtomicU64 = AtomicU64::new(0);

/// The most tasks an executor holds (the bits of [`READY`]).
pub const MAX_TASKS: usize = 64;

fn wake_index(data: *const ()) {
    READY.fetch_or(1 << (data as usize % MAX_TASKS), Ordering::AcqRel);
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(
    |data| RawWaker::new(data, &VTABLE),
    wake_index,
    wake_index,
    |_| {},
);

fn waker(index: usize) -> Waker {
    // SAFETY: the data is a plain index, never dereferenced; every function of the
    // vtable is safe to call with any data and from anywhere, and cloning copies it.
    unsafe { Waker::from_raw(RawWaker::new(index as *const (), &VTABLE)) }
}

/// Up to `N` (at most [`MAX_TASKS`]) tasks of the future type `F`.
pub struct Executor<F: Future<Output = ()>, const N: usize> {
    tasks: [Option<F>; N],
}

impl<F: Future<Output = ()>, const N: usize> Executor<F, N> {
    /// An executor without tasks.
    pub fn new() -> Self {
        assert!(N <= MAX_TASKS, "at most {MAX_TASKS} tasks");
        Executor {
            tasks: [const { None }; N],
        }
    }

    /// Whether a task slot is free.
    pub fn has_room(&self) -> bool {
        self.tasks.iter().any(Option::is_none)
    }

    /// Tasks that have not finished.
    pub fn len(&self) -> usize {
        self.tasks.iter().filter(|t| t.is_some()).count()
    }

    /// Whether there are no tasks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds `task` and marks it ready; gives it back when every slot is taken.
    pub fn spawn(self: Pin<&mut Self>, task: F) -> Result<(), F> {
        // SAFETY: only an empty slot is written; no task moves.
        let this = unsafe { self.get_unchecked_mut() };
        let Some(index) = this.tasks.iter().position(Option::is_none) else {
            return Err(task);
        };
        this.tasks[index] = Some(task);
        READY.fetch_or(1 << index, Ordering::AcqRel);
        Ok(())
    }

    /// Whether a task is ready to run.
    pub fn any_ready(&self) -> bool {
        READY.load(Ordering::Acquire) != 0
    }

    /// Polls every ready task once; returns how many ran.
    pub fn run_ready(self: Pin<&mut Self>) -> usize {
        // SAFETY: the tasks are never moved out of their slots while they live (a slot
        // is only overwritten by `spawn` when empty, or emptied in place below), and
        // `self` is pinned, so each task stays where it was first polled.
        let this = unsafe { self.get_unchecked_mut() };
        let ready = READY.swap(0, Ordering::AcqRel);
        let mut ran = 0;
        for index in 0..N {
            if ready & (1 << index) == 0 {
                continue;
            }
            let Some(task) = this.tasks[index].as_mut() else {
                continue;
            };
            ran += 1;
            // SAFETY: as above: the task stays in its slot until it is dropped there.
            let task = unsafe { Pin::new_unchecked(task) };
            let waker = waker(index);
            if let Poll::Ready(()) = task.poll(&mut Context::from_waker(&waker)) {
                this.tasks[index] = None;
            }
        }
        ran
    }
}

impl<F: Future<Output = ()>, const N: usize> Default for Executor<F, N> {
    fn default() -> Self {
        Self::new()
    }
}
