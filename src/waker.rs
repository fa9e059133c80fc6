//! The task waiting for one kind of readiness of one socket (feature `async`), in the
//! style of smoltcp's `register_recv_waker`: a task that found a socket not ready
//! registers its [`Waker`], and [`VsockDevice::poll`](crate::VsockDevice::poll) wakes it
//! once the socket becomes ready. No allocation, no executor: the [`Waker`] is the
//! executor's.

use core::task::Waker;

/// At most one task's [`Waker`], woken once.
#[derive(Debug, Default)]
pub struct WakerSlot(Option<Waker>);

impl WakerSlot {
    /// No task waits.
    pub const EMPTY: WakerSlot = WakerSlot(None);

    /// Registers `waker`. A different task that was registered is woken (it must look
    /// again: one task waits per socket and direction, as in smoltcp and embassy).
    pub fn register(&mut self, waker: &Waker) {
        match &self.0 {
            Some(registered) if registered.will_wake(waker) => {}
            _ => {
                if let Some(replaced) = self.0.replace(waker.clone()) {
                    replaced.wake();
                }
            }
        }
    }

    /// Wakes the registered task, if any, and forgets it: it is woken once, and
    /// registers again if it still waits.
    pub fn wake(&mut self) {
        if let Some(waker) = self.0.take() {
            waker.wake();
        }
    }

    /// Whether a task is registered.
    pub fn is_registered(&self) -> bool {
        self.0.is_some()
    }
}
