//! Rules of BEHAVIOUR.md not covered by the other host tests, driven through the device
//! model: the device, its queues and features (B1), bring-up order and event buffers (B3,
//! B39), descriptor layout (B4), bad used-ring entries (B6), notification suppression
//! (B8), header checks and demultiplexing (B10–B12, B14, B17), credit fields (B26, B27,
//! B43), shutdown (B32–B34) and truncated packets (B44). Every packet the driver puts on
//! the tx ring is compared field by field, and so is every result the caller gets. Each
//! test is named after the rule it checks.
//!
//! Where the model has no call for something a device does (taking an event buffer and
//! returning it with an odd length, moving its `avail_event`, setting `NO_NOTIFY`), the
//! test plays the device itself on the rings in DMA memory, reached through
//! [`FakeHal::phys_to_ptr`] exactly as the model reaches them.

mod common;

use common::{
    accept_from, accept_host, accept_request, bring_up, control, from_host, from_port, listen,
    listen_on, ms, new_transport, pattern, rst_for, rw, rw_to_host, serve_host, start_connect,
    storage, test_config, to_host, FEATURES, GUEST_CID, GUEST_PORT, HOST_BUF_ALLOC, HOST_CID,
    MAX_TX_PAYLOAD, RING_EVENT_IDX, RX_BUFFER_SIZE, VERSION_1,
};
use std::sync::{Arc, Mutex};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::PhysAddr;
use vsock_guest::testing::{DeviceModel, FakeHal, FakeTransport, Packet};
use vsock_guest::wire::{Header, Op, SocketType, HEADER_LEN};
use vsock_guest::{
    Config, Error, Readiness, Shutdown, SocketHandle, SocketSlot, VsockAddr, VsockDevice,
};
use zerocopy::{FromBytes, Immutable, IntoBytes};

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const USED_F_NO_NOTIFY: u16 = 1;

// ---------------------------------------------------------------------------------------
// Packets (besides those of tests/common).

/// `header` as sent to host port `port` (from GUEST_PORT).
fn to_port(port: u32, header: Header) -> Header {
    Header {
        dst_port: port,
        ..header
    }
}

/// A SHUTDOWN with `flags`.
fn with_flags(flags: u32, header: Header) -> Header {
    Header { flags, ..header }
}

// ---------------------------------------------------------------------------------------
// The rings in DMA memory, read and written the way the device (and the model) does.

fn read_mem(paddr: PhysAddr, out: &mut [u8]) {
    let ptr = FakeHal::phys_to_ptr(paddr, out.len()).expect("address in DMA memory");
    // SAFETY: `phys_to_ptr` checked that `out.len()` bytes at `ptr` lie in one live DMA
    // allocation; the test is single-threaded and the driver is not running now.
    unsafe { core::ptr::copy_nonoverlapping(ptr.as_ptr(), out.as_mut_ptr(), out.len()) };
}

fn write_mem(paddr: PhysAddr, bytes: &[u8]) {
    let ptr = FakeHal::phys_to_ptr(paddr, bytes.len()).expect("address in DMA memory");
    // SAFETY: as in `read_mem`; the bytes are device-owned memory (the device may write).
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr.as_ptr(), bytes.len()) };
}

fn mem_u16(paddr: PhysAddr) -> u16 {
    let mut raw = [0u8; 2];
    read_mem(paddr, &mut raw);
    u16::from_le_bytes(raw)
}

fn mem_u32(paddr: PhysAddr) -> u32 {
    let mut raw = [0u8; 4];
    read_mem(paddr, &mut raw);
    u32::from_le_bytes(raw)
}

fn mem_u64(paddr: PhysAddr) -> u64 {
    let mut raw = [0u8; 8];
    read_mem(paddr, &mut raw);
    u64::from_le_bytes(raw)
}

/// A descriptor as the driver wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Desc {
    addr: PhysAddr,
    len: u32,
    flags: u16,
}

fn queue_size(transport: &FakeTransport, queue: usize) -> u16 {
    transport.state().queues[queue].size as u16
}

/// Descriptor `id` of `queue`.
fn descriptor(transport: &FakeTransport, queue: usize, id: u16) -> Desc {
    let regs = transport.state().queues[queue];
    assert!(u32::from(id) < regs.size, "descriptor {id} out of range");
    let at = regs.desc + 16 * PhysAddr::from(id);
    Desc {
        addr: mem_u64(at),
        len: mem_u32(at + 8),
        flags: mem_u16(at + 12),
    }
}

/// The available ring's `idx` of `queue` (0 before the queue is set up).
fn avail_idx(transport: &FakeTransport, queue: usize) -> u16 {
    let regs = transport.state().queues[queue];
    if !regs.ready {
        return 0;
    }
    mem_u16(regs.driver + 2)
}

/// The id in slot `index` (free-running) of `queue`'s available ring.
fn avail_entry(transport: &FakeTransport, queue: usize, index: u16) -> u16 {
    let regs = transport.state().queues[queue];
    let slot = index % regs.size as u16;
    mem_u16(regs.driver + 4 + 2 * PhysAddr::from(slot))
}

/// Plays the device setting `avail_event` of `queue` (VIRTIO_F_EVENT_IDX): "notify me when
/// the available index passes `value`". The model writes the same field whenever it takes
/// a buffer (asking for the next one).
fn set_avail_event(transport: &FakeTransport, queue: usize, value: u16) {
    let regs = transport.state().queues[queue];
    write_mem(
        regs.device + 4 + 8 * PhysAddr::from(regs.size),
        &value.to_le_bytes(),
    );
}

/// Plays the device setting the used ring's flags of `queue` (`VIRTQ_USED_F_NO_NOTIFY`).
fn set_used_flags(transport: &FakeTransport, queue: usize, flags: u16) {
    let regs = transport.state().queues[queue];
    write_mem(regs.device, &flags.to_le_bytes());
}

// ---------------------------------------------------------------------------------------
// B3: the order of bring-up, seen through a transport that records what the driver does.

/// What the driver did to the transport, with what it had posted at that moment.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    /// Device status written, and the available index of rx, tx, event at that moment.
    Status(DeviceStatus, [u16; 3]),
    /// Feature bits accepted.
    Features(u64),
    /// Config space read at this offset.
    ConfigRead(usize),
    /// Queue set up with this size.
    QueueSet(u16, u32),
    /// Queue notified.
    Notify(u16),
}

/// A [`FakeTransport`] that records the calls of interest.
#[derive(Clone, Debug)]
struct Recording {
    inner: FakeTransport,
    log: Arc<Mutex<Vec<Call>>>,
}

impl Recording {
    /// Records the calls made on `inner`.
    fn new(inner: &FakeTransport) -> Self {
        Recording {
            inner: inner.clone(),
            log: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn record(&self, call: Call) {
        // Also called from the driver's Drop: never panic here, even after a failed test.
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(call);
    }

    fn posted(&self) -> [u16; 3] {
        [RX, TX, EVENT].map(|queue| avail_idx(&self.inner, queue))
    }
}

impl Transport for Recording {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.record(Call::Features(driver_features));
        self.inner.write_driver_features(driver_features);
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        self.record(Call::Notify(queue));
        self.inner.notify(queue);
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.record(Call::Status(status, self.posted()));
        self.inner.set_status(status);
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size);
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        self.record(Call::QueueSet(queue, size));
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area);
    }

    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue);
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> Result<T, virtio_drivers::Error> {
        self.record(Call::ConfigRead(offset));
        self.inner.read_config_space(offset)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<(), virtio_drivers::Error> {
        self.inner.write_config_space(offset, value)
    }
}

#[test]
fn b3_init_order_cid_then_event_and_rx_buffers_then_driver_ok() {
    let inner = FakeTransport::new(GUEST_CID, FEATURES);
    let transport = Recording::new(&inner);
    let model = DeviceModel::new(&inner);
    let mut slots = [const { SocketSlot::EMPTY }; 2];
    let mut rx_memory = vec![0u8; 2 * 4096];
    let vsock = VsockDevice::<FakeHal, _>::new(
        transport.clone(),
        test_config(),
        &mut slots,
        &mut rx_memory,
    )
    .expect("bring-up");
    let ack = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER;
    let features_ok = ack | DeviceStatus::FEATURES_OK;
    let log = transport.log.lock().unwrap().clone();
    assert_eq!(
        log,
        [
            Call::Status(DeviceStatus::empty(), [0, 0, 0]),
            Call::Status(ack, [0, 0, 0]),
            Call::Features(FEATURES),
            Call::Status(features_ok, [0, 0, 0]),
            // B2: the CID, as two 32-bit halves, before anything is posted.
            Call::ConfigRead(0),
            Call::ConfigRead(4),
            Call::QueueSet(RX as u16, 128),
            Call::QueueSet(TX as u16, 128),
            Call::QueueSet(EVENT as u16, 4),
            // DRIVER_OK only once the 4 event buffers and every rx buffer are posted.
            Call::Status(features_ok | DeviceStatus::DRIVER_OK, [128, 0, 4]),
            // No notification before DRIVER_OK; then rx and event once each.
            Call::Notify(RX as u16),
            Call::Notify(EVENT as u16),
        ]
    );
    assert_eq!(vsock.local_cid(), 3);
    assert_eq!(model.available(EVENT), 4);
    assert_eq!(model.available(RX), 128);
    // Four event buffers of exactly 4 bytes (struct virtio_vsock_event), device-writable,
    // four different ids.
    let mut ids: Vec<u16> = (0..4).map(|i| avail_entry(&inner, EVENT, i)).collect();
    for &id in &ids {
        let desc = descriptor(&inner, EVENT, id);
        assert_eq!(
            (desc.len, desc.flags),
            (4, DESC_F_WRITE),
            "event buffer {id}"
        );
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 4);
}

// ---------------------------------------------------------------------------------------
// B39: device events.

#[test]
fn b39_unknown_event_ids_are_ignored_and_every_event_buffer_is_reposted() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 8192);
    let (mut vsock, _, conn) = serve_host(&transport, &mut model, &mut storage, test_config());
    let per = 8192;
    assert_eq!(model.notifications(EVENT), 1, "at bring-up");

    // Three rounds of events with ids the driver does not know: more events than buffers,
    // so every buffer must have come back. None of them changes anything.
    let mut at = 2;
    for round in 0..3u32 {
        let ids = [1, 2, 0x8000_0000 + round, u32::MAX];
        for id in ids {
            model.push_event(id).unwrap();
        }
        assert_eq!(model.available(EVENT), 0, "round {round}: all taken");
        assert_eq!(
            model.push_event(5),
            Err(vsock_guest::testing::ModelError::NoBuffer)
        );
        vsock.poll(ms(at));
        at += 1;
        assert_eq!(model.available(EVENT), 4, "round {round}: all reposted");
        assert_eq!(control(&mut model), [], "round {round}: nothing sent");
        assert_eq!(vsock.local_cid(), 3);
    }
    // The device ran dry each round, so each round's reposting notified it once.
    assert_eq!(model.notifications(EVENT), 4);
    // One event, with buffers left: the repost does not notify.
    model.push_event(9).unwrap();
    vsock.poll(ms(at));
    assert_eq!(model.available(EVENT), 4);
    assert_eq!(model.notifications(EVENT), 4);
    assert_eq!(vsock.stats().bad_used_entries, 0);

    // The connection never noticed.
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"ping")
        .unwrap();
    vsock.poll(ms(10));
    let mut buf = [0u8; 8];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(4));
    assert_eq!(&buf[..4], b"ping");
    assert_eq!(vsock.send(conn, b"pong"), Ok(4));
    assert_eq!(model.drain_tx(), [rw_to_host(b"pong", per, 4)]);

    // And the event queue still works: a TRANSPORT_RESET is taken (B40).
    model.set_guest_cid(7);
    model.push_event(0).unwrap();
    vsock.poll(ms(11));
    assert_eq!(vsock.local_cid(), 7);
    assert_eq!(model.available(EVENT), 4);
    assert_eq!(vsock.send(conn, b"x"), Err(Error::ConnectionReset));
    assert_eq!(control(&mut model), []);
}

/// The test's own device side of the event queue, for events the model cannot send: an
/// event buffer returned with any used length.
struct EventDevice {
    /// Next available-ring slot to take.
    next: u16,
}

impl EventDevice {
    /// Takes the next event buffer, writes `bytes` into it and returns it with `used_len`.
    fn push(
        &mut self,
        transport: &FakeTransport,
        model: &mut DeviceModel,
        bytes: &[u8],
        used_len: u32,
    ) {
        assert_ne!(
            avail_idx(transport, EVENT),
            self.next,
            "no event buffer posted"
        );
        let id = avail_entry(transport, EVENT, self.next);
        self.next = self.next.wrapping_add(1);
        let desc = descriptor(transport, EVENT, id);
        assert!(bytes.len() <= desc.len as usize);
        write_mem(desc.addr, bytes);
        model.push_used(EVENT, u32::from(id), used_len).unwrap();
    }

    /// Event buffers posted and not taken.
    fn available(&self, transport: &FakeTransport) -> u16 {
        avail_idx(transport, EVENT).wrapping_sub(self.next)
    }
}

#[test]
fn b39_events_of_a_wrong_length_are_ignored_and_their_buffers_reposted() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 8192);
    let (mut vsock, _, conn) = serve_host(&transport, &mut model, &mut storage, test_config());
    let per = 8192;
    let mut events = EventDevice { next: 0 };
    assert_eq!(events.available(&transport), 4);

    // A TRANSPORT_RESET (id 0) with a new CID in config space, but returned with 0, 3, 5
    // and 8 bytes written: not an event. 5 and 8 are longer than the 4-byte buffer (B6).
    model.set_guest_cid(7);
    let reset = 0u32.to_le_bytes();
    for used_len in [0, 3, 5, 8] {
        events.push(&transport, &mut model, &reset, used_len);
    }
    assert_eq!(events.available(&transport), 0);
    vsock.poll(ms(2));
    assert_eq!(events.available(&transport), 4, "every buffer reposted");
    assert_eq!(vsock.local_cid(), 3, "the CID was not re-read");
    assert_eq!(vsock.stats().bad_used_entries, 2, "the two too long");
    assert_eq!(control(&mut model), []);
    // The connection is untouched.
    assert_eq!(vsock.send(conn, b"still"), Ok(5));
    assert_eq!(model.drain_tx(), [rw_to_host(b"still", per, 0)]);

    // Exactly 4 bytes: the reset is taken (B40), on buffers that were reposted.
    events.push(&transport, &mut model, &reset, 4);
    vsock.poll(ms(3));
    assert_eq!(vsock.local_cid(), 7);
    assert_eq!(events.available(&transport), 4);
    assert_eq!(vsock.send(conn, b"x"), Err(Error::ConnectionReset));
    assert_eq!(control(&mut model), []);
}

// ---------------------------------------------------------------------------------------
// B4: one descriptor per packet.

#[test]
fn b4_one_descriptor_per_packet_on_both_queues_header_and_payload_contiguous() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 8192);
    let config = Config {
        queue_size: 16,
        rx_buffer_size: 1024,
        tx_packet_size: HEADER_LEN + 512,
        ..test_config()
    };
    let mut vsock = bring_up(&transport, config, &mut storage);
    let per = 8192;

    // Rx: 16 device-writable buffers of the configured 1024 bytes, not chained, not
    // indirect, not overlapping.
    assert_eq!(queue_size(&transport, RX), 16);
    assert_eq!(avail_idx(&transport, RX), 16);
    let mut rx: Vec<Desc> = (0..16)
        .map(|i| descriptor(&transport, RX, avail_entry(&transport, RX, i)))
        .collect();
    for desc in &rx {
        assert_eq!(desc.flags, DESC_F_WRITE, "{desc:?}");
        assert_eq!(desc.flags & (DESC_F_NEXT | DESC_F_INDIRECT), 0);
        assert_eq!(desc.len, 1024);
    }
    rx.sort_by_key(|d| d.addr);
    for pair in rx.windows(2) {
        assert!(pair[0].addr + 1024 <= pair[1].addr, "{pair:?} overlap");
    }

    // A packet filling one rx buffer exactly (header + 980 bytes) is taken whole.
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, HOST_BUF_ALLOC, ms(1));
    let big = pattern(1024 - HEADER_LEN);
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), &big)
        .unwrap();
    vsock.poll(ms(2));
    let mut buf = vec![0u8; 2048];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(980));
    assert_eq!(&buf[..980], &big[..]);

    // Tx: 1000 bytes go out as a 512-byte and a 488-byte packet, each one driver-readable
    // descriptor holding the header followed directly by the payload.
    let data = pattern(1000);
    let first = avail_idx(&transport, TX);
    assert_eq!(vsock.send(conn, &data), Ok(1000));
    assert_eq!(avail_idx(&transport, TX), first.wrapping_add(2));
    for (k, chunk) in [&data[..512], &data[512..]].into_iter().enumerate() {
        let id = avail_entry(&transport, TX, first.wrapping_add(k as u16));
        let desc = descriptor(&transport, TX, id);
        assert_eq!(desc.flags, 0, "packet {k}: no NEXT, no WRITE, no INDIRECT");
        assert_eq!(desc.len as usize, HEADER_LEN + chunk.len(), "packet {k}");
        let mut bytes = vec![0u8; desc.len as usize];
        read_mem(desc.addr, &mut bytes);
        assert_eq!(
            Header::parse(&bytes),
            Ok(Header {
                len: chunk.len() as u32,
                ..to_host(Op::Rw, per, 980)
            })
        );
        assert_eq!(
            &bytes[HEADER_LEN..],
            chunk,
            "packet {k}: payload after the header"
        );
    }
    assert_eq!(
        model.drain_tx(),
        [
            rw_to_host(&data[..512], per, 980),
            rw_to_host(&data[512..], per, 980)
        ]
    );

    // A control packet: one 44-byte descriptor.
    vsock.shutdown(conn, Shutdown::Write).unwrap();
    let id = avail_entry(&transport, TX, first.wrapping_add(2));
    let desc = descriptor(&transport, TX, id);
    assert_eq!((desc.len as usize, desc.flags), (HEADER_LEN, 0));
    assert_eq!(
        control(&mut model),
        [with_flags(2, to_host(Op::Shutdown, per, 980))]
    );

    // Buffers that cannot hold more than a header are refused.
    let mut slots = [const { SocketSlot::EMPTY }; 1];
    let mut rx_memory = vec![0u8; 4096];
    for (rx_buffer_size, tx_packet_size) in [(HEADER_LEN, 4096), (4096, HEADER_LEN)] {
        let result = VsockDevice::<FakeHal, _>::new(
            FakeTransport::new(GUEST_CID, FEATURES),
            Config {
                rx_buffer_size,
                tx_packet_size,
                ..test_config()
            },
            &mut slots,
            &mut rx_memory,
        );
        assert_eq!(result.err(), Some(Error::InvalidArgument));
    }
}

// ---------------------------------------------------------------------------------------
// B6: used-ring entries the driver must not trust.

#[test]
fn b6_bad_used_entries_are_dropped_buffers_reposted_and_the_driver_keeps_working() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 16 * 1024);
    let config = Config {
        queue_size: 16,
        ..test_config()
    };
    let (mut vsock, _, conn) = serve_host(&transport, &mut model, &mut storage, config);
    let per = 16 * 1024;
    let mut buf = [0u8; 64];
    let rw_bytes = |payload: &[u8]| {
        let mut bytes = vec![0u8; HEADER_LEN + payload.len()];
        Header {
            len: payload.len() as u32,
            ..from_host(Op::Rw, HOST_BUF_ALLOC, 0)
        }
        .emit(&mut bytes)
        .unwrap();
        bytes[HEADER_LEN..].copy_from_slice(payload);
        bytes
    };

    // Rx ids that were never posted: one past the ring, the largest id a 256-entry ring
    // could have, a posted id plus 2^16 (must not be truncated to the posted id, whose
    // buffer holds a valid packet), and u32::MAX.
    let posted = avail_entry(&transport, RX, 0);
    let aliased = descriptor(&transport, RX, posted);
    let alias_packet = rw_bytes(b"ALIAS");
    write_mem(aliased.addr, &alias_packet);
    for id in [16, 255, 0x1_0000 | u32::from(posted), u32::MAX] {
        model.push_used(RX, id, alias_packet.len() as u32).unwrap();
    }
    // Lengths: one byte more than the 4096-byte buffer (the header names no connection;
    // for a connection that is B44); shorter than the header (with a complete, valid
    // packet in the buffer); zero.
    let good = rw_bytes(b"data");
    let mut stray = good.clone();
    Header {
        src_port: 4321,
        len: 4,
        ..from_host(Op::Rw, HOST_BUF_ALLOC, 0)
    }
    .emit(&mut stray)
    .unwrap();
    model.deliver_raw(&stray, 4097).unwrap();
    model.deliver_raw(&good, (HEADER_LEN - 1) as u32).unwrap();
    model.deliver_raw(&good, 0).unwrap();
    assert_eq!(model.available(RX), 13);
    vsock.poll(ms(2));
    assert_eq!(control(&mut model), [], "no reply to any of it");
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::WouldBlock));
    let stats = vsock.stats();
    assert_eq!(
        (stats.bad_used_entries, stats.rx_dropped, stats.rx_packets),
        (5, 2, 1),
        "{stats:?}"
    );
    assert_eq!(model.available(RX), 16, "every taken buffer reposted");

    // A following good packet is handled; then a full ring of them (no buffer lost, none
    // posted twice).
    model.deliver_raw(&good, good.len() as u32).unwrap();
    vsock.poll(ms(3));
    assert_eq!(vsock.recv(conn, &mut buf), Ok(4));
    assert_eq!(&buf[..4], b"data");
    // `recv` took that packet itself (poll left it for the reader); the device sees its
    // buffer again at the next poll.
    vsock.poll(ms(3));
    for i in 0..16u8 {
        model
            .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), &[i])
            .unwrap();
    }
    assert_eq!(model.available(RX), 0);
    vsock.poll(ms(4));
    assert_eq!(model.available(RX), 16);
    assert_eq!(vsock.recv(conn, &mut buf), Ok(16));
    assert_eq!(&buf[..16], &(0..16).collect::<Vec<u8>>()[..]);

    // Tx: an id that is not in flight, one out of range, and a second completion of a
    // buffer already returned. None of them may free a buffer twice.
    let slot = avail_idx(&transport, TX);
    assert_eq!(vsock.send(conn, b"one"), Ok(3));
    let sent_id = avail_entry(&transport, TX, slot);
    assert_eq!(model.drain_tx(), [rw_to_host(b"one", per, 20)]);
    model.push_used(TX, u32::from(sent_id), 0).unwrap(); // completed twice
    model
        .push_used(TX, u32::from((sent_id + 1) % 16), 47)
        .unwrap(); // never sent
    model.push_used(TX, 16, 0).unwrap();
    model
        .push_used(TX, 0x1_0000 | u32::from(sent_id), 0)
        .unwrap();
    vsock.poll(ms(5));
    assert_eq!(vsock.stats().bad_used_entries, 9);
    // Exactly 16 tx buffers: 16 full packets fit, the 17th does not.
    let data = pattern(17 * MAX_TX_PAYLOAD);
    assert_eq!(vsock.send(conn, &data), Ok(16 * MAX_TX_PAYLOAD));
    assert_eq!(model.available(TX), 16);
    let mut ids: Vec<u16> = (0..16)
        .map(|k| avail_entry(&transport, TX, slot.wrapping_add(1 + k)))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..16).collect::<Vec<u16>>(), "16 different buffers");
    let expected: Vec<Packet> = data
        .chunks(MAX_TX_PAYLOAD)
        .take(16)
        .map(|chunk| rw_to_host(chunk, per, 20))
        .collect();
    assert_eq!(model.drain_tx(), expected);

    // Event queue: an id out of range is dropped; the four buffers stay posted.
    model.push_used(EVENT, 4, 4).unwrap();
    vsock.poll(ms(6));
    assert_eq!(vsock.stats().bad_used_entries, 10);
    assert_eq!(model.available(EVENT), 4);
    assert_eq!(vsock.local_cid(), 3);
    assert_eq!(vsock.send(conn, b"end"), Ok(3));
    assert_eq!(model.drain_tx(), [rw_to_host(b"end", per, 20)]);
}

// ---------------------------------------------------------------------------------------
// B8: notifications.

#[test]
fn b8_event_idx_one_tx_notification_per_batch_none_when_the_device_does_not_want_one() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 64 * 1024);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    assert_eq!(
        transport.state().driver_features & RING_EVENT_IDX,
        RING_EVENT_IDX
    );
    let per = 64 * 1024;
    let listener = listen(&mut vsock);
    assert_eq!(model.notifications(TX), 0);
    let conn = accept_host(&mut vsock, &mut model, listener, HOST_BUF_ALLOC, ms(1));
    assert_eq!(model.notifications(TX), 1, "the RESPONSE");
    let data = pattern(8 * MAX_TX_PAYLOAD);

    // The device took everything and asked for the next buffer. A 3-packet send is one
    // batch: one notification, before `send` returns.
    assert_eq!(
        vsock.send(conn, &data[..3 * MAX_TX_PAYLOAD]),
        Ok(3 * MAX_TX_PAYLOAD)
    );
    assert_eq!(model.available(TX), 3);
    assert_eq!(model.notifications(TX), 2, "one notification for the three");
    vsock.poll(ms(2));
    assert_eq!(model.notifications(TX), 2, "nothing new for the poll");
    // The device has not caught up (its avail_event is behind): it will see more packets
    // without being told.
    assert_eq!(
        vsock.send(conn, &data[..2 * MAX_TX_PAYLOAD]),
        Ok(2 * MAX_TX_PAYLOAD)
    );
    assert_eq!(vsock.send(conn, b"x"), Ok(1));
    vsock.poll(ms(3));
    assert_eq!(model.available(TX), 6);
    assert_eq!(model.notifications(TX), 2);
    assert_eq!(model.drain_tx().len(), 6);

    // Several replies queued in one poll: one notification.
    for port in [4000, 4001, 4002] {
        let stray = Header {
            src_port: port,
            dst_port: 4321,
            ..from_host(Op::Rw, HOST_BUF_ALLOC, 0)
        };
        model.deliver(&stray, b"?").unwrap();
    }
    model
        .deliver(&from_host(Op::CreditRequest, HOST_BUF_ALLOC, 0), &[])
        .unwrap();
    vsock.poll(ms(4));
    assert_eq!(model.available(TX), 4);
    assert_eq!(model.notifications(TX), 3);
    assert_eq!(model.drain_tx().len(), 4);

    // The device polls and moves its avail_event far ahead: no notifications at all.
    let next = avail_idx(&transport, TX);
    set_avail_event(&transport, TX, next.wrapping_add(1000));
    assert_eq!(
        vsock.send(conn, &data[..2 * MAX_TX_PAYLOAD]),
        Ok(2 * MAX_TX_PAYLOAD)
    );
    assert_eq!(vsock.send(conn, b"y"), Ok(1));
    vsock.shutdown(conn, Shutdown::Read).unwrap();
    assert_eq!(model.available(TX), 4);
    assert_eq!(model.notifications(TX), 3);
    // It asks for the packet at index next + 5, the second of the next send: that send
    // notifies once, the poll after it has nothing to say.
    set_avail_event(&transport, TX, next.wrapping_add(5));
    assert_eq!(
        vsock.send(conn, &data[..2 * MAX_TX_PAYLOAD]),
        Ok(2 * MAX_TX_PAYLOAD)
    );
    assert_eq!(model.notifications(TX), 4);
    vsock.poll(ms(5));
    assert_eq!(model.notifications(TX), 4);
    // An index already passed: none.
    assert_eq!(vsock.send(conn, b"z"), Ok(1));
    vsock.poll(ms(6));
    assert_eq!(model.notifications(TX), 4);
    assert_eq!(vsock.stats().tx_kicks, 4);
    let packets = model.drain_tx();
    assert_eq!(packets.len(), 7);
    assert_eq!(
        packets[3].header,
        with_flags(1, to_host(Op::Shutdown, per, 0))
    );
    assert_eq!(packets[6], rw_to_host(b"z", per, 0));
}

/// B8's one exception (`VirtioVsock::watch_queues`): a device that holds packets, uses
/// none and has not asked to hear of new ones is notified after `DEVICE_STALL` (100 ms)
/// all the same, and every `DEVICE_STALL` while it lasts; a device that uses packets is
/// not.
#[test]
fn b8_a_device_that_holds_tx_packets_and_uses_none_is_notified_after_100_ms() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 64 * 1024);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, HOST_BUF_ALLOC, ms(1));
    let before = model.notifications(TX);

    // The device asks not to hear of new packets, and then takes none.
    let next = avail_idx(&transport, TX);
    set_avail_event(&transport, TX, next.wrapping_add(1000));
    assert_eq!(vsock.send(conn, b"held"), Ok(4));
    vsock.poll(ms(10));
    vsock.poll(ms(109));
    assert_eq!(model.available(TX), 1);
    assert_eq!(model.notifications(TX), before, "99 ms: not yet");
    vsock.poll(ms(110));
    assert_eq!(model.notifications(TX), before + 1, "100 ms: notified");
    assert_eq!(vsock.stats().tx_stall_notifies, 1);
    vsock.poll(ms(150));
    assert_eq!(model.notifications(TX), before + 1);
    vsock.poll(ms(210));
    assert_eq!(
        model.notifications(TX),
        before + 2,
        "and again 100 ms later"
    );
    assert_eq!(vsock.stats().tx_stall_notifies, 2);

    // Once it takes them, nothing is outstanding: no more notifications.
    assert_eq!(model.drain_tx(), [rw_to_host(b"held", 64 * 1024, 0)]);
    set_avail_event(&transport, TX, avail_idx(&transport, TX).wrapping_add(1000));
    vsock.poll(ms(300));
    vsock.poll(ms(600));
    assert_eq!(model.notifications(TX), before + 2);

    // A device that keeps using packets is never notified against its wish, however long
    // the whole exchange takes: the wait restarts with every packet it uses. (It asks for
    // each next packet here, so `send` notifies it as usual.)
    for step in 0..5u64 {
        assert_eq!(vsock.send(conn, b"more"), Ok(4));
        vsock.poll(ms(700 + 90 * step));
        assert_eq!(model.drain_tx().len(), 1);
    }
    vsock.poll(ms(1200));
    assert_eq!(vsock.stats().tx_stall_notifies, 2);
}

/// Plays the host filling `count` receive buffers, each with a CREDIT_UPDATE: a packet the
/// driver takes without a reply.
fn fill_rx_buffers(model: &mut DeviceModel, count: usize) {
    let credit = from_host(Op::CreditUpdate, HOST_BUF_ALLOC, 0);
    for _ in 0..count {
        model.deliver(&credit, &[]).unwrap();
    }
}

#[test]
fn b8_event_idx_rx_reposting_notifies_only_when_the_device_ran_dry() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 4096);
    let config = Config {
        queue_size: 16,
        ..test_config()
    };
    let (mut vsock, _, _conn) = serve_host(&transport, &mut model, &mut storage, config);
    assert_eq!(model.notifications(RX), 1, "at bring-up");

    // One buffer used, 15 left: reposting it does not notify.
    fill_rx_buffers(&mut model, 1);
    vsock.poll(ms(2));
    assert_eq!(model.available(RX), 16);
    assert_eq!(model.notifications(RX), 1);
    // 15 used, one left: the device is not dry, no notification.
    fill_rx_buffers(&mut model, 15);
    assert_eq!(model.available(RX), 1);
    vsock.poll(ms(3));
    assert_eq!(model.available(RX), 16);
    assert_eq!(model.notifications(RX), 1);
    // All 16 used: the device ran dry and asked for the next buffer; one notification for
    // the 16 reposted in one poll.
    fill_rx_buffers(&mut model, 16);
    assert_eq!(model.available(RX), 0);
    vsock.poll(ms(4));
    assert_eq!(model.available(RX), 16);
    assert_eq!(model.notifications(RX), 2);
    // Dry again, but the device said it does not want to hear (avail_event far ahead).
    fill_rx_buffers(&mut model, 16);
    let next = avail_idx(&transport, RX);
    set_avail_event(&transport, RX, next.wrapping_add(100));
    vsock.poll(ms(5));
    assert_eq!(model.available(RX), 16);
    assert_eq!(model.notifications(RX), 2);
    assert_eq!(vsock.stats().rx_kicks, 2);
    assert_eq!(control(&mut model), []);
}

/// B8's exception on the receive side: a device that ran out of receive buffers, said it
/// does not want to hear of new ones and uses none of the reposted ones is notified once,
/// after `DEVICE_STALL` (100 ms); one that uses them is not.
#[test]
fn b8_a_device_that_ran_dry_and_uses_no_reposted_rx_buffer_is_notified_once_after_100_ms() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 4096);
    let config = Config {
        queue_size: 16,
        ..test_config()
    };
    let (mut vsock, _, _conn) = serve_host(&transport, &mut model, &mut storage, config);
    let before = model.notifications(RX);

    // Dry, and the device says it does not want to hear of the reposted buffers.
    fill_rx_buffers(&mut model, 16);
    let next = avail_idx(&transport, RX);
    set_avail_event(&transport, RX, next.wrapping_add(100));
    vsock.poll(ms(10));
    assert_eq!(model.available(RX), 16);
    vsock.poll(ms(109));
    assert_eq!(model.notifications(RX), before, "99 ms: not yet");
    vsock.poll(ms(110));
    assert_eq!(model.notifications(RX), before + 1, "100 ms: notified");
    assert_eq!(vsock.stats().rx_stall_notifies, 1);
    vsock.poll(ms(300));
    vsock.poll(ms(1000));
    assert_eq!(model.notifications(RX), before + 1, "once");

    // Dry again, and this time the device goes on filling the reposted buffers: nothing.
    fill_rx_buffers(&mut model, 16);
    set_avail_event(&transport, RX, avail_idx(&transport, RX).wrapping_add(100));
    vsock.poll(ms(1010));
    fill_rx_buffers(&mut model, 1);
    vsock.poll(ms(1200));
    vsock.poll(ms(1400));
    assert_eq!(model.notifications(RX), before + 1);
    assert_eq!(vsock.stats().rx_stall_notifies, 1);
    assert_eq!(control(&mut model), []);
}

#[test]
fn b8_without_event_idx_one_notification_per_batch_none_under_no_notify() {
    // EVENT_IDX not offered: the used ring's NO_NOTIFY flag is the device's hint.
    let transport = FakeTransport::new(GUEST_CID, VERSION_1 | 1);
    let mut model = DeviceModel::new(&transport);
    let mut storage = storage(2, 2 * 64 * 1024);
    let config = Config {
        queue_size: 16,
        ..test_config()
    };
    let mut vsock = bring_up(&transport, config, &mut storage);
    assert_eq!(transport.state().driver_features, VERSION_1 | 1);
    let per = 64 * 1024;
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, HOST_BUF_ALLOC, ms(1));
    assert_eq!(model.notifications(TX), 1);
    assert_eq!(
        model.notifications(RX),
        2,
        "bring-up, and the REQUEST's buffer reposted"
    );
    let data = pattern(8 * MAX_TX_PAYLOAD);

    // One notification per batch, whether the device caught up or not: a send is a batch,
    // and so is a quarter of the queue (4 packets here) within a long send.
    assert_eq!(
        vsock.send(conn, &data[..3 * MAX_TX_PAYLOAD]),
        Ok(3 * MAX_TX_PAYLOAD)
    );
    assert_eq!(model.notifications(TX), 2, "3 packets, one notification");
    vsock.poll(ms(2));
    assert_eq!(model.notifications(TX), 2, "nothing new for the poll");
    assert_eq!(vsock.send(conn, b"x"), Ok(1));
    assert_eq!(model.notifications(TX), 3);
    assert_eq!(model.drain_tx().len(), 4);
    assert_eq!(
        vsock.send(conn, &data[..6 * MAX_TX_PAYLOAD]),
        Ok(6 * MAX_TX_PAYLOAD)
    );
    assert_eq!(
        model.notifications(TX),
        5,
        "a full batch inside the send, then the rest at its end"
    );
    vsock.poll(ms(4));
    assert_eq!(model.notifications(TX), 5, "nothing new for the poll");
    assert_eq!(model.drain_tx().len(), 6);
    // Rx reposting notifies once per poll that reposted, dry or not.
    let credit = from_host(Op::CreditUpdate, HOST_BUF_ALLOC, 0);
    for _ in 0..3 {
        model.deliver(&credit, &[]).unwrap();
    }
    vsock.poll(ms(5));
    assert_eq!(model.notifications(RX), 3, "three reposted in one poll");
    vsock.poll(ms(6));
    assert_eq!(model.notifications(RX), 3, "nothing reposted, nothing said");

    // NO_NOTIFY set on both queues: silence.
    set_used_flags(&transport, TX, USED_F_NO_NOTIFY);
    set_used_flags(&transport, RX, USED_F_NO_NOTIFY);
    assert_eq!(
        vsock.send(conn, &data[..2 * MAX_TX_PAYLOAD]),
        Ok(2 * MAX_TX_PAYLOAD)
    );
    model.deliver(&credit, &[]).unwrap();
    vsock.poll(ms(7));
    assert_eq!((model.notifications(TX), model.notifications(RX)), (5, 3));
    // Cleared: the next batch notifies once.
    set_used_flags(&transport, TX, 0);
    assert_eq!(vsock.send(conn, b"y"), Ok(1));
    vsock.poll(ms(8));
    assert_eq!(model.notifications(TX), 6);
    assert_eq!(vsock.stats().tx_kicks, 6);
    let packets = model.drain_tx();
    assert_eq!(packets.len(), 3);
    assert_eq!(packets[2], rw_to_host(b"y", per, 0));
}

// ---------------------------------------------------------------------------------------
// B10, B11: header checks.

#[test]
fn b10_packets_for_another_cid_are_dropped_without_reply() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4, 4 * 8192);
    let (mut vsock, listener, conn) =
        serve_host(&transport, &mut model, &mut storage, test_config());
    let per = 8192;

    // Data, an RST and a SHUTDOWN for the connection's tuple, and a REQUEST for the
    // listener, each with a dst_cid that is not ours: 4, the host's, ANY, and ours with
    // reserved upper bits set.
    for dst_cid in [4, HOST_CID, 0xFFFF_FFFF, GUEST_CID | (1 << 32)] {
        for (op, payload) in [
            (Op::Rw, &b"not for you"[..]),
            (Op::Rst, &[][..]),
            (Op::Shutdown, &[][..]),
            (Op::CreditRequest, &[][..]),
        ] {
            let header = Header {
                dst_cid,
                flags: if op == Op::Shutdown { 3 } else { 0 },
                ..from_host(op, HOST_BUF_ALLOC, 0)
            };
            model.deliver(&header, payload).unwrap();
        }
        let request = Header {
            dst_cid,
            ..from_port(5001, from_host(Op::Request, HOST_BUF_ALLOC, 0))
        };
        model.deliver(&request, &[]).unwrap();
    }
    vsock.poll(ms(2));
    assert_eq!(control(&mut model), [], "no reply to any of them");
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    let mut buf = [0u8; 32];
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::WouldBlock));
    assert_eq!(vsock.recv_queue(conn), Ok(0));
    assert_eq!(vsock.take_error(conn), Ok(None));
    assert_eq!(vsock.send(conn, b"alive"), Ok(5));
    assert_eq!(model.drain_tx(), [rw_to_host(b"alive", per, 0)]);
}

#[test]
fn b10_control_ops_with_payload_reset_the_connection() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4, 4 * 8192);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let per = 8192;
    let listener = listen(&mut vsock);
    let mut buf = [0u8; 32];

    // On an established connection, every control op with a payload resets it; the RST
    // carries the connection's credit (B9). An RST with a payload resets it silently (B14).
    let ops = [
        (Op::Request, 0),
        (Op::Response, 0),
        (Op::Shutdown, 1),
        (Op::Shutdown, 3),
        (Op::CreditUpdate, 0),
        (Op::CreditRequest, 0),
        (Op::Rst, 0),
    ];
    for (i, (op, flags)) in ops.into_iter().enumerate() {
        let port = 6000 + i as u32;
        let at = 10 * i as u64;
        let conn = accept_from(
            &mut vsock,
            &mut model,
            listener,
            port,
            HOST_BUF_ALLOC,
            ms(at),
        );
        model
            .deliver(
                &from_port(port, from_host(Op::Rw, HOST_BUF_ALLOC, 0)),
                b"abc",
            )
            .unwrap();
        vsock.poll(ms(at + 1));
        assert_eq!(vsock.recv(conn, &mut buf[..1]), Ok(1));
        let bad = with_flags(flags, from_port(port, from_host(op, HOST_BUF_ALLOC, 0)));
        model.deliver(&bad, b"zz").unwrap();
        vsock.poll(ms(at + 2));
        let expected = if op == Op::Rst {
            vec![]
        } else {
            vec![to_port(port, to_host(Op::Rst, per, 1))]
        };
        assert_eq!(control(&mut model), expected, "{op:?} with payload");
        assert_eq!(vsock.accept(listener), Err(Error::WouldBlock), "{op:?}");
        let ready = vsock.readiness(conn).unwrap();
        assert!(
            ready.contains(Readiness::ERROR | Readiness::HANG_UP),
            "{op:?}: {ready:?}"
        );
        // B38: what was buffered stays readable, then the reset.
        assert_eq!(vsock.recv(conn, &mut buf), Ok(2), "{op:?}");
        assert_eq!(&buf[..2], b"bc");
        assert_eq!(vsock.recv(conn, &mut buf), Err(Error::ConnectionReset));
        assert_eq!(vsock.take_error(conn), Ok(Some(Error::ConnectionReset)));
        assert_eq!(vsock.send(conn, b"x"), Err(Error::ConnectionReset));
        vsock.close(conn).unwrap();
        assert_eq!(control(&mut model), [], "{op:?}: nothing after the reset");
    }

    // A REQUEST with a payload to the listener: refused, no connection.
    let request = from_port(7000, from_host(Op::Request, HOST_BUF_ALLOC, 0));
    model.deliver(&request, b"hi").unwrap();
    vsock.poll(ms(100));
    assert_eq!(control(&mut model), [rst_for(&request)]);
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));

    // While connecting: a RESPONSE with a payload fails the connect (B18).
    let client = start_connect(&mut vsock, &mut model, VsockAddr::new(2, 7001), 49152, per);
    let response = Header {
        src_port: 7001,
        dst_port: 49152,
        ..from_host(Op::Response, HOST_BUF_ALLOC, 0)
    };
    model.deliver(&response, b"!").unwrap();
    vsock.poll(ms(101));
    assert_eq!(
        control(&mut model),
        [Header {
            src_port: 49152,
            dst_port: 7001,
            ..to_host(Op::Rst, per, 0)
        }]
    );
    assert_eq!(vsock.take_error(client), Ok(Some(Error::ConnectionReset)));
    assert_eq!(vsock.send(client, b"x"), Err(Error::ConnectionReset));
}

#[test]
fn b10_unknown_ops_are_dropped_silently() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4, 4 * 8192);
    let (mut vsock, listener, conn) =
        serve_host(&transport, &mut model, &mut storage, test_config());
    let per = 8192;

    // Unknown ops on the connection's tuple, to the listener, to no socket, and with an
    // unknown socket type too (dropped, not answered as B11: the op is checked first).
    for op in [0u16, 8, 100, 0xFFFF] {
        for payload in [&[][..], &b"payload"[..]] {
            for header in [
                from_host(Op::Rw, HOST_BUF_ALLOC, 0),
                from_port(5001, from_host(Op::Rw, HOST_BUF_ALLOC, 0)),
                Header {
                    dst_port: 4321,
                    ..from_host(Op::Rw, HOST_BUF_ALLOC, 0)
                },
                Header {
                    socket_type: 9,
                    ..from_host(Op::Rw, HOST_BUF_ALLOC, 0)
                },
            ] {
                model.deliver(&Header { op, ..header }, payload).unwrap();
            }
        }
        vsock.poll(ms(2));
    }
    assert_eq!(control(&mut model), []);
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    assert_eq!(vsock.recv_queue(conn), Ok(0));
    assert_eq!(vsock.take_error(conn), Ok(None));
    assert_eq!(model.available(RX), 128);
    // The connection is untouched: data in, data out.
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"known")
        .unwrap();
    vsock.poll(ms(3));
    let mut buf = [0u8; 16];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(5));
    assert_eq!(vsock.send(conn, b"ok"), Ok(2));
    assert_eq!(model.drain_tx(), [rw_to_host(b"ok", per, 5)]);
}

#[test]
fn b10_len_is_checked_against_the_bytes_written() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 8192);
    let (mut vsock, _, conn) = serve_host(&transport, &mut model, &mut storage, test_config());
    let packet = |len: u32, payload: &[u8]| {
        let mut bytes = vec![0u8; HEADER_LEN + payload.len()];
        Header {
            len,
            ..from_host(Op::Rw, HOST_BUF_ALLOC, 0)
        }
        .emit(&mut bytes)
        .unwrap();
        bytes[HEADER_LEN..].copy_from_slice(payload);
        bytes
    };
    // len one more than written − 44, and lengths that overflow a naive addition.
    for len in [7, u32::MAX, u32::MAX - 43, 0x8000_0000] {
        let bytes = packet(len, b"sixsix");
        model.deliver_raw(&bytes, bytes.len() as u32).unwrap();
    }
    vsock.poll(ms(2));
    assert_eq!(control(&mut model), []);
    assert_eq!(vsock.recv_queue(conn), Ok(0));
    assert_eq!(vsock.stats().rx_dropped, 4);
    // len smaller than what was written: the payload is `len` bytes, the rest ignored.
    let bytes = packet(3, b"abcXYZ");
    model.deliver_raw(&bytes, bytes.len() as u32).unwrap();
    vsock.poll(ms(3));
    let mut buf = [0u8; 16];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(3));
    assert_eq!(&buf[..3], b"abc");
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::WouldBlock));
}

#[test]
fn b11_unknown_socket_type_gets_rst_carrying_that_type() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4, 4 * 8192);
    let (mut vsock, listener, conn) =
        serve_host(&transport, &mut model, &mut storage, test_config());
    let per = 8192;

    // A REQUEST of type 9 and of SEQPACKET (2, not implemented) to the listener, and data
    // of type 0 on the connection's tuple: each gets an RST of its own type, addresses
    // swapped, no credit.
    let request9 = Header {
        socket_type: 9,
        ..from_port(5001, from_host(Op::Request, HOST_BUF_ALLOC, 0))
    };
    let seqpacket = Header {
        socket_type: SocketType::SeqPacket as u16,
        ..from_port(5002, from_host(Op::Request, HOST_BUF_ALLOC, 0))
    };
    let typeless = Header {
        socket_type: 0,
        ..from_host(Op::Rw, HOST_BUF_ALLOC, 0)
    };
    model.deliver(&request9, &[]).unwrap();
    model.deliver(&seqpacket, &[]).unwrap();
    model.deliver(&typeless, b"data").unwrap();
    // An RST of an unknown type is not answered (B14).
    model
        .deliver(
            &Header {
                socket_type: 0xFFFF,
                ..from_host(Op::Rst, HOST_BUF_ALLOC, 0)
            },
            &[],
        )
        .unwrap();
    vsock.poll(ms(2));
    assert_eq!(
        control(&mut model),
        [
            Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port: GUEST_PORT,
                dst_port: 5001,
                len: 0,
                socket_type: 9,
                op: Op::Rst as u16,
                flags: 0,
                buf_alloc: 0,
                fwd_cnt: 0,
            },
            Header {
                dst_port: 5002,
                socket_type: 2,
                ..to_host(Op::Rst, 0, 0)
            },
            Header {
                socket_type: 0,
                ..to_host(Op::Rst, 0, 0)
            },
        ]
    );
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    // The stream connection on the same ports is untouched.
    assert_eq!(vsock.recv_queue(conn), Ok(0));
    assert_eq!(vsock.take_error(conn), Ok(None));
    assert_eq!(vsock.send(conn, b"ok"), Ok(2));
    assert_eq!(model.drain_tx(), [rw_to_host(b"ok", per, 0)]);
}

// ---------------------------------------------------------------------------------------
// B12, B17: demultiplexing.

#[test]
fn b12_connections_are_looked_up_by_the_full_tuple() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(8, 8 * 4096);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let per = 4096;
    let l1234 = listen_on(&mut vsock, 1234, 4);
    let l1235 = listen_on(&mut vsock, 1235, 4);

    // A: host 5000 → 1234. B: host 5000 → 1235 (same host port). C: host 5001 → 1234
    // (same guest port). D: sibling CID 5, port 5000 → 1234 (same ports as A).
    let host = |cid: u64, src: u32, dst: u32, op: Op| Header {
        src_cid: cid,
        src_port: src,
        dst_port: dst,
        ..from_host(op, HOST_BUF_ALLOC, 0)
    };
    let guest = |cid: u64, src: u32, dst: u32, op: Op, fwd_cnt: u32| Header {
        dst_cid: cid,
        src_port: src,
        dst_port: dst,
        ..to_host(op, per, fwd_cnt)
    };
    let tuples = [
        (HOST_CID, 5000, 1234, l1234),
        (HOST_CID, 5000, 1235, l1235),
        (HOST_CID, 5001, 1234, l1234),
        (5, 5000, 1234, l1234),
    ];
    let conns: Vec<SocketHandle> = tuples
        .iter()
        .enumerate()
        .map(|(i, &(cid, src, dst, listener))| {
            let request = host(cid, src, dst, Op::Request);
            accept_request(&mut vsock, &mut model, listener, request, ms(1 + i as u64))
        })
        .collect();
    for (i, &(cid, src, _, _)) in tuples.iter().enumerate() {
        assert_eq!(
            vsock.peer_addr(conns[i]),
            Ok(VsockAddr::new(cid as u32, src))
        );
    }

    // Data for each, interleaved, different lengths: each lands in its own connection.
    for round in 0..2 {
        for (i, &(cid, src, dst, _)) in tuples.iter().enumerate().rev() {
            let payload = vec![b'a' + i as u8; i + 1 + round];
            model
                .deliver(&host(cid, src, dst, Op::Rw), &payload)
                .unwrap();
        }
    }
    vsock.poll(ms(10));
    assert_eq!(control(&mut model), []);
    let mut buf = [0u8; 32];
    for (i, &conn) in conns.iter().enumerate() {
        let n = 2 * i + 3;
        assert_eq!(vsock.recv(conn, &mut buf), Ok(n), "connection {i}");
        assert!(
            buf[..n].iter().all(|&b| b == b'a' + i as u8),
            "connection {i}"
        );
    }
    // Each sends on its own tuple, with its own fwd_cnt.
    for (i, &(cid, src, dst, _)) in tuples.iter().enumerate() {
        assert_eq!(vsock.send(conns[i], b"re"), Ok(2));
        assert_eq!(
            model.drain_tx(),
            [rw(guest(cid, dst, src, Op::Rw, 2 * i as u32 + 3), b"re")],
            "connection {i}"
        );
    }

    // An RST for A resets A only; a CREDIT_REQUEST for D is answered by D; a SHUTDOWN for
    // B shuts B only.
    model
        .deliver(&host(HOST_CID, 5000, 1234, Op::Rst), &[])
        .unwrap();
    model
        .deliver(&host(5, 5000, 1234, Op::CreditRequest), &[])
        .unwrap();
    model
        .deliver(
            &with_flags(2, host(HOST_CID, 5000, 1235, Op::Shutdown)),
            &[],
        )
        .unwrap();
    vsock.poll(ms(11));
    assert_eq!(
        control(&mut model),
        [guest(5, 1234, 5000, Op::CreditUpdate, 9)]
    );
    assert_eq!(vsock.send(conns[0], b"x"), Err(Error::ConnectionReset));
    assert_eq!(vsock.recv(conns[1], &mut buf), Ok(0), "B: end of stream");
    assert_eq!(vsock.recv(conns[2], &mut buf), Err(Error::WouldBlock));
    assert_eq!(vsock.recv(conns[3], &mut buf), Err(Error::WouldBlock));
    for i in 1..4 {
        let (cid, src, dst, _) = tuples[i];
        assert_eq!(vsock.send(conns[i], b"!"), Ok(1), "connection {i}");
        assert_eq!(
            model.drain_tx(),
            [rw(guest(cid, dst, src, Op::Rw, 2 * i as u32 + 3), b"!")]
        );
    }
}

#[test]
fn b17_duplicate_request_is_dropped_and_the_connection_untouched() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4, 4 * 8192);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let per = 8192;
    let listener = listen(&mut vsock);

    // While the connection waits in the accept queue: no second RESPONSE, no second entry.
    model
        .deliver(&from_host(Op::Request, 1000, 0), &[])
        .unwrap();
    vsock.poll(ms(1));
    assert_eq!(control(&mut model), [to_host(Op::Response, per, 0)]);
    model
        .deliver(&from_host(Op::Request, 1000, 0), &[])
        .unwrap();
    vsock.poll(ms(2));
    assert_eq!(control(&mut model), []);
    let (conn, _) = vsock.accept(listener).unwrap();
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));

    // Established, with data buffered and 400 of the host's 1000 bytes of credit used.
    model
        .deliver(&from_host(Op::Rw, 1000, 0), b"buffered")
        .unwrap();
    vsock.poll(ms(3));
    let data = pattern(1000);
    assert_eq!(vsock.send(conn, &data[..400]), Ok(400));
    assert_eq!(model.drain_tx(), [rw_to_host(&data[..400], per, 0)]);

    // A duplicate REQUEST, with credit fields that would leave none: dropped whole. No
    // reply, no new connection, the buffered data and the credit (600 bytes left)
    // unchanged.
    model.deliver(&from_host(Op::Request, 64, 0), &[]).unwrap();
    vsock.poll(ms(4));
    assert_eq!(control(&mut model), []);
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    assert_eq!(vsock.take_error(conn), Ok(None));
    assert_eq!(vsock.send(conn, &data[400..]), Ok(600));
    assert_eq!(model.drain_tx(), [rw_to_host(&data[400..], per, 0)]);
    // Another, with credit fields that would give more: still none.
    model
        .deliver(&from_host(Op::Request, 5000, 400), &[])
        .unwrap();
    vsock.poll(ms(5));
    assert_eq!(control(&mut model), []);
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    assert_eq!(vsock.send(conn, b"more"), Err(Error::WouldBlock));
    // 1000 bytes unacknowledged (the REQUEST's fwd_cnt did not count): the host reports
    // them when it reads them, so no CREDIT_REQUEST (B29).
    assert_eq!(control(&mut model), []);
    let mut buf = [0u8; 16];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(8));
    assert_eq!(&buf[..8], b"buffered");

    // While we close (waiting for the host's RST): still dropped.
    vsock.close(conn).unwrap();
    assert_eq!(
        control(&mut model),
        [with_flags(3, to_host(Op::Shutdown, per, 8))]
    );
    model
        .deliver(&from_host(Op::Request, 1000, 0), &[])
        .unwrap();
    vsock.poll(ms(6));
    assert_eq!(control(&mut model), []);
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
}

// ---------------------------------------------------------------------------------------
// B26, B27: credit fields.

#[test]
fn b26_peer_credit_is_refreshed_from_every_header() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 8192);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let per = 8192;
    let listener = listen(&mut vsock);
    // The host starts with 100 bytes of buffer.
    let conn = accept_host(&mut vsock, &mut model, listener, 100, ms(1));
    let data = pattern(2000);
    assert_eq!(vsock.send(conn, &data), Ok(100));
    assert_eq!(model.drain_tx(), [rw_to_host(&data[..100], per, 0)]);

    // A CREDIT_REQUEST header reporting the 100 bytes consumed: answered, and the credit
    // counts at once.
    model
        .deliver(&from_host(Op::CreditRequest, 100, 100), &[])
        .unwrap();
    vsock.poll(ms(2));
    assert_eq!(control(&mut model), [to_host(Op::CreditUpdate, per, 0)]);
    assert_eq!(vsock.send(conn, &data[100..]), Ok(100));
    assert_eq!(model.drain_tx(), [rw_to_host(&data[100..200], per, 0)]);

    // An RW header growing the buffer to 300 with everything consumed.
    model
        .deliver(&from_host(Op::Rw, 300, 200), b"data")
        .unwrap();
    vsock.poll(ms(3));
    assert_eq!(vsock.send(conn, &data[200..]), Ok(300));
    assert_eq!(model.drain_tx(), [rw_to_host(&data[200..500], per, 0)]);

    // A CREDIT_UPDATE shrinking it: nothing may go out (B24). 100 bytes are still
    // unacknowledged, so the host will report more when it reads them: no request yet
    // (B29).
    model
        .deliver(&from_host(Op::CreditUpdate, 100, 400), &[])
        .unwrap();
    vsock.poll(ms(4));
    assert_eq!(control(&mut model), []);
    assert_eq!(vsock.send(conn, &data[500..]), Err(Error::WouldBlock));
    assert_eq!(control(&mut model), []);

    // A SHUTDOWN(SEND) header with the rest consumed and 1000 bytes of buffer: we may still
    // send (B33), with that credit.
    model
        .deliver(&with_flags(2, from_host(Op::Shutdown, 1000, 500)), &[])
        .unwrap();
    vsock.poll(ms(5));
    assert_eq!(control(&mut model), []);
    assert_eq!(vsock.send(conn, &data[500..]), Ok(1000));
    assert_eq!(model.drain_tx(), [rw_to_host(&data[500..1500], per, 0)]);
    let mut buf = [0u8; 8];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(4));
    assert_eq!(vsock.recv(conn, &mut buf), Ok(0));
}

#[test]
fn b27_fwd_cnt_counts_consumed_bytes_and_buf_alloc_is_the_receive_capacity() {
    let (transport, mut model) = new_transport();
    // 3 slots sharing 15002 bytes: 5000 each (the remainder is not advertised).
    let mut storage = storage(3, 15_002);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    assert_eq!(vsock.rx_buffer_per_socket(), 5000);
    let per = 5000;
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, HOST_BUF_ALLOC, ms(1));
    let data = pattern(5001);

    // 1000 bytes arrive; 300 are consumed: fwd_cnt says 300, not 1000.
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), &data[..1000])
        .unwrap();
    vsock.poll(ms(2));
    let mut buf = vec![0u8; 8192];
    assert_eq!(vsock.recv(conn, &mut buf[..300]), Ok(300));
    assert_eq!(vsock.send(conn, b"a"), Ok(1));
    assert_eq!(model.drain_tx(), [rw_to_host(b"a", per, 300)]);
    // Peeking consumes nothing.
    assert_eq!(vsock.peek(conn, &mut buf[..500]), Ok(500));
    assert_eq!(&buf[..500], &data[300..800]);
    assert_eq!(vsock.send(conn, b"b"), Ok(1));
    assert_eq!(model.drain_tx(), [rw_to_host(b"b", per, 300)]);
    // More arrives: still 300.
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), &data[1000..1200])
        .unwrap();
    vsock.poll(ms(3));
    assert_eq!(vsock.send(conn, b"c"), Ok(1));
    assert_eq!(model.drain_tx(), [rw_to_host(b"c", per, 300)]);
    // The rest consumed: 1200, in the next header of any kind.
    assert_eq!(vsock.recv(conn, &mut buf), Ok(900));
    assert_eq!(&buf[..900], &data[300..1200]);
    vsock.shutdown(conn, Shutdown::Read).unwrap();
    assert_eq!(
        control(&mut model),
        [with_flags(1, to_host(Op::Shutdown, per, 1200))]
    );

    // buf_alloc (5000) is the real capacity: the host fills it exactly without a reset...
    let conn2 = accept_from(
        &mut vsock,
        &mut model,
        listener,
        5001,
        HOST_BUF_ALLOC,
        ms(4),
    );
    let to_5001 = |model: &mut DeviceModel, payload: &[u8]| {
        model
            .deliver(
                &from_port(5001, from_host(Op::Rw, HOST_BUF_ALLOC, 0)),
                payload,
            )
            .unwrap();
    };
    to_5001(&mut model, &data[..4052]);
    to_5001(&mut model, &data[4052..5000]);
    vsock.poll(ms(5));
    assert_eq!(control(&mut model), []);
    assert_eq!(vsock.recv_queue(conn2), Ok(5000));
    // ...and one byte more is an overrun (B30).
    to_5001(&mut model, &data[5000..]);
    vsock.poll(ms(6));
    assert_eq!(
        control(&mut model),
        [to_port(5001, to_host(Op::Rst, per, 0))]
    );
    assert_eq!(vsock.recv(conn2, &mut buf), Ok(5000));
    assert_eq!(&buf[..5000], &data[..5000]);
    vsock.close(conn2).unwrap();
    assert_eq!(control(&mut model), []);
    // And a connection we open advertises the same (checked by `start_connect`).
    start_connect(&mut vsock, &mut model, VsockAddr::new(2, 6000), 49152, per);
}

// ---------------------------------------------------------------------------------------
// B32–B34: shutdown.

#[test]
fn b32_local_shutdown_flags_on_the_wire_are_receive_1_send_2_and_sticky() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4, 4 * 8192);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let per = 8192;
    let listener = listen(&mut vsock);
    let mut buf = [0u8; 16];
    let shutdown =
        |port: u32, flags: u32| with_flags(flags, to_port(port, to_host(Op::Shutdown, per, 0)));

    // shutdown(Read): RECEIVE = 1. recv sees the end, send still works. Then
    // shutdown(Write): the flags stay and add up, 3. send is a broken pipe.
    let a = accept_from(
        &mut vsock,
        &mut model,
        listener,
        5000,
        HOST_BUF_ALLOC,
        ms(1),
    );
    vsock.shutdown(a, Shutdown::Read).unwrap();
    assert_eq!(control(&mut model), [shutdown(5000, 1)]);
    assert_eq!(vsock.recv(a, &mut buf), Ok(0));
    assert_eq!(vsock.send(a, b"hi"), Ok(2));
    assert_eq!(
        model.drain_tx(),
        [rw(to_port(5000, to_host(Op::Rw, per, 0)), b"hi")]
    );
    vsock.shutdown(a, Shutdown::Read).unwrap();
    assert_eq!(
        control(&mut model),
        [shutdown(5000, 1)],
        "repeated, unchanged"
    );
    vsock.shutdown(a, Shutdown::Write).unwrap();
    assert_eq!(control(&mut model), [shutdown(5000, 3)]);
    assert_eq!(vsock.send(a, b"hi"), Err(Error::BrokenPipe));
    vsock.close(a).unwrap();
    assert_eq!(control(&mut model), [shutdown(5000, 3)]);

    // shutdown(Write): SEND = 2. Data from the host is still received. Then
    // shutdown(Read): 3.
    let b = accept_from(
        &mut vsock,
        &mut model,
        listener,
        5001,
        HOST_BUF_ALLOC,
        ms(2),
    );
    vsock.shutdown(b, Shutdown::Write).unwrap();
    assert_eq!(control(&mut model), [shutdown(5001, 2)]);
    assert_eq!(vsock.send(b, b"x"), Err(Error::BrokenPipe));
    model
        .deliver(
            &from_port(5001, from_host(Op::Rw, HOST_BUF_ALLOC, 0)),
            b"more",
        )
        .unwrap();
    vsock.poll(ms(3));
    assert_eq!(control(&mut model), []);
    assert_eq!(vsock.recv(b, &mut buf), Ok(4));
    vsock.shutdown(b, Shutdown::Write).unwrap();
    assert_eq!(
        control(&mut model),
        [with_flags(2, to_port(5001, to_host(Op::Shutdown, per, 4)))]
    );
    vsock.shutdown(b, Shutdown::Read).unwrap();
    assert_eq!(
        control(&mut model),
        [with_flags(3, to_port(5001, to_host(Op::Shutdown, per, 4)))]
    );

    // shutdown(Both): 3 at once.
    let c = accept_from(
        &mut vsock,
        &mut model,
        listener,
        5002,
        HOST_BUF_ALLOC,
        ms(4),
    );
    vsock.shutdown(c, Shutdown::Both).unwrap();
    assert_eq!(control(&mut model), [shutdown(5002, 3)]);
    assert_eq!(vsock.send(c, b"x"), Err(Error::BrokenPipe));
    assert_eq!(vsock.recv(c, &mut buf), Ok(0));
    // close: SHUTDOWN(both), 3, whatever was shut down before (B36).
    vsock.close(b).unwrap();
    vsock.close(c).unwrap();
    assert_eq!(
        control(&mut model),
        [
            with_flags(3, to_port(5001, to_host(Op::Shutdown, per, 4))),
            shutdown(5002, 3)
        ]
    );
}

#[test]
fn b32_peer_shutdown_flags_are_sticky_and_add_up() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 8192);
    let (mut vsock, _, conn) = serve_host(&transport, &mut model, &mut storage, test_config());
    let per = 8192;
    let peer_shutdown = |flags: u32| with_flags(flags, from_host(Op::Shutdown, HOST_BUF_ALLOC, 0));

    // RECEIVE (1): our send is a broken pipe. A later SHUTDOWN without flags, or with
    // unknown bits only, takes nothing back.
    model.deliver(&peer_shutdown(1), &[]).unwrap();
    model.deliver(&peer_shutdown(0), &[]).unwrap();
    model.deliver(&peer_shutdown(4), &[]).unwrap();
    vsock.poll(ms(2));
    assert_eq!(control(&mut model), []);
    assert_eq!(vsock.send(conn, b"x"), Err(Error::BrokenPipe));
    assert_eq!(control(&mut model), [], "no CREDIT_REQUEST either");
    // Data still comes in.
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"in")
        .unwrap();
    vsock.poll(ms(3));
    let mut buf = [0u8; 8];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(2));
    // SEND (2) later: both seen, the connection is over: RST (B34).
    model.deliver(&peer_shutdown(2), &[]).unwrap();
    vsock.poll(ms(4));
    assert_eq!(control(&mut model), [to_host(Op::Rst, per, 2)]);
    assert_eq!(vsock.recv(conn, &mut buf), Ok(0));
    assert_eq!(vsock.send(conn, b"x"), Err(Error::BrokenPipe));
    assert_eq!(vsock.take_error(conn), Ok(None), "an orderly end");
}

#[test]
fn b33_peer_send_shutdown_recv_drains_then_eof_and_we_may_still_send() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 8192);
    let (mut vsock, _, conn) = serve_host(&transport, &mut model, &mut storage, test_config());
    let per = 8192;

    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"last words")
        .unwrap();
    model
        .deliver(
            &with_flags(2, from_host(Op::Shutdown, HOST_BUF_ALLOC, 0)),
            &[],
        )
        .unwrap();
    vsock.poll(ms(2));
    assert_eq!(control(&mut model), []);
    let ready = vsock.readiness(conn).unwrap();
    assert!(
        ready.contains(Readiness::READABLE | Readiness::HANG_UP),
        "{ready:?}"
    );
    let mut buf = [0u8; 32];
    assert_eq!(vsock.recv(conn, &mut buf[..4]), Ok(4));
    assert_eq!(vsock.recv(conn, &mut buf), Ok(6));
    assert_eq!(&buf[..6], b" words");
    assert_eq!(vsock.recv(conn, &mut buf), Ok(0));
    assert_eq!(vsock.recv(conn, &mut buf), Ok(0));
    // We may still send, more than once.
    assert_eq!(vsock.send(conn, b"reply"), Ok(5));
    assert_eq!(vsock.send(conn, b"again"), Ok(5));
    assert_eq!(
        model.drain_tx(),
        [rw_to_host(b"reply", per, 10), rw_to_host(b"again", per, 10)]
    );
    // Data after the host said it would send no more: RST.
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"oops")
        .unwrap();
    vsock.poll(ms(3));
    assert_eq!(control(&mut model), [to_host(Op::Rst, per, 10)]);
    assert_eq!(vsock.send(conn, b"x"), Err(Error::ConnectionReset));
}

#[test]
fn b34_both_peer_flags_rst_data_stays_readable_and_the_same_port_reconnects() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4, 4 * 8192);
    let (mut vsock, listener, old) =
        serve_host(&transport, &mut model, &mut storage, test_config());
    let per = 8192;

    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"old data")
        .unwrap();
    model
        .deliver(
            &with_flags(3, from_host(Op::Shutdown, HOST_BUF_ALLOC, 0)),
            &[],
        )
        .unwrap();
    vsock.poll(ms(2));
    assert_eq!(control(&mut model), [to_host(Op::Rst, per, 0)]);
    let ready = vsock.readiness(old).unwrap();
    assert!(
        ready.contains(Readiness::READABLE | Readiness::HANG_UP),
        "{ready:?}"
    );
    assert_eq!(vsock.send(old, b"x"), Err(Error::BrokenPipe));

    // Before the old socket is read or closed, the host connects again from the same port:
    // a new connection, with its own data.
    let new = accept_host(&mut vsock, &mut model, listener, HOST_BUF_ALLOC, ms(3));
    assert_ne!(new, old);
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"new")
        .unwrap();
    vsock.poll(ms(4));
    let mut buf = [0u8; 16];
    assert_eq!(vsock.recv(old, &mut buf), Ok(8));
    assert_eq!(&buf[..8], b"old data");
    assert_eq!(vsock.recv(old, &mut buf), Ok(0));
    assert_eq!(vsock.take_error(old), Ok(None));
    vsock.close(old).unwrap();
    assert_eq!(control(&mut model), [], "the old connection already ended");
    assert_eq!(vsock.recv(new, &mut buf), Ok(3));
    assert_eq!(&buf[..3], b"new");
    assert_eq!(vsock.send(new, b"hello again"), Ok(11));
    assert_eq!(model.drain_tx(), [rw_to_host(b"hello again", per, 3)]);
}

// ---------------------------------------------------------------------------------------
// B5, B16, B31.

#[test]
fn b5_the_header_is_a_copy_taken_once_from_device_memory() {
    // What the device wrote: a header and a payload in one buffer.
    let sent = Header {
        len: 3,
        ..from_host(Op::Rw, HOST_BUF_ALLOC, 7)
    };
    let mut buffer = vec![0u8; HEADER_LEN + 3];
    sent.emit(&mut buffer).unwrap();
    buffer[HEADER_LEN..].copy_from_slice(b"abc");
    let header = {
        let (header, payload) = Header::parse_packet(&buffer, buffer.len()).unwrap();
        assert_eq!(payload, b"abc");
        header
    };
    // A device rewriting the buffer afterwards cannot change what was validated.
    buffer.fill(0xff);
    assert_eq!(header, sent);
}

#[test]
fn b16_an_accepted_connection_takes_its_peer_credit_from_the_request() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 16 * 1024);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let per = vsock.rx_buffer_per_socket() as u32;
    let listener = listen(&mut vsock);
    // The host's REQUEST advertises 1000 bytes of receive buffer and nothing else does.
    let conn = accept_host(&mut vsock, &mut model, listener, 1000, ms(1));
    let data = pattern(3000);
    assert_eq!(vsock.send(conn, &data), Ok(1000));
    vsock.poll(ms(2));
    assert_eq!(model.drain_tx(), [rw_to_host(&data[..1000], per, 0)]);
}

#[test]
fn b31_rx_buffers_are_reposted_as_soon_as_their_payload_is_copied() {
    const RX: usize = 0;
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 16 * 1024);
    let (mut vsock, _listener, conn) =
        serve_host(&transport, &mut model, &mut storage, test_config());
    let posted = model.available(RX);
    assert_eq!(posted, 128);
    // Three times as many 1-byte packets as there are rx buffers, the application reading
    // nothing: each buffer is reposted once its byte is in the socket's receive ring.
    let bytes = pattern(3 * posted);
    for (i, byte) in bytes.iter().enumerate() {
        model
            .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), &[*byte])
            .unwrap();
        if i % 64 == 63 {
            vsock.poll(ms(2 + i as u64));
            assert_eq!(model.available(RX), posted, "all reposted after packet {i}");
        }
    }
    assert_eq!(vsock.recv_queue(conn), Ok(bytes.len()));
    let mut out = vec![0u8; bytes.len()];
    assert_eq!(vsock.recv(conn, &mut out), Ok(bytes.len()));
    assert_eq!(out, bytes);
}

#[test]
fn b40_a_request_to_the_new_cid_in_the_same_poll_as_the_reset_is_answered() {
    const NEW_CID: u64 = 7;
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 16 * 1024);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let per = vsock.rx_buffer_per_socket() as u32;
    let listener = listen(&mut vsock);
    // The device moves us to CID 7, reports the reset, and the host connects to the new
    // CID at once: all of it waits for the same poll.
    model.set_guest_cid(NEW_CID);
    model.push_event(0).unwrap();
    let request = Header {
        dst_cid: NEW_CID,
        ..from_host(Op::Request, HOST_BUF_ALLOC, 0)
    };
    model.deliver(&request, &[]).unwrap();
    vsock.poll(ms(1));
    assert_eq!(vsock.local_cid(), NEW_CID as u32);
    let response = Header {
        src_cid: NEW_CID,
        ..to_host(Op::Response, per, 0)
    };
    assert_eq!(control(&mut model), [response]);
    let (_conn, peer) = vsock.accept(listener).unwrap();
    assert_eq!(peer, VsockAddr::new(HOST_CID as u32, common::HOST_PORT));
}

#[test]
fn b8_every_send_notifies_before_it_returns() {
    // An application may do long work between a send and its next poll: the device must
    // not wait for that poll to hear of the data.
    const TX: usize = 1;
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 16 * 1024);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen(&mut vsock);
    // The host has room for two packets only.
    let conn = accept_host(
        &mut vsock,
        &mut model,
        listener,
        2 * MAX_TX_PAYLOAD as u32,
        ms(1),
    );
    let before = model.notifications(TX);
    let data = pattern(3 * MAX_TX_PAYLOAD);
    // Everything fits: the device hears now.
    assert_eq!(vsock.send(conn, &data[..10]), Ok(10));
    assert_eq!(model.notifications(TX), before + 1);
    assert_eq!(model.drain_tx().len(), 1);
    // Out of credit part way: the device hears of what was sent.
    assert_eq!(vsock.send(conn, &data[10..]), Ok(2 * MAX_TX_PAYLOAD - 10));
    assert_eq!(model.notifications(TX), before + 2);
    assert_eq!(model.drain_tx().len(), 2);
}

// ---------------------------------------------------------------------------------------
// B1: the device, its queues and features.

#[test]
fn b1_device_id_19_queues_0_1_2_and_only_the_features_we_understand() {
    const STREAM: u64 = 1 << 0;
    const SEQPACKET: u64 = 1 << 1;
    const NO_IMPLIED_STREAM: u64 = 1 << 2;
    const INDIRECT_DESC: u64 = 1 << 28;
    const UNKNOWN: u64 = 1 << 40;
    assert_eq!(DeviceType::Socket as u32, 19);

    // Everything we know, plus SEQPACKET (not implemented) and bits we do not know.
    let offered = VERSION_1
        | RING_EVENT_IDX
        | STREAM
        | SEQPACKET
        | NO_IMPLIED_STREAM
        | INDIRECT_DESC
        | UNKNOWN;
    let inner = FakeTransport::new(GUEST_CID, offered);
    let transport = Recording::new(&inner);
    let mut slots = [const { SocketSlot::EMPTY }; 2];
    let mut rx_memory = vec![0u8; 2 * 4096];
    let vsock = VsockDevice::<FakeHal, _>::new(
        transport.clone(),
        test_config(),
        &mut slots,
        &mut rx_memory,
    )
    .expect("bring-up");
    let log = transport.log.lock().unwrap().clone();
    let accepted: Vec<u64> = log
        .iter()
        .filter_map(|call| match call {
            Call::Features(bits) => Some(*bits),
            _ => None,
        })
        .collect();
    assert_eq!(
        accepted,
        [VERSION_1 | RING_EVENT_IDX | STREAM | NO_IMPLIED_STREAM]
    );
    let queues: Vec<u16> = log
        .iter()
        .filter_map(|call| match call {
            Call::QueueSet(queue, _) => Some(*queue),
            _ => None,
        })
        .collect();
    assert_eq!(queues, [0, 1, 2], "rx = 0, tx = 1, event = 2");
    drop(vsock);

    // A device that offers no vsock feature at all has stream sockets, as if it offered
    // STREAM: the driver accepts only VERSION_1, and a connection works.
    let transport = FakeTransport::new(GUEST_CID, VERSION_1);
    let mut model = DeviceModel::new(&transport);
    let mut plain_storage = storage(2, 2 * 16 * 1024);
    let mut vsock = bring_up(&transport, test_config(), &mut plain_storage);
    assert_eq!(transport.state().driver_features, VERSION_1);
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, HOST_BUF_ALLOC, ms(1));
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"hi")
        .unwrap();
    vsock.poll(ms(2));
    let mut buf = [0u8; 8];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(2));

    // Another device type: NoDevice, and the device never sees DRIVER_OK.
    let other = FakeTransport::new(GUEST_CID, VERSION_1 | STREAM);
    other.state().device_type = DeviceType::Console;
    let mut other_storage = storage(2, 2 * 4096);
    let result = VsockDevice::<FakeHal, _>::new(
        other.clone(),
        test_config(),
        &mut other_storage.slots,
        &mut other_storage.rx_memory,
    );
    assert_eq!(result.err(), Some(Error::NoDevice));
    assert!(!other.state().status.contains(DeviceStatus::DRIVER_OK));
}

// ---------------------------------------------------------------------------------------
// B14: no RST for an RST.

#[test]
fn b14_an_rst_is_never_answered_with_an_rst() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 16 * 1024);
    let (mut vsock, _, conn) = serve_host(&transport, &mut model, &mut storage, test_config());
    // RSTs for no connection: to a port nobody uses, of an unknown type, with a payload.
    let nobody = to_port_of_guest(4321, from_host(Op::Rst, HOST_BUF_ALLOC, 0));
    model.deliver(&nobody, &[]).unwrap();
    let odd_type = Header {
        socket_type: 9,
        ..nobody
    };
    model.deliver(&odd_type, &[]).unwrap();
    model.deliver(&nobody, b"payload").unwrap();
    vsock.poll(ms(2));
    assert_eq!(
        control(&mut model),
        [],
        "RSTs for no connection are dropped"
    );
    // The connection's own RST ends it without an answer.
    model
        .deliver(&from_host(Op::Rst, HOST_BUF_ALLOC, 0), &[])
        .unwrap();
    vsock.poll(ms(3));
    assert_eq!(control(&mut model), []);
    let mut buf = [0u8; 8];
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::ConnectionReset));
    // A second RST on the tuple, now that nothing owns it: still no answer.
    model
        .deliver(&from_host(Op::Rst, HOST_BUF_ALLOC, 0), &[])
        .unwrap();
    vsock.poll(ms(4));
    assert_eq!(control(&mut model), []);
}

/// `header` sent to guest port `port` instead of GUEST_PORT.
fn to_port_of_guest(port: u32, header: Header) -> Header {
    Header {
        dst_port: port,
        ..header
    }
}

// ---------------------------------------------------------------------------------------
// B43: credit fields in ring order.

#[test]
fn b43_a_credit_update_that_waited_carries_the_fwd_cnt_of_when_it_enters_the_ring() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 16 * 1024);
    let config = Config {
        queue_size: 8,
        ..test_config()
    };
    let per = 16 * 1024;
    let (mut vsock, _, conn) = serve_host(&transport, &mut model, &mut storage, config);
    // The host fills our window; the device then holds every tx buffer we give it.
    let data = pattern(per as usize);
    for chunk in data.chunks(RX_BUFFER_SIZE - HEADER_LEN) {
        model
            .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), chunk)
            .unwrap();
    }
    vsock.poll(ms(2));
    let sent = pattern(8 * MAX_TX_PAYLOAD);
    assert_eq!(vsock.send(conn, &sent), Ok(8 * MAX_TX_PAYLOAD));
    // Reading half the window makes a CREDIT_UPDATE due; it has to wait for the ring.
    let mut buf = vec![0u8; per as usize];
    assert_eq!(
        vsock.recv(conn, &mut buf[..per as usize / 2]),
        Ok(per as usize / 2)
    );
    // More is read while it waits, and the device takes half the data.
    assert_eq!(vsock.recv(conn, &mut buf[..1000]), Ok(1000));
    let first = model.pop_tx().unwrap();
    assert_eq!(first.header.fwd_cnt, 0);
    for _ in 0..3 {
        model.pop_tx().unwrap();
    }
    // The next poll puts the update on the ring with fwd_cnt as it is then, after every
    // packet before it on the ring (the model checks B43 on each).
    vsock.poll(ms(3));
    let rest = model.drain_tx();
    assert_eq!(rest.len(), 5, "4 data packets, then the update");
    let update = &rest[4].header;
    assert_eq!(update.op, Op::CreditUpdate as u16);
    assert_eq!(update.fwd_cnt, per / 2 + 1000);
    assert!(rest.iter().all(|p| p.header.fwd_cnt <= update.fwd_cnt));
}

// ---------------------------------------------------------------------------------------
// B44: a packet the device truncated.

/// Collects this thread's warnings, for tests that count them.
struct WarningCapture;

std::thread_local! {
    static WARNINGS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl log::Log for WarningCapture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let line = record.args().to_string();
            let _ = WARNINGS.try_with(|w| w.borrow_mut().push(line));
        }
    }

    fn flush(&self) {}
}

static WARNING_CAPTURE: WarningCapture = WarningCapture;

/// The warnings logged on this thread while `f` runs.
fn warnings_during(f: impl FnOnce()) -> Vec<String> {
    // Only the first call in the process installs it; the others find it there.
    let _ = log::set_logger(&WARNING_CAPTURE);
    log::set_max_level(log::LevelFilter::Warn);
    WARNINGS.with(|w| w.borrow_mut().clear());
    f();
    WARNINGS.with(|w| w.borrow_mut().split_off(0))
}

#[test]
fn b44_a_truncated_packet_resets_its_connection_and_tells_the_peer() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(3, 3 * 16 * 1024);
    let (mut vsock, listener, conn) =
        serve_host(&transport, &mut model, &mut storage, test_config());
    let per = 16 * 1024;
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"early")
        .unwrap();
    // A packet of 8000 bytes in a 4096-byte buffer: the device wrote what fit and claims
    // the whole length (vhost-device-vsock 0.3.0 does this with a sibling's packets).
    let mut bytes = vec![0u8; RX_BUFFER_SIZE];
    Header {
        len: 8000,
        ..from_host(Op::Rw, HOST_BUF_ALLOC, 0)
    }
    .emit(&mut bytes)
    .unwrap();
    model
        .deliver_raw(&bytes, (HEADER_LEN + 8000) as u32)
        .unwrap();
    let warnings = warnings_during(|| vsock.poll(ms(2)));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("truncated"), "{warnings:?}");
    // RST to the peer, with the connection's credit fields (B9); the bytes that did
    // arrive stay readable, then the reset shows (B38).
    assert_eq!(control(&mut model), [to_host(Op::Rst, per, 0)]);
    let mut buf = [0u8; 16];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(5));
    assert_eq!(&buf[..5], b"early");
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::ConnectionReset));
    assert_eq!(vsock.stats().bad_used_entries, 1);
    assert_eq!(model.available(RX), 128, "the buffer is reposted");
    // The driver keeps working: the host connects again from another port.
    let again = accept_from(
        &mut vsock,
        &mut model,
        listener,
        5001,
        HOST_BUF_ALLOC,
        ms(3),
    );
    assert_eq!(
        vsock
            .readiness(again)
            .map(|r| r.contains(Readiness::WRITABLE)),
        Ok(true)
    );
}

// ---------------------------------------------------------------------------------------
// B6: a buffer the device returns without writing a packet into it.

/// vhost-device-vsock 0.3.0 returns an rx buffer with a used length of 44 and nothing
/// written when the connection it meant to serve ended meanwhile. The driver zeroes the
/// header of a buffer that held a packet without payload before it posts it again, so
/// such a buffer reads op 0 and is dropped: the packet it held before (here a REQUEST,
/// then an RST) is never handled twice. A buffer that held data needs no zeroing: its
/// header announces a payload that is not there, and it is dropped the same way.
#[test]
fn b6_a_buffer_returned_without_a_packet_is_never_taken_for_the_one_it_held() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(3, 3 * 16 * 1024);
    let config = Config {
        queue_size: 4,
        ..test_config()
    };
    let mut vsock = bring_up(&transport, config, &mut storage);
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, HOST_BUF_ALLOC, ms(1));
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"hello")
        .unwrap();
    model
        .deliver(&from_host(Op::Rst, HOST_BUF_ALLOC, 0), &[])
        .unwrap();
    vsock.poll(ms(2));
    let mut buf = [0u8; 8];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(5));
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::ConnectionReset));
    vsock.close(conn).unwrap();
    // Every buffer of the ring comes back once without a packet written into it: one
    // that never held one, the REQUEST's, the data's and the RST's.
    for _ in 0..4 {
        model.deliver_raw(&[], HEADER_LEN as u32).unwrap();
    }
    vsock.poll(ms(3));
    assert_eq!(control(&mut model), [], "no RESPONSE to a ghost REQUEST");
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    let stats = vsock.stats();
    assert_eq!(
        (stats.rx_empty, stats.rx_packets, stats.rx_dropped),
        (4, 3, 0),
        "{stats:?}"
    );
    assert_eq!(model.available(RX), 4);
    // The next real REQUEST on the same tuple is a new connection, as usual.
    accept_host(&mut vsock, &mut model, listener, HOST_BUF_ALLOC, ms(4));
}
