//! A `no_std`, heap-free driver for the virtio socket device (vsock), with the stream
//! socket semantics of `AF_VSOCK` (`vsock(4)`) as a polling API.
//!
//! One [`VsockDevice`] owns the device's queues and a fixed table of sockets, addressed by
//! copyable [`SocketHandle`]s. Every call returns at once; all progress happens in
//! [`VsockDevice::poll`], with time passed in by the caller.
#![no_std]
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]

// The host-side device model uses the host allocator and locks.
#[cfg(any(test, feature = "testing"))]
extern crate std;

pub mod addr;
pub mod conn;
pub mod credit;
pub mod device;
pub mod error;
pub mod queue;
pub mod socket;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
pub mod wire;

pub use addr::{
    VsockAddr, VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL,
    VMADDR_PORT_ANY,
};
pub use device::Stats;
pub use error::{Error, Result};
pub use socket::{Config, Readiness, Shutdown, SocketHandle, SocketSlot, VsockDevice};
pub use time::Instant;
