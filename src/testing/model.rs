//! The device side of the rx, tx and event virtqueues, stepped by the test.

use super::hal::FakeHal;
use super::transport::{FakeTransport, QueueRegs};
use crate::wire::{Header, Op, HEADER_LEN};
use std::collections::HashMap;
use std::vec::Vec;
use virtio_drivers::PhysAddr;

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VIRTIO_F_RING_EVENT_IDX`.
const EVENT_IDX: u64 = 1 << 29;

/// A packet taken from, or given to, the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// The header.
    pub header: Header,
    /// The payload (`header.len` bytes).
    pub payload: Vec<u8>,
}

/// Why the model could not do what the test asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelError {
    /// The driver has set up no such queue yet.
    QueueNotReady,
    /// The driver has posted no free buffer on that queue.
    NoBuffer,
    /// The posted buffer is too small for the packet.
    BufferTooSmall,
    /// A descriptor did not have the direction or address the model expected.
    BadDescriptor,
}

/// The device: takes what the driver posts and returns used buffers, as a real device
/// would, but only when the test calls it.
///
/// It also checks B43 on every packet the driver puts on the tx ring, whichever call
/// takes it: per connection, `fwd_cnt` and `buf_alloc` never go backwards in ring order
/// (compared as wrapping `u32`s, as a peer that takes every header at face value does).
/// A packet that breaks it panics, so every test that runs the model checks the rule.
#[derive(Debug)]
pub struct DeviceModel {
    transport: FakeTransport,
    last_avail: [u16; 3],
    used_idx: [u16; 3],
    /// The credit fields of the last packet of each connection on the tx ring, by
    /// (guest port, peer CID, peer port): `(buf_alloc, fwd_cnt)`.
    credit_sent: HashMap<(u32, u64, u32), (u32, u32)>,
}

fn read_bytes(paddr: PhysAddr, out: &mut [u8]) -> bool {
    let Some(ptr) = FakeHal::phys_to_ptr(paddr, out.len()) else {
        return false;
    };
    // SAFETY: `phys_to_ptr` checked that `out.len()` bytes at `ptr` lie inside one live DMA
    // allocation; the test is single-threaded, so the driver is not touching it now.
    unsafe { core::ptr::copy_nonoverlapping(ptr.as_ptr(), out.as_mut_ptr(), out.len()) };
    true
}

fn write_bytes(paddr: PhysAddr, bytes: &[u8]) -> bool {
    let Some(ptr) = FakeHal::phys_to_ptr(paddr, bytes.len()) else {
        return false;
    };
    // SAFETY: as in `read_bytes`; the region is DMA memory, which the device may write.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.as_ptr(), bytes.len()) };
    true
}

fn read_u16(paddr: PhysAddr) -> u16 {
    let mut raw = [0u8; 2];
    read_bytes(paddr, &mut raw);
    u16::from_le_bytes(raw)
}

fn read_u32(paddr: PhysAddr) -> u32 {
    let mut raw = [0u8; 4];
    read_bytes(paddr, &mut raw);
    u32::from_le_bytes(raw)
}

fn read_u64(paddr: PhysAddr) -> u64 {
    let mut raw = [0u8; 8];
    read_bytes(paddr, &mut raw);
    u64::from_le_bytes(raw)
}

/// A descriptor as the driver wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Descriptor {
    addr: PhysAddr,
    len: u32,
    flags: u16,
}

impl DeviceModel {
    /// The device behind `transport`.
    pub fn new(transport: &FakeTransport) -> Self {
        DeviceModel {
            transport: transport.clone(),
            last_avail: [0; 3],
            used_idx: [0; 3],
            credit_sent: HashMap::new(),
        }
    }

    fn regs(&self, queue: usize) -> Result<QueueRegs, ModelError> {
        let regs = self.transport.state().queues[queue];
        if regs.ready && regs.size > 0 {
            Ok(regs)
        } else {
            Err(ModelError::QueueNotReady)
        }
    }

    /// Buffers the driver has posted on `queue` that the device has not taken yet.
    pub fn available(&self, queue: usize) -> usize {
        let Ok(regs) = self.regs(queue) else {
            return 0;
        };
        usize::from(read_u16(regs.driver + 2).wrapping_sub(self.last_avail[queue]))
    }

    /// Notifications the driver has sent on `queue` (0 rx, 1 tx, 2 event).
    pub fn notifications(&self, queue: usize) -> u64 {
        self.transport.state().queues[queue].notifications
    }

    /// Number of descriptors of `queue` as the driver set it up (0 before it did).
    pub fn queue_size(&self, queue: usize) -> u16 {
        self.regs(queue).map_or(0, |regs| regs.size as u16)
    }

    /// Length of the next buffer the driver made available on `queue`, without taking it.
    pub fn next_buffer_len(&self, queue: usize) -> Option<u32> {
        let regs = self.regs(queue).ok()?;
        let size = regs.size as u16;
        if read_u16(regs.driver + 2) == self.last_avail[queue] {
            return None;
        }
        let slot = self.last_avail[queue] % size;
        let id = read_u16(regs.driver + 4 + 2 * PhysAddr::from(slot));
        if id >= size {
            return None;
        }
        Some(read_u32(regs.desc + 16 * PhysAddr::from(id) + 8))
    }

    /// Takes the next descriptor id the driver made available on `queue`.
    fn next_available(&mut self, queue: usize) -> Result<(u16, Descriptor), ModelError> {
        let regs = self.regs(queue)?;
        let size = regs.size as u16;
        let avail_idx = read_u16(regs.driver + 2);
        if avail_idx == self.last_avail[queue] {
            return Err(ModelError::NoBuffer);
        }
        let slot = self.last_avail[queue] % size;
        let id = read_u16(regs.driver + 4 + 2 * PhysAddr::from(slot));
        self.last_avail[queue] = self.last_avail[queue].wrapping_add(1);
        // avail_event: ask to be notified of the very next buffer.
        let avail_event = regs.device + 4 + 8 * PhysAddr::from(size);
        write_bytes(avail_event, &self.last_avail[queue].to_le_bytes());
        if id >= size {
            return Err(ModelError::BadDescriptor);
        }
        let desc = regs.desc + 16 * PhysAddr::from(id);
        Ok((
            id,
            Descriptor {
                addr: read_u64(desc),
                len: read_u32(desc + 8),
                flags: read_u16(desc + 12),
            },
        ))
    }

    /// Returns descriptor `id` to the driver on `queue` with `len` bytes written. Any
    /// values may be passed, to play a device that lies. The used ring has one slot per
    /// descriptor: more entries than the driver has read overwrite the oldest.
    ///
    /// Then interrupts as a device does (virtio 1.2, 2.7.10): with `VIRTIO_F_EVENT_IDX`
    /// negotiated when the new used index passes the driver's `used_event`, without it
    /// unless the available ring's `VIRTQ_AVAIL_F_NO_INTERRUPT` flag is set. An interrupt
    /// sets the transport's interrupt status and counts in [`QueueRegs::interrupts`].
    pub fn push_used(&mut self, queue: usize, id: u32, len: u32) -> Result<(), ModelError> {
        let regs = self.regs(queue)?;
        let slot = PhysAddr::from(self.used_idx[queue] % regs.size as u16);
        let entry = regs.device + 4 + 8 * slot;
        write_bytes(entry, &id.to_le_bytes());
        write_bytes(entry + 4, &len.to_le_bytes());
        let old = self.used_idx[queue];
        self.used_idx[queue] = old.wrapping_add(1);
        write_bytes(regs.device + 2, &self.used_idx[queue].to_le_bytes());
        let event_idx = self.transport.state().driver_features & EVENT_IDX != 0;
        let interrupt = if event_idx {
            let used_event = read_u16(regs.driver + 4 + 2 * PhysAddr::from(regs.size));
            let new = self.used_idx[queue];
            // vring_need_event: did the new index pass `used_event`?
            new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            read_u16(regs.driver) & AVAIL_F_NO_INTERRUPT == 0
        };
        if interrupt {
            let mut state = self.transport.state();
            state.interrupt_pending = true;
            state.queues[queue].interrupts += 1;
        }
        Ok(())
    }

    /// Interrupts the device raised for `queue`'s used buffers so far.
    pub fn interrupts(&self, queue: usize) -> u64 {
        self.transport.state().queues[queue].interrupts
    }

    /// Checks B43 for a header the driver put on the tx ring (see [`DeviceModel`]).
    /// A REQUEST or RESPONSE starts a connection's record anew; an RST ends it (its
    /// fields are not checked: nothing follows it, and an RST for no connection carries
    /// zeros, B9).
    ///
    /// # Panics
    ///
    /// When `fwd_cnt` or `buf_alloc` went backwards since the connection's last packet.
    fn check_credit_order(&mut self, header: &Header) {
        let tuple = (header.src_port, header.dst_cid, header.dst_port);
        let fields = (header.buf_alloc, header.fwd_cnt);
        match header.op() {
            Some(Op::Request | Op::Response) => {
                self.credit_sent.insert(tuple, fields);
            }
            Some(Op::Rst) => {
                self.credit_sent.remove(&tuple);
            }
            _ => {
                if let Some((buf_alloc, fwd_cnt)) = self.credit_sent.insert(tuple, fields) {
                    let backwards = |new: u32, old: u32| (new.wrapping_sub(old) as i32) < 0;
                    assert!(
                        !backwards(header.fwd_cnt, fwd_cnt)
                            && !backwards(header.buf_alloc, buf_alloc),
                        "B43: op {} of guest port {} to {}:{} carries buf_alloc {} fwd_cnt {} \
                         after a packet with buf_alloc {buf_alloc} fwd_cnt {fwd_cnt}",
                        header.op,
                        header.src_port,
                        header.dst_cid,
                        header.dst_port,
                        header.buf_alloc,
                        header.fwd_cnt
                    );
                }
            }
        }
    }

    /// Takes the next packet the driver sent, and returns its buffer.
    pub fn pop_tx(&mut self) -> Option<Packet> {
        let (id, desc) = self.next_available(TX).ok()?;
        let mut bytes = std::vec![0u8; desc.len as usize];
        let ok = desc.flags & DESC_F_WRITE == 0 && read_bytes(desc.addr, &mut bytes);
        self.push_used(TX, u32::from(id), 0).ok()?;
        if !ok {
            return None;
        }
        let header = Header::parse(&bytes).ok()?;
        self.check_credit_order(&header);
        let payload = bytes
            .get(HEADER_LEN..HEADER_LEN + header.len as usize)?
            .to_vec();
        Some(Packet { header, payload })
    }

    /// Takes the next buffer the driver put on the tx ring, whatever it holds, and returns
    /// it: all the bytes the descriptor covers. `None` when the ring is empty;
    /// `Some(Err(_))` for a descriptor the device could not read (wrong direction or
    /// address), which is returned as used all the same.
    pub fn pop_tx_bytes(&mut self) -> Option<Result<Vec<u8>, ModelError>> {
        let (id, desc) = match self.next_available(TX) {
            Ok(next) => next,
            Err(ModelError::NoBuffer | ModelError::QueueNotReady) => return None,
            Err(e) => return Some(Err(e)),
        };
        let mut bytes = std::vec![0u8; desc.len as usize];
        let ok = desc.flags & DESC_F_WRITE == 0 && read_bytes(desc.addr, &mut bytes);
        if let Err(e) = self.push_used(TX, u32::from(id), 0) {
            return Some(Err(e));
        }
        if let Some(header) = ok.then(|| Header::parse(&bytes).ok()).flatten() {
            self.check_credit_order(&header);
        }
        Some(if ok {
            Ok(bytes)
        } else {
            Err(ModelError::BadDescriptor)
        })
    }

    /// Takes every packet the driver has sent so far.
    pub fn drain_tx(&mut self) -> Vec<Packet> {
        core::iter::from_fn(|| self.pop_tx()).collect()
    }

    /// Writes `bytes` into the next rx buffer and returns it with `used_len` as the written
    /// length (normally `bytes.len()`; anything, to play a lying device).
    pub fn deliver_raw(&mut self, bytes: &[u8], used_len: u32) -> Result<u16, ModelError> {
        let (id, desc) = self.next_available(RX)?;
        if desc.flags & DESC_F_WRITE == 0 {
            return Err(ModelError::BadDescriptor);
        }
        if bytes.len() > desc.len as usize {
            self.push_used(RX, u32::from(id), 0)?;
            return Err(ModelError::BufferTooSmall);
        }
        if !write_bytes(desc.addr, bytes) {
            return Err(ModelError::BadDescriptor);
        }
        self.push_used(RX, u32::from(id), used_len)?;
        Ok(id)
    }

    /// Writes `bytes` into rx buffer `id` again, after it was returned to the driver: a
    /// device that breaks the virtio contract by writing a buffer the driver owns.
    pub fn overwrite_rx_buffer(&mut self, id: u16, bytes: &[u8]) -> Result<(), ModelError> {
        let regs = self.regs(RX)?;
        if u32::from(id) >= regs.size {
            return Err(ModelError::BadDescriptor);
        }
        let addr = read_u64(regs.desc + 16 * PhysAddr::from(id));
        if !write_bytes(addr, bytes) {
            return Err(ModelError::BadDescriptor);
        }
        Ok(())
    }

    /// Delivers one packet to the driver; `header.len` is set from `payload`.
    pub fn deliver(&mut self, header: &Header, payload: &[u8]) -> Result<(), ModelError> {
        let mut bytes = std::vec![0u8; HEADER_LEN + payload.len()];
        let header = Header {
            len: payload.len() as u32,
            ..*header
        };
        header
            .emit(&mut bytes)
            .map_err(|_| ModelError::BufferTooSmall)?;
        bytes[HEADER_LEN..].copy_from_slice(payload);
        let len = bytes.len() as u32;
        self.deliver_raw(&bytes, len).map(|_| ())
    }

    /// Sends device event `id` (0 is `TRANSPORT_RESET`) on the event queue.
    pub fn push_event(&mut self, id: u32) -> Result<(), ModelError> {
        let (desc_id, desc) = self.next_available(EVENT)?;
        if desc.len < 4 || !write_bytes(desc.addr, &id.to_le_bytes()) {
            return Err(ModelError::BufferTooSmall);
        }
        self.push_used(EVENT, u32::from(desc_id), 4)
    }

    /// Changes the CID in config space (and its generation), as before a transport reset.
    pub fn set_guest_cid(&mut self, cid: u64) {
        let mut state = self.transport.state();
        state.config = cid.to_le_bytes();
        state.config_generation = state.config_generation.wrapping_add(1);
    }
}
