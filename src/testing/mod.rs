//! A device model for host tests (feature `testing`): a fake [`Hal`](virtio_drivers::Hal)
//! whose DMA memory is ordinary host memory, a fake
//! [`Transport`](virtio_drivers::transport::Transport), and [`DeviceModel`], the device side
//! of the three virtqueues, stepped by the test itself (no threads, so runs are
//! deterministic).
//!
//! Simulated physical addresses map back to memory through a table, never through
//! integer-to-pointer casts, so Miri's strict provenance checks accept the model.

mod hal;
mod model;
mod transport;

pub use hal::FakeHal;
pub use model::{DeviceModel, ModelError, Packet};
pub use transport::{FakeTransport, QueueRegs, TransportState};
