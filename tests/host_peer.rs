//! The scripted host ([`HostPeer`]) against the driver: one test per kind of
//! misbehaviour, each checking the driver's answer by the rule it must keep
//! (BEHAVIOUR.md), and that the host's own checks of the driver stay clean.

use vsock_guest::testing::{
    AcceptMode, ConnState, Corruption, FakeHal, FakeTransport, HostPeer, DEVICE_FEATURES,
};
use vsock_guest::wire::{Op, ShutdownFlags, SocketType};
use vsock_guest::{
    Config, Error, Instant, Readiness, SocketHandle, SocketSlot, VsockAddr, VsockDevice,
    VMADDR_CID_ANY, VMADDR_CID_HOST,
};

type Device<'a> = VsockDevice<'a, FakeHal, FakeTransport>;

const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1234;
const HOST_PORT: u32 = 5000;
const PER: usize = 8192;

struct Storage {
    slots: [SocketSlot; 4],
    rx_memory: Vec<u8>,
}

fn storage() -> Storage {
    Storage {
        slots: [const { SocketSlot::EMPTY }; 4],
        rx_memory: vec![0u8; 4 * PER],
    }
}

fn bring_up<'a>(transport: &FakeTransport, storage: &'a mut Storage) -> Device<'a> {
    // 4 KiB receive buffers, so that the host's data of a few kilobytes comes in several
    // packets (as it does from a real host), and no send buffer beyond the host's credit,
    // so that `send` takes exactly what the host has room for.
    let config = Config {
        rx_buffer_size: 4096,
        send_buffer: 0,
        ..Config::default()
    };
    VsockDevice::<FakeHal, _>::new(
        transport.clone(),
        config,
        &mut storage.slots,
        &mut storage.rx_memory,
    )
    .expect("bring-up")
}

fn listen(vsock: &mut Device<'_>) -> SocketHandle {
    let listener = vsock.stream_socket().unwrap();
    vsock
        .bind(listener, VsockAddr::new(VMADDR_CID_ANY, GUEST_PORT))
        .unwrap();
    vsock.listen(listener, 4).unwrap();
    listener
}

fn ms(millis: u64) -> Instant {
    Instant::from_millis(millis)
}

/// Starts a connect to the host's HOST_PORT.
fn connect(vsock: &mut Device<'_>) -> SocketHandle {
    let socket = vsock.stream_socket().unwrap();
    assert_eq!(
        vsock.connect(socket, VsockAddr::new(VMADDR_CID_HOST, HOST_PORT)),
        Err(Error::InProgress)
    );
    socket
}

fn ops(packets: &[vsock_guest::testing::Packet]) -> Vec<u16> {
    packets.iter().map(|p| p.header.op).collect()
}

#[test]
fn b18_a_host_answering_a_request_twice_is_reset() {
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    host.listen_with(HOST_PORT, AcceptMode::AcceptTwice);
    let mut storage = storage();
    let mut vsock = bring_up(&transport, &mut storage);
    let socket = connect(&mut vsock);
    let sent = host.settle(&mut vsock, ms(1));
    // REQUEST, then the RST answering the second RESPONSE.
    assert_eq!(ops(&sent), [Op::Request as u16, Op::Rst as u16]);
    assert_eq!(vsock.take_error(socket), Ok(Some(Error::ConnectionReset)));
    let conn = host.accept(HOST_PORT).unwrap();
    assert_eq!(host.conn(conn).state(), ConnState::ResetByGuest);
    assert_eq!(host.violations(), []);
}

#[test]
fn b19_a_refusing_host_and_a_silent_one() {
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    host.listen_with(HOST_PORT, AcceptMode::Refuse);
    let mut storage = storage();
    let mut vsock = bring_up(&transport, &mut storage);
    let refused = connect(&mut vsock);
    host.settle(&mut vsock, ms(1));
    assert_eq!(
        vsock.take_error(refused),
        Ok(Some(Error::ConnectionRefused))
    );

    host.listen_with(HOST_PORT, AcceptMode::Ignore);
    let ignored = connect(&mut vsock);
    host.settle(&mut vsock, ms(2));
    assert_eq!(vsock.take_error(ignored), Ok(None));
    // The connect timeout (2 s) fires, and the guest tells the host to forget it.
    let sent = host.settle(&mut vsock, ms(2002));
    assert_eq!(ops(&sent), [Op::Rst as u16]);
    assert_eq!(vsock.take_error(ignored), Ok(Some(Error::TimedOut)));
    assert_eq!(host.violations(), []);
}

#[test]
fn b25_b29_withheld_credit_blocks_the_guest_until_released() {
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    host.set_default_buf_alloc(1000);
    host.listen(HOST_PORT);
    let mut storage = storage();
    let mut vsock = bring_up(&transport, &mut storage);
    let socket = connect(&mut vsock);
    host.settle(&mut vsock, ms(1));
    let conn = host.accept(HOST_PORT).unwrap();
    assert_eq!(host.conn(conn).state(), ConnState::Connected);

    host.withhold_credit(conn, true);
    assert_eq!(vsock.send(socket, &[1u8; 3000]), Ok(1000));
    host.settle(&mut vsock, ms(2));
    assert_eq!(host.recv_all(conn).len(), 1000);
    // The host read everything but says nothing: the guest stays blocked. Its 1000 bytes
    // are unacknowledged, so it waits for the credit probe (10 ms), then asks once, and
    // the answer (the frozen values) gives it nothing.
    assert_eq!(vsock.send(socket, &[1u8; 3000]), Err(Error::WouldBlock));
    let sent = host.settle(&mut vsock, ms(3));
    assert_eq!(ops(&sent), []);
    let sent = host.settle(&mut vsock, ms(12));
    assert_eq!(
        ops(&sent),
        [Op::CreditUpdate as u16, Op::CreditRequest as u16]
    );
    assert_eq!(vsock.send(socket, &[1u8; 3000]), Err(Error::WouldBlock));
    assert!(!vsock
        .readiness(socket)
        .unwrap()
        .contains(Readiness::WRITABLE));

    host.withhold_credit(conn, false);
    host.settle(&mut vsock, ms(4));
    assert_eq!(vsock.send(socket, &[2u8; 3000]), Ok(1000));
    host.settle(&mut vsock, ms(5));
    assert_eq!(host.recv_all(conn), [2u8; 1000]);
    assert_eq!(host.violations(), []);
}

#[test]
fn b30_a_host_overrunning_the_guests_credit_is_reset() {
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    let mut storage = storage();
    let mut vsock = bring_up(&transport, &mut storage);
    let listener = listen(&mut vsock);
    let conn = host.connect(GUEST_PORT);
    host.settle(&mut vsock, ms(1));
    let (socket, _) = vsock.accept(listener).unwrap();
    assert_eq!(host.conn(conn).guest_credit() as usize, PER);
    host.send_unchecked(conn, &vec![9u8; PER + 1]);
    let sent = host.settle(&mut vsock, ms(2));
    assert_eq!(ops(&sent), [Op::Rst as u16]);
    assert_eq!(host.conn(conn).state(), ConnState::ResetByGuest);
    let mut buf = vec![0u8; 2 * PER];
    let n = vsock.recv(socket, &mut buf).unwrap();
    assert!(n < PER, "only whole packets within the credit: {n}");
    assert_eq!(vsock.recv(socket, &mut buf), Err(Error::ConnectionReset));
    assert_eq!(host.violations(), []);
}

#[test]
fn b13_b18_stray_packets_get_rst_and_never_an_rst_for_an_rst() {
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    let mut storage = storage();
    let mut vsock = bring_up(&transport, &mut storage);
    let _listener = listen(&mut vsock);
    // A RESPONSE nobody asked for, an RST for nothing, data for nothing.
    for op in [Op::Response, Op::Rst, Op::Rw, Op::Shutdown] {
        let header = host.header_to(7000, GUEST_PORT, op);
        let payload: &[u8] = if op == Op::Rw { b"?" } else { &[] };
        host.inject(
            &vsock_guest::wire::Header {
                len: payload.len() as u32,
                ..header
            },
            payload,
        );
    }
    let sent = host.settle(&mut vsock, ms(1));
    assert_eq!(
        ops(&sent),
        [Op::Rst as u16, Op::Rst as u16, Op::Rst as u16],
        "three RSTs, none for the RST"
    );
    assert!(sent
        .iter()
        .all(|p| (p.header.src_port, p.header.dst_port) == (GUEST_PORT, 7000)));

    // RST and SHUTDOWN at any moment: an RST right after the RESPONSE.
    let conn = host.connect(GUEST_PORT);
    host.reset(conn);
    host.settle(&mut vsock, ms(2));
    assert_eq!(host.conn(conn).state(), ConnState::ResetByHost);
    assert_eq!(host.violations(), []);
}

#[test]
fn b6_b10_b11_corrupt_packets_never_become_data() {
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    let mut storage = storage();
    let mut vsock = bring_up(&transport, &mut storage);
    let listener = listen(&mut vsock);
    let conn = host.connect(GUEST_PORT);
    host.settle(&mut vsock, ms(1));
    let (socket, _) = vsock.accept(listener).unwrap();
    let dropped = [
        Corruption::LenBeyondWritten,
        Corruption::LenBeyondBuffer,
        Corruption::Truncated,
        Corruption::UnknownOp(99),
        Corruption::WrongDstCid(77),
    ];
    for corruption in dropped {
        host.inject_corrupt(conn, corruption);
        let sent = host.settle(&mut vsock, ms(2));
        assert_eq!(ops(&sent), [], "{corruption:?} is dropped silently");
    }
    assert_eq!(vsock.stats().rx_dropped, 3);
    assert_eq!(vsock.stats().bad_used_entries, 0);
    // Used-ring ids never posted: dropped, counted. (A used length beyond the buffer
    // with a readable header resets its connection: B44, in tests/rules.rs.)
    host.inject_used(0, 4096, 44);
    host.inject_used(2, 77, 4);
    host.settle(&mut vsock, ms(3));
    assert_eq!(vsock.stats().bad_used_entries, 2);
    // An unknown type is answered with RST of that type; the connection lives on.
    host.inject_corrupt(conn, Corruption::UnknownType(9));
    let sent = host.settle(&mut vsock, ms(4));
    assert_eq!(ops(&sent), [Op::Rst as u16]);
    assert_eq!(sent[0].header.socket_type, 9);
    assert_eq!(host.send(conn, b"still here"), 10);
    host.settle(&mut vsock, ms(5));
    let mut buf = [0u8; 64];
    assert_eq!(vsock.recv(socket, &mut buf), Ok(10));
    assert_eq!(&buf[..10], b"still here");
    // Every rx buffer is back with the device (`recv` took the last one itself; the
    // device sees it at the next poll).
    vsock.poll(ms(5));
    assert_eq!(host.model().available(0), 128);
    // A control op with a payload resets the connection.
    host.inject_corrupt(conn, Corruption::ControlWithPayload);
    let sent = host.settle(&mut vsock, ms(6));
    assert_eq!(ops(&sent), [Op::Rst as u16]);
    assert_eq!(sent[0].header.socket_type, SocketType::Stream as u16);
    assert_eq!(vsock.recv(socket, &mut buf), Err(Error::ConnectionReset));
    assert_eq!(host.violations(), []);
}

#[test]
fn b7_b41_a_device_that_stops_consuming_tx_stalls_only_sending() {
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    let mut storage = storage();
    let mut vsock = bring_up(&transport, &mut storage);
    let listener = listen(&mut vsock);
    let conn = host.connect(GUEST_PORT);
    host.settle(&mut vsock, ms(1));
    let (socket, _) = vsock.accept(listener).unwrap();

    host.set_tx_per_step(Some(0));
    let mut sent = 0;
    loop {
        match vsock.send(socket, &[5u8; 100]) {
            Ok(n) => sent += n,
            Err(Error::WouldBlock) => break,
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(sent, 128 * 100, "one packet per tx buffer, then WouldBlock");
    // Data from the host still arrives while tx is stuck (B7).
    host.send(conn, b"incoming");
    host.settle(&mut vsock, ms(2));
    let mut buf = [0u8; 16];
    assert_eq!(vsock.recv(socket, &mut buf), Ok(8));
    // The device consumes again: everything arrives, in order.
    host.set_tx_per_step(None);
    host.settle(&mut vsock, ms(3));
    assert_eq!(host.recv_all(conn), vec![5u8; sent]);
    assert!(vsock.send(socket, b"more").is_ok());
    assert_eq!(host.violations(), []);
}

#[test]
fn b40_transport_reset_resets_connections_and_listeners_answer_on_the_new_cid() {
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    let mut storage = storage();
    let mut vsock = bring_up(&transport, &mut storage);
    let listener = listen(&mut vsock);
    let conn = host.connect(GUEST_PORT);
    host.settle(&mut vsock, ms(1));
    let (socket, _) = vsock.accept(listener).unwrap();

    host.transport_reset(9);
    let sent = host.settle(&mut vsock, ms(2));
    assert_eq!(ops(&sent), [], "B40: no packets for the reset connections");
    assert_eq!(vsock.local_cid(), 9);
    assert_eq!(host.conn(conn).state(), ConnState::TransportReset);
    let mut buf = [0u8; 4];
    assert_eq!(vsock.recv(socket, &mut buf), Err(Error::ConnectionReset));

    let again = host.connect(GUEST_PORT);
    let sent = host.settle(&mut vsock, ms(3));
    assert_eq!(ops(&sent), [Op::Response as u16]);
    assert_eq!(sent[0].header.src_cid, 9);
    assert_eq!(host.conn(again).state(), ConnState::Connected);
    assert!(vsock.accept(listener).is_ok());

    // A reserved CID is not taken (B2); the old one stays.
    host.transport_reset(2);
    host.settle(&mut vsock, ms(4));
    assert_eq!(vsock.local_cid(), 9);
    assert_eq!(host.violations(), []);
}

#[test]
fn b33_b35_shutdowns_from_the_host_at_any_moment() {
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    let mut storage = storage();
    let mut vsock = bring_up(&transport, &mut storage);
    let listener = listen(&mut vsock);
    let conn = host.connect(GUEST_PORT);
    host.send(conn, b"ignored: no credit yet");
    host.shutdown(conn, ShutdownFlags::RECEIVE);
    host.settle(&mut vsock, ms(1));
    let (socket, _) = vsock.accept(listener).unwrap();
    assert_eq!(vsock.send(socket, b"x"), Err(Error::BrokenPipe));
    host.send(conn, b"last words");
    host.shutdown(conn, ShutdownFlags::SEND);
    let sent = host.settle(&mut vsock, ms(2));
    assert_eq!(ops(&sent), [Op::Rst as u16], "B34: both flags: RST");
    let mut buf = [0u8; 32];
    assert_eq!(vsock.recv(socket, &mut buf), Ok(10));
    assert_eq!(vsock.recv(socket, &mut buf), Ok(0));
    assert_eq!(host.conn(conn).state(), ConnState::ResetByGuest);
    // Data after its own SHUTDOWN(SEND), on a new connection: RST (B33).
    let rude = host.connect(GUEST_PORT);
    host.settle(&mut vsock, ms(3));
    let (_socket, _) = vsock.accept(listener).unwrap();
    host.shutdown(rude, ShutdownFlags::SEND);
    host.send_unchecked(rude, b"more");
    let sent = host.settle(&mut vsock, ms(4));
    assert_eq!(ops(&sent), [Op::Rst as u16]);
    assert_eq!(host.violations(), []);
}
