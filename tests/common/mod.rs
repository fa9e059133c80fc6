// Every test binary that says `mod common;` compiles its own copy of this module and
// uses a different subset of it; what one binary leaves unused is not dead.
#![allow(dead_code)]

//! Helpers shared by the host tests that drive the driver through the device model
//! (tests/device_model.rs, tests/flow_control.rs, tests/rules.rs, tests/api.rs): the
//! addresses of the connection under test, packet headers as the wire carries them, and
//! bringing up a device with a listener and an accepted connection.

use vsock_guest::testing::{DeviceModel, FakeHal, FakeTransport, Packet};
use vsock_guest::wire::{Header, Op, SocketType, HEADER_LEN};
use vsock_guest::{
    Config, Error, Instant, SocketHandle, SocketSlot, VsockAddr, VsockDevice, VMADDR_CID_ANY,
};

/// The driver under test, on the fake HAL and transport.
pub type Device<'a> = VsockDevice<'a, FakeHal, FakeTransport>;

/// The guest's CID, as the device reports it.
pub const GUEST_CID: u64 = 3;
/// The host's CID (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;
/// Feature bit VIRTIO_F_VERSION_1.
pub const VERSION_1: u64 = 1 << 32;
/// Feature bit VIRTIO_F_RING_EVENT_IDX.
pub const RING_EVENT_IDX: u64 = 1 << 29;
/// The features the fake device offers.
pub const FEATURES: u64 = VERSION_1 | RING_EVENT_IDX | 1; // VERSION_1 | RING_EVENT_IDX | STREAM
/// The port the guest listens on.
pub const GUEST_PORT: u32 = 1234;
/// The host's port of the connection under test.
pub const HOST_PORT: u32 = 5000;
/// The host's receive buffer, where a test does not care.
pub const HOST_BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload of one transmitted packet in [`test_config`].
pub const MAX_TX_PAYLOAD: usize = 4096;
/// Bytes per receive buffer in [`test_config`].
pub const RX_BUFFER_SIZE: usize = 4096;

/// The configuration the tests count packets in: `Config::default()` with 4096-byte
/// receive buffers and transmitted packets of at most [`MAX_TX_PAYLOAD`] bytes of payload,
/// so that a few kilobytes make several packets, and no send buffer beyond the peer's
/// credit, so that `send` takes exactly what the peer has room for (tests of the send
/// buffer set `send_buffer` themselves).
pub fn test_config() -> Config {
    Config {
        rx_buffer_size: RX_BUFFER_SIZE,
        tx_packet_size: HEADER_LEN + MAX_TX_PAYLOAD,
        send_buffer: 0,
        ..Config::default()
    }
}

/// A stream header from `src` to `dst` (each a CID and a port): no flags, no payload.
pub fn stream_header(
    src: (u64, u32),
    dst: (u64, u32),
    op: Op,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> Header {
    Header {
        src_cid: src.0,
        dst_cid: dst.0,
        src_port: src.1,
        dst_port: dst.1,
        len: 0,
        socket_type: SocketType::Stream as u16,
        op: op as u16,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

/// A packet the host sends on the connection HOST_PORT → GUEST_PORT.
pub fn from_host(op: Op, buf_alloc: u32, fwd_cnt: u32) -> Header {
    stream_header(
        (HOST_CID, HOST_PORT),
        (GUEST_CID, GUEST_PORT),
        op,
        buf_alloc,
        fwd_cnt,
    )
}

/// The packet the guest must send on the connection GUEST_PORT → HOST_PORT.
pub fn to_host(op: Op, buf_alloc: u32, fwd_cnt: u32) -> Header {
    stream_header(
        (GUEST_CID, GUEST_PORT),
        (HOST_CID, HOST_PORT),
        op,
        buf_alloc,
        fwd_cnt,
    )
}

/// `header` as sent from host port `port` (to GUEST_PORT).
pub fn from_port(port: u32, header: Header) -> Header {
    Header {
        src_port: port,
        ..header
    }
}

/// The RST answering `header`, sent for no socket: addresses swapped, no credit (B13).
pub fn rst_for(header: &Header) -> Header {
    Header {
        src_cid: header.dst_cid,
        dst_cid: header.src_cid,
        src_port: header.dst_port,
        dst_port: header.src_port,
        len: 0,
        socket_type: header.socket_type,
        op: Op::Rst as u16,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

/// The RW packet `header` (with `len` set) and `payload`.
pub fn rw(header: Header, payload: &[u8]) -> Packet {
    Packet {
        header: Header {
            len: payload.len() as u32,
            ..header
        },
        payload: payload.to_vec(),
    }
}

/// The RW packet the guest must send to HOST_PORT with `payload`.
pub fn rw_to_host(payload: &[u8], buf_alloc: u32, fwd_cnt: u32) -> Packet {
    rw(to_host(Op::Rw, buf_alloc, fwd_cnt), payload)
}

/// The instant `millis` milliseconds after time zero.
pub fn ms(millis: u64) -> Instant {
    Instant::from_millis(millis)
}

/// A recognisable byte stream.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Takes everything on the tx ring, checks that none of it carries a payload, and returns
/// the headers.
pub fn control(model: &mut DeviceModel) -> Vec<Header> {
    model
        .drain_tx()
        .into_iter()
        .map(|packet| {
            assert!(
                packet.payload.is_empty(),
                "control packet with payload: {packet:?}"
            );
            packet.header
        })
        .collect()
}

/// A fake transport for a device with GUEST_CID and FEATURES, and the model playing it.
pub fn new_transport() -> (FakeTransport, DeviceModel) {
    let transport = FakeTransport::new(GUEST_CID, FEATURES);
    let model = DeviceModel::new(&transport);
    (transport, model)
}

/// The caller's memory for a device: socket slots and the receive memory they share.
pub struct Storage {
    pub slots: Vec<SocketSlot>,
    pub rx_memory: Vec<u8>,
}

/// `sockets` empty slots sharing `rx_bytes` bytes of receive memory.
pub fn storage(sockets: usize, rx_bytes: usize) -> Storage {
    Storage {
        slots: (0..sockets).map(|_| SocketSlot::EMPTY).collect(),
        rx_memory: vec![0u8; rx_bytes],
    }
}

/// Brings the driver up on `transport` with `config` and `storage`; panics if it fails.
pub fn bring_up<'a>(
    transport: &FakeTransport,
    config: Config,
    storage: &'a mut Storage,
) -> Device<'a> {
    VsockDevice::<FakeHal, _>::new(
        transport.clone(),
        config,
        &mut storage.slots,
        &mut storage.rx_memory,
    )
    .expect("bring-up")
}

/// A socket bound to `port` on any CID, listening with `backlog`.
pub fn listen_on(vsock: &mut Device<'_>, port: u32, backlog: usize) -> SocketHandle {
    let listener = vsock.stream_socket().unwrap();
    vsock
        .bind(listener, VsockAddr::new(VMADDR_CID_ANY, port))
        .unwrap();
    vsock.listen(listener, backlog).unwrap();
    listener
}

/// A socket listening on GUEST_PORT with a backlog of 4.
pub fn listen(vsock: &mut Device<'_>) -> SocketHandle {
    listen_on(vsock, GUEST_PORT, 4)
}

/// The host connects with `request` (a REQUEST header); checks the RESPONSE (our
/// `buf_alloc`, addresses swapped) and accepts the connection.
pub fn accept_request(
    vsock: &mut Device<'_>,
    model: &mut DeviceModel,
    listener: SocketHandle,
    request: Header,
    now: Instant,
) -> SocketHandle {
    model.deliver(&request, &[]).unwrap();
    vsock.poll(now);
    let per = vsock.rx_buffer_per_socket() as u32;
    let response = stream_header(
        (GUEST_CID, request.dst_port),
        (request.src_cid, request.src_port),
        Op::Response,
        per,
        0,
    );
    assert_eq!(control(model), [response]);
    let (conn, peer) = vsock.accept(listener).unwrap();
    assert_eq!(
        peer,
        VsockAddr::new(request.src_cid as u32, request.src_port)
    );
    conn
}

/// The host connects from `host_port` to GUEST_PORT with receive buffer `host_buf_alloc`.
pub fn accept_from(
    vsock: &mut Device<'_>,
    model: &mut DeviceModel,
    listener: SocketHandle,
    host_port: u32,
    host_buf_alloc: u32,
    now: Instant,
) -> SocketHandle {
    let request = from_port(host_port, from_host(Op::Request, host_buf_alloc, 0));
    accept_request(vsock, model, listener, request, now)
}

/// The host connects from HOST_PORT with receive buffer `host_buf_alloc`; checks the
/// RESPONSE and accepts the connection.
pub fn accept_host(
    vsock: &mut Device<'_>,
    model: &mut DeviceModel,
    listener: SocketHandle,
    host_buf_alloc: u32,
    now: Instant,
) -> SocketHandle {
    accept_from(vsock, model, listener, HOST_PORT, host_buf_alloc, now)
}

/// Brings the driver up on `storage` with `config`, listens on GUEST_PORT and accepts the
/// host's connection from HOST_PORT (receive buffer HOST_BUF_ALLOC) at 1 ms; returns the
/// device, the listener and the connection.
pub fn serve_host<'a>(
    transport: &FakeTransport,
    model: &mut DeviceModel,
    storage: &'a mut Storage,
    config: Config,
) -> (Device<'a>, SocketHandle, SocketHandle) {
    let mut vsock = bring_up(transport, config, storage);
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, model, listener, HOST_BUF_ALLOC, ms(1));
    (vsock, listener, conn)
}

/// A new socket connects to `peer`; checks that the REQUEST goes out at once, from our
/// port `guest_port` and advertising `buf_alloc`, and returns the (connecting) socket.
pub fn start_connect(
    vsock: &mut Device<'_>,
    model: &mut DeviceModel,
    peer: VsockAddr,
    guest_port: u32,
    buf_alloc: u32,
) -> SocketHandle {
    let socket = vsock.stream_socket().unwrap();
    assert_eq!(vsock.connect(socket, peer), Err(Error::InProgress));
    let request = stream_header(
        (GUEST_CID, guest_port),
        (u64::from(peer.cid), peer.port),
        Op::Request,
        buf_alloc,
        0,
    );
    assert_eq!(control(model), [request]);
    socket
}
