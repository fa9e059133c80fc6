//! Split virtqueues (virtio 1.x, 2.7) in `Hal::dma_alloc` memory, with the buffers behind
//! them. This is the only module that touches memory the device shares.
//!
//! - [`RxQueue`] (the rx and event queues): a fixed pool of equally sized buffers the device
//!   writes; descriptor `i` always points at buffer `i`.
//! - [`TxQueue`] (the tx queue): an arena of [`TX_CHUNK`]-byte chunks; a packet takes a run
//!   of consecutive chunks, so one packet is as long as its payload needs (up to 64 KiB),
//!   and small packets take little memory. Descriptors are handed out to packets as they
//!   are submitted.
//!
//! Either way one descriptor carries one whole packet (B4). The driver keeps its own shadow
//! of everything it needs (which ids are posted, its indices, which chunks are in use);
//! values the device writes (used-ring ids and lengths) are checked before they are used
//! (B6).

use crate::error::Error;
use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{fence, Ordering};
use virtio_drivers::transport::Transport;
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// The largest queue this driver sets up; the device's maximum may be smaller.
pub const MAX_QUEUE_SIZE: usize = 256;
/// Bytes per chunk of the transmit arena.
pub const TX_CHUNK: usize = 512;
/// The most chunks a transmit arena has (4 MiB of them).
pub const MAX_TX_CHUNKS: usize = 8192;

/// Bytes at the start of a receive buffer zeroed before it is posted again: a packet
/// header (see [`RxQueue::repost_cleared`]).
pub const SCRUBBED_PREFIX: usize = crate::wire::HEADER_LEN;

const DESC_SIZE: usize = 16;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
const POSTED_WORDS: usize = MAX_QUEUE_SIZE / 64;
const CHUNK_WORDS: usize = MAX_TX_CHUNKS / 64;

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

/// A queue's indices at one moment (free-running, as in the rings), for diagnostics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingIndices {
    /// Our next available-ring slot.
    pub avail: u16,
    /// `avail` when we last decided whether to notify.
    pub notified: u16,
    /// The next used-ring entry we will take.
    pub used_taken: u16,
    /// The used index the device has written.
    pub device_used: u16,
    /// The available index the device asked to be notified at (`VIRTIO_F_EVENT_IDX`).
    pub avail_event: Option<u16>,
}

/// The rings of one split virtqueue: descriptor table, available and used rings, which
/// ids the device owns, and when to notify it.
struct SplitRing<H: Hal> {
    index: u16,
    size: u16,
    event_idx: bool,
    ring: DmaRegion<H>,
    avail_offset: usize,
    used_offset: usize,
    /// Ids currently owned by the device.
    posted: [u64; POSTED_WORDS],
    /// Next free slot of the available ring (free-running).
    avail_idx: u16,
    /// `avail_idx` when we last decided whether to notify.
    notified_avail_idx: u16,
    /// The available index the device was last shown.
    published_avail_idx: u16,
    /// Next used-ring entry to read (free-running).
    last_used_idx: u16,
    /// The device's used index as last read: entries up to it are taken without reading
    /// the index again (the device writes that cache line with every entry).
    seen_used_idx: u16,
    /// `last_used_idx` when `used_event` was last written.
    used_event_base: u16,
    /// The device was asked to interrupt at its next used entry ([`SplitRing::arm`]).
    armed: bool,
    kicks: u64,
}

impl<H: Hal> SplitRing<H> {
    /// Allocates the rings of queue `index` with `size` descriptors (a power of two, at
    /// most [`MAX_QUEUE_SIZE`]); registered with the transport by [`SplitRing::register`].
    fn new<T: Transport>(
        transport: &mut T,
        index: u16,
        size: u16,
        event_idx: bool,
    ) -> Result<Self, Error> {
        let queue_size = usize::from(size);
        if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
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
        let mut rings = SplitRing {
            index,
            size,
            event_idx,
            ring,
            avail_offset,
            used_offset,
            posted: [0; POSTED_WORDS],
            avail_idx: 0,
            notified_avail_idx: 0,
            published_avail_idx: 0,
            last_used_idx: 0,
            seen_used_idx: 0,
            used_event_base: 0,
            armed: false,
            kicks: 0,
        };
        // We poll; ask the device not to interrupt (without EVENT_IDX this flag is the
        // hint, with it `used_event` is kept far ahead in `pop_used`).
        rings.write_ring_u16(rings.avail_offset, AVAIL_F_NO_INTERRUPT);
        rings.write_used_event();
        Ok(rings)
    }

    /// Tells the device where the rings are.
    fn register<T: Transport>(&self, transport: &mut T) {
        transport.queue_set(
            self.index,
            u32::from(self.size),
            self.ring.paddr,
            self.ring.paddr + self.avail_offset as u64,
            self.ring.paddr + self.used_offset as u64,
        );
    }

    fn write_descriptor(&mut self, id: u16, addr: PhysAddr, len: u32, flags: u16) {
        debug_assert!(id < self.size && !self.is_posted(id));
        let base = self.slot(id) * DESC_SIZE;
        // SAFETY: `slot(id) < size`, so the 16-byte descriptor lies in the descriptor table
        // at the start of `ring`, which is live DMA memory of at least `16 * size` bytes; the
        // device only reads descriptors, and only of posted ids (callers pass unposted ones).
        unsafe {
            self.ring.at::<u64>(base).write_volatile(addr.to_le());
            self.ring.at::<u32>(base + 8).write_volatile(len.to_le());
            self.ring.at::<u16>(base + 12).write_volatile(flags.to_le());
            self.ring.at::<u16>(base + 14).write_volatile(0);
        }
    }

    /// Where a free-running ring index (or a descriptor id) falls in the rings:
    /// `index % size`, with a mask, since `size` is a power of two (a division is a
    /// helper call under QEMU's TCG, and a slow instruction on real CPUs too).
    fn slot(&self, index: u16) -> usize {
        usize::from(index & (self.size - 1))
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

    /// Gives descriptor `id` to the device: it sees it once [`SplitRing::notify_if_needed`]
    /// publishes the index (once per batch: the device reads that cache line).
    fn post(&mut self, id: u16) {
        debug_assert!(id < self.size && !self.is_posted(id));
        self.set_posted(id, true);
        let slot = self.slot(self.avail_idx);
        self.write_ring_u16(self.avail_offset + 4 + 2 * slot, id);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Lets the device see every posted descriptor, without notifying it.
    fn publish(&mut self) {
        // The ring entries (and the buffers behind them) must be visible before the index.
        fence(Ordering::Release);
        self.write_ring_u16(self.avail_offset + 2, self.avail_idx);
        self.published_avail_idx = self.avail_idx;
    }

    /// Keeps the device's `used_event` far ahead so it does not interrupt us (we poll):
    /// half the index space ahead when written, rewritten once a quarter of it is used
    /// (not on every entry: the device reads that cache line too).
    fn write_used_event(&mut self) {
        if self.event_idx {
            let offset = self.avail_offset + 4 + 2 * usize::from(self.size);
            self.write_ring_u16(offset, self.last_used_idx.wrapping_add(0x8000));
            self.used_event_base = self.last_used_idx;
        }
    }

    /// Asks the device to interrupt once it adds a used entry: `used_event` at the next
    /// entry to take under `VIRTIO_F_EVENT_IDX` (so one interrupt, however many entries
    /// follow), else the available ring's `NO_INTERRUPT` flag cleared (an interrupt per
    /// batch, until [`SplitRing::disarm`]). Then looks at the used index once more and
    /// returns whether the device had added none: an entry added before the request was
    /// visible would raise no interrupt, so the caller must not wait for one then.
    fn arm(&mut self) -> bool {
        if self.event_idx {
            let offset = self.avail_offset + 4 + 2 * usize::from(self.size);
            self.write_ring_u16(offset, self.last_used_idx);
        } else {
            self.write_ring_u16(self.avail_offset, 0);
        }
        self.armed = true;
        // The request must be visible before the used index is read again: the device
        // writes the index, then reads the request (a store-then-load on both sides).
        fence(Ordering::SeqCst);
        self.read_used_u16(self.used_offset + 2) == self.last_used_idx
    }

    /// Asks the device not to interrupt again (undoes [`SplitRing::arm`]).
    fn disarm(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        if self.event_idx {
            self.write_used_event();
        } else {
            self.write_ring_u16(self.avail_offset, AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Reads the device's used index when every entry it covered has been taken; returns
    /// whether an entry is waiting.
    fn see_used(&mut self) -> bool {
        if self.seen_used_idx == self.last_used_idx {
            let used_idx = self.read_used_u16(self.used_offset + 2);
            if used_idx == self.last_used_idx {
                return false;
            }
            // Read the entries (and later the buffers) only after seeing the index.
            fence(Ordering::Acquire);
            self.seen_used_idx = used_idx;
        }
        true
    }

    /// Takes the next entry of the used ring, if any: the id (checked to be posted, and now
    /// the driver's again) and the length the device claims. `Err` carries an id that was
    /// out of range or not posted.
    fn pop_used(&mut self) -> Option<Result<(u16, u32), u32>> {
        if !self.see_used() {
            return None;
        }
        let entry = self.next_used_entry();
        let raw_id = self.read_used_u32(entry);
        let raw_len = self.read_used_u32(entry + 4);
        self.last_used_idx = self.last_used_idx.wrapping_add(1);
        if !self.armed && self.last_used_idx.wrapping_sub(self.used_event_base) >= 0x4000 {
            self.write_used_event();
        }
        let Some(id) = u16::try_from(raw_id).ok().filter(|&id| self.is_posted(id)) else {
            return Some(Err(raw_id));
        };
        self.set_posted(id, false);
        Some(Ok((id, raw_len)))
    }

    /// Whether the used ring holds an entry not taken yet: one read of the device's
    /// index when the last one read is used up. `pop_used` reads the index again (and
    /// fences) before it takes the entry.
    fn has_used(&self) -> bool {
        self.seen_used_idx != self.last_used_idx
            || self.read_used_u16(self.used_offset + 2) != self.last_used_idx
    }

    /// Reads the device's used index afresh and returns how many entries it covers that
    /// have not been taken (as the device claims: a device that lies can claim up to
    /// 65,535).
    fn used_pending(&mut self) -> u16 {
        let used_idx = self.read_used_u16(self.used_offset + 2);
        // Read the entries (and later the buffers) only after seeing the index.
        fence(Ordering::Acquire);
        self.seen_used_idx = used_idx;
        used_idx.wrapping_sub(self.last_used_idx)
    }

    /// The raw id and the length the device claims for the used entry `ahead` places
    /// after the next one to take, without taking anything (unchecked: only a hint);
    /// `None` when the used index last read does not cover it (`ahead` 0 reads the index
    /// when every entry it covered has been taken).
    fn peek_used(&mut self, ahead: u16) -> Option<(u32, u32)> {
        if !self.see_used() || self.seen_used_idx.wrapping_sub(self.last_used_idx) <= ahead {
            return None;
        }
        let entry = self.used_entry(ahead);
        Some((self.read_used_u32(entry), self.read_used_u32(entry + 4)))
    }

    /// The raw id of the next used entry, when the index last read already covers it
    /// (unchecked: only a hint).
    fn peek_used_id(&self) -> Option<u32> {
        if self.seen_used_idx == self.last_used_idx {
            return None;
        }
        Some(self.read_used_u32(self.next_used_entry()))
    }

    /// The offset in the ring of the used entry `pop_used` takes next: its id, then its
    /// length.
    fn next_used_entry(&self) -> usize {
        self.used_entry(0)
    }

    /// The offset in the ring of the used entry `ahead` places after the one `pop_used`
    /// takes next.
    fn used_entry(&self, ahead: u16) -> usize {
        self.used_offset + 4 + 8 * self.slot(self.last_used_idx.wrapping_add(ahead))
    }

    /// Buffers posted since the last notification decision.
    fn unnotified(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.notified_avail_idx)
    }

    /// Buffers the device holds: posted and not yet taken back from the used ring.
    fn outstanding(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.last_used_idx)
    }

    /// Used entries taken so far, good and rejected ones (free-running, wraps at 2^16).
    fn used_taken(&self) -> u16 {
        self.last_used_idx
    }

    /// Whether the device has used every buffer it was shown (as far as we have taken
    /// its used entries).
    fn device_used_all(&self) -> bool {
        self.last_used_idx == self.published_avail_idx
    }

    /// Where the indices stand: for a log line about a device that stopped.
    fn indices(&self) -> RingIndices {
        RingIndices {
            avail: self.avail_idx,
            notified: self.notified_avail_idx,
            used_taken: self.last_used_idx,
            device_used: self.read_used_u16(self.used_offset + 2),
            avail_event: self.event_idx.then(|| self.read_avail_event()),
        }
    }

    /// The available index the device asked to be notified at (`VIRTIO_F_EVENT_IDX`): the
    /// field after the used ring's entries.
    fn read_avail_event(&self) -> u16 {
        self.read_used_u16(self.used_offset + 4 + 8 * usize::from(self.size))
    }

    /// Publishes what is posted, as decided on: what follows is the notification decision.
    fn publish_for_decision(&mut self) {
        self.publish();
        self.notified_avail_idx = self.avail_idx;
        // The index write must be visible before we read the device's suppression state.
        fence(Ordering::SeqCst);
    }

    /// Notifies the device of this queue, and counts it.
    fn kick<T: Transport>(&mut self, transport: &mut T) {
        transport.notify(self.index);
        self.kicks += 1;
    }

    /// Publishes what is posted and notifies the device whatever it asked for: the way out
    /// for a device that holds buffers, uses none, and has not asked to hear of new ones.
    fn notify_anyway<T: Transport>(&mut self, transport: &mut T) {
        self.publish_for_decision();
        self.kick(transport);
    }

    /// Publishes the buffers posted since the last call and notifies the device of them,
    /// unless it asked not to be notified (B8). Returns whether it notified.
    fn notify_if_needed<T: Transport>(&mut self, transport: &mut T) -> bool {
        let new = self.avail_idx;
        let old = self.notified_avail_idx;
        if new == old {
            return false;
        }
        self.publish_for_decision();
        let needed = if self.event_idx {
            let avail_event = self.read_avail_event();
            // vring_need_event: did the device's wake-up index fall in (old, new]?
            new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.read_used_u16(self.used_offset) & USED_F_NO_NOTIFY == 0
        };
        if needed {
            self.kick(transport);
        }
        needed
    }
}

/// Asks the CPU to start loading the cache line at `addr` (a hint: nothing is read).
#[inline(always)]
fn prefetch(addr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch does not access memory architecturally; any address is allowed.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(addr.cast())
    };
    #[cfg(target_arch = "aarch64")]
    // SAFETY: PRFM is a hint: it neither faults nor changes memory or flags.
    unsafe {
        core::arch::asm!(
            "prfm pldl1keep, [{addr}]",
            addr = in(reg) addr,
            options(nostack, readonly, preserves_flags)
        )
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let _ = addr;
}

/// A queue whose device writes into a fixed pool of equally sized buffers (rx, events).
pub struct RxQueue<H: Hal> {
    rings: SplitRing<H>,
    buffers: DmaRegion<H>,
    buffer_size: usize,
}

impl<H: Hal> RxQueue<H> {
    /// Allocates and registers queue `index` with `size` descriptors (a power of two, at
    /// most [`MAX_QUEUE_SIZE`]) and `size` buffers of `buffer_size` bytes; none is posted
    /// yet ([`RxQueue::post_all`]).
    pub fn new<T: Transport>(
        transport: &mut T,
        index: u16,
        size: u16,
        buffer_size: usize,
        event_idx: bool,
    ) -> Result<Self, Error> {
        if buffer_size == 0 || buffer_size > u32::MAX as usize {
            return Err(Error::InvalidArgument);
        }
        let mut rings = SplitRing::<H>::new(transport, index, size, event_idx)?;
        let buffers_bytes = buffer_size
            .checked_mul(usize::from(size))
            .ok_or(Error::InvalidArgument)?;
        let buffers = DmaRegion::<H>::new(buffers_bytes, BufferDirection::DeviceToDriver)?;
        for id in 0..size {
            let addr = buffers.paddr + (usize::from(id) * buffer_size) as u64;
            rings.write_descriptor(id, addr, buffer_size as u32, DESC_F_WRITE);
        }
        rings.register(transport);
        Ok(RxQueue {
            rings,
            buffers,
            buffer_size,
        })
    }

    /// Notifications sent to the device so far.
    pub fn kicks(&self) -> u64 {
        self.rings.kicks
    }

    /// Descriptors (and buffers) in the queue.
    pub fn size(&self) -> u16 {
        self.rings.size
    }

    /// Posts and publishes every buffer (at start-up, before DRIVER_OK: B3).
    pub fn post_all(&mut self) {
        for id in 0..self.rings.size {
            self.repost(id);
        }
        self.rings.publish();
    }

    /// Posts buffer `id` again after its contents were consumed.
    pub fn repost(&mut self, id: u16) {
        if id < self.rings.size && !self.rings.is_posted(id) {
            self.rings.post(id);
        }
    }

    /// [`RxQueue::repost`], with the first [`SCRUBBED_PREFIX`] bytes of the buffer zeroed
    /// first, for a buffer that held a whole packet without payload: a device that returns
    /// a buffer without writing a packet into it (vhost-device-vsock 0.3.0 does, for a
    /// connection that ended while it had work queued) then shows an invalid header (op 0),
    /// never that packet again, which would be handled twice. (A header that announces a
    /// payload fails the length check (B10) when it comes back with nothing after it, so
    /// buffers of data packets need no zeroing, and their cache lines stay clean.)
    pub fn repost_cleared(&mut self, id: u16) {
        if id < self.rings.size && !self.rings.is_posted(id) {
            let prefix = SCRUBBED_PREFIX.min(self.buffer_size);
            // SAFETY: `id < size`, so the first `prefix <= buffer_size` bytes of buffer `id`
            // lie within the `buffers` region (live as long as `self`). The buffer is not
            // posted, so the device does not own it, and no borrow of it (`buffer` borrows
            // `self`) outlives this `&mut self`.
            unsafe {
                core::ptr::write_bytes(
                    self.buffers.at::<u8>(usize::from(id) * self.buffer_size),
                    0,
                    prefix,
                );
            }
            self.rings.post(id);
        }
    }

    /// Takes the next entry of the used ring, if any, and checks it (B6). A bad entry is
    /// reported (and consumed); the caller decides what to log. The start of the buffer
    /// after it, when the device already returned that one too, is fetched into the cache
    /// meanwhile.
    pub fn pop_used(&mut self) -> Option<Result<Used, BadUsed>> {
        let entry = self.rings.pop_used()?;
        if let Some(next) = self.rings.peek_used_id() {
            if next < u32::from(self.rings.size) {
                prefetch(self.buffers.at::<u8>(next as usize * self.buffer_size));
            }
        }
        Some(match entry {
            Err(raw_id) => Err(BadUsed::UnknownId(raw_id)),
            Ok((id, len)) if len as usize > self.buffer_size => Err(BadUsed::TooLong { id, len }),
            Ok((id, len)) => Ok(Used {
                id,
                len: len as usize,
            }),
        })
    }

    /// The length the device claims to have written into the buffer that
    /// [`RxQueue::pop_used`] would take next, without taking it; `None` when the used ring
    /// holds nothing new. Unchecked: only a hint (`pop_used` checks it).
    pub fn peek_used_len(&mut self) -> Option<u32> {
        self.rings.peek_used(0).map(|(_, len)| len)
    }

    /// Reads the device's used index afresh and returns how many used entries wait to be
    /// taken, as the device claims ([`RxQueue::peek_used_buffer`] can look at them).
    pub fn used_pending(&mut self) -> u16 {
        self.rings.used_pending()
    }

    /// The bytes the device claims to have written into the buffer of the used entry
    /// `ahead` places after the one [`RxQueue::pop_used`] would take next, without taking
    /// anything; `None` when the used index last read ([`RxQueue::used_pending`]) does
    /// not cover that entry, or when `pop_used` would reject it (it reports that when it
    /// takes it). Only a hint: the buffer is still the device's as far as the bookkeeping
    /// goes, and `pop_used` checks everything again.
    pub fn peek_used_buffer(&mut self, ahead: u16) -> Option<&[u8]> {
        let (raw_id, len) = self.rings.peek_used(ahead)?;
        let id = u16::try_from(raw_id)
            .ok()
            .filter(|&id| id < self.rings.size && self.rings.is_posted(id))?;
        let len = len as usize;
        if len > self.buffer_size {
            return None;
        }
        // SAFETY: `id < size` and `len <= buffer_size`, so the range lies within buffer
        // `id` inside the `buffers` region, which lives as long as `self` (and the borrow
        // of `self` keeps the buffer from being reposted meanwhile). The device put the id
        // in the used ring, and the used index covering it was read (with an acquire
        // fence) after it did: it has finished writing the buffer and, by the virtio
        // contract, does not touch it until it is posted again, as for a buffer
        // `pop_used` took (see `RxQueue::buffer`).
        Some(unsafe {
            core::slice::from_raw_parts(
                self.buffers.at::<u8>(usize::from(id) * self.buffer_size),
                len,
            )
        })
    }

    /// Whether the device returned a buffer that [`RxQueue::pop_used`] has not taken.
    pub fn has_used(&self) -> bool {
        self.rings.has_used()
    }

    /// Whether the device has used every buffer it was shown: it has none to fill until
    /// it hears of the reposted ones.
    pub fn device_ran_dry(&self) -> bool {
        self.rings.device_used_all()
    }

    /// Used entries taken so far, good and rejected ones (wraps at 2^16).
    pub fn used_taken(&self) -> u16 {
        self.rings.used_taken()
    }

    /// The ring's indices now (see [`RingIndices`]).
    pub fn indices(&self) -> RingIndices {
        self.rings.indices()
    }

    /// Publishes and notifies the device whatever it asked for: the way out for a device
    /// that ran out of buffers and has not asked to hear of new ones.
    pub fn notify_anyway<T: Transport>(&mut self, transport: &mut T) {
        self.rings.notify_anyway(transport);
    }

    /// The contents of buffer `id`, which the driver owns (returned by the device). Empty
    /// for an id out of range or posted.
    pub fn buffer(&self, id: u16) -> &[u8] {
        if id >= self.rings.size || self.rings.is_posted(id) {
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

    /// Notifies the device of buffers posted since the last call, where it asked to hear
    /// (B8). Returns whether it notified.
    pub fn notify_if_needed<T: Transport>(&mut self, transport: &mut T) -> bool {
        self.rings.notify_if_needed(transport)
    }

    /// Asks the device to interrupt when it returns a buffer; `false` when it already has
    /// (see [`TxQueue::arm_interrupt`]).
    pub fn arm_interrupt(&mut self) -> bool {
        self.rings.arm()
    }

    /// Asks the device not to interrupt.
    pub fn disarm_interrupt(&mut self) {
        self.rings.disarm();
    }
}

/// A run of consecutive chunks of a [`TxQueue`]'s arena that the driver owns: allocated by
/// [`TxQueue::alloc`], filled through [`TxQueue::buffer_mut`], then submitted or released.
/// Not `Clone`: a run has one owner.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub struct TxBuffer {
    first: u16,
    chunks: u16,
    /// The arena it belongs to (its physical address), so that a buffer of another queue
    /// is never taken for one of this queue.
    arena: PhysAddr,
}

impl TxBuffer {
    /// Bytes the buffer holds.
    pub fn capacity(&self) -> usize {
        usize::from(self.chunks) * TX_CHUNK
    }
}

/// The transmit queue: the rings, an arena of chunks for packets, and which run of chunks
/// each posted descriptor carries.
pub struct TxQueue<H: Hal> {
    rings: SplitRing<H>,
    arena: DmaRegion<H>,
    chunk_count: usize,
    /// One bit per chunk: set while a [`TxBuffer`] or a posted descriptor holds it.
    in_use: [u64; CHUNK_WORDS],
    /// Where the next allocation starts looking (packets complete roughly in order, so
    /// the chunks after the last allocation are the ones most likely free).
    cursor: usize,
    /// Chunks not in use.
    free_chunks: usize,
    /// The run each posted descriptor carries: (first chunk, chunks).
    runs: [(u16, u16); MAX_QUEUE_SIZE],
    /// Descriptor ids not posted.
    free_ids: heapless::Vec<u16, MAX_QUEUE_SIZE>,
}

impl<H: Hal> TxQueue<H> {
    /// Allocates and registers queue `index` with `size` descriptors (a power of two, at
    /// most [`MAX_QUEUE_SIZE`]) and an arena of `arena_bytes` (rounded down to whole
    /// chunks, at most [`MAX_TX_CHUNKS`] of them, at least one).
    pub fn new<T: Transport>(
        transport: &mut T,
        index: u16,
        size: u16,
        arena_bytes: usize,
        event_idx: bool,
    ) -> Result<Self, Error> {
        let chunk_count = (arena_bytes / TX_CHUNK).min(MAX_TX_CHUNKS);
        if chunk_count == 0 {
            return Err(Error::InvalidArgument);
        }
        let rings = SplitRing::<H>::new(transport, index, size, event_idx)?;
        let arena = DmaRegion::<H>::new(chunk_count * TX_CHUNK, BufferDirection::DriverToDevice)?;
        let mut free_ids = heapless::Vec::new();
        for id in (0..size).rev() {
            // Capacity is MAX_QUEUE_SIZE >= size, so this cannot fail.
            let _ = free_ids.push(id);
        }
        rings.register(transport);
        Ok(TxQueue {
            rings,
            arena,
            chunk_count,
            in_use: [0; CHUNK_WORDS],
            cursor: 0,
            free_chunks: chunk_count,
            runs: [(0, 0); MAX_QUEUE_SIZE],
            free_ids,
        })
    }

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        self.rings.size
    }

    /// Bytes of the arena.
    pub fn arena_bytes(&self) -> usize {
        self.chunk_count * TX_CHUNK
    }

    /// Notifications sent to the device so far.
    pub fn kicks(&self) -> u64 {
        self.rings.kicks
    }

    /// Descriptors not posted: how many more packets can be submitted now.
    pub fn free_descriptors(&self) -> usize {
        self.free_ids.len()
    }

    /// Chunks of the arena no buffer holds.
    pub fn free_chunks(&self) -> usize {
        self.free_chunks
    }

    fn mark(&mut self, first: usize, chunks: usize, in_use: bool) {
        let end = first + chunks;
        let mut chunk = first;
        while chunk < end {
            let bit = chunk % 64;
            let count = (64 - bit).min(end - chunk);
            let mask = (u64::MAX >> (64 - count)) << bit;
            if let Some(word) = self.in_use.get_mut(chunk / 64) {
                if in_use {
                    *word |= mask;
                } else {
                    *word &= !mask;
                }
            }
            chunk += count;
        }
    }

    /// Free chunks from `start` on, counting at most `limit`.
    fn free_run_from(&self, start: usize, limit: usize) -> usize {
        let end = (start + limit).min(self.chunk_count);
        let mut chunk = start;
        while chunk < end {
            let word = self.in_use.get(chunk / 64).copied().unwrap_or(u64::MAX);
            let bit = chunk % 64;
            let free = ((word >> bit).trailing_zeros() as usize).min(64 - bit);
            chunk += free;
            if free < 64 - bit {
                break;
            }
        }
        chunk.min(end) - start
    }

    /// Chunks in use from `start` on, up to the end of the arena.
    fn used_run_from(&self, start: usize) -> usize {
        let mut chunk = start;
        while chunk < self.chunk_count {
            let word = self.in_use.get(chunk / 64).copied().unwrap_or(0);
            let bit = chunk % 64;
            let used = (word >> bit).trailing_ones() as usize;
            chunk += used;
            if used < 64 - bit {
                break;
            }
        }
        chunk.min(self.chunk_count) - start
    }

    /// Allocates a buffer for `want` bytes, or, when no run of chunks is that long, the
    /// longest run there is of at least `at_least` bytes. `None` when not even that is free.
    pub fn alloc(&mut self, at_least: usize, want: usize) -> Option<TxBuffer> {
        let least_chunks = at_least.max(1).div_ceil(TX_CHUNK);
        let want_chunks = want
            .div_ceil(TX_CHUNK)
            .clamp(least_chunks, self.chunk_count.max(1));
        if least_chunks > self.free_chunks {
            return None;
        }
        // The usual case first: the chunks at the cursor are free (packets complete in
        // order, so the ones after the last allocation are the first to be free).
        if self.cursor + want_chunks <= self.chunk_count
            && self.free_run_from(self.cursor, want_chunks) == want_chunks
        {
            return Some(self.take_run(self.cursor, want_chunks));
        }
        // Next fit from the cursor, wrapping once; a run never wraps (it is contiguous).
        let mut best: Option<(usize, usize)> = None;
        let mut chunk = self.cursor.min(self.chunk_count);
        let mut scanned = 0;
        while scanned < self.chunk_count {
            if chunk >= self.chunk_count {
                chunk = 0;
            }
            let used = self.used_run_from(chunk);
            if used > 0 {
                chunk += used;
                scanned += used;
                continue;
            }
            let free = self.free_run_from(chunk, want_chunks).max(1);
            if free >= want_chunks {
                best = Some((chunk, want_chunks));
                break;
            }
            if free >= least_chunks && best.is_none_or(|(_, len)| free > len) {
                best = Some((chunk, free));
            }
            chunk += free;
            scanned += free;
        }
        let (first, chunks) = best?;
        Some(self.take_run(first, chunks))
    }

    /// Marks the free run of `chunks` chunks from `first` in use, as a buffer.
    fn take_run(&mut self, first: usize, chunks: usize) -> TxBuffer {
        self.mark(first, chunks, true);
        self.free_chunks -= chunks;
        self.cursor = first + chunks;
        TxBuffer {
            first: first as u16,
            chunks: chunks as u16,
            arena: self.arena.paddr,
        }
    }

    /// Gives an unsubmitted buffer's chunks back.
    pub fn release(&mut self, buffer: TxBuffer) {
        if self.owns(&buffer) {
            self.free_run(buffer.first, buffer.chunks);
        }
    }

    /// Whether `buffer` came from this queue's `alloc`.
    fn owns(&self, buffer: &TxBuffer) -> bool {
        buffer.arena == self.arena.paddr
            && usize::from(buffer.first) + usize::from(buffer.chunks) <= self.chunk_count
    }

    fn free_run(&mut self, first: u16, chunks: u16) {
        let (first, chunks) = (usize::from(first), usize::from(chunks));
        self.mark(first, chunks, false);
        self.free_chunks = (self.free_chunks + chunks).min(self.chunk_count);
    }

    /// The bytes of `buffer`, for the driver to fill.
    pub fn buffer_mut(&mut self, buffer: &TxBuffer) -> &mut [u8] {
        if !self.owns(buffer) {
            return &mut [];
        }
        let first = usize::from(buffer.first);
        let chunks = usize::from(buffer.chunks);
        // SAFETY: the run lies within this queue's arena (checked by `owns`), which is live
        // for as long as `self`. `TxBuffer`s come only from `alloc`, which marks their
        // chunks in use, and are not `Clone`, so no other buffer and no posted descriptor
        // covers these chunks: the device does not read them now, and the exclusive borrow
        // of `self` makes this the only reference to them.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.arena.at::<u8>(first * TX_CHUNK),
                chunks * TX_CHUNK,
            )
        }
    }

    /// Sends the first `len` bytes of `buffer` as one packet; the chunks after them are
    /// free again. Gives the buffer back when no descriptor is free (or `len` is larger
    /// than the buffer).
    pub fn submit(&mut self, mut buffer: TxBuffer, len: usize) -> Result<(), TxBuffer> {
        if len > buffer.capacity() || len == 0 || !self.owns(&buffer) {
            return Err(buffer);
        }
        let Some(id) = self.free_ids.pop() else {
            return Err(buffer);
        };
        let needed = len.div_ceil(TX_CHUNK) as u16;
        if needed < buffer.chunks {
            self.free_run(buffer.first + needed, buffer.chunks - needed);
            buffer.chunks = needed;
        }
        let addr = self.arena.paddr + (usize::from(buffer.first) * TX_CHUNK) as u64;
        self.rings.write_descriptor(id, addr, len as u32, 0);
        if let Some(run) = self.runs.get_mut(usize::from(id)) {
            *run = (buffer.first, buffer.chunks);
        }
        self.rings.post(id);
        Ok(())
    }

    /// Takes the next sent packet back from the device and frees its chunks. `None` when
    /// the device has returned nothing more; `Some(Err(_))` for a bad used-ring entry
    /// (B6), which frees nothing.
    pub fn reclaim_one(&mut self) -> Option<Result<(), BadUsed>> {
        Some(match self.rings.pop_used()? {
            Err(raw_id) => Err(BadUsed::UnknownId(raw_id)),
            // A sent buffer's used length carries no meaning for us.
            Ok((id, _len)) => {
                let (first, chunks) = self.runs.get(usize::from(id)).copied().unwrap_or((0, 0));
                self.free_run(first, chunks);
                // Capacity is MAX_QUEUE_SIZE >= size, and the id was posted, so not free.
                let _ = self.free_ids.push(id);
                Ok(())
            }
        })
    }

    /// Packets submitted since the last notification decision.
    pub fn unnotified(&self) -> u16 {
        self.rings.unnotified()
    }

    /// Packets the device holds (submitted, not yet reclaimed).
    pub fn outstanding(&self) -> u16 {
        self.rings.outstanding()
    }

    /// Used entries taken back so far, good and rejected ones (wraps at 2^16).
    pub fn used_taken(&self) -> u16 {
        self.rings.used_taken()
    }

    /// The ring's indices now (see [`RingIndices`]).
    pub fn indices(&self) -> RingIndices {
        self.rings.indices()
    }

    /// Publishes and notifies the device whatever it asked for: the way out for a device
    /// that holds packets, uses none, and has not asked to hear of new ones.
    pub fn notify_anyway<T: Transport>(&mut self, transport: &mut T) {
        self.rings.notify_anyway(transport);
    }

    /// Notifies the device of packets submitted since the last call, where it asked to
    /// hear (B8). Returns whether it notified.
    pub fn notify_if_needed<T: Transport>(&mut self, transport: &mut T) -> bool {
        self.rings.notify_if_needed(transport)
    }

    /// Asks the device to interrupt when it returns a packet: once with
    /// `VIRTIO_F_EVENT_IDX`, per batch without it until [`TxQueue::disarm_interrupt`].
    /// Returns `false` when it had returned one already before the request was visible
    /// (then no interrupt need come for it: look at the ring instead of waiting).
    pub fn arm_interrupt(&mut self) -> bool {
        self.rings.arm()
    }

    /// Asks the device not to interrupt.
    pub fn disarm_interrupt(&mut self) {
        self.rings.disarm();
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::testing::{FakeHal, FakeTransport};

    const FEATURES: u64 = (1 << 32) | 1;

    fn tx_queue(size: u16, arena_bytes: usize) -> (FakeTransport, TxQueue<FakeHal>) {
        let mut transport = FakeTransport::new(3, FEATURES);
        let queue = TxQueue::new(&mut transport, 1, size, arena_bytes, false).unwrap();
        (transport, queue)
    }

    /// A receive queue of `size` buffers of `buffer_size` bytes, all posted.
    fn rx_queue(size: u16, buffer_size: usize) -> (FakeTransport, RxQueue<FakeHal>) {
        let mut transport = FakeTransport::new(3, FEATURES);
        let mut queue = RxQueue::new(&mut transport, 0, size, buffer_size, false).unwrap();
        queue.post_all();
        (transport, queue)
    }

    fn runs(buffers: &[TxBuffer]) -> std::vec::Vec<(u16, u16)> {
        buffers.iter().map(|b| (b.first, b.chunks)).collect()
    }

    /// Plays the device: returns every published descriptor as used, in the order posted.
    fn complete_all(transport: &mut FakeTransport, queue: &mut TxQueue<FakeHal>) -> usize {
        queue.notify_if_needed(transport);
        let mut model = crate::testing::DeviceModel::new(transport);
        let taken = core::iter::from_fn(|| model.pop_tx_bytes()).count();
        let mut reclaimed = 0;
        while let Some(entry) = queue.reclaim_one() {
            entry.unwrap();
            reclaimed += 1;
        }
        assert_eq!(reclaimed, taken);
        reclaimed
    }

    #[test]
    fn a_packet_takes_the_chunks_its_length_needs() {
        let (_transport, mut queue) = tx_queue(8, 16 * TX_CHUNK);
        let small = queue.alloc(45, 45).unwrap();
        assert_eq!((small.first, small.chunks), (0, 1));
        let exact = queue.alloc(45, 2 * TX_CHUNK).unwrap();
        assert_eq!((exact.first, exact.chunks), (1, 2));
        let over = queue.alloc(45, 2 * TX_CHUNK + 1).unwrap();
        assert_eq!((over.first, over.chunks), (3, 3));
        assert_eq!(over.capacity(), 3 * TX_CHUNK);
        assert_eq!(queue.free_chunks(), 10);
        for buffer in [small, exact, over] {
            queue.release(buffer);
        }
        assert_eq!(queue.free_chunks(), 16);
    }

    #[test]
    fn a_fragmented_arena_gives_the_longest_run_it_has() {
        let (_transport, mut queue) = tx_queue(8, 8 * TX_CHUNK);
        let all: std::vec::Vec<TxBuffer> = (0..8).map(|_| queue.alloc(1, 1).unwrap()).collect();
        assert_eq!(queue.alloc(1, 1), None, "full");
        // Free chunks 1, 3, 4 and 6: runs of 1, 2 and 1.
        let mut kept = std::vec::Vec::new();
        for (index, buffer) in all.into_iter().enumerate() {
            if [1, 3, 4, 6].contains(&index) {
                queue.release(buffer);
            } else {
                kept.push(buffer);
            }
        }
        let longest = queue.alloc(1, 8 * TX_CHUNK).unwrap();
        assert_eq!((longest.first, longest.chunks), (3, 2));
        assert_eq!(
            queue.alloc(2 * TX_CHUNK, 8 * TX_CHUNK),
            None,
            "no run of two chunks left"
        );
        let one = queue.alloc(TX_CHUNK, 8 * TX_CHUNK).unwrap();
        assert_eq!(one.chunks, 1);
        kept.push(longest);
        kept.push(one);
        assert_eq!(queue.free_chunks(), 1);
        for buffer in kept {
            queue.release(buffer);
        }
        assert_eq!(queue.free_chunks(), 8);
        let whole = queue.alloc(1, 8 * TX_CHUNK).unwrap();
        assert_eq!((whole.first, whole.chunks), (0, 8));
    }

    #[test]
    fn allocation_goes_on_after_the_last_one_and_wraps() {
        let (mut transport, mut queue) = tx_queue(8, 10 * TX_CHUNK);
        let first = queue.alloc(1, 4 * TX_CHUNK).unwrap();
        queue.submit(first, 100).unwrap();
        let second = queue.alloc(1, 4 * TX_CHUNK).unwrap();
        assert_eq!(second.first, 4);
        queue.submit(second, 100).unwrap();
        assert_eq!(complete_all(&mut transport, &mut queue), 2);
        // Chunks 0..8 are free again, but the next allocation starts at 8: the two chunks
        // there are too few for four, so it wraps to the start.
        let third = queue.alloc(1, 4 * TX_CHUNK).unwrap();
        assert_eq!((third.first, third.chunks), (0, 4));
        let fourth = queue.alloc(1, 2 * TX_CHUNK).unwrap();
        assert_eq!(runs(&[third, fourth]), [(0, 4), (4, 2)]);
    }

    #[test]
    fn submitted_packets_hold_descriptors_until_the_device_returns_them() {
        let (mut transport, mut queue) = tx_queue(2, 8 * TX_CHUNK);
        for _ in 0..2 {
            let buffer = queue.alloc(1, 1).unwrap();
            queue.buffer_mut(&buffer)[..3].copy_from_slice(b"abc");
            queue.submit(buffer, 3).unwrap();
        }
        assert_eq!(queue.free_descriptors(), 0);
        let third = queue.alloc(1, 1).unwrap();
        let third = queue.submit(third, 3).unwrap_err();
        queue.release(third);
        assert_eq!(queue.free_chunks(), 6);
        queue.notify_if_needed(&mut transport);
        let mut model = crate::testing::DeviceModel::new(&transport);
        assert_eq!(model.pop_tx_bytes(), Some(Ok(b"abc".to_vec())));
        assert_eq!(queue.reclaim_one(), Some(Ok(())));
        assert_eq!(
            queue.reclaim_one(),
            None,
            "the second is still with the device"
        );
        assert_eq!((queue.free_descriptors(), queue.free_chunks()), (1, 7));
    }

    #[test]
    fn bad_used_entries_free_nothing() {
        let (transport, mut queue) = tx_queue(4, 4 * TX_CHUNK);
        let buffer = queue.alloc(1, 1).unwrap();
        queue.submit(buffer, 1).unwrap();
        let mut model = crate::testing::DeviceModel::new(&transport);
        // A device returning an id twice, one never posted and one out of range.
        model.push_used(1, 0, 0).unwrap();
        model.push_used(1, 0, 0).unwrap();
        model.push_used(1, 2, 0).unwrap();
        model.push_used(1, 70_000, 0).unwrap();
        assert_eq!(queue.reclaim_one(), Some(Ok(())));
        assert_eq!(queue.reclaim_one(), Some(Err(BadUsed::UnknownId(0))));
        assert_eq!(queue.reclaim_one(), Some(Err(BadUsed::UnknownId(2))));
        assert_eq!(queue.reclaim_one(), Some(Err(BadUsed::UnknownId(70_000))));
        assert_eq!(queue.reclaim_one(), None);
        assert_eq!((queue.free_descriptors(), queue.free_chunks()), (4, 4));
    }

    #[test]
    fn a_buffer_of_another_queue_is_never_used() {
        let (_transport, mut queue) = tx_queue(4, 4 * TX_CHUNK);
        let (_other_transport, mut other) = tx_queue(4, 4 * TX_CHUNK);
        let foreign = other.alloc(1, 1).unwrap();
        assert!(queue.buffer_mut(&foreign).is_empty());
        let foreign = queue.submit(foreign, 1).unwrap_err();
        queue.release(foreign);
        assert_eq!(queue.free_chunks(), 4);
        assert_eq!(other.free_chunks(), 3);
    }

    #[test]
    fn reposted_buffers_reach_the_device_once_per_batch() {
        let (mut transport, mut queue) = rx_queue(8, 64);
        let mut model = crate::testing::DeviceModel::new(&transport);
        assert_eq!(model.available(0), 8, "start-up publishes every buffer");
        for _ in 0..3 {
            model.deliver_raw(&[0; 8], 8).unwrap();
        }
        assert_eq!(model.available(0), 5);
        for _ in 0..3 {
            let Some(Ok(Used { id, .. })) = queue.pop_used() else {
                panic!("three buffers came back");
            };
            queue.repost(id);
        }
        assert_eq!(model.available(0), 5, "reposts wait for the batch to end");
        assert!(queue.notify_if_needed(&mut transport));
        assert_eq!(model.available(0), 8);
        assert!(
            !queue.notify_if_needed(&mut transport),
            "nothing new to publish"
        );
    }

    #[test]
    fn peeking_at_the_next_used_length_takes_nothing() {
        let (transport, mut queue) = rx_queue(4, 64);
        let mut model = crate::testing::DeviceModel::new(&transport);
        assert_eq!(queue.peek_used_len(), None);
        model.deliver_raw(&[1; 10], 10).unwrap();
        model.deliver_raw(&[2; 30], 30).unwrap();
        // The same entry until it is taken, then the next.
        assert_eq!(queue.peek_used_len(), Some(10));
        assert_eq!(queue.peek_used_len(), Some(10));
        assert!(matches!(queue.pop_used(), Some(Ok(Used { len: 10, .. }))));
        assert_eq!(queue.peek_used_len(), Some(30));
        assert!(matches!(queue.pop_used(), Some(Ok(Used { len: 30, .. }))));
        assert_eq!(queue.peek_used_len(), None);
        assert!(queue.pop_used().is_none());
    }

    #[test]
    fn peeking_at_used_buffers_takes_nothing_and_skips_what_pop_rejects() {
        let (transport, mut queue) = rx_queue(4, 64);
        let mut model = crate::testing::DeviceModel::new(&transport);
        assert_eq!(queue.used_pending(), 0);
        assert_eq!(queue.peek_used_buffer(0), None);
        model.deliver_raw(&[1, 2, 3, 4], 4).unwrap();
        model.deliver_raw(&[5; 30], 30).unwrap();
        // The index is read when everything seen was taken; entries past it wait for a
        // fresh read.
        assert_eq!(queue.peek_used_buffer(0), Some(&[1, 2, 3, 4][..]));
        model.deliver_raw(&[6; 40], 40).unwrap();
        assert_eq!(queue.peek_used_buffer(2), None);
        assert_eq!(queue.used_pending(), 3);
        assert_eq!(queue.peek_used_buffer(0), Some(&[1, 2, 3, 4][..]));
        assert_eq!(queue.peek_used_buffer(1), Some(&[5; 30][..]));
        assert_eq!(queue.peek_used_buffer(2), Some(&[6; 40][..]));
        assert_eq!(queue.peek_used_buffer(3), None, "past the used index");
        for len in [4, 30, 40] {
            assert!(matches!(queue.pop_used(), Some(Ok(Used { len: l, .. })) if l == len));
        }
        assert_eq!(queue.used_pending(), 0);
        // An id out of range, a length over the buffer: pop_used rejects both, and the
        // peek shows neither.
        model.push_used(0, 9, 8).unwrap();
        assert_eq!(queue.peek_used_buffer(0), None);
        assert!(matches!(queue.pop_used(), Some(Err(_))));
        model.deliver_raw(&[7; 8], 65).unwrap();
        assert_eq!(queue.peek_used_buffer(0), None);
        assert!(matches!(
            queue.pop_used(),
            Some(Err(BadUsed::TooLong { .. }))
        ));
        assert_eq!(queue.peek_used_buffer(0), None);
    }

    #[test]
    fn an_arena_is_whole_chunks_within_bounds() {
        let mut transport = FakeTransport::new(3, FEATURES);
        assert_eq!(
            TxQueue::<FakeHal>::new(&mut transport, 1, 4, TX_CHUNK - 1, false).err(),
            Some(Error::InvalidArgument)
        );
        let (_transport, queue) = tx_queue(4, 3 * TX_CHUNK + 100);
        assert_eq!(queue.arena_bytes(), 3 * TX_CHUNK);
        let (_transport, queue) = tx_queue(4, usize::MAX / 2);
        assert_eq!(queue.arena_bytes(), MAX_TX_CHUNKS * TX_CHUNK);
    }
}
