//! A fake virtio transport: registers in plain memory, shared with the [`DeviceModel`].
//!
//! [`DeviceModel`]: super::DeviceModel

use std::sync::{Arc, Mutex, MutexGuard};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error, PhysAddr};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// One queue as the driver registered it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRegs {
    /// Number of descriptors.
    pub size: u32,
    /// Physical address of the descriptor table.
    pub desc: PhysAddr,
    /// Physical address of the available ring.
    pub driver: PhysAddr,
    /// Physical address of the used ring.
    pub device: PhysAddr,
    /// Whether the queue is set up.
    pub ready: bool,
    /// Notifications the driver sent on this queue.
    pub notifications: u64,
    /// Interrupts the device raised for this queue's used buffers (see
    /// [`DeviceModel`](super::DeviceModel)).
    pub interrupts: u64,
}

/// The transport's registers and config space.
#[derive(Clone, Debug)]
pub struct TransportState {
    /// Device type reported to the driver.
    pub device_type: DeviceType,
    /// Feature bits the device offers.
    pub device_features: u64,
    /// Feature bits the driver accepted.
    pub driver_features: u64,
    /// Device status register.
    pub status: DeviceStatus,
    /// Largest queue size the device supports.
    pub max_queue_size: u32,
    /// The three queues (rx, tx, event).
    pub queues: [QueueRegs; 3],
    /// Device config space: `guest_cid` (le64).
    pub config: [u8; 8],
    /// Config generation counter.
    pub config_generation: u32,
    /// The interrupt status register's used-buffer bit: set when the device interrupts,
    /// cleared by the driver's `ack_interrupt`.
    pub interrupt_pending: bool,
}

/// A [`Transport`] over a [`TransportState`] shared with the test.
#[derive(Clone, Debug)]
pub struct FakeTransport {
    state: Arc<Mutex<TransportState>>,
}

impl FakeTransport {
    /// A socket device with CID `guest_cid` offering `device_features`.
    pub fn new(guest_cid: u64, device_features: u64) -> Self {
        FakeTransport {
            state: Arc::new(Mutex::new(TransportState {
                device_type: DeviceType::Socket,
                device_features,
                driver_features: 0,
                status: DeviceStatus::empty(),
                max_queue_size: 128,
                queues: [QueueRegs::default(); 3],
                config: guest_cid.to_le_bytes(),
                config_generation: 0,
                interrupt_pending: false,
            })),
        }
    }

    /// The shared state, locked.
    pub fn state(&self) -> MutexGuard<'_, TransportState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn queue(&self, queue: u16) -> Option<usize> {
        let index = usize::from(queue);
        (index < 3).then_some(index)
    }
}

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        self.state().device_type
    }

    fn read_device_features(&mut self) -> u64 {
        self.state().device_features
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.state().driver_features = driver_features;
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        self.state().max_queue_size
    }

    fn notify(&mut self, queue: u16) {
        if let Some(index) = self.queue(queue) {
            self.state().queues[index].notifications += 1;
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.state().status
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.state().status = status;
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        if let Some(index) = self.queue(queue) {
            self.state().queues[index] = QueueRegs {
                size,
                desc: descriptors,
                driver: driver_area,
                device: device_area,
                ready: true,
                notifications: 0,
                interrupts: 0,
            };
        }
    }

    fn queue_unset(&mut self, queue: u16) {
        if let Some(index) = self.queue(queue) {
            self.state().queues[index] = QueueRegs::default();
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.queue(queue)
            .is_some_and(|index| self.state().queues[index].ready)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let mut state = self.state();
        if std::mem::take(&mut state.interrupt_pending) {
            InterruptStatus::QUEUE_INTERRUPT
        } else {
            InterruptStatus::empty()
        }
    }

    fn read_config_generation(&self) -> u32 {
        self.state().config_generation
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, Error> {
        let state = self.state();
        let bytes = state
            .config
            .get(offset..)
            .ok_or(Error::ConfigSpaceTooSmall)?;
        T::read_from_prefix(bytes)
            .map(|(value, _)| value)
            .map_err(|_| Error::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> Result<(), Error> {
        Err(Error::Unsupported)
    }
}
