//! One connection's data on its way out: packets built in transmit memory that wait for
//! the peer's credit, so that `send` takes bytes beyond what the peer has room for (up to
//! `Config::send_buffer`) and the application can go on producing while the peer catches
//! up. The data is written once, into the DMA memory the device reads (by copy from the
//! caller's slice, or in place through `send_with`); a packet is submitted whole as soon as
//! the peer's credit covers it (B25).

use crate::conn::Connection;
use crate::device::VirtioVsock;
use crate::queue::TxBuffer;
use crate::wire::{Op, ShutdownFlags};
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

/// Packets one connection may have waiting.
pub const SEGMENTS: usize = 4;

/// The smallest payload [`SendQueue::packet_limit`] cuts packets to for a small window:
/// smaller packets would cost the device and the peer more per byte than the pipelining
/// saves.
const MIN_WINDOW_SHARE: usize = 4096;

/// A packet being built: its buffer (header space first) and the payload bytes in it.
#[derive(Debug)]
struct Segment {
    buffer: TxBuffer,
    /// Payload bytes written.
    len: u32,
    /// Payload bytes it may hold.
    capacity: u32,
}

/// Where [`SendQueue::append`] puts the next bytes, and how many fit.
enum Space {
    /// The newest waiting packet has room for this many.
    Back(usize),
    /// A new packet, of this payload capacity.
    New(usize),
    /// None: the send buffer is full, or memory ran out.
    None,
}

/// The packets of one connection that wait for credit or a free descriptor, oldest first.
/// The newest one takes more bytes while it waits.
#[derive(Debug)]
pub struct SendQueue {
    segments: heapless::Deque<Segment, SEGMENTS>,
}

impl SendQueue {
    /// An empty queue.
    pub const fn new() -> Self {
        SendQueue {
            segments: heapless::Deque::new(),
        }
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Payload bytes waiting.
    pub fn unsent(&self) -> usize {
        self.segments.iter().map(|s| s.len as usize).sum()
    }

    /// Payload bytes of the oldest waiting packet (0 when none waits).
    pub fn front_len(&self) -> usize {
        self.segments.front().map_or(0, |s| s.len as usize)
    }

    /// The payload space [`SendQueue::append`] would offer now (0: it would take nothing).
    pub fn room<H: Hal, T: Transport>(
        &self,
        device: &VirtioVsock<H, T>,
        conn: &Connection,
        send_buffer: usize,
    ) -> usize {
        match self.next_space(device, conn, send_buffer, usize::MAX) {
            Space::Back(n) | Space::New(n) => n,
            Space::None => 0,
        }
    }

    /// Where the next bytes go: the newest waiting packet while it has room, else a new
    /// packet, which goes out at once when nothing waits, the peer has room and a
    /// descriptor and memory are free (it then holds at most `size_hint` bytes, and
    /// `send_buffer` does not count), or else waits.
    fn next_space<H: Hal, T: Transport>(
        &self,
        device: &VirtioVsock<H, T>,
        conn: &Connection,
        send_buffer: usize,
        size_hint: usize,
    ) -> Space {
        let credit = conn.credit.peer_free() as usize;
        let can_submit = device.tx_free_descriptors() > 0 && device.tx_free_chunks() > 0;
        if self.segments.is_empty() && credit > 0 && can_submit {
            return Space::New(credit.min(Self::packet_limit(device, conn)).min(size_hint));
        }
        let queued_room = send_buffer.saturating_sub(self.unsent());
        if queued_room == 0 {
            return Space::None;
        }
        if let Some(back) = self.segments.back() {
            let free = ((back.capacity - back.len) as usize).min(queued_room);
            if free > 0 {
                return Space::Back(free);
            }
        }
        if self.segments.is_full() || device.tx_free_chunks() == 0 {
            return Space::None;
        }
        Space::New(Self::packet_limit(device, conn).min(queued_room))
    }

    /// The largest payload a new packet of `conn` takes: the device's and the peer's
    /// limit, and half the peer's receive buffer, but not under 4 KiB (or the whole
    /// buffer, when it is smaller). A packet as large as the peer's whole buffer takes all
    /// its credit at once: the connection then waits a full round trip for the peer's
    /// CREDIT_UPDATE before it sends again. With two packets in the window, one is on the
    /// way while the peer reads the other, and the peer's update (sent when its free
    /// space runs low) comes before the pipe runs dry; `dispatch` cuts a packet that
    /// does not fit what is left, so the window does fill. Against vhost-device-vsock's
    /// 64 KiB window, half-window packets measured faster than quarter-window ones
    /// (README "Memory"): fewer packets, and the backend pays per packet.
    fn packet_limit<H: Hal, T: Transport>(device: &VirtioVsock<H, T>, conn: &Connection) -> usize {
        let window = conn.credit.peer_buf_alloc() as usize;
        let share = (window / 2).max(window.min(MIN_WINDOW_SHARE));
        Self::max_payload(device, conn).min(share).max(1)
    }

    /// The largest payload of one packet of `conn`: the device's limit, and the peer's.
    fn max_payload<H: Hal, T: Transport>(device: &VirtioVsock<H, T>, conn: &Connection) -> usize {
        device
            .max_tx_payload()
            .min(usize::try_from(conn.max_payload).unwrap_or(usize::MAX))
    }

    /// Gives `write` the free payload space of the newest waiting packet, or of a new one
    /// (see [`SendQueue::room`]), for it to fill; returns the bytes it wrote (what it
    /// returns, at most the space). `size_hint`: the most bytes `write` will want (a
    /// packet that goes out at once is not made larger). 0 when there is no room: the
    /// peer's credit plus `send_buffer` is taken, or transmit memory or descriptors ran
    /// out. The caller submits with [`SendQueue::dispatch`].
    pub fn append<H: Hal, T: Transport>(
        &mut self,
        device: &mut VirtioVsock<H, T>,
        conn: &Connection,
        send_buffer: usize,
        size_hint: usize,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) -> usize {
        let capacity = match self.next_space(device, conn, send_buffer, size_hint) {
            Space::None => return 0,
            Space::Back(free) => {
                let Some(back) = self.segments.back_mut() else {
                    return 0;
                };
                let start = back.len as usize;
                let space = device
                    .tx_payload_mut(&back.buffer)
                    .get_mut(start..start + free)
                    .unwrap_or_default();
                let n = write(space).min(free);
                back.len += n as u32;
                return n;
            }
            Space::New(capacity) => capacity,
        };
        let Some(buffer) = device.alloc_tx(capacity) else {
            return 0;
        };
        let space = device.tx_payload_mut(&buffer);
        let capacity = space.len().min(capacity);
        let n = write(space.get_mut(..capacity).unwrap_or_default()).min(capacity);
        if n == 0 {
            device.release_tx(buffer);
            return 0;
        }
        let segment = Segment {
            buffer,
            len: n as u32,
            capacity: capacity as u32,
        };
        if let Err(segment) = self.segments.push_back(segment) {
            // Not full (checked above); give the memory back all the same.
            device.release_tx(segment.buffer);
            return 0;
        }
        n
    }

    /// Sends all of `data` as one packet at once, when that is the packet [`append`] and
    /// [`dispatch`] would make and submit: nothing waits, the peer will receive, its
    /// credit and one packet's limit cover `data`, and a descriptor and memory are free.
    /// Returns whether it did; when not, nothing changed. The short way for the common
    /// small send (a reply), without building the packet in the queue first.
    ///
    /// [`append`]: SendQueue::append
    /// [`dispatch`]: SendQueue::dispatch
    pub fn send_at_once<H: Hal, T: Transport>(
        &self,
        device: &mut VirtioVsock<H, T>,
        conn: &mut Connection,
        guest_cid: u32,
        data: &[u8],
    ) -> bool {
        let len = data.len();
        if !self.segments.is_empty()
            || len == 0
            || len > conn.credit.peer_free() as usize
            || len > Self::packet_limit(device, conn)
            || conn.peer_shutdown.contains(ShutdownFlags::RECEIVE)
            || device.tx_free_descriptors() == 0
        {
            return false;
        }
        let Some(buffer) = device.alloc_tx(len) else {
            return false;
        };
        let Some(space) = device.tx_payload_mut(&buffer).get_mut(..len) else {
            device.release_tx(buffer);
            return false;
        };
        space.copy_from_slice(data);
        if let Err(buffer) = submit_data(device, conn, guest_cid, buffer, len) {
            device.release_tx(buffer);
            return false;
        }
        true
    }

    /// Submits waiting packets, oldest first, while the peer's credit covers each whole
    /// one and descriptors are free (B25), each with its header made as it enters the
    /// ring (B9, B43). A peer that will receive no more gets nothing: the waiting data is
    /// dropped (B33).
    pub fn dispatch<H: Hal, T: Transport>(
        &mut self,
        device: &mut VirtioVsock<H, T>,
        conn: &mut Connection,
        guest_cid: u32,
    ) {
        if conn.peer_shutdown.contains(ShutdownFlags::RECEIVE) {
            self.release_all(device);
            return;
        }
        while let Some(front) = self.segments.front() {
            let len = front.len as usize;
            let credit = conn.credit.peer_free() as usize;
            if device.tx_free_descriptors() == 0 {
                break;
            }
            if len > credit {
                // A packet larger than the peer's whole buffer (it shrank the buffer since)
                // would wait forever: send what fits from its front. So would, until the
                // credit probe, one that needs more than is left while too little is in
                // flight for the peer's space to run low (peers return credit unasked
                // only then; writes of odd sizes leave packets of odd sizes): send what
                // fits, not under 4 KiB or half the buffer, and the window is full.
                let peer_buf_alloc = conn.credit.peer_buf_alloc() as usize;
                let never_fits = len > peer_buf_alloc;
                let smallest_cut = MIN_WINDOW_SHARE.min(peer_buf_alloc / 2).max(1);
                let peer_stays_silent =
                    !conn.credit.peer_updates_unasked() && credit >= smallest_cut;
                if (peer_stays_silent || never_fits && credit > 0)
                    && self.send_front_part(device, conn, guest_cid, credit)
                {
                    continue;
                }
                break;
            }
            let Some(segment) = self.segments.pop_front() else {
                break;
            };
            if let Err(buffer) = submit_data(device, conn, guest_cid, segment.buffer, len) {
                // Unreachable with a free descriptor; keep the data for the next try.
                let _ = self.segments.push_front(Segment { buffer, ..segment });
                break;
            }
        }
    }

    /// Sends the first `n` bytes of the oldest waiting packet in a packet of their own
    /// (copied into new transmit memory) and moves the rest to the front of its buffer.
    /// Returns whether it did: not without memory or a descriptor for it.
    fn send_front_part<H: Hal, T: Transport>(
        &mut self,
        device: &mut VirtioVsock<H, T>,
        conn: &mut Connection,
        guest_cid: u32,
        n: usize,
    ) -> bool {
        let Some(front) = self.segments.front_mut() else {
            return false;
        };
        let Some(part) = device.alloc_tx(n) else {
            return false;
        };
        let n = n
            .min(device.tx_payload_mut(&part).len())
            .min(front.len as usize);
        let mut bounce = [0u8; 512];
        let mut copied = 0;
        while copied < n {
            // Through a small bounce buffer: both runs are borrows of the one arena.
            let step = (n - copied).min(bounce.len());
            let range = copied..copied + step;
            let from = device.tx_payload_mut(&front.buffer).get(range.clone());
            let Some(from) = from else { break };
            bounce[..step].copy_from_slice(from);
            let Some(to) = device.tx_payload_mut(&part).get_mut(range) else {
                break;
            };
            to.copy_from_slice(&bounce[..step]);
            copied += step;
        }
        if copied < n {
            device.release_tx(part);
            return false;
        }
        if let Err(part) = submit_data(device, conn, guest_cid, part, n) {
            device.release_tx(part);
            return false;
        }
        let len = front.len as usize;
        if let Some(rest) = device.tx_payload_mut(&front.buffer).get_mut(..len) {
            rest.copy_within(n.., 0);
        }
        front.len -= n as u32;
        true
    }

    /// Drops everything waiting and gives its memory back.
    pub fn release_all<H: Hal, T: Transport>(&mut self, device: &mut VirtioVsock<H, T>) {
        while let Some(segment) = self.segments.pop_front() {
            device.release_tx(segment.buffer);
        }
    }

    /// Forgets everything waiting without giving memory back: for queues whose device is
    /// gone (a `SocketSlot` handed to a new `VsockDevice`).
    pub fn forget(&mut self) {
        self.segments.clear();
    }
}

/// Submits the `len` payload bytes in `buffer` as a packet of data of `conn`, its header
/// made now, with the connection's credit fields as they are when it enters the ring (B9,
/// B43), and counts them against the peer's credit. Gives the buffer back when the device
/// has no room for it.
fn submit_data<H: Hal, T: Transport>(
    device: &mut VirtioVsock<H, T>,
    conn: &mut Connection,
    guest_cid: u32,
    buffer: TxBuffer,
    len: usize,
) -> Result<(), TxBuffer> {
    let header = conn.header(guest_cid, Op::Rw);
    device.submit_tx(buffer, &header, len)?;
    conn.credit.on_sent(len as u32);
    conn.credit.on_header_sent(header.buf_alloc, header.fwd_cnt);
    Ok(())
}

impl Default for SendQueue {
    fn default() -> Self {
        Self::new()
    }
}
