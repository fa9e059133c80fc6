//! Split virtqueues (virtio 1.x, 2.7) in `Hal::dma_alloc` memory, each with a fixed pool of
//! equally sized buffers: descriptor `i` always points at buffer `i`, one descriptor per
//! packet (B4). This is the only module that touches memory the device shares.
//!
//! The driver keeps its own shadow of everything it needs (which ids are posted, its
//! indices); values the device writes (used-ring ids and lengths) are checked before they
//! are used (B6).

use crate::error::Error;
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};
use virtio_drivers::transport::Transport;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// The largest queue this driver sets up; the device's maximum may be smaller.
pub const MAX_QUEUE_SIZE: usize = 256;

const DESC_SIZE: usize = 16;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
const POSTED_WORDS: usize = MAX_QUEUE_SIZE / 64;

const fn align_up(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}

/// Pages of `Hal::dma_alloc` memory, returned with `dma_dealloc` on drop.
struct DmaRegion<H: Hal> {
    paddr: PhysAddr,
    vaddr: NonNull<u8>,
    pages: usize,
    _hal: PhantomData<H>,
}

impl<H: Hal> DmaRegion<H> {
    fn new(bytes: usize, direction: BufferDirection) -> Result<Self, Error> {
        let pages = bytes.div_ceil(PAGE_SIZE).max(1);
        let (paddr, vaddr) = H::dma_alloc(pages, direction);
        if paddr == 0 {
            return Err(Error::NoBufferSpace);
        }
        Ok(DmaRegion {
            paddr,
            vaddr,
            pages,
            _hal: PhantomData,
        })
    }

    fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }

    /// A pointer `offset` bytes into the region, for an access of `size` bytes.
    fn at<T>(&self, offset: usize) -> *mut T {
        debug_assert!(offset + core::mem::size_of::<T>() <= self.len());
        // The offsets come from this module's layout arithmetic, never from the device.
        self.vaddr.as_ptr().wrapping_add(offset).cast::<T>()
    }
}

impl<H: Hal> Drop for DmaRegion<H> {
    fn drop(&mut self) {
        // SAFETY: `paddr`, `vaddr` and `pages` are exactly what `dma_alloc` returned for this
        // region, it is freed once (here), and the queue that used it was reset or is being
        // dropped with it, so the device no longer owns any part of it.
        let status = unsafe { H::dma_dealloc(self.paddr, self.vaddr, self.pages) };
        if status != 0 {
            log::warn!("vsock: dma_dealloc returned {status}");
        }
    }
}

/// Who writes the buffers of a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The device fills them (rx and event queues).
    DeviceWrites,
    /// The driver fills them (tx queue).
    DriverWrites,
}

/// A buffer the device has returned, checked against what was posted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// The buffer (and descriptor) id.
    pub id: u16,
    /// Bytes the device wrote, at most the buffer size.
    pub len: usize,
}

/// What was wrong with a used-ring entry (B6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadUsed {
    /// The id was out of range or not posted.
    UnknownId(u32),
    /// The length was larger than the buffer; the buffer is back with the driver.
    TooLong {
        /// The buffer the entry named.
        id: u16,
        /// The length the device claimed.
        len: u32,
    },
}

/// One split virtqueue with its buffer pool.
pub struct Virtqueue<H: Hal> {
    index: u16,
    size: u16,
    direction: Direction,
    event_idx: bool,
    ring: DmaRegion<H>,
    avail_offset: usize,
    used_offset: usize,
    buffers: DmaRegion<H>,
    buffer_size: usize,
    /// Ids currently owned by the device.
    posted: [u64; POSTED_WORDS],
    /// Ids owned by the driver and not holding anything (tx queue).
    free: heapless::Vec<u16, MAX_QUEUE_SIZE>,
    /// Next free slot of the available ring (free-running).
    avail_idx: u16,
    /// `avail_idx` when we last decided whether to notify.
    notified_avail_idx: u16,
    /// Next used-ring entry to read (free-running).
    last_used_idx: u16,
    kicks: u64,
}

impl<H: Hal> Virtqueue<H> {
    /// Allocates and registers queue `index` with `size` descriptors (a power of two, at
    /// most [`MAX_QUEUE_SIZE`]) and `size` buffers of `buffer_size` bytes.
    pub fn new<T: Transport>(
        transport: &mut T,
        index: u16,
        size: u16,
        buffer_size: usize,
        direction: Direction,
        event_idx: bool,
    ) -> Result<Self, Error> {
        let queue_size = usize::from(size);
        if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
            return Err(Error::InvalidArgument);
        }
        if buffer_size == 0 || buffer_size > u32::MAX as usize {
            return Err(Error::InvalidArgument);
        }
        if transport.queue_used(index) {
            return Err(Error::DeviceError);
        }
        // The legacy layout (used ring on the next page) is valid for modern devices too.
        let avail_offset = DESC_SIZE * queue_size;
        let used_offset = align_up(avail_offset + 2 * (queue_size + 3), PAGE_SIZE);
        let ring_bytes = used_offset + align_up(6 + 8 * queue_size, PAGE_SIZE);
        let ring = DmaRegion::<H>::new(ring_bytes, BufferDirection::Both)?;
        let buffers_bytes = buffer_size
            .checked_mul(queue_size)
            .ok_or(Error::InvalidArgument)?;
        let buffers = DmaRegion::<H>::new(
            buffers_bytes,
            match direction {
                Direction::DeviceWrites => BufferDirection::DeviceToDriver,
                Direction::DriverWrites => BufferDirection::DriverToDevice,
            },
        )?;
        let mut queue = Virtqueue {
            index,
            size,
            direction,
            event_idx,
            ring,
            avail_offset,
            used_offset,
            buffers,
            buffer_size,
            posted: [0; POSTED_WORDS],
            free: heapless::Vec::new(),
            avail_idx: 0,
            notified_avail_idx: 0,
            last_used_idx: 0,
            kicks: 0,
        };
        let flags = match direction {
            Direction::DeviceWrites => DESC_F_WRITE,
            Direction::DriverWrites => 0,
        };
        for id in 0..size {
            let addr = queue.buffers.paddr + (usize::from(id) * buffer_size) as u64;
            queue.write_descriptor(id, addr, buffer_size as u32, flags);
            // Capacity is MAX_QUEUE_SIZE >= size, so this cannot fail.
            let _ = queue.free.push(size - 1 - id);
        }
        // We poll; ask the device not to interrupt (without EVENT_IDX this flag is the
        // hint, with it `used_event` is kept far ahead in `pop_used`).
        queue.write_ring_u16(queue.avail_offset, AVAIL_F_NO_INTERRUPT);
        queue.write_used_event();
        transport.queue_set(
            index,
            u32::from(size),
            queue.ring.paddr,
            queue.ring.paddr + avail_offset as u64,
            queue.ring.paddr + used_offset as u64,
        );
        Ok(queue)
    }

    /// Number of descriptors (and buffers).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Bytes per buffer.
    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }

    /// Notifications sent to the device so far.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// Ids that are with the driver and hold nothing.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    fn write_descriptor(&mut self, id: u16, addr: PhysAddr, len: u32, flags: u16) {
        let base = usize::from(id) * DESC_SIZE;
        // SAFETY: `id < size`, so the 16-byte descriptor lies in the descriptor table at the
        // start of `ring`, which is live DMA memory of at least `16 * size` bytes; the device
        // only reads descriptors, and only of posted ids (this one is not posted).
        unsafe {
            self.ring.at::<u64>(base).write_volatile(addr.to_le());
            self.ring.at::<u32>(base + 8).write_volatile(len.to_le());
            self.ring.at::<u16>(base + 12).write_volatile(flags.to_le());
            self.ring.at::<u16>(base + 14).write_volatile(0);
        }
    }

    fn write_descriptor_len(&mut self, id: u16, len: u32) {
        let at = usize::from(id) * DESC_SIZE + 8;
        // SAFETY: as in `write_descriptor`: in bounds, and the id is not posted.
        unsafe { self.ring.at::<u32>(at).write_volatile(len.to_le()) }
    }

    fn write_ring_u16(&mut self, offset: usize, value: u16) {
        // SAFETY: every caller passes an offset inside the available ring (driver-owned),
        // which lies within `ring`, 2-byte aligned.
        unsafe { self.ring.at::<u16>(offset).write_volatile(value.to_le()) }
    }

    fn read_used_u16(&self, offset: usize) -> u16 {
        // SAFETY: every caller passes an offset inside the used ring, within `ring`, 2-byte
        // aligned. The device may write it concurrently: the read is volatile and any value
        // is acceptable to the callers.
        u16::from_le(unsafe { self.ring.at::<u16>(offset).read_volatile() })
    }

    fn read_used_u32(&self, offset: usize) -> u32 {
        // SAFETY: as `read_used_u16`, 4-byte aligned (the used ring starts page-aligned and
        // its entries at offset 4 + 8 * i).
        u32::from_le(unsafe { self.ring.at::<u32>(offset).read_volatile() })
    }

    fn is_posted(&self, id: u16) -> bool {
        let id = usize::from(id);
        self.posted
            .get(id / 64)
            .is_some_and(|word| word & (1 << (id % 64)) != 0)
    }

    fn set_posted(&mut self, id: u16, posted: bool) {
        let id = usize::from(id);
        if let Some(word) = self.posted.get_mut(id / 64) {
            if posted {
                *word |= 1 << (id % 64);
            } else {
                *word &= !(1 << (id % 64));
            }
        }
    }

    /// Gives buffer `id` (with `len` valid bytes for the driver-writes direction) to the
    /// device. The device sees it at once; it is notified by [`Virtqueue::notify_if_needed`].
    fn post(&mut self, id: u16, len: u32) {
        debug_assert!(id < self.size && !self.is_posted(id));
        if self.direction == Direction::DriverWrites {
            self.write_descriptor_len(id, len);
        }
        self.set_posted(id, true);
        let slot = usize::from(self.avail_idx % self.size);
        self.write_ring_u16(self.avail_offset + 4 + 2 * slot, id);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The ring entry (and the buffer behind it) must be visible before the index.
        fence(Ordering::Release);
        self.write_ring_u16(self.avail_offset + 2, self.avail_idx);
    }

    /// Posts every free buffer (device-writes queues, at start-up).
    pub fn post_all(&mut self) {
        while let Some(id) = self.free.pop() {
            self.post(id, self.buffer_size as u32);
        }
    }

    /// Posts buffer `id` again after its contents were consumed (device-writes queues).
    pub fn repost(&mut self, id: u16) {
        if id < self.size && !self.is_posted(id) {
            self.post(id, self.buffer_size as u32);
        }
    }

    /// Takes a free buffer for the driver to fill (driver-writes queue).
    pub fn alloc(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Returns an allocated, unposted buffer to the free list.
    pub fn release(&mut self, id: u16) {
        if id < self.size && !self.is_posted(id) && !self.free.contains(&id) {
            let _ = self.free.push(id);
        }
    }

    /// Sends allocated buffer `id` holding `len` bytes.
    pub fn submit(&mut self, id: u16, len: usize) {
        if id < self.size && !self.is_posted(id) && len <= self.buffer_size {
            self.post(id, len as u32);
        }
    }

    /// Keeps the device's `used_event` far ahead so it does not interrupt us (we poll).
    fn write_used_event(&mut self) {
        if self.event_idx {
            let offset = self.avail_offset + 4 + 2 * usize::from(self.size);
            self.write_ring_u16(offset, self.last_used_idx.wrapping_add(0x8000));
        }
    }

    /// Takes the next entry of the used ring, if any, and checks it (B6). A bad entry is
    /// reported (and consumed); the caller decides what to log.
    pub fn pop_used(&mut self) -> Option<Result<Used, BadUsed>> {
        let used_idx = self.read_used_u16(self.used_offset + 2);
        if used_idx == self.last_used_idx {
            return None;
        }
        // Read the entry (and later the buffer) only after seeing the index.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used_idx % self.size);
        let entry = self.used_offset + 4 + 8 * slot;
        let raw_id = self.read_used_u32(entry);
        let raw_len = self.read_used_u32(entry + 4);
        self.last_used_idx = self.last_used_idx.wrapping_add(1);
        self.write_used_event();
        let Some(id) = u16::try_from(raw_id).ok().filter(|&id| self.is_posted(id)) else {
            return Some(Err(BadUsed::UnknownId(raw_id)));
        };
        self.set_posted(id, false);
        if self.direction == Direction::DriverWrites {
            // A sent buffer's used length carries no meaning for us.
            let _ = self.free.push(id);
            return Some(Ok(Used { id, len: 0 }));
        }
        if raw_len as usize > self.buffer_size {
            return Some(Err(BadUsed::TooLong { id, len: raw_len }));
        }
        Some(Ok(Used {
            id,
            len: raw_len as usize,
        }))
    }

    /// The contents of buffer `id`, which the driver owns (returned by the device or not
    /// yet posted). Empty for an id out of range.
    pub fn buffer(&self, id: u16) -> &[u8] {
        if id >= self.size || self.is_posted(id) {
            return &[];
        }
        // SAFETY: `id < size`, so the range lies within the `buffers` region (size *
        // buffer_size bytes, live for as long as `self`). The buffer is not posted, so the
        // device does not own it and will not write it while this borrow of `self` lives.
        unsafe {
            core::slice::from_raw_parts(
                self.buffers.at::<u8>(usize::from(id) * self.buffer_size),
                self.buffer_size,
            )
        }
    }

    /// Buffer `id` for the driver to fill. Empty for an id out of range or posted.
    pub fn buffer_mut(&mut self, id: u16) -> &mut [u8] {
        if id >= self.size || self.is_posted(id) {
            return &mut [];
        }
        // SAFETY: as in `buffer`; the exclusive borrow of `self` makes this the only
        // reference to the buffer.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.buffers.at::<u8>(usize::from(id) * self.buffer_size),
                self.buffer_size,
            )
        }
    }

    /// Buffers posted since the last notification decision.
    pub fn unnotified(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.notified_avail_idx)
    }

    /// Notifies the device of buffers posted since the last call, unless it asked not to be
    /// notified (B8). Returns whether it notified.
    pub fn notify_if_needed<T: Transport>(&mut self, transport: &mut T) -> bool {
        let new = self.avail_idx;
        let old = self.notified_avail_idx;
        if new == old {
            return false;
        }
        self.notified_avail_idx = new;
        // The index write must be visible before we read the device's suppression state.
        fence(Ordering::SeqCst);
        let needed = if self.event_idx {
            let avail_event = self.read_used_u16(self.used_offset + 4 + 8 * usize::from(self.size));
            // vring_need_event: did the device's wake-up index fall in (old, new]?
            new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.read_used_u16(self.used_offset) & USED_F_NO_NOTIFY == 0
        };
        if needed {
            transport.notify(self.index);
            self.kicks += 1;
        }
        needed
    }

    /// Physical address of the ring memory (descriptor table first), for device models.
    pub fn ring_paddr(&self) -> PhysAddr {
        self.ring.paddr
    }
}
