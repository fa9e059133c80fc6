//! The whole `vsock(4)` socket API driven through the device model: for every call and
//! every error it can return, the exact packets the driver puts on the tx ring (compared as
//! whole headers: op, flags, cids, ports, type, `buf_alloc`, `fwd_cnt`, `len`, and the
//! payload), or that none go out, and the exact result the caller gets. Tests name the
//! rule they check (BEHAVIOUR.md); rules covered by `tests/rules.rs` and
//! `tests/flow_control.rs` are only touched where a call needs them.

mod common;

use common::{
    control, listen_on, ms, new_transport, pattern, rst_for, rw, start_connect, stream_header,
    test_config, Device, Storage, GUEST_PORT, HOST_BUF_ALLOC as PEER_BUF_ALLOC, HOST_PORT,
    MAX_TX_PAYLOAD,
};
use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use core::time::Duration;
use std::alloc::{GlobalAlloc, Layout, System};
use virtio_drivers::transport::DeviceStatus;
use virtio_drivers::{BufferDirection, Hal, PhysAddr};
use vsock_guest::io::BlockingStream;
use vsock_guest::testing::{DeviceModel, FakeHal, FakeTransport, Packet};
use vsock_guest::wire::{Header, Op, HEADER_LEN};
use vsock_guest::{
    Config, Error, Instant, Readiness, Shutdown, SocketHandle, SocketSlot, VsockAddr, VsockDevice,
    VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL, VMADDR_PORT_ANY,
};

/// `common::GUEST_CID` as the socket API spells CIDs.
const GUEST_CID: u32 = common::GUEST_CID as u32;
const HOST_CID: u32 = VMADDR_CID_HOST;
/// Another guest on the same host.
const SIBLING_CID: u32 = 4;
/// Receive buffer per socket (`buf_alloc` the guest advertises) in these tests.
const PER: u32 = 16 * 1024;
/// First ephemeral port (B21).
const EPHEMERAL: u32 = 49152;

// ---------------------------------------------------------------------------------------
// Helpers (those of tests/common, generalised to any tuple).
// ---------------------------------------------------------------------------------------

/// One connection as the wire sees it: our port, the peer's address.
#[derive(Clone, Copy, Debug)]
struct Tuple {
    guest_cid: u32,
    guest_port: u32,
    peer: VsockAddr,
}

impl Tuple {
    const fn new(guest_port: u32, peer_cid: u32, peer_port: u32) -> Self {
        Tuple {
            guest_cid: GUEST_CID,
            guest_port,
            peer: VsockAddr::new(peer_cid, peer_port),
        }
    }

    /// The host's connection HOST_PORT → GUEST_PORT.
    const fn host() -> Self {
        Tuple::new(GUEST_PORT, HOST_CID, HOST_PORT)
    }

    /// A packet the peer sends on this connection, advertising PEER_BUF_ALLOC and 0.
    fn peer_sends(self, op: Op) -> Header {
        stream_header(self.peer_end(), self.guest_end(), op, PEER_BUF_ALLOC, 0)
    }

    /// The control packet the guest must send on this connection.
    fn to_peer(self, op: Op, buf_alloc: u32, fwd_cnt: u32) -> Header {
        stream_header(self.guest_end(), self.peer_end(), op, buf_alloc, fwd_cnt)
    }

    /// The SHUTDOWN the guest must send with `flags` (RECEIVE = 1, SEND = 2: B32).
    fn shutdown_to_peer(self, flags: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            flags,
            ..self.to_peer(Op::Shutdown, buf_alloc, fwd_cnt)
        }
    }

    /// The SHUTDOWN the peer sends with `flags`.
    fn peer_shutdown(self, flags: u32) -> Header {
        Header {
            flags,
            ..self.peer_sends(Op::Shutdown)
        }
    }

    /// The RW packet the guest must send with `payload`.
    fn rw_to_peer(self, payload: &[u8], buf_alloc: u32, fwd_cnt: u32) -> Packet {
        rw(self.to_peer(Op::Rw, buf_alloc, fwd_cnt), payload)
    }

    /// The guest's end of this connection, as a header names it.
    fn guest_end(self) -> (u64, u32) {
        (u64::from(self.guest_cid), self.guest_port)
    }

    /// The peer's end of this connection, as a header names it.
    fn peer_end(self) -> (u64, u32) {
        (u64::from(self.peer.cid), self.peer.port)
    }

    /// The same connection after the guest's CID changed.
    fn with_guest_cid(self, guest_cid: u32) -> Self {
        Tuple { guest_cid, ..self }
    }
}

/// The instant `micros` microseconds after time zero.
fn us(micros: u64) -> Instant {
    Instant::from_micros(micros)
}

/// Asserts that nothing went out.
#[track_caller]
fn assert_silent(model: &mut DeviceModel) {
    assert_eq!(model.drain_tx(), [], "no packet expected");
}

/// The caller's memory for a device: `sockets` slots of PER bytes each.
fn storage(sockets: usize) -> Storage {
    common::storage(sockets, sockets * PER as usize)
}

/// Brings the driver up (`common::bring_up`) and checks that each socket gets PER bytes.
fn bring_up<'a>(transport: &FakeTransport, config: Config, storage: &'a mut Storage) -> Device<'a> {
    let vsock = common::bring_up(transport, config, storage);
    assert_eq!(vsock.rx_buffer_per_socket(), PER as usize);
    vsock
}

/// The peer of `tuple` connects; checks the RESPONSE (B15: at once, with our credit).
fn request(vsock: &mut Device<'_>, model: &mut DeviceModel, tuple: Tuple, now: Instant) {
    model.deliver(&tuple.peer_sends(Op::Request), &[]).unwrap();
    vsock.poll(now);
    assert_eq!(control(model), [tuple.to_peer(Op::Response, PER, 0)]);
}

/// The peer of `tuple` connects and the guest accepts; checks RESPONSE and peer address.
fn accept_from(
    vsock: &mut Device<'_>,
    model: &mut DeviceModel,
    listener: SocketHandle,
    tuple: Tuple,
    now: Instant,
) -> SocketHandle {
    request(vsock, model, tuple, now);
    let (conn, peer) = vsock.accept(listener).unwrap();
    assert_eq!(peer, tuple.peer);
    conn
}

/// A new unbound socket connects to `peer` at `now` (the time of the last poll); checks
/// the REQUEST, answers it and checks that the socket became writable.
fn connect_to(
    vsock: &mut Device<'_>,
    model: &mut DeviceModel,
    peer: VsockAddr,
    now: Instant,
) -> (SocketHandle, Tuple) {
    vsock.poll(now);
    let socket = vsock.stream_socket().unwrap();
    assert_eq!(vsock.connect(socket, peer), Err(Error::InProgress));
    let local = vsock.local_addr(socket).unwrap();
    let tuple = Tuple::new(local.port, peer.cid, peer.port);
    assert_eq!(control(model), [tuple.to_peer(Op::Request, PER, 0)]);
    model.deliver(&tuple.peer_sends(Op::Response), &[]).unwrap();
    vsock.poll(now);
    assert_silent(model);
    assert_eq!(vsock.readiness(socket), Ok(Readiness::WRITABLE));
    (socket, tuple)
}

/// Readiness of a connection that failed or ended by RST with an error still pending.
const FAILED: Readiness = Readiness::READABLE
    .union(Readiness::WRITABLE)
    .union(Readiness::HANG_UP)
    .union(Readiness::ERROR);
/// Readiness of a connection that ended, once its error (if any) was taken.
const ENDED: Readiness = Readiness::READABLE
    .union(Readiness::WRITABLE)
    .union(Readiness::HANG_UP);

// ---------------------------------------------------------------------------------------
// Error
// ---------------------------------------------------------------------------------------

#[test]
fn error_errno_display_and_embedded_io_kind_for_every_variant() {
    use embedded_io::{Error as _, ErrorKind};
    let table = [
        (
            Error::AccessDenied,
            13,
            "permission denied: privileged port",
            ErrorKind::PermissionDenied,
        ),
        (
            Error::AddrInUse,
            98,
            "address already in use",
            ErrorKind::AddrInUse,
        ),
        (
            Error::AddrNotAvailable,
            99,
            "address not available",
            ErrorKind::AddrNotAvailable,
        ),
        (
            Error::InvalidCid,
            14,
            "invalid CID for this operation",
            ErrorKind::InvalidInput,
        ),
        (
            Error::InProgress,
            115,
            "connection in progress",
            ErrorKind::Other,
        ),
        (
            Error::InvalidArgument,
            22,
            "invalid argument",
            ErrorKind::InvalidInput,
        ),
        (
            Error::NoDevice,
            19,
            "no virtio socket device",
            ErrorKind::Other,
        ),
        (
            Error::NotConnected,
            107,
            "socket is not connected",
            ErrorKind::NotConnected,
        ),
        (
            Error::TimedOut,
            110,
            "connection timed out",
            ErrorKind::TimedOut,
        ),
        (
            Error::WouldBlock,
            11,
            "operation would block",
            ErrorKind::Other,
        ),
        (
            Error::ConnectionRefused,
            111,
            "connection refused",
            ErrorKind::ConnectionRefused,
        ),
        (
            Error::ConnectionReset,
            104,
            "connection reset",
            ErrorKind::ConnectionReset,
        ),
        (Error::BrokenPipe, 32, "broken pipe", ErrorKind::BrokenPipe),
        (
            Error::NoBufferSpace,
            105,
            "no buffer space available",
            ErrorKind::OutOfMemory,
        ),
        (
            Error::TooManySockets,
            24,
            "too many sockets",
            ErrorKind::OutOfMemory,
        ),
        (
            Error::Already,
            114,
            "connection already in progress",
            ErrorKind::Other,
        ),
        (
            Error::IsConnected,
            106,
            "socket is already connected",
            ErrorKind::Other,
        ),
        (
            Error::InvalidHandle,
            9,
            "invalid socket handle",
            ErrorKind::InvalidInput,
        ),
        (
            Error::DeviceError,
            5,
            "virtio device error",
            ErrorKind::Other,
        ),
    ];
    for (error, errno, text, kind) in table {
        assert_eq!(error.errno(), errno, "{error:?}");
        assert_eq!(error.to_string(), format!("{text} (errno {errno})"));
        assert_eq!(error.kind(), kind, "{error:?}");
        let as_std: &dyn core::error::Error = &error;
        assert!(as_std.source().is_none());
    }
    // Every errno is distinct, so a POSIX layer can map back.
    let mut errnos: Vec<i32> = table.iter().map(|row| row.1).collect();
    errnos.sort_unstable();
    errnos.dedup();
    assert_eq!(errnos.len(), table.len());
}

// ---------------------------------------------------------------------------------------
// Bring-up: NoDevice, InvalidArgument, NoBufferSpace
// ---------------------------------------------------------------------------------------

#[test]
fn new_is_no_device_for_another_device_type_or_a_device_without_streams() {
    let mut storage = storage(1);
    // B1: not a socket device.
    let (transport, _model) = new_transport();
    transport.state().device_type = virtio_drivers::transport::DeviceType::Console;
    let result = VsockDevice::<FakeHal, _>::new(
        transport.clone(),
        test_config(),
        &mut storage.slots,
        &mut storage.rx_memory,
    );
    assert_eq!(result.err(), Some(Error::NoDevice));
    assert!(!transport.state().status.contains(DeviceStatus::DRIVER_OK));

    // B1: a socket device that offers NO_IMPLIED_STREAM without STREAM has no stream
    // sockets: NoDevice, and the device is told so.
    let transport = FakeTransport::new(u64::from(GUEST_CID), (1 << 32) | (1 << 2));
    let result = VsockDevice::<FakeHal, _>::new(
        transport.clone(),
        test_config(),
        &mut storage.slots,
        &mut storage.rx_memory,
    );
    assert_eq!(result.err(), Some(Error::NoDevice));
    let status = transport.state().status;
    assert!(status.contains(DeviceStatus::FAILED), "{status:?}");
    assert!(!status.contains(DeviceStatus::DRIVER_OK), "{status:?}");
    assert_eq!(Error::NoDevice.errno(), 19, "ENODEV");
}

#[test]
fn new_is_invalid_argument_for_unusable_storage_or_sizes() {
    let (transport, _model) = new_transport();
    let mut slots: Vec<SocketSlot> = (0..4).map(|_| SocketSlot::EMPTY).collect();
    let mut rx_memory = vec![0u8; 4 * 1024];
    let config = test_config();
    let cases: [(&str, usize, usize, Config); 6] = [
        ("no slots", 0, 4096, config),
        ("no rx memory", 4, 0, config),
        ("less rx memory than slots", 4, 3, config),
        (
            "rx buffer no larger than a header",
            4,
            4096,
            Config {
                rx_buffer_size: 44,
                ..config
            },
        ),
        (
            "tx buffer no larger than a header",
            4,
            4096,
            Config {
                tx_packet_size: 44,
                ..config
            },
        ),
        (
            "sibling packet no larger than a header",
            4,
            4096,
            Config {
                sibling_packet_size: 44,
                ..config
            },
        ),
    ];
    for (what, n_slots, rx_len, config) in cases {
        let result = VsockDevice::<FakeHal, _>::new(
            transport.clone(),
            config,
            &mut slots[..n_slots],
            &mut rx_memory[..rx_len],
        );
        assert_eq!(result.err(), Some(Error::InvalidArgument), "{what}");
        assert!(!transport.state().status.contains(DeviceStatus::DRIVER_OK));
    }
}

std::thread_local! {
    /// DMA allocations `ScarceHal` still grants on this thread.
    static DMA_BUDGET: Cell<usize> = const { Cell::new(usize::MAX) };
    /// DMA allocations of `ScarceHal` not yet returned, on this thread.
    static DMA_LIVE: Cell<usize> = const { Cell::new(0) };
}

/// A Hal whose DMA memory runs out after a per-thread budget; otherwise `FakeHal` (so the
/// device model can still read the memory).
struct ScarceHal;

// SAFETY: every method forwards to `FakeHal`, which upholds the contract; a refused
// allocation returns physical address 0, the documented failure value the driver checks.
unsafe impl Hal for ScarceHal {
    fn dma_alloc(pages: usize, direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let budget = DMA_BUDGET.get();
        if budget == 0 {
            return (0, NonNull::dangling());
        }
        DMA_BUDGET.set(budget - 1);
        DMA_LIVE.set(DMA_LIVE.get() + 1);
        FakeHal::dma_alloc(pages, direction)
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        DMA_LIVE.set(DMA_LIVE.get() - 1);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { FakeHal::dma_dealloc(paddr, vaddr, pages) }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { FakeHal::mmio_phys_to_virt(paddr, size) }
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { FakeHal::share(buffer, direction) }
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { FakeHal::unshare(paddr, buffer, direction) }
    }
}

#[test]
fn new_is_no_buffer_space_when_dma_memory_runs_out_and_frees_what_it_took() {
    let mut storage = storage(2);
    // Three queues, each a ring and a buffer area: bring-up takes six allocations. Refuse
    // each one in turn.
    for budget in 0..6 {
        let (transport, _model) = new_transport();
        DMA_BUDGET.set(budget);
        let result = VsockDevice::<ScarceHal, _>::new(
            transport.clone(),
            test_config(),
            &mut storage.slots,
            &mut storage.rx_memory,
        );
        assert_eq!(
            result.err(),
            Some(Error::NoBufferSpace),
            "allocation {budget}"
        );
        assert_eq!(
            DMA_LIVE.get(),
            0,
            "allocation {budget}: everything returned"
        );
        let status = transport.state().status;
        assert!(status.contains(DeviceStatus::FAILED), "{status:?}");
        assert!(!status.contains(DeviceStatus::DRIVER_OK), "{status:?}");
        // No queue the device knows of points at memory that was given back.
        let queues = transport.state().queues;
        assert!(
            queues.iter().all(|q| !q.ready),
            "allocation {budget}: queues left registered: {queues:?}"
        );
    }
    let (transport, mut model) = new_transport();
    DMA_BUDGET.set(6);
    let mut vsock = VsockDevice::<ScarceHal, _>::new(
        transport.clone(),
        test_config(),
        &mut storage.slots,
        &mut storage.rx_memory,
    )
    .expect("six allocations are enough");
    assert_eq!(DMA_LIVE.get(), 6);
    // No allocation after bring-up (B42): a connection costs no DMA memory.
    let listener = vsock.stream_socket().unwrap();
    vsock
        .bind(listener, VsockAddr::new(GUEST_CID, 80))
        .unwrap_err();
    vsock
        .bind(listener, VsockAddr::new(GUEST_CID, GUEST_PORT))
        .unwrap();
    vsock.listen(listener, 1).unwrap();
    model
        .deliver(&Tuple::host().peer_sends(Op::Request), &[])
        .unwrap();
    vsock.poll(ms(1));
    assert_eq!(
        control(&mut model),
        [Tuple::host().to_peer(Op::Response, PER, 0)]
    );
    drop(vsock);
    assert_eq!(DMA_LIVE.get(), 0);
    DMA_BUDGET.set(usize::MAX);
}

// ---------------------------------------------------------------------------------------
// stream_socket, bind, local_addr: TooManySockets, InvalidArgument, AddrInUse,
// AddrNotAvailable, AccessDenied
// ---------------------------------------------------------------------------------------

#[test]
fn stream_socket_until_too_many_sockets() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(3);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let a = vsock.stream_socket().unwrap();
    let b = vsock.stream_socket().unwrap();
    let c = vsock.stream_socket().unwrap();
    assert!(a != b && b != c && a != c);
    assert_eq!(vsock.stream_socket(), Err(Error::TooManySockets));
    assert_eq!(Error::TooManySockets.errno(), 24);
    // A new socket is unconnected and unbound.
    assert_eq!(vsock.readiness(a), Ok(Readiness::empty()));
    assert_eq!(vsock.local_addr(a), Err(Error::InvalidArgument));
    assert_eq!(vsock.peer_addr(a), Err(Error::NotConnected));
    assert_eq!(vsock.take_error(a), Ok(None));
    assert_eq!(vsock.recv_queue(a), Ok(0));
    // Closing an unconnected socket frees its slot at once, and sends nothing.
    vsock.close(b).unwrap();
    let d = vsock.stream_socket().unwrap();
    assert_ne!(d, b, "a reused slot gets a new handle");
    assert_eq!(vsock.stream_socket(), Err(Error::TooManySockets));
    vsock.poll(ms(1));
    assert_silent(&mut model);
}

#[test]
fn bind_explicit_port_on_any_or_own_cid() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let any = vsock.stream_socket().unwrap();
    assert_eq!(
        vsock.bind(any, VsockAddr::new(VMADDR_CID_ANY, 1024)),
        Ok(())
    );
    // local_addr names our CID, also for a socket bound to VMADDR_CID_ANY.
    assert_eq!(vsock.local_addr(any), Ok(VsockAddr::new(GUEST_CID, 1024)));
    let own = vsock.stream_socket().unwrap();
    assert_eq!(
        vsock.bind(own, VsockAddr::new(GUEST_CID, 0xFFFF_FFFE)),
        Ok(())
    );
    assert_eq!(
        vsock.local_addr(own),
        Ok(VsockAddr::new(GUEST_CID, 0xFFFF_FFFE))
    );
    assert_eq!(vsock.readiness(own), Ok(Readiness::empty()));
    assert_eq!(vsock.local_cid(), GUEST_CID);
    vsock.poll(ms(1));
    assert_silent(&mut model);
}

#[test]
fn bind_port_any_takes_ephemeral_ports_from_49152_and_skips_taken_ones() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(5);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let first = vsock.stream_socket().unwrap();
    vsock
        .bind(first, VsockAddr::new(VMADDR_CID_ANY, VMADDR_PORT_ANY))
        .unwrap();
    assert_eq!(
        vsock.local_addr(first),
        Ok(VsockAddr::new(GUEST_CID, EPHEMERAL))
    );
    // Someone binds the next one explicitly: PORT_ANY skips it.
    let explicit = vsock.stream_socket().unwrap();
    vsock
        .bind(explicit, VsockAddr::new(GUEST_CID, EPHEMERAL + 1))
        .unwrap();
    let second = vsock.stream_socket().unwrap();
    vsock
        .bind(second, VsockAddr::new(GUEST_CID, VMADDR_PORT_ANY))
        .unwrap();
    assert_eq!(
        vsock.local_addr(second),
        Ok(VsockAddr::new(GUEST_CID, EPHEMERAL + 2))
    );
    // A port given back is not handed out again at once (B21).
    vsock.close(first).unwrap();
    let third = vsock.stream_socket().unwrap();
    vsock
        .bind(third, VsockAddr::new(VMADDR_CID_ANY, VMADDR_PORT_ANY))
        .unwrap();
    assert_eq!(
        vsock.local_addr(third),
        Ok(VsockAddr::new(GUEST_CID, EPHEMERAL + 3))
    );
    // An ephemeral port is a port like any other: bind to it is AddrInUse.
    let clash = vsock.stream_socket().unwrap();
    assert_eq!(
        vsock.bind(clash, VsockAddr::new(VMADDR_CID_ANY, EPHEMERAL + 3)),
        Err(Error::AddrInUse)
    );
    vsock.poll(ms(1));
    assert_silent(&mut model);
}

#[test]
fn bind_errors_leave_the_socket_unbound_and_send_nothing() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let taken = vsock.stream_socket().unwrap();
    vsock
        .bind(taken, VsockAddr::new(VMADDR_CID_ANY, 2000))
        .unwrap();
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);

    let s = vsock.stream_socket().unwrap();
    let cases = [
        // B22: a CID that is not ANY and not ours.
        (VsockAddr::new(HOST_CID, 3000), Error::AddrNotAvailable),
        (
            VsockAddr::new(VMADDR_CID_HYPERVISOR, 3000),
            Error::AddrNotAvailable,
        ),
        (
            VsockAddr::new(VMADDR_CID_LOCAL, 3000),
            Error::AddrNotAvailable,
        ),
        (VsockAddr::new(SIBLING_CID, 3000), Error::AddrNotAvailable),
        (
            VsockAddr::new(SIBLING_CID, VMADDR_PORT_ANY),
            Error::AddrNotAvailable,
        ),
        // B22: privileged ports.
        (VsockAddr::new(VMADDR_CID_ANY, 0), Error::AccessDenied),
        (VsockAddr::new(GUEST_CID, 80), Error::AccessDenied),
        (VsockAddr::new(VMADDR_CID_ANY, 1023), Error::AccessDenied),
        // B22: taken by a bound socket, by a listener.
        (VsockAddr::new(VMADDR_CID_ANY, 2000), Error::AddrInUse),
        (VsockAddr::new(GUEST_CID, GUEST_PORT), Error::AddrInUse),
    ];
    for (addr, error) in cases {
        assert_eq!(vsock.bind(s, addr), Err(error), "{addr}");
        assert_eq!(vsock.local_addr(s), Err(Error::InvalidArgument), "{addr}");
    }
    // B22: already bound (explicitly, or by PORT_ANY): InvalidArgument, binding unchanged.
    vsock.bind(s, VsockAddr::new(GUEST_CID, 1024)).unwrap();
    for addr in [
        VsockAddr::new(GUEST_CID, 1025),
        VsockAddr::new(GUEST_CID, 1024),
        VsockAddr::new(VMADDR_CID_ANY, VMADDR_PORT_ANY),
    ] {
        assert_eq!(vsock.bind(s, addr), Err(Error::InvalidArgument), "{addr}");
    }
    assert_eq!(vsock.local_addr(s), Ok(VsockAddr::new(GUEST_CID, 1024)));
    assert_eq!(
        vsock.bind(listener, VsockAddr::new(GUEST_CID, 1026)),
        Err(Error::InvalidArgument)
    );
    vsock.poll(ms(1));
    assert_silent(&mut model);
}

#[test]
fn bind_privileged_port_when_config_allows_it() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(3);
    let config = Config {
        allow_privileged_ports: true,
        ..test_config()
    };
    let mut vsock = bring_up(&transport, config, &mut storage);
    let listener = listen_on(&mut vsock, 80, 1);
    assert_eq!(
        vsock.local_addr(listener),
        Ok(VsockAddr::new(GUEST_CID, 80))
    );
    let tuple = Tuple::new(80, HOST_CID, HOST_PORT);
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(1));
    assert_eq!(vsock.local_addr(conn), Ok(VsockAddr::new(GUEST_CID, 80)));
    // Port 0 is an ordinary (privileged) port, not a wildcard.
    let zero = vsock.stream_socket().unwrap();
    vsock.bind(zero, VsockAddr::new(VMADDR_CID_ANY, 0)).unwrap();
    assert_eq!(vsock.local_addr(zero), Ok(VsockAddr::new(GUEST_CID, 0)));
    vsock.close(conn).unwrap();
    assert_eq!(control(&mut model), [tuple.shutdown_to_peer(3, PER, 0)]);
}

// ---------------------------------------------------------------------------------------
// listen, accept: backlog (B15), accept queue (B22)
// ---------------------------------------------------------------------------------------

#[test]
fn listen_needs_a_bound_unconnected_socket() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    // B22: listen on an unbound socket.
    let unbound = vsock.stream_socket().unwrap();
    assert_eq!(vsock.listen(unbound, 4), Err(Error::InvalidArgument));
    assert_eq!(vsock.readiness(unbound), Ok(Readiness::empty()));
    // A connecting or connected socket cannot listen (POSIX listen(2): EINVAL).
    vsock.poll(ms(1));
    let tuple = Tuple::new(EPHEMERAL, HOST_CID, HOST_PORT);
    let connecting = start_connect(&mut vsock, &mut model, tuple.peer, tuple.guest_port, PER);
    assert_eq!(vsock.listen(connecting, 4), Err(Error::InvalidArgument));
    model.deliver(&tuple.peer_sends(Op::Response), &[]).unwrap();
    vsock.poll(ms(2));
    assert_eq!(vsock.listen(connecting, 4), Err(Error::InvalidArgument));
    assert_eq!(vsock.accept(connecting), Err(Error::InvalidArgument));
    // Listening twice is allowed (it sets the backlog).
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    assert_eq!(vsock.listen(listener, 2), Ok(()));
    assert_eq!(vsock.readiness(listener), Ok(Readiness::empty()));
    assert_eq!(
        vsock.local_addr(listener),
        Ok(VsockAddr::new(GUEST_CID, GUEST_PORT))
    );
    assert_eq!(vsock.peer_addr(listener), Err(Error::NotConnected));
    assert_silent(&mut model);
}

#[test]
fn b15_request_beyond_the_backlog_gets_rst_and_room_returns_after_accept() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(8);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 2);
    let peer = |port| Tuple::new(GUEST_PORT, HOST_CID, port);

    request(&mut vsock, &mut model, peer(5000), ms(1));
    request(&mut vsock, &mut model, peer(5001), ms(2));
    assert_eq!(vsock.readiness(listener), Ok(Readiness::READABLE));
    // The third REQUEST finds the backlog full: RST, addresses swapped, no credit.
    let third = peer(5002).peer_sends(Op::Request);
    model.deliver(&third, &[]).unwrap();
    vsock.poll(ms(3));
    assert_eq!(control(&mut model), [rst_for(&third)]);

    // accept makes room for exactly one more.
    let (first, addr) = vsock.accept(listener).unwrap();
    assert_eq!(addr, VsockAddr::new(HOST_CID, 5000));
    request(&mut vsock, &mut model, peer(5003), ms(4));
    let fifth = peer(5004).peer_sends(Op::Request);
    model.deliver(&fifth, &[]).unwrap();
    vsock.poll(ms(5));
    assert_eq!(control(&mut model), [rst_for(&fifth)]);

    // A larger backlog takes effect at once; a zero backlog counts as one.
    vsock.listen(listener, 3).unwrap();
    request(&mut vsock, &mut model, peer(5004), ms(6));
    vsock.listen(listener, 0).unwrap();
    let sixth = peer(5005).peer_sends(Op::Request);
    model.deliver(&sixth, &[]).unwrap();
    vsock.poll(ms(7));
    assert_eq!(control(&mut model), [rst_for(&sixth)]);

    // Accepted in arrival order; the refused ones never show up.
    let order: Vec<u32> = (0..3)
        .map(|_| vsock.accept(listener).unwrap().1.port)
        .collect();
    assert_eq!(order, [5001, 5003, 5004]);
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    vsock.listen(listener, 0).unwrap();
    request(&mut vsock, &mut model, peer(5005), ms(8));
    assert_eq!(vsock.accept(listener).unwrap().1.port, 5005);
    assert_eq!(vsock.peer_addr(first), Ok(VsockAddr::new(HOST_CID, 5000)));
}

/// The listener counts its queue rather than walking the slots: the count must follow
/// every way a connection leaves the queue (accepted, reset by the peer and freed,
/// the listener closed), or the backlog would refuse too early or admit too many.
#[test]
fn b15_the_backlog_counts_connections_that_left_the_queue_every_way() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(8);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 2);
    let peer = |port| Tuple::new(GUEST_PORT, HOST_CID, port);
    let refused = |vsock: &mut Device<'_>, model: &mut DeviceModel, port, now| {
        let request = peer(port).peer_sends(Op::Request);
        model.deliver(&request, &[]).unwrap();
        vsock.poll(now);
        assert_eq!(control(model), [rst_for(&request)], "port {port}");
    };

    // Full, then one accepted: room for one.
    request(&mut vsock, &mut model, peer(5000), ms(1));
    request(&mut vsock, &mut model, peer(5001), ms(2));
    refused(&mut vsock, &mut model, 5002, ms(3));
    assert_eq!(vsock.accept(listener).unwrap().1.port, 5000);
    request(&mut vsock, &mut model, peer(5003), ms(4));
    refused(&mut vsock, &mut model, 5004, ms(5));

    // A waiting connection the peer resets leaves the queue (it is freed): room for one.
    model.deliver(&peer(5001).peer_sends(Op::Rst), &[]).unwrap();
    vsock.poll(ms(6));
    assert_eq!(control(&mut model), []);
    request(&mut vsock, &mut model, peer(5005), ms(7));
    refused(&mut vsock, &mut model, 5010, ms(7));
    assert_eq!(vsock.readiness(listener), Ok(Readiness::READABLE));
    assert_eq!(vsock.accept(listener).unwrap().1.port, 5003);
    assert_eq!(vsock.accept(listener).unwrap().1.port, 5005);
    assert_eq!(vsock.readiness(listener), Ok(Readiness::empty()));
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));

    // Closing a listener resets what waits in it; a new listener in its slot starts empty.
    request(&mut vsock, &mut model, peer(5006), ms(8));
    vsock.close(listener).unwrap();
    assert_eq!(control(&mut model), [peer(5006).to_peer(Op::Rst, PER, 0)]);
    // (The accepted connections keep GUEST_PORT.)
    let listener = listen_on(&mut vsock, GUEST_PORT + 1, 2);
    assert_eq!(vsock.readiness(listener), Ok(Readiness::empty()));
    let peer = |port| Tuple::new(GUEST_PORT + 1, HOST_CID, port);
    request(&mut vsock, &mut model, peer(5007), ms(9));
    request(&mut vsock, &mut model, peer(5008), ms(10));
    let request = peer(5009).peer_sends(Op::Request);
    model.deliver(&request, &[]).unwrap();
    vsock.poll(ms(11));
    assert_eq!(control(&mut model), [rst_for(&request)]);
    assert_eq!(vsock.accept(listener).unwrap().1.port, 5007);
    assert_eq!(vsock.accept(listener).unwrap().1.port, 5008);
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
}

#[test]
fn b15_request_with_no_free_socket_slot_gets_rst() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 8);
    let conn = accept_from(&mut vsock, &mut model, listener, Tuple::host(), ms(1));
    let second = Tuple::new(GUEST_PORT, HOST_CID, 5001).peer_sends(Op::Request);
    model.deliver(&second, &[]).unwrap();
    vsock.poll(ms(2));
    assert_eq!(control(&mut model), [rst_for(&second)]);
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    // Once the connection is gone (aborted: its slot is free at once), there is room.
    vsock.abort(conn).unwrap();
    assert_eq!(
        control(&mut model),
        [Tuple::host().to_peer(Op::Rst, PER, 0)]
    );
    request(
        &mut vsock,
        &mut model,
        Tuple::new(GUEST_PORT, HOST_CID, 5001),
        ms(3),
    );
}

#[test]
fn b15_request_to_a_port_nobody_listens_on_gets_rst() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    // Bound but not listening.
    let bound = vsock.stream_socket().unwrap();
    vsock
        .bind(bound, VsockAddr::new(VMADDR_CID_ANY, GUEST_PORT))
        .unwrap();
    // A connected socket's port, from another peer.
    let (_conn, tuple) = connect_to(&mut vsock, &mut model, VsockAddr::new(HOST_CID, 80), ms(1));
    for request in [
        Tuple::host().peer_sends(Op::Request),
        Tuple::new(tuple.guest_port, HOST_CID, 81).peer_sends(Op::Request),
        Tuple::new(4321, SIBLING_CID, 81).peer_sends(Op::Request),
    ] {
        model.deliver(&request, &[]).unwrap();
        vsock.poll(ms(2));
        assert_eq!(control(&mut model), [rst_for(&request)]);
    }
    assert_eq!(vsock.accept(bound), Err(Error::InvalidArgument));
}

#[test]
fn accept_gives_the_oldest_connection_with_its_peer_address() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 4);
    let host = Tuple::host();
    let sibling = Tuple::new(GUEST_PORT, SIBLING_CID, 6000);
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    request(&mut vsock, &mut model, host, ms(1));
    request(&mut vsock, &mut model, sibling, ms(2));
    // A waiting connection already takes data.
    model
        .deliver(&sibling.peer_sends(Op::Rw), b"early")
        .unwrap();
    vsock.poll(ms(3));
    assert_silent(&mut model);
    assert_eq!(vsock.readiness(listener), Ok(Readiness::READABLE));

    let (a, peer_a) = vsock.accept(listener).unwrap();
    assert_eq!(peer_a, VsockAddr::new(HOST_CID, HOST_PORT));
    assert_eq!(vsock.readiness(listener), Ok(Readiness::READABLE));
    let (b, peer_b) = vsock.accept(listener).unwrap();
    assert_eq!(peer_b, VsockAddr::new(SIBLING_CID, 6000));
    assert_eq!(vsock.readiness(listener), Ok(Readiness::empty()));
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    assert_eq!(Error::WouldBlock.errno(), 11);

    for (conn, peer) in [(a, peer_a), (b, peer_b)] {
        assert_eq!(
            vsock.local_addr(conn),
            Ok(VsockAddr::new(GUEST_CID, GUEST_PORT))
        );
        assert_eq!(vsock.peer_addr(conn), Ok(peer));
        assert_eq!(vsock.take_error(conn), Ok(None));
    }
    assert_eq!(vsock.readiness(a), Ok(Readiness::WRITABLE));
    assert_eq!(
        vsock.readiness(b),
        Ok(Readiness::READABLE | Readiness::WRITABLE)
    );
    let mut buf = [0u8; 16];
    assert_eq!(vsock.recv(b, &mut buf), Ok(5));
    assert_eq!(&buf[..5], b"early");
    // accepted connections answer on their own tuple.
    assert_eq!(vsock.send(a, b"to host"), Ok(7));
    assert_eq!(vsock.send(b, b"to sibling"), Ok(10));
    assert_eq!(
        model.drain_tx(),
        [
            host.rw_to_peer(b"to host", PER, 0),
            sibling.rw_to_peer(b"to sibling", PER, 5),
        ]
    );
    assert_eq!(vsock.accept(a), Err(Error::InvalidArgument));
}

#[test]
fn b22_connection_reset_before_accept_is_dropped_from_the_queue() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let first = Tuple::host();
    request(&mut vsock, &mut model, first, ms(1));
    model.deliver(&first.peer_sends(Op::Rw), b"lost").unwrap();
    model.deliver(&first.peer_sends(Op::Rst), &[]).unwrap();
    vsock.poll(ms(2));
    assert_silent(&mut model); // B14: no RST for an RST
    assert_eq!(vsock.readiness(listener), Ok(Readiness::empty()));
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    // Its backlog place is free again; the same peer port may come back.
    request(&mut vsock, &mut model, first, ms(3));
    let (conn, peer) = vsock.accept(listener).unwrap();
    assert_eq!(peer, first.peer);
    assert_eq!(vsock.recv_queue(conn), Ok(0));
}

#[test]
fn b34_connection_closed_in_order_before_accept_keeps_its_data_for_accept() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();
    request(&mut vsock, &mut model, tuple, ms(1));
    // The peer sends its request, and closes before the guest gets round to accept.
    model.deliver(&tuple.peer_sends(Op::Rw), b"hello").unwrap();
    model.deliver(&tuple.peer_shutdown(3), &[]).unwrap();
    vsock.poll(ms(2));
    // B34: RST back, tuple free; the data stays readable until the socket is closed.
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Rst, PER, 0)]);
    assert_eq!(vsock.readiness(listener), Ok(Readiness::READABLE));
    let (conn, peer) = vsock.accept(listener).unwrap();
    assert_eq!(peer, tuple.peer);
    assert_eq!(vsock.readiness(conn), Ok(ENDED));
    let mut buf = [0u8; 16];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(5));
    assert_eq!(&buf[..5], b"hello");
    assert_eq!(vsock.recv(conn, &mut buf), Ok(0));
    assert_eq!(vsock.take_error(conn), Ok(None));
    assert_eq!(vsock.send(conn, b"late"), Err(Error::BrokenPipe));
    vsock.close(conn).unwrap();
    assert_silent(&mut model);
    // The slot is free and the backlog has room.
    request(&mut vsock, &mut model, tuple, ms(3));
}

#[test]
fn close_or_abort_of_a_listener_resets_waiting_connections_only() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(8);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    for (port, end) in [(GUEST_PORT, "close"), (GUEST_PORT + 1, "abort")] {
        let listener = listen_on(&mut vsock, port, 4);
        let accepted = Tuple::new(port, HOST_CID, 5000);
        let waiting = [
            Tuple::new(port, HOST_CID, 5001),
            Tuple::new(port, SIBLING_CID, 5002),
        ];
        let conn = accept_from(&mut vsock, &mut model, listener, accepted, ms(1));
        for tuple in waiting {
            request(&mut vsock, &mut model, tuple, ms(2));
        }
        // A waiting connection with unread data is reset all the same.
        model.deliver(&waiting[0].peer_sends(Op::Rw), b"x").unwrap();
        vsock.poll(ms(3));
        if end == "close" {
            vsock.close(listener).unwrap();
        } else {
            vsock.abort(listener).unwrap();
        }
        assert_eq!(
            control(&mut model),
            [
                waiting[0].to_peer(Op::Rst, PER, 0),
                waiting[1].to_peer(Op::Rst, PER, 0)
            ],
            "{end}"
        );
        assert_eq!(vsock.accept(listener), Err(Error::InvalidHandle));
        // Nobody listens any more.
        let late = Tuple::new(port, HOST_CID, 5003).peer_sends(Op::Request);
        model.deliver(&late, &[]).unwrap();
        vsock.poll(ms(4));
        assert_eq!(control(&mut model), [rst_for(&late)], "{end}");
        // The accepted connection is not the listener's any more: untouched.
        assert_eq!(vsock.send(conn, b"still here"), Ok(10));
        assert_eq!(
            model.drain_tx(),
            [accepted.rw_to_peer(b"still here", PER, 0)],
            "{end}"
        );
        // Packets of the reset connections get RST for no socket.
        let stray = waiting[1].peer_sends(Op::Rw);
        model.deliver(&stray, b"?").unwrap();
        vsock.poll(ms(5));
        assert_eq!(control(&mut model), [rst_for(&stray)], "{end}");
    }
}

// ---------------------------------------------------------------------------------------
// connect: InProgress, Already, IsConnected, InvalidCid, ConnectionRefused, TimedOut (B18-B21)
// ---------------------------------------------------------------------------------------

#[test]
fn b19_connect_is_in_progress_until_response_then_writable() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    vsock.poll(ms(10));
    let s = vsock.stream_socket().unwrap();
    let peer = VsockAddr::new(HOST_CID, HOST_PORT);
    assert_eq!(vsock.connect(s, peer), Err(Error::InProgress));
    assert_eq!(Error::InProgress.errno(), 115);
    // B21: bound to the first ephemeral port; the REQUEST carries our credit (B9).
    let tuple = Tuple::new(EPHEMERAL, HOST_CID, HOST_PORT);
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Request, PER, 0)]);
    assert_eq!(
        vsock.local_addr(s),
        Ok(VsockAddr::new(GUEST_CID, EPHEMERAL))
    );
    assert_eq!(vsock.peer_addr(s), Ok(peer));

    // While connecting: nothing is ready, calls return at once and send nothing.
    assert_eq!(vsock.readiness(s), Ok(Readiness::empty()));
    assert_eq!(vsock.connect(s, peer), Err(Error::Already));
    assert_eq!(
        vsock.connect(s, VsockAddr::new(SIBLING_CID, 1)),
        Err(Error::Already)
    );
    assert_eq!(vsock.send(s, b"early"), Err(Error::WouldBlock));
    let mut buf = [0u8; 8];
    assert_eq!(vsock.recv(s, &mut buf), Err(Error::WouldBlock));
    assert_eq!(vsock.peek(s, &mut buf), Err(Error::WouldBlock));
    assert_eq!(vsock.recv_queue(s), Ok(0));
    assert_eq!(vsock.shutdown(s, Shutdown::Write), Err(Error::NotConnected));
    assert_eq!(vsock.take_error(s), Ok(None));
    assert_eq!(
        vsock.bind(s, VsockAddr::new(VMADDR_CID_ANY, 2000)),
        Err(Error::InvalidArgument)
    );
    vsock.poll(ms(20));
    assert_silent(&mut model);
    assert_eq!(vsock.readiness(s), Ok(Readiness::empty()));

    // RESPONSE: connected, writable, no packet in answer.
    model.deliver(&tuple.peer_sends(Op::Response), &[]).unwrap();
    vsock.poll(ms(30));
    assert_silent(&mut model);
    assert_eq!(vsock.readiness(s), Ok(Readiness::WRITABLE));
    assert_eq!(vsock.take_error(s), Ok(None));
    assert_eq!(vsock.connect(s, peer), Err(Error::IsConnected));
    assert_eq!(
        vsock.connect(s, VsockAddr::new(SIBLING_CID, 1)),
        Err(Error::IsConnected)
    );
    assert_silent(&mut model);

    // Data both ways on the tuple.
    assert_eq!(vsock.send(s, b"hi"), Ok(2));
    assert_eq!(model.drain_tx(), [tuple.rw_to_peer(b"hi", PER, 0)]);
    model.deliver(&tuple.peer_sends(Op::Rw), b"yo").unwrap();
    vsock.poll(ms(40));
    assert_eq!(vsock.recv(s, &mut buf), Ok(2));
    assert_eq!(&buf[..2], b"yo");
    // The connect timeout no longer applies.
    vsock.poll(ms(10_000));
    assert_silent(&mut model);
    assert_eq!(vsock.readiness(s), Ok(Readiness::WRITABLE));
}

#[test]
fn b20_connect_targets_host_hypervisor_siblings_and_any_but_not_local_or_own_cid() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(8);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    vsock.poll(ms(1));
    let s = vsock.stream_socket().unwrap();
    // InvalidCid (EFAULT): loopback is not available, and we cannot connect to ourselves.
    for cid in [VMADDR_CID_LOCAL, GUEST_CID] {
        assert_eq!(
            vsock.connect(s, VsockAddr::new(cid, HOST_PORT)),
            Err(Error::InvalidCid),
            "cid {cid}"
        );
    }
    assert_eq!(Error::InvalidCid.errno(), 14, "EFAULT");
    // No port to connect to.
    assert_eq!(
        vsock.connect(s, VsockAddr::new(HOST_CID, VMADDR_PORT_ANY)),
        Err(Error::InvalidArgument)
    );
    // None of them bound the socket, sent anything or changed its state.
    assert_eq!(vsock.local_addr(s), Err(Error::InvalidArgument));
    assert_eq!(vsock.readiness(s), Ok(Readiness::empty()));
    assert_eq!(vsock.take_error(s), Ok(None));
    assert_silent(&mut model);

    // VMADDR_CID_ANY in connect means the host (vsock(4), B20).
    assert_eq!(
        vsock.connect(s, VsockAddr::new(VMADDR_CID_ANY, HOST_PORT)),
        Err(Error::InProgress)
    );
    let to_host = Tuple::new(EPHEMERAL, HOST_CID, HOST_PORT);
    assert_eq!(control(&mut model), [to_host.to_peer(Op::Request, PER, 0)]);
    assert_eq!(vsock.peer_addr(s), Ok(VsockAddr::new(HOST_CID, HOST_PORT)));

    // The hypervisor, the host and other guests.
    for (i, cid) in [
        VMADDR_CID_HYPERVISOR,
        VMADDR_CID_HOST,
        SIBLING_CID,
        0xFFFF_FFFE,
    ]
    .into_iter()
    .enumerate()
    {
        let tuple = Tuple::new(EPHEMERAL + 1 + i as u32, cid, 7);
        let s = start_connect(&mut vsock, &mut model, tuple.peer, tuple.guest_port, PER);
        model.deliver(&tuple.peer_sends(Op::Response), &[]).unwrap();
        vsock.poll(ms(2));
        assert_silent(&mut model);
        assert_eq!(vsock.readiness(s), Ok(Readiness::WRITABLE), "cid {cid}");
        assert_eq!(vsock.peer_addr(s), Ok(VsockAddr::new(cid, 7)));
    }

    // A listener cannot connect.
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    assert_eq!(
        vsock.connect(listener, VsockAddr::new(HOST_CID, HOST_PORT)),
        Err(Error::InvalidArgument)
    );
    assert_silent(&mut model);
}

#[test]
fn connect_from_a_bound_socket_uses_its_port() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let s = vsock.stream_socket().unwrap();
    vsock.bind(s, VsockAddr::new(GUEST_CID, 2000)).unwrap();
    assert_eq!(
        vsock.connect(s, VsockAddr::new(SIBLING_CID, 9000)),
        Err(Error::InProgress)
    );
    let tuple = Tuple::new(2000, SIBLING_CID, 9000);
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Request, PER, 0)]);
    assert_eq!(vsock.local_addr(s), Ok(VsockAddr::new(GUEST_CID, 2000)));
    // The port stays taken by the connection.
    let other = vsock.stream_socket().unwrap();
    assert_eq!(
        vsock.bind(other, VsockAddr::new(VMADDR_CID_ANY, 2000)),
        Err(Error::AddrInUse)
    );
}

#[test]
fn b19_refused_connect_makes_the_socket_readable_writable_errored_and_reports_once() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    for taker in ["take_error", "send"] {
        vsock.poll(ms(1));
        let s = vsock.stream_socket().unwrap();
        assert_eq!(
            vsock.connect(s, VsockAddr::new(HOST_CID, HOST_PORT)),
            Err(Error::InProgress)
        );
        let port = vsock.local_addr(s).unwrap().port;
        let tuple = Tuple::new(port, HOST_CID, HOST_PORT);
        assert_eq!(control(&mut model), [tuple.to_peer(Op::Request, PER, 0)]);
        model.deliver(&tuple.peer_sends(Op::Rst), &[]).unwrap();
        vsock.poll(ms(2));
        assert_silent(&mut model); // B14
        assert_eq!(vsock.readiness(s), Ok(FAILED));
        // SO_ERROR: the error is reported exactly once, by whichever call comes first.
        if taker == "take_error" {
            assert_eq!(vsock.take_error(s), Ok(Some(Error::ConnectionRefused)));
        } else {
            assert_eq!(vsock.send(s, b"x"), Err(Error::ConnectionRefused));
        }
        assert_eq!(vsock.take_error(s), Ok(None));
        assert_eq!(vsock.readiness(s), Ok(ENDED));
        assert_silent(&mut model);
        // The tuple is gone: a late RESPONSE is answered with RST (B13, B18).
        let late = tuple.peer_sends(Op::Response);
        model.deliver(&late, &[]).unwrap();
        vsock.poll(ms(3));
        assert_eq!(control(&mut model), [rst_for(&late)]);
        // Closing a failed socket sends nothing and frees it.
        vsock.close(s).unwrap();
        assert_silent(&mut model);
        assert_eq!(vsock.readiness(s), Err(Error::InvalidHandle));
    }
}

#[test]
fn b19_connect_times_out_after_the_configured_timeout_and_a_late_response_gets_rst() {
    for (timeout_ms, config) in [
        (2000, test_config()),
        (
            500,
            Config {
                connect_timeout: Duration::from_millis(500),
                ..test_config()
            },
        ),
    ] {
        let (transport, mut model) = new_transport();
        let mut storage = storage(2);
        let mut vsock = bring_up(&transport, config, &mut storage);
        // The deadline counts from the time of the last poll.
        vsock.poll(ms(100));
        let s = vsock.stream_socket().unwrap();
        let peer = VsockAddr::new(HOST_CID, HOST_PORT);
        assert_eq!(vsock.connect(s, peer), Err(Error::InProgress));
        let tuple = Tuple::new(EPHEMERAL, HOST_CID, HOST_PORT);
        assert_eq!(control(&mut model), [tuple.to_peer(Op::Request, PER, 0)]);
        let deadline = (100 + timeout_ms) * 1000;
        vsock.poll(us(deadline - 1));
        assert_silent(&mut model);
        assert_eq!(vsock.readiness(s), Ok(Readiness::empty()));
        assert_eq!(vsock.connect(s, peer), Err(Error::Already));
        // At the deadline: TimedOut, and an RST tells the peer to forget the REQUEST.
        vsock.poll(us(deadline));
        assert_eq!(control(&mut model), [tuple.to_peer(Op::Rst, PER, 0)]);
        assert_eq!(vsock.readiness(s), Ok(FAILED));
        assert_eq!(vsock.take_error(s), Ok(Some(Error::TimedOut)));
        assert_eq!(vsock.take_error(s), Ok(None));
        assert_eq!(vsock.readiness(s), Ok(ENDED));
        // A late RESPONSE gets an RST (B19, B13); nothing else happens later.
        let late = tuple.peer_sends(Op::Response);
        model.deliver(&late, &[]).unwrap();
        vsock.poll(us(deadline + 1));
        assert_eq!(control(&mut model), [rst_for(&late)]);
        assert_eq!(vsock.take_error(s), Ok(None));
        vsock.poll(us(deadline + 60_000_000));
        assert_silent(&mut model);
        assert_eq!(Error::TimedOut.errno(), 110);
    }
}

/// `poll`'s walks over the sockets stop after the highest slot in use. A connect in the
/// highest slot still times out after the sockets below it closed, and again after the
/// walk's end came down (that slot emptied) and went up (a new socket took it).
#[test]
fn b19_connect_times_out_in_the_highest_slot_in_use() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let config = Config {
        connect_timeout: Duration::from_millis(500),
        ..test_config()
    };
    let mut vsock = bring_up(&transport, config, &mut storage);
    vsock.poll(ms(100));
    let low = [
        vsock.stream_socket().unwrap(),
        vsock.stream_socket().unwrap(),
    ];
    let high = vsock.stream_socket().unwrap();
    let peer = VsockAddr::new(HOST_CID, HOST_PORT);
    assert_eq!(vsock.connect(high, peer), Err(Error::InProgress));
    let tuple = Tuple::new(EPHEMERAL, HOST_CID, HOST_PORT);
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Request, PER, 0)]);
    for socket in low {
        vsock.close(socket).unwrap();
    }
    vsock.poll(ms(200));
    assert_silent(&mut model);
    vsock.poll(ms(600));
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Rst, PER, 0)]);
    assert_eq!(vsock.take_error(high), Ok(Some(Error::TimedOut)));
    // Empty the highest slot, let a poll lower the walk's end, then fill the slots again:
    // the third socket lands in the same slot, and its timeout fires too.
    vsock.close(high).unwrap();
    vsock.poll(ms(700));
    let again = [
        vsock.stream_socket().unwrap(),
        vsock.stream_socket().unwrap(),
    ];
    let third = vsock.stream_socket().unwrap();
    assert_eq!(vsock.connect(third, peer), Err(Error::InProgress));
    let requests = control(&mut model);
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].op, Op::Request as u16);
    vsock.poll(ms(1199));
    assert_silent(&mut model);
    vsock.poll(ms(1200));
    let rst = control(&mut model);
    assert_eq!(rst.len(), 1);
    assert_eq!(rst[0].op, Op::Rst as u16);
    assert_eq!(rst[0].src_port, requests[0].src_port);
    assert_eq!(vsock.take_error(third), Ok(Some(Error::TimedOut)));
    for socket in again {
        assert_eq!(vsock.readiness(socket), Ok(Readiness::empty()));
    }
}

#[test]
fn b18_any_op_but_response_or_rst_while_connecting_resets_the_attempt() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    vsock.poll(ms(1));
    let peer = VsockAddr::new(HOST_CID, HOST_PORT);
    let odd_packets: [(Header, &[u8]); 6] = [
        (Tuple::host().peer_sends(Op::Rw), b"data"),
        (Tuple::host().peer_sends(Op::Rw), b""),
        (Tuple::host().peer_shutdown(2), b""),
        (Tuple::host().peer_sends(Op::CreditUpdate), b""),
        (Tuple::host().peer_sends(Op::CreditRequest), b""),
        (Tuple::host().peer_sends(Op::Request), b""),
    ];
    for (header, payload) in odd_packets {
        let s = vsock.stream_socket().unwrap();
        assert_eq!(vsock.connect(s, peer), Err(Error::InProgress));
        let tuple = Tuple::new(vsock.local_addr(s).unwrap().port, HOST_CID, HOST_PORT);
        assert_eq!(control(&mut model), [tuple.to_peer(Op::Request, PER, 0)]);
        let header = Header {
            dst_port: tuple.guest_port,
            ..header
        };
        model.deliver(&header, payload).unwrap();
        vsock.poll(ms(2));
        assert_eq!(
            control(&mut model),
            [tuple.to_peer(Op::Rst, PER, 0)],
            "op {}",
            header.op
        );
        assert_eq!(vsock.readiness(s), Ok(FAILED));
        assert_eq!(vsock.take_error(s), Ok(Some(Error::ConnectionReset)));
        assert_eq!(vsock.recv_queue(s), Ok(0), "no data taken while connecting");
        vsock.close(s).unwrap();
        assert_silent(&mut model);
    }
    // B18: a RESPONSE on an established connection resets it too.
    let (s, tuple) = connect_to(&mut vsock, &mut model, peer, ms(3));
    model.deliver(&tuple.peer_sends(Op::Response), &[]).unwrap();
    vsock.poll(ms(4));
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Rst, PER, 0)]);
    assert_eq!(vsock.take_error(s), Ok(Some(Error::ConnectionReset)));
}

#[test]
fn b36_closing_or_aborting_a_connecting_socket_sends_rst_and_cancels_the_timer() {
    let (transport, mut model) = new_transport();
    // One slot: the socket's slot must be free again at once.
    let mut storage = storage(1);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    for (port, end) in [(EPHEMERAL, "close"), (EPHEMERAL + 1, "abort")] {
        vsock.poll(ms(0));
        let tuple = Tuple::new(port, HOST_CID, HOST_PORT);
        let s = start_connect(&mut vsock, &mut model, tuple.peer, tuple.guest_port, PER);
        vsock.poll(ms(5));
        if end == "close" {
            vsock.close(s).unwrap();
        } else {
            vsock.abort(s).unwrap();
        }
        assert_eq!(
            control(&mut model),
            [tuple.to_peer(Op::Rst, PER, 0)],
            "{end}"
        );
        assert_eq!(vsock.readiness(s), Err(Error::InvalidHandle));
        let again = vsock.stream_socket().unwrap();
        vsock.close(again).unwrap();
        // No timeout fires later; a late RESPONSE finds no socket.
        vsock.poll(ms(5000));
        assert_silent(&mut model);
        let late = tuple.peer_sends(Op::Response);
        model.deliver(&late, &[]).unwrap();
        vsock.poll(ms(5001));
        assert_eq!(control(&mut model), [rst_for(&late)], "{end}");
    }
}

#[test]
fn b21_ephemeral_ports_are_not_reused_while_the_old_connection_may_still_see_rst() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(6);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let host = VsockAddr::new(HOST_CID, HOST_PORT);
    let (a, ta) = connect_to(&mut vsock, &mut model, host, ms(0));
    let (_b, tb) = connect_to(&mut vsock, &mut model, host, ms(0));
    assert_eq!((ta.guest_port, tb.guest_port), (EPHEMERAL, EPHEMERAL + 1));

    // `a` closes; its peer stays silent, so it waits for the close timeout.
    vsock.poll(ms(1));
    vsock.close(a).unwrap();
    assert_eq!(control(&mut model), [ta.shutdown_to_peer(3, PER, 0)]);
    let probe = vsock.stream_socket().unwrap();
    assert_eq!(
        vsock.bind(probe, VsockAddr::new(VMADDR_CID_ANY, EPHEMERAL)),
        Err(Error::AddrInUse)
    );
    let (_c, tc) = connect_to(&mut vsock, &mut model, host, ms(2));
    assert_eq!(tc.guest_port, EPHEMERAL + 2);

    // The close timeout: RST, and the old port is free for an explicit bind...
    vsock.poll(ms(8001));
    assert_eq!(control(&mut model), [ta.to_peer(Op::Rst, PER, 0)]);
    assert_eq!(
        vsock.bind(probe, VsockAddr::new(VMADDR_CID_ANY, EPHEMERAL)),
        Ok(())
    );
    vsock.close(probe).unwrap();
    // ...but implicit binds keep moving forward, also past a refused connect.
    let td = Tuple::new(EPHEMERAL + 3, HOST_CID, HOST_PORT);
    let d = start_connect(&mut vsock, &mut model, host, td.guest_port, PER);
    model.deliver(&td.peer_sends(Op::Rst), &[]).unwrap();
    vsock.poll(ms(8002));
    vsock.close(d).unwrap();
    assert_silent(&mut model);
    let (_e, te) = connect_to(&mut vsock, &mut model, host, ms(8003));
    assert_eq!(te.guest_port, EPHEMERAL + 4);
}

// ---------------------------------------------------------------------------------------
// send, recv, peek, recv_queue; NotConnected
// ---------------------------------------------------------------------------------------

#[test]
fn send_recv_peek_and_recv_queue_on_a_connection() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();
    // The host has 6000 bytes of receive buffer, and says so in every header.
    let from_host = |op| Header {
        buf_alloc: 6000,
        ..tuple.peer_sends(op)
    };
    model.deliver(&from_host(Op::Request), &[]).unwrap();
    vsock.poll(ms(1));
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Response, PER, 0)]);
    let (conn, _) = vsock.accept(listener).unwrap();

    // send: nothing for nothing; then what the credit allows, in packets of at most the
    // tx buffer's payload (B25).
    assert_eq!(vsock.send(conn, b""), Ok(0));
    assert_silent(&mut model);
    let data = pattern(10_000);
    assert_eq!(vsock.send(conn, &data), Ok(6000));
    assert_eq!(
        model.drain_tx(),
        [
            tuple.rw_to_peer(&data[..MAX_TX_PAYLOAD], PER, 0),
            tuple.rw_to_peer(&data[MAX_TX_PAYLOAD..6000], PER, 0),
        ]
    );
    assert_eq!(vsock.readiness(conn), Ok(Readiness::empty()));
    // Out of credit, with all of it unacknowledged: the peer reports it as it reads, so
    // no CREDIT_REQUEST (B29).
    assert_eq!(vsock.send(conn, &data[6000..]), Err(Error::WouldBlock));
    assert_silent(&mut model);

    // recv: WouldBlock until data arrives.
    let mut buf = [0u8; 16];
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::WouldBlock));
    assert_eq!(vsock.peek(conn, &mut buf), Err(Error::WouldBlock));
    model.deliver(&from_host(Op::Rw), b"abc").unwrap();
    model.deliver(&from_host(Op::Rw), b"defgh").unwrap();
    vsock.poll(ms(2));
    assert_silent(&mut model);
    assert_eq!(vsock.readiness(conn), Ok(Readiness::READABLE));
    assert_eq!(vsock.recv_queue(conn), Ok(8));
    // peek copies without consuming.
    assert_eq!(vsock.peek(conn, &mut buf[..4]), Ok(4));
    assert_eq!(&buf[..4], b"abcd");
    assert_eq!(vsock.peek(conn, &mut buf), Ok(8));
    assert_eq!(&buf[..8], b"abcdefgh");
    assert_eq!(vsock.recv_queue(conn), Ok(8));
    // recv consumes, across packet boundaries.
    assert_eq!(vsock.recv(conn, &mut buf[..5]), Ok(5));
    assert_eq!(&buf[..5], b"abcde");
    assert_eq!(vsock.recv_queue(conn), Ok(3));
    assert_eq!(vsock.recv(conn, &mut []), Ok(0));
    assert_eq!(vsock.recv_queue(conn), Ok(3));
    assert_eq!(vsock.recv(conn, &mut buf), Ok(3));
    assert_eq!(&buf[..3], b"fgh");
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::WouldBlock));
    assert_eq!(vsock.recv_queue(conn), Ok(0));
    assert_silent(&mut model); // B28: no CREDIT_UPDATE for 8 bytes

    // The host reads: credit comes back, and our fwd_cnt shows the 8 bytes consumed.
    model
        .deliver(
            &Header {
                fwd_cnt: 6000,
                ..from_host(Op::CreditUpdate)
            },
            &[],
        )
        .unwrap();
    vsock.poll(ms(3));
    assert_eq!(vsock.readiness(conn), Ok(Readiness::WRITABLE));
    assert_eq!(vsock.send(conn, &data[6000..6010]), Ok(10));
    assert_eq!(
        model.drain_tx(),
        [tuple.rw_to_peer(&data[6000..6010], PER, 8)]
    );

    // End of stream: the host will send no more (B33): Ok(0), also for peek.
    model.deliver(&from_host(Op::Rw), b"bye").unwrap();
    model
        .deliver(
            &Header {
                flags: 2,
                fwd_cnt: 6000,
                ..from_host(Op::Shutdown)
            },
            &[],
        )
        .unwrap();
    vsock.poll(ms(4));
    assert_silent(&mut model);
    assert_eq!(
        vsock.readiness(conn),
        Ok(Readiness::READABLE | Readiness::WRITABLE | Readiness::HANG_UP)
    );
    assert_eq!(vsock.recv(conn, &mut buf), Ok(3));
    assert_eq!(vsock.recv(conn, &mut buf), Ok(0));
    assert_eq!(vsock.recv(conn, &mut buf), Ok(0));
    assert_eq!(vsock.peek(conn, &mut buf), Ok(0));
    // We may still send.
    assert_eq!(vsock.send(conn, b"!"), Ok(1));
    assert_eq!(model.drain_tx(), [tuple.rw_to_peer(b"!", PER, 11)]);
}

#[test]
fn recv_with_reads_in_place_in_the_pieces_of_the_ring() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();
    model.deliver(&tuple.peer_sends(Op::Request), &[]).unwrap();
    vsock.poll(ms(1));
    control(&mut model);
    let (conn, _) = vsock.accept(listener).unwrap();
    let called = std::cell::Cell::new(false);

    // Nothing waits: WouldBlock, and the reader is not called.
    let result = vsock.recv_with(conn, |_| {
        called.set(true);
        0
    });
    assert_eq!(result, Err(Error::WouldBlock));
    assert!(!called.get());

    // 10000 bytes in, 9000 read: the next 10000 wrap around the 16 KiB ring.
    let data = pattern(20_000);
    for part in data[..10_000].chunks(MAX_TX_PAYLOAD - 44) {
        model.deliver(&tuple.peer_sends(Op::Rw), part).unwrap();
    }
    // The first poll leaves the data for the reader; the second takes it into the ring,
    // which this test reads.
    vsock.poll(ms(2));
    vsock.poll(ms(2));
    let mut seen = Vec::new();
    let n = vsock.recv_with(conn, |bytes| {
        seen.extend_from_slice(&bytes[..9000]);
        9000
    });
    assert_eq!(n, Ok(9000));
    assert_eq!(seen, &data[..9000]);
    assert_eq!(vsock.recv_queue(conn), Ok(1000));
    for part in data[10_000..].chunks(MAX_TX_PAYLOAD - 44) {
        model.deliver(&tuple.peer_sends(Op::Rw), part).unwrap();
    }
    vsock.poll(ms(3));
    // The first piece runs to the end of the ring: 16384 - 9000 bytes.
    let n = vsock.recv_with(conn, |bytes| {
        assert_eq!(bytes, &data[9000..16_384]);
        bytes.len()
    });
    assert_eq!(n, Ok(16_384 - 9000));
    // A reader that claims more than it was given takes what it was given.
    let n = vsock.recv_with(conn, |bytes| {
        assert_eq!(bytes, &data[16_384..]);
        usize::MAX
    });
    assert_eq!(n, Ok(20_000 - 16_384));
    assert_eq!(vsock.recv_queue(conn), Ok(0));
    // B28: the space made is announced as for recv: when the host's view of it fell
    // below half the ring (after 9000 read, and after 16384), not after the rest.
    let updates: Vec<u32> = control(&mut model)
        .into_iter()
        .filter(|h| h.op == Op::CreditUpdate as u16)
        .map(|h| h.fwd_cnt)
        .collect();
    assert_eq!(updates, [9000, 16_384]);

    // End of stream: Ok(0), and the reader is not called.
    model
        .deliver(
            &Header {
                flags: vsock_guest::wire::ShutdownFlags::SEND.bits(),
                ..tuple.peer_sends(Op::Shutdown)
            },
            &[],
        )
        .unwrap();
    vsock.poll(ms(4));
    let result = vsock.recv_with(conn, |_| {
        called.set(true);
        0
    });
    assert_eq!(result, Ok(0));
    assert!(!called.get());
}

#[test]
fn recv_takes_arrived_packets_itself_and_copies_its_data_straight_to_the_caller() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(3);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 2);
    let a = Tuple::host();
    let b = Tuple::new(GUEST_PORT, HOST_CID, HOST_PORT + 1);
    let conn_a = accept_from(&mut vsock, &mut model, listener, a, ms(1));
    let conn_b = accept_from(&mut vsock, &mut model, listener, b, ms(1));
    let rx_shown = model.available(0);
    let data = pattern(3000);

    // The packets arrive and no poll runs before recv: recv takes them. A's bytes go to
    // the caller, B's to B's ring. Once the caller's buffer holds something, recv stops
    // before a packet that would not fit whole: it stays where the device put it, for the
    // next call, and no byte of it is copied twice.
    model.deliver(&a.peer_sends(Op::Rw), &data[..1000]).unwrap();
    model.deliver(&b.peer_sends(Op::Rw), b"for b").unwrap();
    model
        .deliver(&a.peer_sends(Op::Rw), &data[1000..2500])
        .unwrap();
    model.deliver(&a.peer_sends(Op::Rw), &data[2500..]).unwrap();
    let mut buf = vec![0u8; 1800];
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(1000));
    assert_eq!(buf[..1000], data[..1000]);
    assert_eq!(vsock.recv_queue(conn_a), Ok(0));
    assert_eq!(vsock.recv_queue(conn_b), Ok(5));
    assert_eq!(vsock.stats().rx_buffered_bytes, 5, "B's bytes only");
    // The next call takes the 1500-byte packet whole, and stops before the 500-byte one
    // (300 bytes of room).
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(1500));
    assert_eq!(buf[..1500], data[1000..2500]);
    assert_eq!(vsock.recv_queue(conn_a), Ok(0));
    // A first packet larger than the buffer is read in part where it lies: its rest
    // stays there for the next call, not copied into A's ring and out again.
    let mut buf = vec![0u8; 300];
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(300));
    assert_eq!(buf, data[2500..2800]);
    assert_eq!(vsock.recv_queue(conn_a), Ok(200));
    assert!(vsock
        .readiness(conn_a)
        .unwrap()
        .contains(Readiness::READABLE));
    assert_eq!(vsock.stats().rx_buffered_bytes, 5, "still B's bytes only");
    let mut buf = vec![0u8; 1000];
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(200));
    assert_eq!(buf[..200], data[2800..]);
    assert_eq!(vsock.recv(conn_a, &mut buf), Err(Error::WouldBlock));
    let mut small = [0u8; 8];
    assert_eq!(vsock.recv(conn_b, &mut small), Ok(5));
    assert_eq!(&small[..5], b"for b");
    assert_silent(&mut model);

    // A CREDIT_REQUEST that recv takes is answered (B29), by the next poll at the latest,
    // with every byte read counted as consumed (B27). That poll shows the device all four
    // reposted buffers (B31).
    model
        .deliver(&a.peer_sends(Op::CreditRequest), &[])
        .unwrap();
    assert_eq!(vsock.recv(conn_a, &mut buf), Err(Error::WouldBlock));
    vsock.poll(ms(2));
    assert_eq!(
        control(&mut model),
        [a.to_peer(Op::CreditUpdate, PER, 3000)]
    );
    assert_eq!(model.available(0), rx_shown);

    // Data, then the end of the stream, taken by one recv: the data, then Ok(0) (B33).
    model.deliver(&a.peer_sends(Op::Rw), b"end").unwrap();
    model.deliver(&a.peer_shutdown(2), &[]).unwrap();
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(3));
    assert_eq!(&buf[..3], b"end");
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(0));
}

/// A device with 16 KiB receive buffers and interrupts, listening on `GUEST_PORT` (a
/// backlog of every slot but its own), with connections A (from `Tuple::host()`) and B
/// (from the next host port) accepted.
struct Readers<'a> {
    vsock: Device<'a>,
    listener: SocketHandle,
    a: Tuple,
    b: Tuple,
    conn_a: SocketHandle,
    conn_b: SocketHandle,
}

fn two_readers<'a>(
    transport: &FakeTransport,
    model: &mut DeviceModel,
    storage: &'a mut Storage,
) -> Readers<'a> {
    let config = Config {
        interrupts: true,
        rx_buffer_size: 16 * 1024,
        ..test_config()
    };
    let backlog = storage.slots.len() - 1;
    let mut vsock = bring_up(transport, config, storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, backlog);
    let a = Tuple::host();
    let b = Tuple::new(GUEST_PORT, HOST_CID, HOST_PORT + 1);
    let conn_a = accept_from(&mut vsock, model, listener, a, ms(1));
    let conn_b = accept_from(&mut vsock, model, listener, b, ms(1));
    Readers {
        vsock,
        listener,
        a,
        b,
        conn_a,
        conn_b,
    }
}

#[test]
fn poll_leaves_data_for_a_reader_with_nothing_buffered_once() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(3);
    // Receive buffers of 16 KiB: poll leaves a lone packet only with 4 KiB of data or more.
    let Readers {
        mut vsock,
        a,
        b,
        conn_a,
        conn_b,
        ..
    } = two_readers(&transport, &mut model, &mut storage);
    let rx_shown = model.available(0);
    let data = pattern(16_000);
    let buffered = |vsock: &Device<'_>| vsock.stats().rx_buffered_bytes;
    let mut buf = vec![0u8; 16 * 1024];

    // Two data packets for A (the first small) and a CREDIT_REQUEST, nothing else: poll
    // leaves them where the device put them. A reads as having the data; the kernel may
    // not sleep on it.
    model.deliver(&a.peer_sends(Op::Rw), &data[..100]).unwrap();
    model
        .deliver(&a.peer_sends(Op::CreditRequest), &[])
        .unwrap();
    model
        .deliver(&a.peer_sends(Op::Rw), &data[100..11_000])
        .unwrap();
    vsock.poll(ms(2));
    assert_eq!(model.available(0), rx_shown - 3, "nothing taken");
    assert_silent(&mut model);
    assert_eq!(vsock.recv_queue(conn_a), Ok(11_000));
    assert!(vsock
        .readiness(conn_a)
        .unwrap()
        .contains(Readiness::READABLE));
    assert!(!vsock
        .readiness(conn_b)
        .unwrap()
        .contains(Readiness::READABLE));
    assert!(
        !vsock.arm_interrupts(),
        "data left: poll again, do not sleep"
    );
    // recv takes them itself, one copy each, none through A's ring; the device gets the
    // buffers back at the next poll (B31).
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(11_000));
    assert_eq!(buf[..11_000], data[..11_000]);
    assert_eq!(buffered(&vsock), 0);
    // The request is answered when recv takes it (B29), with the bytes read by then
    // (B27); the space the whole read made is announced after it (B28).
    assert_eq!(
        control(&mut model),
        [
            a.to_peer(Op::CreditUpdate, PER, 100),
            a.to_peer(Op::CreditUpdate, PER, 11_000)
        ]
    );
    vsock.poll(ms(3));
    assert_eq!(model.available(0), rx_shown);
    assert!(vsock.arm_interrupts());

    // Left once only: a poll that finds the data still there takes it into the ring.
    model
        .deliver(&a.peer_sends(Op::Rw), &data[11_000..])
        .unwrap();
    vsock.poll(ms(4));
    assert_eq!(buffered(&vsock), 0);
    vsock.poll(ms(5));
    assert_eq!(buffered(&vsock), 5000);
    assert_eq!(model.available(0), rx_shown);
    assert_eq!(vsock.recv_queue(conn_a), Ok(5000));
    assert!(vsock.arm_interrupts());
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(5000));
    assert_eq!(buf[..5000], data[11_000..]);

    // peek shows left data (it moves it to the ring to show it).
    model.deliver(&a.peer_sends(Op::Rw), &data[..4096]).unwrap();
    vsock.poll(ms(6));
    assert_eq!(vsock.recv_queue(conn_a), Ok(4096));
    assert_eq!(vsock.peek(conn_a, &mut buf[..10]), Ok(10));
    assert_eq!(buf[..10], data[..10]);
    assert_eq!(buffered(&vsock), 9096);
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(4096));
    let mut taken = 9096;

    // Not left, each taken into the rings by the first poll: one packet of less than 4 KiB
    // of data; data for two connections; more packets than a quarter of the receive queue; a
    // header with new credit fields (B26).
    let cases: [&[(Tuple, &[u8])]; 3] = [
        &[(a, &data[..4095])],
        &[(a, &data[..4096]), (b, b"y")],
        &[(a, &data[..4096])],
    ];
    for (case, packets) in cases.iter().enumerate() {
        for &(tuple, payload) in packets.iter() {
            model.deliver(&tuple.peer_sends(Op::Rw), payload).unwrap();
        }
        if case == 2 {
            let many = rx_shown / 4; // every buffer is shown: the queue size
            for _ in 0..many {
                model.deliver(&a.peer_sends(Op::Rw), b"m").unwrap();
            }
            taken += many as u64;
        }
        taken += packets.iter().map(|(_, p)| p.len() as u64).sum::<u64>();
        vsock.poll(ms(7));
        assert_eq!(buffered(&vsock), taken, "case {case}");
        while vsock.recv(conn_a, &mut buf).is_ok() {}
        while vsock.recv(conn_b, &mut buf).is_ok() {}
    }
    let credit = Header {
        buf_alloc: PEER_BUF_ALLOC * 2,
        ..a.peer_sends(Op::Rw)
    };
    model.deliver(&credit, &data[..4096]).unwrap();
    vsock.poll(ms(8));
    assert_eq!(buffered(&vsock), taken + 4096);
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(4096));

    // Data and the end of the stream: both taken, so A reads as ended at once (B33).
    model.deliver(&a.peer_sends(Op::Rw), &data[..4096]).unwrap();
    model.deliver(&a.peer_shutdown(2), &[]).unwrap();
    vsock.poll(ms(10));
    assert!(vsock
        .readiness(conn_a)
        .unwrap()
        .contains(Readiness::HANG_UP));
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(4096));
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(0));
    assert_eq!(model.available(0), rx_shown);
    // Nothing went out but the credit updates of what was read (B28).
    let sent = model.drain_tx();
    assert!(!sent.is_empty());
    assert!(
        sent.iter().all(|p| p.header.op == Op::CreditUpdate as u16),
        "{sent:?}"
    );
}

#[test]
fn recv_reads_a_packet_larger_than_its_buffer_in_part_where_it_lies() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(5);
    let Readers {
        mut vsock,
        listener,
        a,
        b,
        conn_a,
        conn_b,
    } = two_readers(&transport, &mut model, &mut storage);
    let rx_shown = model.available(0);
    let data = pattern(10_000);
    let buffered = |vsock: &Device<'_>| vsock.stats().rx_buffered_bytes;
    let mut buf = [0u8; 3000];
    // Reads A to its end in pieces of `buf`, and checks what came.
    let read_rest = |vsock: &mut Device<'_>, buf: &mut [u8], from: usize| {
        let mut read = Vec::new();
        while let Ok(n) = vsock.recv(conn_a, buf) {
            read.extend_from_slice(&buf[..n]);
        }
        assert_eq!(read, data[from..]);
    };
    let mut consumed = 0;

    // A 10,000-byte packet read 3,000 bytes at a time: each piece straight from where the
    // device put it, none through A's receive buffer. The packet reads as waiting, and
    // the kernel may not sleep on it; its buffer goes back once read to its end (B31).
    model.deliver(&a.peer_sends(Op::Rw), &data).unwrap();
    for piece in 0..3 {
        assert_eq!(vsock.recv(conn_a, &mut buf), Ok(3000));
        assert_eq!(buf[..], data[piece * 3000..(piece + 1) * 3000]);
        assert_eq!(vsock.recv_queue(conn_a), Ok(7000 - piece * 3000));
        assert!(vsock
            .readiness(conn_a)
            .unwrap()
            .contains(Readiness::READABLE));
        assert!(!vsock.arm_interrupts(), "a packet waits");
        assert_eq!(model.available(0), rx_shown - 1, "its buffer still read");
    }
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(1000));
    assert_eq!(buf[..1000], data[9000..]);
    assert_eq!(vsock.recv(conn_a, &mut buf), Err(Error::WouldBlock));
    assert_eq!(buffered(&vsock), 0, "no byte copied twice");
    vsock.poll(ms(2));
    assert_eq!(model.available(0), rx_shown);
    assert!(vsock.arm_interrupts());
    consumed += 10_000;

    // A poll after the first piece leaves the rest once, as it leaves data (the reader
    // may come); the next poll takes it into A's ring.
    model.deliver(&a.peer_sends(Op::Rw), &data).unwrap();
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(3000));
    vsock.poll(ms(3));
    assert_eq!(vsock.recv_queue(conn_a), Ok(7000));
    assert_eq!(buffered(&vsock), 0);
    assert!(!vsock.arm_interrupts(), "left: poll again");
    vsock.poll(ms(4));
    assert_eq!(buffered(&vsock), 7000);
    assert_eq!(vsock.recv_queue(conn_a), Ok(7000));
    assert_eq!(model.available(0), rx_shown);
    assert!(vsock.arm_interrupts());
    read_rest(&mut vsock, &mut buf, 3000);
    consumed += 10_000;

    // Another connection's packet behind it: the next poll takes both, A's rest into A's
    // ring; so does a recv of the other connection, and a peek of A, which shows the rest.
    for case in 0..3 {
        model.deliver(&a.peer_sends(Op::Rw), &data).unwrap();
        assert_eq!(vsock.recv(conn_a, &mut buf), Ok(3000));
        let before = buffered(&vsock);
        model.deliver(&b.peer_sends(Op::Rw), b"for b").unwrap();
        let mut small = [0u8; 8];
        match case {
            0 => {
                vsock.poll(ms(5));
                assert_eq!(buffered(&vsock), before + 7005);
                assert_eq!(vsock.recv(conn_b, &mut small), Ok(5));
            }
            1 => {
                assert_eq!(vsock.recv(conn_b, &mut small), Ok(5));
                assert_eq!(buffered(&vsock), before + 7000);
            }
            _ => {
                assert_eq!(vsock.peek(conn_a, &mut small), Ok(8));
                assert_eq!(small[..], data[3000..3008]);
                assert_eq!(buffered(&vsock), before + 7005);
                assert_eq!(vsock.recv(conn_b, &mut small), Ok(5));
            }
        }
        assert_eq!(&small[..5], b"for b");
        read_rest(&mut vsock, &mut buf, 3000);
        consumed += 10_000;
    }

    // Every byte read in part counts as consumed once (B27): the answer to a
    // CREDIT_REQUEST says so.
    vsock.poll(ms(6));
    model.drain_tx();
    model
        .deliver(&a.peer_sends(Op::CreditRequest), &[])
        .unwrap();
    vsock.poll(ms(7));
    assert_eq!(
        control(&mut model),
        [a.to_peer(Op::CreditUpdate, PER, consumed)]
    );

    // shutdown(Read) and abort while a packet is read in part take it first, as if it had
    // been cut, so that it counts as having come before: the SHUTDOWN goes out alone (the
    // packet is not data after it), the rest stays readable; abort sends one RST, after
    // the credit update the bytes read made due (B28).
    let c = Tuple::new(GUEST_PORT, HOST_CID, HOST_PORT + 2);
    let d = Tuple::new(GUEST_PORT, HOST_CID, HOST_PORT + 3);
    let conn_c = accept_from(&mut vsock, &mut model, listener, c, ms(6));
    let conn_d = accept_from(&mut vsock, &mut model, listener, d, ms(6));
    model.deliver(&c.peer_sends(Op::Rw), &data).unwrap();
    assert_eq!(vsock.recv(conn_c, &mut buf), Ok(3000));
    vsock.shutdown(conn_c, Shutdown::Read).unwrap();
    vsock.poll(ms(6));
    let sent = control(&mut model);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].op, Op::Shutdown as u16);
    let mut rest = Vec::new();
    while let Ok(n @ 1..) = vsock.recv(conn_c, &mut buf) {
        rest.extend_from_slice(&buf[..n]);
    }
    assert_eq!(rest, data[3000..]);
    assert_eq!(vsock.recv(conn_c, &mut buf), Ok(0));
    model.deliver(&d.peer_sends(Op::Rw), &data).unwrap();
    assert_eq!(vsock.recv(conn_d, &mut buf), Ok(3000));
    vsock.abort(conn_d).unwrap();
    vsock.poll(ms(6));
    let sent = control(&mut model);
    let rsts = sent.iter().filter(|h| h.op == Op::Rst as u16).count();
    assert_eq!(rsts, 1, "{sent:?}");
    assert_eq!(sent.last().map(|h| h.op), Some(Op::Rst as u16), "{sent:?}");
    assert_eq!(model.available(0), rx_shown);

    // Closing while a packet is read in part takes it first, as if it had been cut: its
    // buffer goes back to the device, the SHUTDOWN goes out.
    model.deliver(&b.peer_sends(Op::Rw), &data).unwrap();
    assert_eq!(vsock.recv(conn_b, &mut buf), Ok(3000));
    vsock.close(conn_b).unwrap();
    vsock.poll(ms(8));
    assert_eq!(model.available(0), rx_shown);
    let sent = control(&mut model);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].op, Op::Shutdown as u16);

    // A device that rewrites the packet while it is read in part (here its source port):
    // the reader has bytes of a packet that is gone, so the connection is reset when the
    // packet is taken (its header is checked then, not at each piece).
    let header = Header {
        len: 10_000,
        ..a.peer_sends(Op::Rw)
    };
    let mut bytes = vec![0u8; HEADER_LEN + data.len()];
    header.emit(&mut bytes).unwrap();
    bytes[HEADER_LEN..].copy_from_slice(&data);
    let id = model.deliver_raw(&bytes, bytes.len() as u32).unwrap();
    assert_eq!(vsock.recv(conn_a, &mut buf), Ok(3000));
    let rewritten = Header {
        src_port: HOST_PORT + 7,
        ..header
    };
    rewritten.emit(&mut bytes).unwrap();
    model.overwrite_rx_buffer(id, &bytes).unwrap();
    let mut pieces = 1;
    let error = loop {
        match vsock.recv(conn_a, &mut buf) {
            Ok(_) => pieces += 1,
            Err(e) => break e,
        }
    };
    assert_eq!(error, Error::ConnectionReset);
    assert!(pieces <= 4, "{pieces} pieces of a 10,000-byte packet");
    vsock.poll(ms(9));
    let sent = control(&mut model);
    assert!(
        sent.iter()
            .any(|h| h.op == Op::Rst as u16 && h.src_port == GUEST_PORT && h.dst_port == HOST_PORT),
        "{sent:?}"
    );
    assert_eq!(model.available(0), rx_shown);
}

#[test]
fn data_left_for_an_aborted_socket_is_not_shown_to_the_socket_that_takes_its_slot() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let config = Config {
        rx_buffer_size: 16 * 1024,
        ..test_config()
    };
    let mut vsock = bring_up(&transport, config, &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(1));
    model
        .deliver(&tuple.peer_sends(Op::Rw), &pattern(5000))
        .unwrap();
    vsock.poll(ms(2));
    assert_eq!(vsock.recv_queue(conn), Ok(5000), "left for the reader");
    vsock.abort(conn).unwrap();
    // The listener has slot 0, the connection had slot 1: the new socket takes it.
    let socket = vsock.stream_socket().unwrap();
    assert_eq!(vsock.recv_queue(socket), Ok(0));
    assert!(!vsock
        .readiness(socket)
        .unwrap()
        .contains(Readiness::READABLE));
    // The next poll takes the packet: data for no connection, which was reset already.
    vsock.poll(ms(3));
    assert_eq!(vsock.recv_queue(socket), Ok(0));
    assert_eq!(model.available(0), usize::from(model.queue_size(0)));
}

#[test]
fn recv_with_reads_the_next_packet_where_the_device_wrote_it_when_the_ring_is_empty() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let ring = storage.rx_memory.as_ptr_range();
    let in_ring = |bytes: &[u8]| ring.contains(&bytes.as_ptr());
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(1));
    let data = pattern(1500);
    model
        .deliver(&tuple.peer_sends(Op::Rw), &data[..1000])
        .unwrap();
    model
        .deliver(&tuple.peer_sends(Op::Rw), &data[1000..])
        .unwrap();

    // No poll: the reader gets the first packet's data in the device's receive buffer,
    // not in the socket's ring. What it leaves goes to the ring; the second packet is not
    // taken yet.
    let n = vsock.recv_with(conn, |bytes| {
        assert_eq!(bytes, &data[..1000]);
        assert!(!in_ring(bytes));
        600
    });
    assert_eq!(n, Ok(600));
    assert_eq!(vsock.recv_queue(conn), Ok(400));
    // The ring's bytes come first, in the ring.
    let n = vsock.recv_with(conn, |bytes| {
        assert_eq!(bytes, &data[600..1000]);
        assert!(in_ring(bytes));
        bytes.len()
    });
    assert_eq!(n, Ok(400));
    // The ring is empty again: the second packet, where the device wrote it.
    let n = vsock.recv_with(conn, |bytes| {
        assert_eq!(bytes, &data[1000..]);
        assert!(!in_ring(bytes));
        usize::MAX
    });
    assert_eq!(n, Ok(500));
    let called = Cell::new(false);
    let result = vsock.recv_with(conn, |_| {
        called.set(true);
        0
    });
    assert_eq!(result, Err(Error::WouldBlock));
    assert!(!called.get());

    // Everything read counts as consumed (B27).
    model
        .deliver(&tuple.peer_sends(Op::CreditRequest), &[])
        .unwrap();
    vsock.poll(ms(2));
    assert_eq!(
        control(&mut model),
        [tuple.to_peer(Op::CreditUpdate, PER, 1500)]
    );
}

#[test]
fn calls_on_unconnected_or_listening_sockets_are_not_connected() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let unbound = vsock.stream_socket().unwrap();
    let bound = vsock.stream_socket().unwrap();
    vsock
        .bind(bound, VsockAddr::new(VMADDR_CID_ANY, 2000))
        .unwrap();
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let mut buf = [0u8; 4];
    for s in [unbound, bound, listener] {
        assert_eq!(vsock.send(s, b"x"), Err(Error::NotConnected));
        assert_eq!(vsock.send(s, b""), Err(Error::NotConnected));
        assert_eq!(vsock.recv(s, &mut buf), Err(Error::NotConnected));
        assert_eq!(vsock.peek(s, &mut buf), Err(Error::NotConnected));
        for how in [Shutdown::Read, Shutdown::Write, Shutdown::Both] {
            assert_eq!(vsock.shutdown(s, how), Err(Error::NotConnected));
        }
        assert_eq!(vsock.peer_addr(s), Err(Error::NotConnected));
        assert_eq!(vsock.recv_queue(s), Ok(0));
        assert_eq!(vsock.take_error(s), Ok(None));
    }
    assert_eq!(vsock.accept(unbound), Err(Error::InvalidArgument));
    assert_eq!(vsock.accept(bound), Err(Error::InvalidArgument));
    assert_eq!(Error::NotConnected.errno(), 107);
    vsock.poll(ms(1));
    assert_silent(&mut model);
}

// ---------------------------------------------------------------------------------------
// shutdown (B35), close and abort (B36), simultaneous close (B37), RST with data (B38)
// ---------------------------------------------------------------------------------------

#[test]
fn b35_shutdown_sends_receive_1_send_2_both_3() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 3);
    let mut buf = [0u8; 8];
    for (i, (how, flags)) in [
        (Shutdown::Read, 1),
        (Shutdown::Write, 2),
        (Shutdown::Both, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let tuple = Tuple::new(GUEST_PORT, HOST_CID, 5000 + i as u32);
        let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(1));
        // Consume a little first, so the SHUTDOWN's fwd_cnt shows it (B9).
        model.deliver(&tuple.peer_sends(Op::Rw), b"12").unwrap();
        vsock.poll(ms(2));
        assert_eq!(vsock.recv(conn, &mut buf), Ok(2));
        assert_eq!(vsock.shutdown(conn, how), Ok(()), "{how:?}");
        assert_eq!(
            control(&mut model),
            [tuple.shutdown_to_peer(flags, PER, 2)],
            "{how:?}"
        );
        let reading = flags & 1 == 0;
        let writing = flags & 2 == 0;
        // Receiving side shut: recv is at end of stream at once, and says so in readiness.
        if !reading {
            assert_eq!(vsock.recv(conn, &mut buf), Ok(0), "{how:?}");
            assert!(vsock.readiness(conn).unwrap().contains(Readiness::READABLE));
        } else {
            assert_eq!(vsock.recv(conn, &mut buf), Err(Error::WouldBlock));
            model.deliver(&tuple.peer_sends(Op::Rw), b"more").unwrap();
            vsock.poll(ms(3));
            assert_eq!(vsock.recv(conn, &mut buf), Ok(4));
        }
        // Sending side shut: BrokenPipe, no packet; WRITABLE since send fails at once.
        if !writing {
            assert_eq!(vsock.send(conn, b"x"), Err(Error::BrokenPipe), "{how:?}");
            assert_eq!(vsock.send(conn, b""), Err(Error::BrokenPipe), "{how:?}");
            assert!(vsock.readiness(conn).unwrap().contains(Readiness::WRITABLE));
        } else {
            assert_eq!(vsock.send(conn, b"x"), Ok(1));
            assert_eq!(
                model.drain_tx(),
                [tuple.rw_to_peer(b"x", PER, 2)],
                "{how:?}"
            );
        }
        assert_silent(&mut model);
        assert_eq!(vsock.take_error(conn), Ok(None));
        // Flags are sticky (B32): shutting the other side down too says both.
        let other = if flags == 1 {
            Shutdown::Write
        } else {
            Shutdown::Read
        };
        let fwd_cnt = if reading { 6 } else { 2 };
        assert_eq!(vsock.shutdown(conn, other), Ok(()));
        assert_eq!(
            control(&mut model),
            [tuple.shutdown_to_peer(3, PER, fwd_cnt)],
            "{how:?}"
        );
        assert_eq!(vsock.send(conn, b"x"), Err(Error::BrokenPipe));
        assert_eq!(vsock.recv(conn, &mut buf), Ok(0));
        // The peer answers the full shutdown with RST: the connection is over, in order
        // (B37: not a reset).
        model.deliver(&tuple.peer_sends(Op::Rst), &[]).unwrap();
        vsock.poll(ms(4));
        assert_silent(&mut model);
        assert_eq!(vsock.take_error(conn), Ok(None));
        assert_eq!(vsock.readiness(conn), Ok(ENDED));
        assert_eq!(vsock.recv(conn, &mut buf), Ok(0));
        assert_eq!(vsock.shutdown(conn, how), Err(Error::NotConnected));
        vsock.close(conn).unwrap();
        assert_silent(&mut model);
    }
    assert_eq!(Error::BrokenPipe.errno(), 32);
}

#[test]
fn b36_close_shuts_down_both_ways_and_frees_the_slot_when_the_peer_resets() {
    let (transport, mut model) = new_transport();
    // The listener and one connection: a new socket needs the connection's slot.
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(1));
    model
        .deliver(&tuple.peer_sends(Op::Rw), b"0123456789")
        .unwrap();
    vsock.poll(ms(2));
    let mut buf = [0u8; 10];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(10));

    vsock.close(conn).unwrap();
    assert_eq!(control(&mut model), [tuple.shutdown_to_peer(3, PER, 10)]);
    // The handle is gone at once; the slot finishes the close in the background.
    assert_eq!(vsock.readiness(conn), Err(Error::InvalidHandle));
    assert_eq!(vsock.close(conn), Err(Error::InvalidHandle));
    assert_eq!(vsock.stream_socket(), Err(Error::TooManySockets));
    // While closing: data is dropped without a word, a CREDIT_REQUEST still answered.
    model.deliver(&tuple.peer_sends(Op::Rw), b"late").unwrap();
    model
        .deliver(&tuple.peer_sends(Op::CreditRequest), &[])
        .unwrap();
    vsock.poll(ms(3));
    assert_eq!(
        control(&mut model),
        [tuple.to_peer(Op::CreditUpdate, PER, 10)]
    );
    // The peer's RST ends it: no answer (B14), the slot is free.
    model.deliver(&tuple.peer_sends(Op::Rst), &[]).unwrap();
    vsock.poll(ms(4));
    assert_silent(&mut model);
    let s = vsock.stream_socket().unwrap();
    assert_ne!(s, conn);
    vsock.close(s).unwrap();
    // The tuple is free: the peer may connect again from the same port.
    request(&mut vsock, &mut model, tuple, ms(5));
    // And nothing fires at the old close deadline.
    vsock.poll(ms(60_000));
    assert_silent(&mut model);
}

#[test]
fn b36_close_without_an_answer_sends_rst_at_the_close_timeout() {
    for (timeout_ms, config) in [
        (8000, test_config()),
        (
            300,
            Config {
                close_timeout: Duration::from_millis(300),
                ..test_config()
            },
        ),
    ] {
        let (transport, mut model) = new_transport();
        let mut storage = storage(2);
        let mut vsock = bring_up(&transport, config, &mut storage);
        let listener = listen_on(&mut vsock, GUEST_PORT, 1);
        let tuple = Tuple::host();
        let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(1));
        // The deadline counts from the time of the last poll.
        vsock.poll(ms(100));
        vsock.close(conn).unwrap();
        assert_eq!(control(&mut model), [tuple.shutdown_to_peer(3, PER, 0)]);
        let deadline = (100 + timeout_ms) * 1000;
        vsock.poll(us(deadline - 1));
        assert_silent(&mut model);
        assert_eq!(vsock.stream_socket(), Err(Error::TooManySockets));
        vsock.poll(us(deadline));
        assert_eq!(control(&mut model), [tuple.to_peer(Op::Rst, PER, 0)]);
        let s = vsock.stream_socket().unwrap();
        vsock.close(s).unwrap();
        // The peer's late answer finds no socket: an RST is not answered (B14), anything
        // else gets an RST for no socket (B13).
        model.deliver(&tuple.peer_sends(Op::Rst), &[]).unwrap();
        vsock.poll(us(deadline + 1));
        assert_silent(&mut model);
        let late = tuple.peer_shutdown(3);
        model.deliver(&late, &[]).unwrap();
        vsock.poll(us(deadline + 2));
        assert_eq!(control(&mut model), [rst_for(&late)]);
    }
}

#[test]
fn b36_close_after_the_connection_ended_sends_nothing() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(3);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 2);
    // Reset by the peer.
    let reset = Tuple::new(GUEST_PORT, HOST_CID, 5000);
    let a = accept_from(&mut vsock, &mut model, listener, reset, ms(1));
    model.deliver(&reset.peer_sends(Op::Rst), &[]).unwrap();
    // Closed in order by the peer (B34: we already sent RST).
    let ended = Tuple::new(GUEST_PORT, HOST_CID, 5001);
    let b = accept_from(&mut vsock, &mut model, listener, ended, ms(1));
    model.deliver(&ended.peer_shutdown(3), &[]).unwrap();
    vsock.poll(ms(2));
    assert_eq!(control(&mut model), [ended.to_peer(Op::Rst, PER, 0)]);
    vsock.close(a).unwrap();
    vsock.close(b).unwrap();
    assert_silent(&mut model);
    // Both slots are free at once.
    let _ = vsock.stream_socket().unwrap();
    let _ = vsock.stream_socket().unwrap();
    vsock.poll(ms(60_000));
    assert_silent(&mut model);
}

#[test]
fn b36_abort_sends_rst_now_and_frees_the_slot() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(1));
    model
        .deliver(&tuple.peer_sends(Op::Rw), b"unread and read")
        .unwrap();
    vsock.poll(ms(2));
    let mut buf = [0u8; 4];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(4));
    vsock.abort(conn).unwrap();
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Rst, PER, 4)]);
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::InvalidHandle));
    assert_eq!(vsock.abort(conn), Err(Error::InvalidHandle));
    let s = vsock.stream_socket().unwrap();
    // Aborting sockets without a connection sends nothing.
    vsock.abort(s).unwrap();
    assert_silent(&mut model);
    // The peer's crossing packets find no socket.
    let data = tuple.peer_sends(Op::Rw);
    model.deliver(&data, b"?").unwrap();
    model.deliver(&tuple.peer_sends(Op::Rst), &[]).unwrap();
    vsock.poll(ms(3));
    assert_eq!(control(&mut model), [rst_for(&data)]);
    vsock.poll(ms(60_000));
    assert_silent(&mut model);
}

#[test]
fn b37_simultaneous_close_ends_cleanly_with_no_rst_answering_an_rst() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();

    // 1. Both SHUTDOWN(both) at once: the peer's arrives after ours went out. We answer it
    //    with RST (the connection is over); the peer's RST answering ours is dropped.
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(1));
    vsock.close(conn).unwrap();
    assert_eq!(control(&mut model), [tuple.shutdown_to_peer(3, PER, 0)]);
    model.deliver(&tuple.peer_shutdown(3), &[]).unwrap();
    model.deliver(&tuple.peer_sends(Op::Rst), &[]).unwrap();
    vsock.poll(ms(2));
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Rst, PER, 0)]);
    let s = vsock.stream_socket().unwrap(); // the slot is free
    vsock.close(s).unwrap();

    // 2. The peer's SHUTDOWN is already in the ring, not yet polled, when we close.
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(3));
    model.deliver(&tuple.peer_shutdown(3), &[]).unwrap();
    vsock.close(conn).unwrap();
    assert_eq!(control(&mut model), [tuple.shutdown_to_peer(3, PER, 0)]);
    vsock.poll(ms(4));
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Rst, PER, 0)]);
    model.deliver(&tuple.peer_sends(Op::Rst), &[]).unwrap();
    vsock.poll(ms(5));
    assert_silent(&mut model);

    // 3. Half closes crossing: we shut down sending as the peer does, then both close.
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(6));
    vsock.shutdown(conn, Shutdown::Write).unwrap();
    assert_eq!(control(&mut model), [tuple.shutdown_to_peer(2, PER, 0)]);
    model.deliver(&tuple.peer_shutdown(2), &[]).unwrap();
    vsock.poll(ms(7));
    assert_silent(&mut model);
    let mut buf = [0u8; 4];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(0));
    vsock.close(conn).unwrap();
    assert_eq!(control(&mut model), [tuple.shutdown_to_peer(3, PER, 0)]);
    model.deliver(&tuple.peer_shutdown(3), &[]).unwrap();
    vsock.poll(ms(8));
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Rst, PER, 0)]);
    model.deliver(&tuple.peer_sends(Op::Rst), &[]).unwrap();
    vsock.poll(ms(9));
    assert_silent(&mut model);

    // 4. Both reset at once: nobody answers an RST.
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(10));
    vsock.abort(conn).unwrap();
    assert_eq!(control(&mut model), [tuple.to_peer(Op::Rst, PER, 0)]);
    model.deliver(&tuple.peer_sends(Op::Rst), &[]).unwrap();
    vsock.poll(ms(11));
    assert_silent(&mut model);
    let s = vsock.stream_socket().unwrap();
    vsock.close(s).unwrap();
    vsock.poll(ms(60_000));
    assert_silent(&mut model);
}

#[test]
fn b38_rst_with_unread_data_keeps_the_data_then_reports_connection_reset() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(1));
    model.deliver(&tuple.peer_sends(Op::Rw), b"abcdef").unwrap();
    model.deliver(&tuple.peer_sends(Op::Rst), &[]).unwrap();
    vsock.poll(ms(2));
    assert_silent(&mut model); // B14
    assert_eq!(vsock.readiness(conn), Ok(FAILED));
    assert_eq!(vsock.recv_queue(conn), Ok(6));
    let mut buf = [0u8; 4];
    assert_eq!(vsock.peek(conn, &mut buf), Ok(4));
    assert_eq!(vsock.recv(conn, &mut buf), Ok(4));
    assert_eq!(&buf, b"abcd");
    assert_eq!(vsock.recv(conn, &mut buf), Ok(2));
    assert_eq!(&buf[..2], b"ef");
    assert_silent(&mut model); // no CREDIT_UPDATE on a dead connection
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::ConnectionReset));
    assert_eq!(vsock.peek(conn, &mut buf), Err(Error::ConnectionReset));
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::ConnectionReset));
    assert_eq!(vsock.take_error(conn), Ok(Some(Error::ConnectionReset)));
    assert_eq!(vsock.take_error(conn), Ok(None));
    assert_eq!(vsock.readiness(conn), Ok(ENDED));
    assert_eq!(vsock.send(conn, b"x"), Err(Error::ConnectionReset));
    assert_eq!(
        vsock.shutdown(conn, Shutdown::Write),
        Err(Error::NotConnected)
    );
    assert_eq!(vsock.peer_addr(conn), Ok(tuple.peer));
    vsock.close(conn).unwrap();
    assert_silent(&mut model);
    assert_eq!(Error::ConnectionReset.errno(), 104);
}

// ---------------------------------------------------------------------------------------
// InvalidHandle
// ---------------------------------------------------------------------------------------

/// Every call with `handle` fails with InvalidHandle and sends nothing.
#[track_caller]
fn assert_invalid_handle(vsock: &mut Device<'_>, model: &mut DeviceModel, handle: SocketHandle) {
    let invalid = Err(Error::InvalidHandle);
    let mut buf = [0u8; 4];
    assert_eq!(
        vsock.bind(handle, VsockAddr::new(VMADDR_CID_ANY, 3000)),
        invalid
    );
    assert_eq!(vsock.listen(handle, 1), invalid);
    assert_eq!(vsock.accept(handle), Err(Error::InvalidHandle));
    assert_eq!(vsock.connect(handle, VsockAddr::new(HOST_CID, 1)), invalid);
    assert_eq!(vsock.send(handle, b"x"), Err(Error::InvalidHandle));
    assert_eq!(vsock.recv(handle, &mut buf), Err(Error::InvalidHandle));
    assert_eq!(vsock.peek(handle, &mut buf), Err(Error::InvalidHandle));
    assert_eq!(vsock.recv_queue(handle), Err(Error::InvalidHandle));
    assert_eq!(vsock.shutdown(handle, Shutdown::Both), invalid);
    assert_eq!(vsock.readiness(handle), Err(Error::InvalidHandle));
    assert_eq!(vsock.take_error(handle), Err(Error::InvalidHandle));
    assert_eq!(vsock.local_addr(handle), Err(Error::InvalidHandle));
    assert_eq!(vsock.peer_addr(handle), Err(Error::InvalidHandle));
    assert_eq!(vsock.abort(handle), invalid);
    assert_eq!(vsock.close(handle), invalid);
    assert_silent(model);
}

#[test]
fn every_call_with_a_closed_or_foreign_handle_is_invalid_handle() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(3);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(1));
    let plain = vsock.stream_socket().unwrap();

    vsock.close(plain).unwrap();
    assert_invalid_handle(&mut vsock, &mut model, plain);
    // A closing connection's handle is dead although its slot is busy.
    vsock.close(conn).unwrap();
    assert_eq!(control(&mut model), [tuple.shutdown_to_peer(3, PER, 0)]);
    assert_invalid_handle(&mut vsock, &mut model, conn);
    vsock.abort(listener).unwrap();
    assert_invalid_handle(&mut vsock, &mut model, listener);
    assert_eq!(Error::InvalidHandle.errno(), 9);

    // Slots are reused with new handles; old handles stay dead.
    let a = vsock.stream_socket().unwrap();
    let b = vsock.stream_socket().unwrap();
    assert_eq!(vsock.stream_socket(), Err(Error::TooManySockets));
    for old in [plain, listener, conn] {
        assert!(old != a && old != b);
        assert_invalid_handle(&mut vsock, &mut model, old);
    }
    assert_eq!(vsock.readiness(a), Ok(Readiness::empty()));
    assert_eq!(vsock.readiness(b), Ok(Readiness::empty()));

    // A handle of another, larger device names no slot here.
    let (other_transport, _other_model) = new_transport();
    let mut other_storage = crate::storage(8);
    let mut other = bring_up(&other_transport, test_config(), &mut other_storage);
    let foreign = (0..8)
        .map(|_| other.stream_socket().unwrap())
        .last()
        .unwrap();
    assert_invalid_handle(&mut vsock, &mut model, foreign);
}

// ---------------------------------------------------------------------------------------
// Device events (B40)
// ---------------------------------------------------------------------------------------

#[test]
fn b40_transport_reset_fails_every_connection_silently_and_listeners_answer_on_the_new_cid() {
    const NEW_CID: u32 = 7;
    let (transport, mut model) = new_transport();
    let mut storage = storage(8);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 4);
    // An accepted connection with unread data.
    let accepted = Tuple::new(GUEST_PORT, HOST_CID, 5000);
    let a = accept_from(&mut vsock, &mut model, listener, accepted, ms(1));
    model.deliver(&accepted.peer_sends(Op::Rw), b"abc").unwrap();
    // A connection closing in the background.
    let closing = Tuple::new(GUEST_PORT, HOST_CID, 5002);
    let gone = accept_from(&mut vsock, &mut model, listener, closing, ms(1));
    vsock.close(gone).unwrap();
    assert_eq!(control(&mut model), [closing.shutdown_to_peer(3, PER, 0)]);
    // One waiting in the accept queue.
    request(
        &mut vsock,
        &mut model,
        Tuple::new(GUEST_PORT, HOST_CID, 5001),
        ms(1),
    );
    // One connecting.
    let connecting = Tuple::new(EPHEMERAL, HOST_CID, 7000);
    let c = start_connect(
        &mut vsock,
        &mut model,
        connecting.peer,
        connecting.guest_port,
        PER,
    );
    // One bound, not connected.
    let u = vsock.stream_socket().unwrap();
    vsock.bind(u, VsockAddr::new(VMADDR_CID_ANY, 2000)).unwrap();
    vsock.poll(ms(2));
    assert_silent(&mut model);

    // The VM migrates: a new CID, then TRANSPORT_RESET.
    model.set_guest_cid(u64::from(NEW_CID));
    model.push_event(0).unwrap();
    vsock.poll(ms(3));
    assert_silent(&mut model); // no packets for the dead connections
    assert_eq!(vsock.local_cid(), NEW_CID);

    // Every connection failed with ConnectionReset; buffered data stays readable.
    assert_eq!(vsock.readiness(a), Ok(FAILED));
    let mut buf = [0u8; 8];
    assert_eq!(vsock.recv(a, &mut buf), Ok(3));
    assert_eq!(vsock.recv(a, &mut buf), Err(Error::ConnectionReset));
    assert_eq!(vsock.take_error(a), Ok(Some(Error::ConnectionReset)));
    assert_eq!(vsock.take_error(a), Ok(None));
    assert_eq!(vsock.readiness(c), Ok(FAILED));
    assert_eq!(vsock.take_error(c), Ok(Some(Error::ConnectionReset)));
    // The waiting connection is gone from the queue (B22); the closing one from its slot.
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    assert_eq!(vsock.readiness(listener), Ok(Readiness::empty()));
    let free: Vec<SocketHandle> = (0..4).map(|_| vsock.stream_socket().unwrap()).collect();
    assert_eq!(vsock.stream_socket(), Err(Error::TooManySockets));
    for s in free {
        vsock.close(s).unwrap();
    }
    // Bound sockets and listeners stay, on the new CID.
    assert_eq!(
        vsock.local_addr(listener),
        Ok(VsockAddr::new(NEW_CID, GUEST_PORT))
    );
    assert_eq!(vsock.local_addr(u), Ok(VsockAddr::new(NEW_CID, 2000)));
    // No timer of the dead connections fires; closing them sends nothing.
    vsock.poll(ms(60_000));
    vsock.close(a).unwrap();
    vsock.close(c).unwrap();
    assert_silent(&mut model);

    // Packets to the old CID are not ours any more (B10): dropped without a word.
    model
        .deliver(
            &Tuple::new(GUEST_PORT, HOST_CID, 5003).peer_sends(Op::Request),
            &[],
        )
        .unwrap();
    vsock.poll(ms(60_001));
    assert_silent(&mut model);
    // The old peers reach the new CID: no such connection any more (B13).
    let stray = accepted.with_guest_cid(NEW_CID).peer_sends(Op::Rw);
    model.deliver(&stray, b"?").unwrap();
    vsock.poll(ms(60_002));
    assert_eq!(control(&mut model), [rst_for(&stray)]);
    assert_eq!(stray.dst_cid, u64::from(NEW_CID));

    // The listener answers on the new CID, and new connections use it (B9).
    let fresh = Tuple::new(GUEST_PORT, HOST_CID, 5003).with_guest_cid(NEW_CID);
    model.deliver(&fresh.peer_sends(Op::Request), &[]).unwrap();
    vsock.poll(ms(60_003));
    assert_eq!(control(&mut model), [fresh.to_peer(Op::Response, PER, 0)]);
    let (conn, peer) = vsock.accept(listener).unwrap();
    assert_eq!(peer, fresh.peer);
    assert_eq!(
        vsock.local_addr(conn),
        Ok(VsockAddr::new(NEW_CID, GUEST_PORT))
    );
    assert_eq!(vsock.send(conn, b"hi"), Ok(2));
    assert_eq!(model.drain_tx(), [fresh.rw_to_peer(b"hi", PER, 0)]);
    let s = vsock.stream_socket().unwrap();
    assert_eq!(
        vsock.connect(s, VsockAddr::new(SIBLING_CID, 9)),
        Err(Error::InProgress)
    );
    let out = Tuple::new(EPHEMERAL + 1, SIBLING_CID, 9).with_guest_cid(NEW_CID);
    assert_eq!(control(&mut model), [out.to_peer(Op::Request, PER, 0)]);
    // Our own new CID is not a peer; the old one is just another guest now.
    let t = vsock.stream_socket().unwrap();
    assert_eq!(
        vsock.connect(t, VsockAddr::new(NEW_CID, 9)),
        Err(Error::InvalidCid)
    );
}

// ---------------------------------------------------------------------------------------
// A device that stops (B41); no allocation (B42)
// ---------------------------------------------------------------------------------------

#[test]
fn b41_a_device_that_stops_consuming_tx_and_returning_rx_stalls_no_call_and_no_timer() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let config = Config {
        queue_size: 8,
        ..test_config()
    };
    let mut vsock = bring_up(&transport, config, &mut storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();
    let conn = accept_from(&mut vsock, &mut model, listener, tuple, ms(1));
    vsock.poll(ms(2)); // takes back the RESPONSE's buffer

    // From here the device takes no tx buffer and returns no rx buffer.
    let data = pattern(9 * MAX_TX_PAYLOAD);
    assert_eq!(vsock.send(conn, &data), Ok(8 * MAX_TX_PAYLOAD));
    assert_eq!(vsock.send(conn, &data), Err(Error::WouldBlock));
    assert_eq!(vsock.readiness(conn), Ok(Readiness::empty()));
    let mut buf = [0u8; 4];
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::WouldBlock));
    // Calls that need to send queue their packet and return at once.
    let s = vsock.stream_socket().unwrap();
    let out = Tuple::new(EPHEMERAL, HOST_CID, 7000);
    assert_eq!(
        vsock.connect(s, VsockAddr::new(HOST_CID, 7000)),
        Err(Error::InProgress)
    );
    assert_eq!(vsock.readiness(s), Ok(Readiness::empty()));
    assert_eq!(vsock.shutdown(conn, Shutdown::Write), Ok(()));
    assert_eq!(vsock.send(conn, b"x"), Err(Error::BrokenPipe));
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    for t in 3..10 {
        vsock.poll(ms(t));
    }
    assert_eq!(model.available(1), 8, "nothing more on the full tx ring");

    // Timers still fire: the connect times out...
    vsock.poll(ms(2002));
    assert_eq!(vsock.readiness(s), Ok(FAILED));
    assert_eq!(vsock.take_error(s), Ok(Some(Error::TimedOut)));
    // ...and a close runs to its timeout and frees the slot.
    vsock.poll(ms(3000));
    vsock.close(conn).unwrap();
    vsock.poll(ms(10_999));
    let fourth = vsock.stream_socket().unwrap();
    assert_eq!(vsock.stream_socket(), Err(Error::TooManySockets));
    vsock.close(fourth).unwrap();
    vsock.poll(ms(11_000));
    let freed = vsock.stream_socket().unwrap();
    vsock.close(freed).unwrap();
    assert_eq!(model.available(1), 8);

    // The device resumes: the data, then what each connection owes now. Nothing was
    // dropped: each ended while its REQUEST or SHUTDOWN still waited, and owes only the
    // RST that replaced them (one per connection, in slot order).
    let packets = model.drain_tx();
    assert_eq!(packets.len(), 8);
    for (i, packet) in packets.iter().enumerate() {
        let chunk = &data[i * MAX_TX_PAYLOAD..(i + 1) * MAX_TX_PAYLOAD];
        assert_eq!(*packet, tuple.rw_to_peer(chunk, PER, 0), "packet {i}");
    }
    vsock.poll(ms(11_001));
    assert_eq!(
        control(&mut model),
        [tuple.to_peer(Op::Rst, PER, 0), out.to_peer(Op::Rst, PER, 0)]
    );
    // And the device works again.
    request(
        &mut vsock,
        &mut model,
        Tuple::new(GUEST_PORT, HOST_CID, 5001),
        ms(11_002),
    );
}

/// Counts heap allocations per thread, to show that the driver makes none (B42).
struct CountingAllocator;

std::thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_allocation() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

fn allocations() -> u64 {
    ALLOCATIONS.get()
}

// SAFETY: forwards every call to the system allocator unchanged; counting touches only a
// const-initialised thread-local without a destructor, which never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn b42_no_call_and_nothing_a_peer_does_allocates() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let before = allocations();
    let listener = listen_on(&mut vsock, GUEST_PORT, 2);
    vsock.poll(ms(1));
    let client = vsock.stream_socket().unwrap();
    assert_eq!(
        vsock.connect(client, VsockAddr::new(HOST_CID, 80)),
        Err(Error::InProgress)
    );
    assert_eq!(allocations(), before, "socket calls");
    let out = Tuple::new(EPHEMERAL, HOST_CID, 80);
    assert_eq!(control(&mut model), [out.to_peer(Op::Request, PER, 0)]);

    // A flood: 50 REQUESTs (two fit the backlog), each followed by data; a RESPONSE.
    model.deliver(&out.peer_sends(Op::Response), &[]).unwrap();
    for port in 0..50 {
        let tuple = Tuple::new(GUEST_PORT, HOST_CID, 10_000 + port);
        model.deliver(&tuple.peer_sends(Op::Request), &[]).unwrap();
        model.deliver(&tuple.peer_sends(Op::Rw), b"data").unwrap();
    }
    let before = allocations();
    vsock.poll(ms(2));
    let (a, _) = vsock.accept(listener).unwrap();
    let (b, _) = vsock.accept(listener).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(vsock.recv(a, &mut buf), Ok(4));
    assert_eq!(vsock.send(b, b"reply"), Ok(5));
    assert_eq!(vsock.send(client, b"hello"), Ok(5));
    vsock.shutdown(a, Shutdown::Both).unwrap();
    vsock.close(b).unwrap();
    vsock.abort(client).unwrap();
    let _ = vsock.readiness(a);
    let _ = vsock.take_error(a);
    vsock.poll(ms(10_000));
    assert_eq!(allocations(), before, "polls and calls under a flood");

    let sent = control_and_data(&mut model);
    let responses = sent.iter().filter(|h| h.op == Op::Response as u16).count();
    let rsts = sent.iter().filter(|h| h.op == Op::Rst as u16).count();
    assert_eq!(responses, 2);
    // 48 refused REQUESTs, their 48 data packets, the aborted client, the closed `b`.
    assert_eq!(rsts, 48 + 48 + 1 + 1);
}

/// Takes everything on the tx ring and returns the headers.
fn control_and_data(model: &mut DeviceModel) -> Vec<Header> {
    model.drain_tx().into_iter().map(|p| p.header).collect()
}

// ---------------------------------------------------------------------------------------
// The blocking embedded-io adapter (src/io.rs)
// ---------------------------------------------------------------------------------------
//
// `BlockingStream` polls the device itself while it waits, so the host's side is played
// from inside its clock: each call of the clock is one tick (1 ms) and runs `script(tick)`.
// The device stays alive (in its mutex) until the tx ring has been drained.

/// A connection accepted from the host, which advertises `host_buf_alloc` in every
/// header; returns the device in a mutex and the connection.
fn io_setup<'a>(
    transport: &FakeTransport,
    model: &RefCell<DeviceModel>,
    storage: &'a mut Storage,
    host_buf_alloc: u32,
) -> (spin::Mutex<Device<'a>>, SocketHandle) {
    io_setup_with(transport, model, storage, host_buf_alloc, test_config())
}

fn io_setup_with<'a>(
    transport: &FakeTransport,
    model: &RefCell<DeviceModel>,
    storage: &'a mut Storage,
    host_buf_alloc: u32,
    config: Config,
) -> (spin::Mutex<Device<'a>>, SocketHandle) {
    let model = &mut *model.borrow_mut();
    let mut vsock = bring_up(transport, config, storage);
    let listener = listen_on(&mut vsock, GUEST_PORT, 1);
    let tuple = Tuple::host();
    model
        .deliver(
            &Header {
                buf_alloc: host_buf_alloc,
                ..tuple.peer_sends(Op::Request)
            },
            &[],
        )
        .unwrap();
    vsock.poll(ms(0));
    assert_eq!(control(model), [tuple.to_peer(Op::Response, PER, 0)]);
    let (conn, _) = vsock.accept(listener).unwrap();
    (spin::Mutex::new(vsock), conn)
}

/// A clock that advances 1 ms per call and runs `script` with the new tick first.
fn scripted_clock<'s>(tick: &'s Cell<u64>, script: impl Fn(u64) + 's) -> impl Fn() -> Instant + 's {
    move || {
        let now = tick.get() + 1;
        tick.set(now);
        script(now);
        ms(now)
    }
}

/// A host with 1000 bytes of receive buffer, for `scripted_clock`: it takes every packet
/// the guest sent (into `sent`), counts the payload bytes in `received`, and reports them
/// in a CREDIT_UPDATE three ticks after the last data arrived.
fn crediting_host<'s>(
    model: &'s RefCell<DeviceModel>,
    received: &'s Cell<u32>,
    sent: &'s RefCell<Vec<Packet>>,
) -> impl Fn(u64) + 's {
    let tuple = Tuple::host();
    let update_due = Cell::new(None::<u64>);
    move |now| {
        let mut model = model.borrow_mut();
        for packet in model.drain_tx() {
            if packet.header.op == Op::Rw as u16 {
                received.set(received.get() + packet.header.len);
                update_due.set(Some(now + 3));
            }
            sent.borrow_mut().push(packet);
        }
        if update_due.get().is_some_and(|due| now >= due) {
            update_due.set(None);
            let update = Header {
                buf_alloc: 1000,
                fwd_cnt: received.get(),
                ..tuple.peer_sends(Op::CreditUpdate)
            };
            model.deliver(&update, &[]).unwrap();
        }
    }
}

#[test]
fn io_write_all_sends_rw_packets_within_the_peer_credit_and_waits_for_more() {
    use embedded_io::Write;
    let (transport, model) = new_transport();
    let model = RefCell::new(model);
    let mut storage = storage(2);
    let (device, conn) = io_setup(&transport, &model, &mut storage, 1000);
    let tuple = Tuple::host();
    let sent = RefCell::new(Vec::new());
    // The host reads what arrives and reports it in a CREDIT_UPDATE three ticks later.
    let received = Cell::new(0u32);
    let tick = Cell::new(0);
    let clock = scripted_clock(&tick, crediting_host(&model, &received, &sent));
    let mut stream = BlockingStream::new(&device, conn, clock);
    assert_eq!(stream.handle(), conn);
    let data = pattern(2500);
    assert_eq!(stream.write(&[]), Ok(0));
    assert_eq!(tick.get(), 0, "an empty write does not wait");
    stream.write_all(&data).unwrap();
    stream.flush().unwrap();
    // The last packet is still on the ring: take it while the device is alive.
    sent.borrow_mut().extend(model.borrow_mut().drain_tx());
    // No CREDIT_REQUEST: the host reports what it read before the credit probe is due.
    assert_eq!(
        *sent.borrow(),
        [
            tuple.rw_to_peer(&data[..1000], PER, 0),
            tuple.rw_to_peer(&data[1000..2000], PER, 0),
            tuple.rw_to_peer(&data[2000..], PER, 0),
        ]
    );
    // A tick per write (three), three more for each of the two waits for credit, and
    // one for the flush (nothing waits: send_buffer is 0 here).
    assert_eq!(tick.get(), 10);
}

#[test]
fn io_write_all_fills_the_send_buffer_and_flush_waits_until_it_went_out() {
    use embedded_io::Write;
    let (transport, model) = new_transport();
    let model = RefCell::new(model);
    let mut storage = storage(2);
    let config = Config {
        send_buffer: 4000,
        ..test_config()
    };
    let (device, conn) = io_setup_with(&transport, &model, &mut storage, 1000, config);
    // The host reads what arrives and reports it in a CREDIT_UPDATE three ticks later.
    let received = Cell::new(0u32);
    let sent = RefCell::new(Vec::new());
    let tick = Cell::new(0);
    let clock = scripted_clock(&tick, crediting_host(&model, &received, &sent));
    let mut stream = BlockingStream::new(&device, conn, clock);
    let data = pattern(2500);
    // 1000 bytes of credit and 1500 into the send buffer: write_all polls once and
    // waits for nothing.
    stream.write_all(&data).unwrap();
    assert_eq!(tick.get(), 1);
    assert_eq!(device.lock().send_queue(conn), Ok(1500));
    // flush waits for the two credit updates the rest needs.
    stream.flush().unwrap();
    assert_eq!(device.lock().send_queue(conn), Ok(0));
    assert!(tick.get() >= 6, "{}", tick.get());
    // The last packet went to the device in flush's last poll.
    let last: u32 = model
        .borrow_mut()
        .drain_tx()
        .iter()
        .filter(|p| p.header.op == Op::Rw as u16)
        .map(|p| p.header.len)
        .sum();
    assert_eq!(received.get() + last, 2500);
}

#[test]
fn io_read_exact_gets_delivered_data_and_read_returns_zero_at_end_of_stream() {
    use embedded_io::{Read, ReadExactError};
    let (transport, model) = new_transport();
    let model = RefCell::new(model);
    let mut storage = storage(4);
    let (device, conn) = io_setup(&transport, &model, &mut storage, PEER_BUF_ALLOC);
    let tuple = Tuple::host();
    let tick = Cell::new(0);
    let clock = scripted_clock(&tick, |now| {
        let mut model = model.borrow_mut();
        match now {
            3 => model.deliver(&tuple.peer_sends(Op::Rw), b"hello ").unwrap(),
            6 => model.deliver(&tuple.peer_sends(Op::Rw), b"world").unwrap(),
            9 => model.deliver(&tuple.peer_shutdown(2), &[]).unwrap(),
            _ => {}
        }
    });
    let mut stream = BlockingStream::new(&device, conn, clock);
    let mut buf = [0u8; 11];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello world");
    assert_eq!(tick.get(), 6);
    assert_eq!(stream.read(&mut []), Ok(0));
    assert_eq!(tick.get(), 6, "an empty read does not wait");
    // End of stream: Ok(0), once the SHUTDOWN(SEND) came, and again after that.
    assert_eq!(stream.read(&mut buf), Ok(0));
    assert_eq!(tick.get(), 9);
    assert_eq!(stream.read(&mut buf), Ok(0));
    // read_exact across the end of stream is UnexpectedEof.
    {
        let mut vsock = device.lock();
        let mut model = model.borrow_mut();
        let listener = vsock.stream_socket().unwrap();
        vsock
            .bind(listener, VsockAddr::new(VMADDR_CID_ANY, 4000))
            .unwrap();
        vsock.listen(listener, 1).unwrap();
        let short = Tuple::new(4000, HOST_CID, 5001);
        model.deliver(&short.peer_sends(Op::Request), &[]).unwrap();
        model.deliver(&short.peer_sends(Op::Rw), b"abc").unwrap();
        model.deliver(&short.peer_shutdown(2), &[]).unwrap();
        vsock.poll(ms(100));
        let (second, _) = vsock.accept(listener).unwrap();
        assert_eq!(control(&mut model), [short.to_peer(Op::Response, PER, 0)]);
        drop(vsock);
        drop(model);
        let mut short_stream = BlockingStream::new(&device, second, || ms(100));
        let mut five = [0u8; 5];
        assert_eq!(
            short_stream.read_exact(&mut five),
            Err(ReadExactError::UnexpectedEof)
        );
        assert_eq!(&five[..3], b"abc");
    }
    // Eleven bytes consumed: no CREDIT_UPDATE due (B28); nothing else went out.
    assert_silent(&mut model.borrow_mut());
}

#[test]
fn io_with_timeout_gives_timed_out_for_read_and_write() {
    use embedded_io::{Read, Write};
    let (transport, model) = new_transport();
    let model = RefCell::new(model);
    let mut storage = storage(2);
    // The host gives no credit at all, and sends nothing.
    let (device, conn) = io_setup(&transport, &model, &mut storage, 0);
    let tuple = Tuple::host();
    let tick = Cell::new(0);
    let clock = scripted_clock(&tick, |_| {});
    let mut stream =
        BlockingStream::new(&device, conn, clock).with_timeout(Duration::from_millis(100));
    let mut buf = [0u8; 4];
    // The deadline is taken at tick 1, the first attempt is at tick 2; the last at 101.
    assert_eq!(stream.read(&mut buf), Err(Error::TimedOut));
    assert_eq!(tick.get(), 101);
    assert_silent(&mut model.borrow_mut());
    // Writing: one CREDIT_REQUEST, then the credit probes of B29 (10, 20, 40 ms apart),
    // then TimedOut.
    assert_eq!(stream.write(b"data"), Err(Error::TimedOut));
    assert_eq!(tick.get(), 202);
    assert_eq!(
        control(&mut model.borrow_mut()),
        [
            tuple.to_peer(Op::CreditRequest, PER, 0),
            tuple.to_peer(Op::CreditUpdate, PER, 0),
            tuple.to_peer(Op::CreditUpdate, PER, 0),
            tuple.to_peer(Op::CreditUpdate, PER, 0),
        ]
    );
    // A timeout ends the wait, not the connection.
    assert_eq!(device.lock().readiness(conn), Ok(Readiness::empty()));
    assert_eq!(device.lock().take_error(conn), Ok(None));
}

#[test]
fn io_read_ready_and_write_ready_follow_readiness() {
    use embedded_io::{Read, ReadReady, WriteReady};
    let (transport, model) = new_transport();
    let model = RefCell::new(model);
    let mut storage = storage(3);
    let (device, conn) = io_setup(&transport, &model, &mut storage, PEER_BUF_ALLOC);
    let tuple = Tuple::host();
    let tick = Cell::new(0);
    let mut stream = BlockingStream::new(&device, conn, scripted_clock(&tick, |_| {}));
    assert_eq!(stream.write_ready(), Ok(true));
    assert_eq!(stream.read_ready(), Ok(false));
    // Data arrives: the readiness call polls and sees it.
    model
        .borrow_mut()
        .deliver(&tuple.peer_sends(Op::Rw), b"ping")
        .unwrap();
    assert_eq!(stream.read_ready(), Ok(true));
    let mut buf = [0u8; 8];
    assert_eq!(stream.read(&mut buf), Ok(4));
    assert_eq!(stream.read_ready(), Ok(false));
    // End of stream is ready to read (it returns Ok(0) at once).
    model
        .borrow_mut()
        .deliver(&tuple.peer_shutdown(2), &[])
        .unwrap();
    assert_eq!(stream.read_ready(), Ok(true));
    assert_eq!(stream.read(&mut buf), Ok(0));
    // The host stops taking data: no credit, not write-ready.
    model
        .borrow_mut()
        .deliver(
            &Header {
                buf_alloc: 0,
                ..tuple.peer_sends(Op::CreditUpdate)
            },
            &[],
        )
        .unwrap();
    assert_eq!(stream.write_ready(), Ok(false));
    // A reset makes both ready: the calls fail at once.
    model
        .borrow_mut()
        .deliver(&tuple.peer_sends(Op::Rst), &[])
        .unwrap();
    assert_eq!(stream.read_ready(), Ok(true));
    assert_eq!(stream.write_ready(), Ok(true));
    assert_silent(&mut model.borrow_mut());
    // A closed handle is an error, not "not ready".
    device.lock().close(conn).unwrap();
    assert_eq!(stream.read_ready(), Err(Error::InvalidHandle));
    assert_eq!(stream.write_ready(), Err(Error::InvalidHandle));
}

#[test]
fn io_errors_of_the_socket_come_through_read_and_write() {
    use embedded_io::{Error as _, ErrorKind, Read, Write};
    let (transport, model) = new_transport();
    let model = RefCell::new(model);
    let mut storage = storage(2);
    let (device, conn) = io_setup(&transport, &model, &mut storage, PEER_BUF_ALLOC);
    let tuple = Tuple::host();
    let tick = Cell::new(0);
    let mut stream = BlockingStream::new(&device, conn, scripted_clock(&tick, |_| {}));
    // shutdown(Write) through the device: write is BrokenPipe at once (B35).
    device.lock().shutdown(conn, Shutdown::Write).unwrap();
    assert_eq!(
        control(&mut model.borrow_mut()),
        [tuple.shutdown_to_peer(2, PER, 0)]
    );
    let error = stream.write(b"x").unwrap_err();
    assert_eq!(error, Error::BrokenPipe);
    assert_eq!(error.kind(), ErrorKind::BrokenPipe);
    assert_eq!(stream.write_all(b"x"), Err(Error::BrokenPipe));
    // The host resets with data unread: the data, then ConnectionReset (B38).
    model
        .borrow_mut()
        .deliver(&tuple.peer_sends(Op::Rw), b"last")
        .unwrap();
    model
        .borrow_mut()
        .deliver(&tuple.peer_sends(Op::Rst), &[])
        .unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(stream.read(&mut buf), Ok(4));
    assert_eq!(&buf[..4], b"last");
    let error = stream.read(&mut buf).unwrap_err();
    assert_eq!(error, Error::ConnectionReset);
    assert_eq!(error.kind(), ErrorKind::ConnectionReset);
    assert_silent(&mut model.borrow_mut());
    // After close the handle is gone.
    device.lock().close(conn).unwrap();
    assert_eq!(stream.read(&mut buf), Err(Error::InvalidHandle));
    assert_eq!(stream.write(b"x"), Err(Error::InvalidHandle));
}

#[test]
fn io_write_on_a_connecting_socket_waits_for_the_connect_and_reports_its_failure() {
    use embedded_io::Write;
    let (transport, model) = new_transport();
    let model = RefCell::new(model);
    let mut storage = storage(2);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let accepted_port = 7000;
    let refused_port = 7001;
    let [ok, refused] = [accepted_port, refused_port].map(|port| {
        let s = vsock.stream_socket().unwrap();
        assert_eq!(
            vsock.connect(s, VsockAddr::new(HOST_CID, port)),
            Err(Error::InProgress)
        );
        s
    });
    let ok_tuple = Tuple::new(EPHEMERAL, HOST_CID, accepted_port);
    let refused_tuple = Tuple::new(EPHEMERAL + 1, HOST_CID, refused_port);
    assert_eq!(
        control(&mut model.borrow_mut()),
        [
            ok_tuple.to_peer(Op::Request, PER, 0),
            refused_tuple.to_peer(Op::Request, PER, 0),
        ]
    );
    let device = spin::Mutex::new(vsock);
    let tick = Cell::new(0);
    let clock = scripted_clock(&tick, |now| {
        let mut model = model.borrow_mut();
        match now {
            3 => model
                .deliver(&ok_tuple.peer_sends(Op::Response), &[])
                .unwrap(),
            6 => model
                .deliver(&refused_tuple.peer_sends(Op::Rst), &[])
                .unwrap(),
            _ => {}
        }
    });
    let mut stream = BlockingStream::new(&device, ok, &clock);
    stream.write_all(b"hi").unwrap();
    assert_eq!(tick.get(), 3);
    assert_eq!(
        model.borrow_mut().drain_tx(),
        [ok_tuple.rw_to_peer(b"hi", PER, 0)]
    );
    let mut stream = BlockingStream::new(&device, refused, &clock);
    assert_eq!(stream.write(b"hi"), Err(Error::ConnectionRefused));
    assert_eq!(tick.get(), 6);
    assert_silent(&mut model.borrow_mut());
}
