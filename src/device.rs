//! Bring-up and ownership of the virtio socket device: feature negotiation, the rx, tx and
//! event queues, the guest CID, packet transmission and reception.

use crate::addr::is_valid_guest_cid;
use crate::error::Error;
use crate::queue::{BadUsed, RxQueue, TxBuffer, TxQueue, Used, MAX_QUEUE_SIZE, TX_CHUNK};
use crate::time::Instant;
use crate::wire::{Header, Op, WireError, HEADER_LEN, MAX_PAYLOAD, OP_INVALID};
use bitflags::bitflags;
use core::time::Duration;
use virtio_drivers::transport::{DeviceType, Transport};
use virtio_drivers::Hal;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const EVENT_QUEUE: u16 = 2;
/// Event buffers posted (B3: at least 4).
const EVENT_BUFFERS: u16 = 4;
/// `struct virtio_vsock_event` is one le32 (B39).
const EVENT_LEN: usize = 4;

bitflags! {
    /// Feature bits this driver understands (B1, B8).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Features: u64 {
        /// `VIRTIO_VSOCK_F_STREAM`.
        const STREAM = 1 << 0;
        /// `VIRTIO_VSOCK_F_SEQPACKET` (never negotiated yet).
        const SEQPACKET = 1 << 1;
        /// `VIRTIO_VSOCK_F_NO_IMPLIED_STREAM`.
        const NO_IMPLIED_STREAM = 1 << 2;
        /// `VIRTIO_F_RING_EVENT_IDX`.
        const RING_EVENT_IDX = 1 << 29;
        /// `VIRTIO_F_VERSION_1`.
        const VERSION_1 = 1 << 32;
    }
}

/// Queue and buffer sizes of the device; see [`crate::Config`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Descriptors per queue (rounded down to a power of two, capped by the device and by
    /// 256).
    pub queue_size: u16,
    /// Bytes per receive buffer, header included.
    pub rx_buffer_size: usize,
    /// Largest transmitted packet, header included.
    pub tx_packet_size: usize,
    /// Bytes of DMA memory for packets being sent.
    pub tx_memory: usize,
}

/// Counters of device activity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Notifications (kicks) sent on the rx queue.
    pub rx_kicks: u64,
    /// Notifications (kicks) sent on the tx queue.
    pub tx_kicks: u64,
    /// Packets received and parsed.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Received packets dropped as malformed.
    pub rx_dropped: u64,
    /// Receive buffers the device returned with no packet in them, dropped: the header it
    /// left reads op 0 (`VIRTIO_VSOCK_OP_INVALID`), or 44 bytes were written and the
    /// header there announces a payload (an earlier data packet's). vhost-device-vsock
    /// 0.3.0 does this routinely around connections that end.
    pub rx_empty: u64,
    /// Used-ring entries rejected (unknown id or bad length).
    pub bad_used_entries: u64,
    /// Notifications on the tx queue sent although the device had not asked for them,
    /// because it held packets and used none for [`DEVICE_STALL`] (counted in `tx_kicks`
    /// too; see [`VirtioVsock::watch_queues`]).
    pub tx_stall_notifies: u64,
    /// Notifications on the rx queue sent although the device had not asked for them,
    /// because it had run out of receive buffers and used none of the reposted ones for
    /// [`DEVICE_STALL`] (counted in `rx_kicks` too).
    pub rx_stall_notifies: u64,
    /// Interrupts acknowledged that were this device's (see
    /// [`VirtioVsock::ack_interrupt`]).
    pub interrupts: u64,
    /// CREDIT_UPDATE packets received: how often peers returned credit unasked or
    /// answered a request (with `tx_credit_requests`, how a transfer was paced).
    pub rx_credit_updates: u64,
    /// CREDIT_REQUEST packets sent: the times a connection found itself without credit
    /// and nothing of its own left unacknowledged, or its probe fired (B29).
    pub tx_credit_requests: u64,
    /// Received payload bytes that went into a socket's receive buffer (copied there, and
    /// copied again by `recv`), rather than straight to the caller of `recv` or
    /// `recv_with` (see [`VsockDevice::recv`](crate::VsockDevice::recv)): data that
    /// arrived while the reader was not in `recv`, or the rest of a packet larger than
    /// `recv`'s buffer. Counted by [`VsockDevice::stats`](crate::VsockDevice::stats); 0
    /// from [`VirtioVsock::stats`].
    pub rx_buffered_bytes: u64,
}

/// What [`VirtioVsock::receive`] took from the device.
#[derive(Clone, Copy, Debug)]
pub enum Arrival<'a> {
    /// A well-formed packet: its header and payload.
    Packet(&'a Header, &'a [u8]),
    /// A packet the device cut short: its used entry claims `written` bytes, more than the
    /// buffer holds, so only the header at the buffer's start is left and the payload's
    /// bytes are lost (B44).
    Truncated {
        /// The header the device wrote.
        header: &'a Header,
        /// The length the used entry claimed.
        written: u32,
    },
}

/// How long the device may sit on work we gave it (transmit packets, or receive buffers
/// after it ran out) without using any before it is notified whatever it asked for (see
/// [`VirtioVsock::watch_queues`]). A working device takes them in microseconds; a needless
/// notification costs one exit.
pub const DEVICE_STALL: Duration = Duration::from_millis(100);

/// How long one queue's device has sat on work, between polls.
#[derive(Clone, Copy, Debug, Default)]
struct StallWatch {
    /// The queue's used entries taken so far, when the wait began.
    taken: u16,
    /// Since when the device has had work and used no entry; `None` while it has none.
    since: Option<Instant>,
    /// Notifications sent in this wait so far: only the first is logged as a warning, so
    /// that a dead device does not fill the log ten lines a second.
    notified: u32,
}

impl StallWatch {
    /// `waiting`: the device has work it has not done; `taken`: the queue's used entries
    /// taken so far (the ring's free-running count). Returns how long the device has sat
    /// on the work once that reaches [`DEVICE_STALL`] (and counts a notification), and
    /// starts the wait again; a used entry starts a new one. (Exactly 65,536 entries
    /// between two polls look like none: at worst one needless notification.)
    fn overdue(&mut self, waiting: bool, taken: u16, now: Instant) -> Option<Duration> {
        if !waiting {
            self.since = None;
            return None;
        }
        match self.since {
            Some(since) if self.taken == taken => {
                let waited = now - since;
                if waited < DEVICE_STALL {
                    return None;
                }
                self.since = Some(now);
                self.notified = self.notified.saturating_add(1);
                Some(waited)
            }
            _ => {
                *self = StallWatch {
                    taken,
                    since: Some(now),
                    notified: 0,
                };
                None
            }
        }
    }

    /// When [`StallWatch::overdue`] will next report, if the device still sits on its
    /// work then.
    fn deadline(&self) -> Option<Instant> {
        self.since.map(|since| since + DEVICE_STALL)
    }

    /// The level to log the notification `overdue` just counted at.
    fn log_level(&self) -> log::Level {
        if self.notified <= 1 {
            log::Level::Warn
        } else {
            log::Level::Debug
        }
    }
}

/// The virtio side of the driver.
pub struct VirtioVsock<H: Hal, T: Transport> {
    transport: T,
    rx: RxQueue<H>,
    tx: TxQueue<H>,
    events: RxQueue<H>,
    /// Largest payload of one transmitted packet.
    max_tx_payload: usize,
    /// Chunks of transmit memory that data never takes (see [`control_reserve`]).
    control_reserve: usize,
    guest_cid: u32,
    features: Features,
    stats: Stats,
    tx_watch: StallWatch,
    /// The rx ring's used entries taken ([`RxQueue::used_taken`]) when the device last had
    /// no receive buffer left, until it uses one of the reposted ones or is notified of
    /// them anyway.
    rx_ran_dry_at: Option<u16>,
    rx_watch: StallWatch,
}

/// Chunks of transmit memory kept for control packets (a chunk each): a sixteenth of
/// `chunks`, and at least one while there are two or more. Data waiting for credit can
/// fill the rest, and control packets still go out meanwhile: the CREDIT_UPDATEs that let
/// the peer send us more, and the CREDIT_REQUESTs of the credit probe. Without them a peer
/// that writes before it reads would wait for our credit while we wait for its, and a
/// peer that does not volunteer its credit would never be asked (a small arena once
/// kept no reserve: `tests/credit_order.rs`, `b43_regression_…`).
fn control_reserve(chunks: usize) -> usize {
    (chunks / 16).max(1).min(chunks.saturating_sub(1))
}

fn largest_power_of_two_at_most(n: u32) -> u16 {
    let capped = n.min(MAX_QUEUE_SIZE as u32);
    if capped == 0 {
        return 0;
    }
    1 << (31 - capped.leading_zeros())
}

/// Reads the guest CID consistently (B2): both 32-bit halves under one config generation.
fn read_guest_cid<T: Transport>(transport: &T) -> Result<u32, Error> {
    let cid = transport
        .read_consistent(|| {
            let low: u32 = transport.read_config_space(0)?;
            let high: u32 = transport.read_config_space(4)?;
            Ok(u64::from(low) | (u64::from(high) << 32))
        })
        .map_err(|_| Error::DeviceError)?;
    if !is_valid_guest_cid(cid) {
        log::warn!("vsock: device reports reserved guest CID {cid:#x}");
        return Err(Error::DeviceError);
    }
    // is_valid_guest_cid guarantees it fits.
    u32::try_from(cid).map_err(|_| Error::DeviceError)
}

impl<H: Hal, T: Transport> VirtioVsock<H, T> {
    /// Brings the device up (B1, B3): negotiates features, reads the CID, sets up the three
    /// queues, posts event and receive buffers, then sets DRIVER_OK.
    pub fn new(mut transport: T, config: QueueConfig) -> Result<Self, Error> {
        if transport.device_type() != DeviceType::Socket {
            return Err(Error::NoDevice);
        }
        if config.rx_buffer_size <= HEADER_LEN || config.tx_packet_size <= HEADER_LEN {
            return Err(Error::InvalidArgument);
        }
        let wanted = Features::VERSION_1
            | Features::STREAM
            | Features::NO_IMPLIED_STREAM
            | Features::RING_EVENT_IDX;
        let features = transport.begin_init(wanted);
        let offered = Features::from_bits_truncate(transport.read_device_features());
        if offered.contains(Features::NO_IMPLIED_STREAM) && !offered.contains(Features::STREAM) {
            log::warn!("vsock: device offers no stream sockets");
            transport.set_status(virtio_drivers::transport::DeviceStatus::FAILED);
            return Err(Error::NoDevice);
        }
        let event_idx = features.contains(Features::RING_EVENT_IDX);
        let guest_cid = match read_guest_cid(&transport) {
            Ok(cid) => cid,
            Err(e) => {
                transport.set_status(virtio_drivers::transport::DeviceStatus::FAILED);
                return Err(e);
            }
        };
        let size_for = |transport: &mut T, queue: u16| {
            let max = transport.max_queue_size(queue);
            largest_power_of_two_at_most(max.min(u32::from(config.queue_size)))
        };
        let rx_size = size_for(&mut transport, RX_QUEUE);
        let tx_size = size_for(&mut transport, TX_QUEUE);
        let event_size = size_for(&mut transport, EVENT_QUEUE).min(EVENT_BUFFERS);
        // On failure, tell the device and unregister every queue while the queues created
        // so far are still alive: they are freed only when this function returns.
        let fail = |transport: &mut T, error: Error| {
            transport.set_status(virtio_drivers::transport::DeviceStatus::FAILED);
            for queue in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
                transport.queue_unset(queue);
            }
            error
        };
        let mut rx = match RxQueue::new(
            &mut transport,
            RX_QUEUE,
            rx_size,
            config.rx_buffer_size,
            event_idx,
        ) {
            Ok(queue) => queue,
            Err(e) => return Err(fail(&mut transport, e)),
        };
        let tx = match TxQueue::new(
            &mut transport,
            TX_QUEUE,
            tx_size,
            config.tx_memory,
            event_idx,
        ) {
            Ok(queue) => queue,
            Err(e) => return Err(fail(&mut transport, e)),
        };
        let mut events = match RxQueue::new(
            &mut transport,
            EVENT_QUEUE,
            event_size,
            EVENT_LEN,
            event_idx,
        ) {
            Ok(queue) => queue,
            Err(e) => return Err(fail(&mut transport, e)),
        };
        events.post_all();
        rx.post_all();
        transport.finish_init();
        let control_reserve = control_reserve(tx.free_chunks());
        let max_tx_payload = (config.tx_packet_size - HEADER_LEN).min(MAX_PAYLOAD).min(
            tx.arena_bytes()
                .saturating_sub(control_reserve * TX_CHUNK + HEADER_LEN),
        );
        let mut device = VirtioVsock {
            transport,
            rx,
            tx,
            events,
            max_tx_payload,
            control_reserve,
            guest_cid,
            features,
            stats: Stats::default(),
            tx_watch: StallWatch::default(),
            rx_ran_dry_at: None,
            rx_watch: StallWatch::default(),
        };
        device.flush();
        let _ = device.events.notify_if_needed(&mut device.transport);
        Ok(device)
    }

    /// Our CID, as the device assigned it.
    pub fn guest_cid(&self) -> u32 {
        self.guest_cid
    }

    /// Re-reads the CID after a transport reset (B40). Keeps the old one if the device
    /// now reports a reserved value.
    pub fn reread_guest_cid(&mut self) {
        match read_guest_cid(&self.transport) {
            Ok(cid) => self.guest_cid = cid,
            Err(_) => log::warn!("vsock: keeping CID {} after reset", self.guest_cid),
        }
    }

    /// The negotiated features.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        Stats {
            rx_kicks: self.rx.kicks(),
            tx_kicks: self.tx.kicks(),
            ..self.stats
        }
    }

    /// Largest payload one transmitted packet can carry.
    pub fn max_tx_payload(&self) -> usize {
        self.max_tx_payload
    }

    /// Transmit descriptors free: packets that can be submitted now.
    pub fn tx_free_descriptors(&self) -> usize {
        self.tx.free_descriptors()
    }

    /// Chunks of transmit memory free for data: those beyond the reserve for control
    /// packets.
    pub fn tx_free_chunks(&self) -> usize {
        self.tx.free_chunks().saturating_sub(self.control_reserve)
    }

    /// Bytes of transmit memory held by packets being built, waiting or with the device.
    pub fn tx_memory_in_use(&self) -> usize {
        self.tx.arena_bytes() - self.tx.free_chunks() * TX_CHUNK
    }

    /// Returns sent packets' memory and descriptors.
    pub fn reclaim_tx(&mut self) {
        while let Some(entry) = self.tx.reclaim_one() {
            if let Err(bad) = entry {
                self.stats.bad_used_entries += 1;
                log::warn!("vsock: tx used entry rejected: {bad:?}");
            }
        }
    }

    /// The one exception to B8, for a device that lost a wake-up: notifies it whatever it
    /// asked for when it has sat on work for [`DEVICE_STALL`] without using any, and logs
    /// that (a warning for the first notification of a wait, debug after). Transmit: it
    /// holds packets and took none (again every [`DEVICE_STALL`] while that lasts).
    /// Receive: it ran out of buffers and used none of those reposted since (once; a
    /// quiet peer sends nothing either).
    ///
    /// `VIRTIO_F_EVENT_IDX` is a store-then-load handshake on both sides (we write the
    /// available index and read `avail_event`; the device writes `avail_event` and reads
    /// the index), and it holds only with a full fence on each. QEMU 7.2's TCG with one
    /// vCPU emits no host barrier for a guest fence, so the two can pass each other: seen
    /// with vhost-device-vsock about once in 40 runs of 64 MiB in 4 KiB writes, the backend
    /// idle in `epoll_wait` with packets on the ring that it never took. Call once a poll,
    /// after its packets are submitted; `now` as passed to `poll`.
    pub fn watch_queues(&mut self, now: Instant) {
        let holding = self.tx.outstanding() > 0;
        if let Some(waited) = self.tx_watch.overdue(holding, self.tx.used_taken(), now) {
            log::log!(
                self.tx_watch.log_level(),
                "vsock: the device holds {} tx packets and took none for {} ms ({:?}); notifying it",
                self.tx.outstanding(),
                waited.as_millis(),
                self.tx.indices()
            );
            self.tx.notify_anyway(&mut self.transport);
            self.stats.tx_stall_notifies += 1;
        }
        let rx_taken = self.rx.used_taken();
        let dry = self.rx_ran_dry_at == Some(rx_taken);
        if let Some(waited) = self.rx_watch.overdue(dry, rx_taken, now) {
            log::log!(
                self.rx_watch.log_level(),
                "vsock: the device ran out of rx buffers and used none of the reposted ones for {} ms ({:?}); notifying it",
                waited.as_millis(),
                self.rx.indices()
            );
            self.rx.notify_anyway(&mut self.transport);
            self.stats.rx_stall_notifies += 1;
            self.rx_ran_dry_at = None;
        }
    }

    /// Transmit memory for a packet of data of up to `payload` bytes (at most
    /// [`VirtioVsock::max_tx_payload`]): as much as that, or less when free memory is
    /// fragmented or only the reserve for control packets is left beyond it; `None` when
    /// none is free for data.
    pub fn alloc_tx(&mut self, payload: usize) -> Option<TxBuffer> {
        let room = self.tx_free_chunks() * TX_CHUNK;
        let want = (HEADER_LEN + payload.min(self.max_tx_payload)).min(room);
        if want <= HEADER_LEN {
            return None;
        }
        self.tx.alloc(HEADER_LEN + 1, want)
    }

    /// The payload space of a packet buffer (after the header's room), at most
    /// [`VirtioVsock::max_tx_payload`] bytes.
    pub fn tx_payload_mut(&mut self, buffer: &TxBuffer) -> &mut [u8] {
        let max = self.max_tx_payload;
        let bytes = self.tx.buffer_mut(buffer);
        let end = bytes.len().min(HEADER_LEN + max);
        bytes.get_mut(HEADER_LEN..end).unwrap_or_default()
    }

    /// Submits a packet whose payload (`len` bytes) is in `buffer`: writes `header` in
    /// front of it, with `len` set (B4). Gives the buffer back when no descriptor is free
    /// or `len` does not fit. The device is notified by [`VirtioVsock::flush`].
    pub fn submit_tx(
        &mut self,
        buffer: TxBuffer,
        header: &Header,
        len: usize,
    ) -> Result<(), TxBuffer> {
        if len > self.max_tx_payload {
            return Err(buffer);
        }
        let header = Header {
            len: len as u32,
            ..*header
        };
        if header.emit(self.tx.buffer_mut(&buffer)).is_err() {
            return Err(buffer);
        }
        self.tx.submit(buffer, HEADER_LEN + len)?;
        self.stats.tx_packets += 1;
        if header.op == Op::CreditRequest as u16 {
            self.stats.tx_credit_requests += 1;
        }
        Ok(())
    }

    /// Gives unsent transmit memory back.
    pub fn release_tx(&mut self, buffer: TxBuffer) {
        self.tx.release(buffer);
    }

    /// Sends one packet: the header (its `len` set from `payload`) and the whole payload,
    /// in one buffer (B4). Errors with `WouldBlock` when no memory or descriptor is free.
    /// The device is notified by [`VirtioVsock::flush`].
    pub fn send(&mut self, header: &Header, payload: &[u8]) -> Result<(), Error> {
        if payload.len() > self.max_tx_payload {
            return Err(Error::InvalidArgument);
        }
        if self.tx.free_descriptors() == 0 {
            return Err(Error::WouldBlock);
        }
        let Some(buffer) = self
            .tx
            .alloc(HEADER_LEN + payload.len(), HEADER_LEN + payload.len())
        else {
            return Err(Error::WouldBlock);
        };
        match self.tx_payload_mut(&buffer).get_mut(..payload.len()) {
            Some(space) => space.copy_from_slice(payload),
            None => {
                self.tx.release(buffer);
                return Err(Error::WouldBlock);
            }
        }
        self.submit_tx(buffer, header, payload.len())
            .map_err(|buffer| {
                self.tx.release(buffer);
                Error::WouldBlock
            })
    }

    /// Notifies the device of sent packets once a quarter of the transmit queue is
    /// waiting for it to hear (B8): a long burst keeps the device busy as it goes.
    pub fn flush_tx_batch(&mut self) {
        if self.tx.unnotified() >= (self.tx.size() / 4).max(1) {
            self.tx.notify_if_needed(&mut self.transport);
        }
    }

    /// Notifies the device about everything posted, where it wants to hear (B8).
    pub fn flush(&mut self) {
        self.tx.notify_if_needed(&mut self.transport);
        self.rx.notify_if_needed(&mut self.transport);
        self.events.notify_if_needed(&mut self.transport);
    }

    /// Takes the next received packet, hands it to `handle`, and reposts the buffer at
    /// once (B31; the device sees the batch of reposts at the next
    /// [`VirtioVsock::flush`]). Malformed packets are dropped with a warning (B6, B10);
    /// a packet the device cut short is handed over as [`Arrival::Truncated`] when its
    /// header is readable (B44). Returns `false` when there was nothing to take.
    pub fn receive(&mut self, handle: impl FnOnce(Arrival<'_>)) -> bool {
        let Some(entry) = self.rx.pop_used() else {
            return false;
        };
        if self.rx.device_ran_dry() {
            self.rx_ran_dry_at = Some(self.rx.used_taken());
        }
        match entry {
            Ok(Used { id, len }) => {
                // Whether the buffer now holds a whole packet without payload, which a
                // device returning it unwritten would show again (see `repost_cleared`).
                let mut clear = false;
                match Header::parse_packet(self.rx.buffer(id), len) {
                    Ok((header, _)) if header.op == OP_INVALID => {
                        self.stats.rx_empty += 1;
                        log::debug!("vsock: the device returned an rx buffer with no packet ({len} bytes written)");
                    }
                    Ok((header, payload)) => {
                        self.stats.rx_packets += 1;
                        if header.op == Op::CreditUpdate as u16 {
                            self.stats.rx_credit_updates += 1;
                        }
                        clear = header.len == 0;
                        handle(Arrival::Packet(&header, payload));
                    }
                    Err(WireError::LengthMismatch) if len == HEADER_LEN => {
                        // A header alone that announces a payload: the buffer came back
                        // unwritten over an earlier data packet.
                        self.stats.rx_empty += 1;
                        log::debug!("vsock: the device returned an rx buffer with no packet (44 bytes written over a data packet)");
                    }
                    Err(
                        WireError::Truncated
                        | WireError::LengthMismatch
                        | WireError::BufferTooSmall,
                    ) => {
                        self.stats.rx_dropped += 1;
                        match Header::parse(self.rx.buffer(id)) {
                            Ok(header) => log::warn!(
                                "vsock: dropping malformed rx packet ({len} bytes written, \
                                 op {} len {} from {}:{})",
                                header.op,
                                header.len,
                                header.src_cid,
                                header.src_port
                            ),
                            Err(_) => log::warn!(
                                "vsock: dropping malformed rx packet ({len} bytes written)"
                            ),
                        }
                    }
                }
                if clear {
                    self.rx.repost_cleared(id);
                } else {
                    self.rx.repost(id);
                }
            }
            Err(BadUsed::TooLong { id, len }) => {
                self.stats.bad_used_entries += 1;
                // The device filled the buffer and lost the rest of the packet: its
                // header, at the start of the buffer, still names the connection.
                match Header::parse(self.rx.buffer(id)) {
                    Ok(header) => handle(Arrival::Truncated {
                        header: &header,
                        written: len,
                    }),
                    Err(_) => {
                        log::warn!("vsock: rx used entry of {len} bytes for buffer {id} rejected")
                    }
                }
                self.rx.repost(id);
            }
            Err(bad) => {
                self.stats.bad_used_entries += 1;
                log::warn!("vsock: rx used entry rejected: {bad:?}");
            }
        }
        true
    }

    /// The payload length the device claims for the packet [`VirtioVsock::receive`] would
    /// take next (what it wrote less the header), without taking it; `None` when no
    /// receive buffer came back. Only a hint: `receive` checks the packet.
    pub fn next_payload_len(&mut self) -> Option<usize> {
        let written = self.rx.peek_used_len()?;
        Some((written as usize).saturating_sub(HEADER_LEN))
    }

    /// Reads the device's used index afresh and returns how many received packets wait
    /// for [`VirtioVsock::receive`], as the device claims (a device that lies can claim
    /// more than the queue holds).
    pub fn rx_pending(&mut self) -> u16 {
        self.rx.used_pending()
    }

    /// The size of the receive queue: buffers the driver posts.
    pub fn rx_queue_size(&self) -> u16 {
        self.rx.size()
    }

    /// The header of the packet `ahead` places after the one [`VirtioVsock::receive`]
    /// would take next, without taking anything: `None` when the count
    /// [`VirtioVsock::rx_pending`] last read does not cover it, or when its used entry or
    /// packet is malformed (`receive` deals with those when it takes them). Only a hint,
    /// as [`RxQueue::peek_used_buffer`] says.
    pub fn arrived_header(&mut self, ahead: u16) -> Option<Header> {
        self.arrived_packet(ahead).map(|(header, _)| header)
    }

    /// The header and payload of the packet `ahead` places after the one
    /// [`VirtioVsock::receive`] would take next, where the device put it, without taking
    /// anything; `None` as for [`VirtioVsock::arrived_header`].
    pub fn arrived_packet(&mut self, ahead: u16) -> Option<(Header, &[u8])> {
        let packet = self.arrived_bytes(ahead)?;
        Header::parse_packet(packet, packet.len()).ok()
    }

    /// The bytes the device wrote into the receive buffer of the packet `ahead` places
    /// after the one [`VirtioVsock::receive`] would take next, header and payload, unread
    /// and without taking anything; `None` as for [`VirtioVsock::arrived_header`].
    pub fn arrived_bytes(&mut self, ahead: u16) -> Option<&[u8]> {
        self.rx.peek_used_buffer(ahead)
    }

    /// Receive buffers taken back from the device so far, good and rejected ones
    /// (free-running, wraps at 2^16): unchanged between two calls when nothing was taken.
    pub fn rx_taken(&self) -> u16 {
        self.rx.used_taken()
    }

    /// Whether the device returned a receive buffer or an event that
    /// [`VirtioVsock::receive`] or [`VirtioVsock::next_event`] have not taken: the cheap
    /// check a poll that finds nothing makes.
    pub fn has_arrivals(&self) -> bool {
        self.rx.has_used() || self.events.has_used()
    }

    /// Takes the next device event id (B39): only 4-byte events count; the buffer is
    /// reposted. Returns `None` when there was no event to take, `Some(None)` for a bad one.
    pub fn next_event(&mut self) -> Option<Option<u32>> {
        let entry = self.events.pop_used()?;
        match entry {
            Ok(Used { id, len }) => {
                let event = match self.events.buffer(id).first_chunk::<EVENT_LEN>() {
                    Some(raw) if len == EVENT_LEN => Some(u32::from_le_bytes(*raw)),
                    _ => {
                        log::warn!("vsock: ignoring event of {len} bytes");
                        None
                    }
                };
                self.events.repost_cleared(id);
                Some(event)
            }
            Err(bad) => {
                self.stats.bad_used_entries += 1;
                log::warn!("vsock: event used entry rejected: {bad:?}");
                if let BadUsed::TooLong { id, .. } = bad {
                    self.events.repost_cleared(id);
                }
                Some(None)
            }
        }
    }

    /// Acknowledges the device's interrupt (reads and clears its interrupt status) and
    /// returns whether it had raised one: `false` means the interrupt was another
    /// device's, on a shared line.
    pub fn ack_interrupt(&mut self) -> bool {
        let ours = !self.transport.ack_interrupt().is_empty();
        if ours {
            self.stats.interrupts += 1;
        }
        ours
    }

    /// Asks the device to interrupt when it returns a receive buffer or an event, and,
    /// with `tx`, a transmit packet; then looks at the used rings once more. Returns
    /// `true` when none had anything returned meanwhile: then it is safe to wait for the
    /// interrupt. `false`: something came in before the request was visible; take it
    /// (poll) instead of waiting. The request lasts until [`VirtioVsock::disarm_interrupts`].
    pub fn arm_interrupts(&mut self, tx: bool) -> bool {
        // Every queue is armed, whatever an earlier one found: the caller polls on `false`,
        // and the poll disarms them all.
        let rx = self.rx.arm_interrupt();
        let events = self.events.arm_interrupt();
        let tx = !tx || self.tx.arm_interrupt();
        rx && events && tx
    }

    /// Asks the device not to interrupt (busy stretches run interrupt-free, B8).
    pub fn disarm_interrupts(&mut self) {
        self.rx.disarm_interrupt();
        self.events.disarm_interrupt();
        self.tx.disarm_interrupt();
    }

    /// Transmit packets the device holds (submitted, not yet taken back).
    pub fn tx_outstanding(&self) -> u16 {
        self.tx.outstanding()
    }

    /// The next instant [`VirtioVsock::watch_queues`] has something to check, with no
    /// device activity before it: when a queue's device, sitting on work, will have sat on
    /// it for [`DEVICE_STALL`]. `None` while it sits on none.
    pub fn poll_at(&self) -> Option<Instant> {
        match (self.tx_watch.deadline(), self.rx_watch.deadline()) {
            (Some(tx), Some(rx)) => Some(tx.min(rx)),
            (tx, rx) => tx.or(rx),
        }
    }
}

impl<H: Hal, T: Transport> Drop for VirtioVsock<H, T> {
    fn drop(&mut self) {
        // Reset the device before the queue memory goes back to the allocator.
        self.transport
            .set_status(virtio_drivers::transport::DeviceStatus::empty());
        for queue in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
            self.transport.queue_unset(queue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{largest_power_of_two_at_most, StallWatch, DEVICE_STALL};
    use crate::time::Instant;
    use core::time::Duration;

    #[test]
    fn queue_sizes_are_powers_of_two_capped_at_256() {
        assert_eq!(largest_power_of_two_at_most(0), 0);
        assert_eq!(largest_power_of_two_at_most(1), 1);
        assert_eq!(largest_power_of_two_at_most(100), 64);
        assert_eq!(largest_power_of_two_at_most(128), 128);
        assert_eq!(largest_power_of_two_at_most(1024), 256);
        assert_eq!(largest_power_of_two_at_most(u32::MAX), 256);
    }

    #[test]
    fn stall_watch_counts_100_ms_waits_and_warns_once_per_wait() {
        let at = Instant::from_millis;
        let mut watch = StallWatch::default();
        // No work: nothing, whatever the time.
        assert_eq!(watch.overdue(false, 0, at(0)), None);
        // Work from 10 ms on, nothing used.
        assert_eq!(watch.overdue(true, 0, at(10)), None);
        assert_eq!(watch.overdue(true, 0, at(109)), None);
        assert_eq!(watch.overdue(true, 0, at(110)), Some(DEVICE_STALL));
        assert_eq!(watch.log_level(), log::Level::Warn);
        assert_eq!(watch.overdue(true, 0, at(150)), None);
        assert_eq!(
            watch.overdue(true, 0, at(260)),
            Some(Duration::from_millis(150))
        );
        assert_eq!(watch.log_level(), log::Level::Debug);
        // A used entry starts a new wait, which warns again.
        assert_eq!(watch.overdue(true, 1, at(300)), None);
        assert_eq!(watch.overdue(true, 1, at(399)), None);
        assert_eq!(watch.overdue(true, 1, at(400)), Some(DEVICE_STALL));
        assert_eq!(watch.log_level(), log::Level::Warn);
        // So does the end of the work.
        assert_eq!(watch.overdue(false, 1, at(410)), None);
        assert_eq!(watch.overdue(true, 1, at(420)), None);
        assert_eq!(watch.overdue(true, 1, at(520)), Some(DEVICE_STALL));
        assert_eq!(watch.log_level(), log::Level::Warn);
    }
}
