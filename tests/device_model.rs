//! The driver's queues driven by the device model: the model plays the device, delivers
//! packets into the driver's rx buffers and checks what the driver puts on the tx ring.

mod common;

use common::{
    bring_up, listen, new_transport, storage, stream_header, test_config, Device, FEATURES,
    GUEST_CID, GUEST_PORT, HOST_CID,
};
use vsock_guest::testing::{DeviceModel, FakeHal, FakeTransport, Packet};
use vsock_guest::wire::{Header, Op, SocketType};
use vsock_guest::{Error, Instant, Readiness, SocketHandle, SocketSlot, VsockAddr, VsockDevice};

const RX_PER_SOCKET: usize = 64 * 1024;

/// A packet the host sends from `host_port` to `guest_port`, advertising 32 KiB of
/// receive buffer.
fn host_header(op: Op, host_port: u32, guest_port: u32) -> Header {
    stream_header(
        (HOST_CID, host_port),
        (GUEST_CID, guest_port),
        op,
        32 * 1024,
        0,
    )
}

/// A socket bound to GUEST_PORT on our own CID, listening with a backlog of 1.
fn listen_on_own_cid(vsock: &mut Device<'_>) -> SocketHandle {
    let listener = vsock.stream_socket().unwrap();
    vsock
        .bind(listener, VsockAddr::new(GUEST_CID as u32, GUEST_PORT))
        .unwrap();
    vsock.listen(listener, 1).unwrap();
    listener
}

/// Takes the tx ring, checks that it held exactly one packet, and returns that packet.
fn expect_one(model: &mut DeviceModel) -> Packet {
    let mut packets = model.drain_tx();
    assert_eq!(
        packets.len(),
        1,
        "expected exactly one packet, got {packets:?}"
    );
    packets.remove(0)
}

#[test]
fn listen_accept_echo_and_peer_close() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(4, 4 * RX_PER_SOCKET);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    assert_eq!(vsock.local_cid(), 3);
    // B1: features negotiated; B3: event and rx buffers posted, DRIVER_OK set.
    assert_eq!(transport.state().driver_features, FEATURES);
    assert!(transport.state().status.bits() & 4 != 0, "DRIVER_OK");
    assert_eq!(model.available(0), 128, "every rx buffer posted");
    assert_eq!(model.available(2), 4, "four event buffers posted");

    let listener = listen(&mut vsock);

    // B15/B16: REQUEST → RESPONSE at once, peer credit from the REQUEST.
    model
        .deliver(&host_header(Op::Request, 5000, 1234), &[])
        .unwrap();
    vsock.poll(Instant::from_millis(1));
    let response = expect_one(&mut model);
    assert_eq!(
        response.header,
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 5000,
            len: 0,
            socket_type: SocketType::Stream as u16,
            op: Op::Response as u16,
            flags: 0,
            buf_alloc: RX_PER_SOCKET as u32,
            fwd_cnt: 0,
        }
    );
    assert!(vsock
        .readiness(listener)
        .unwrap()
        .contains(Readiness::READABLE));
    let (conn, peer) = vsock.accept(listener).unwrap();
    assert_eq!(peer, VsockAddr::new(2, 5000));
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    assert!(vsock.readiness(conn).unwrap().contains(Readiness::WRITABLE));

    // Data in: poll leaves it where the device put it for `recv`, which copies it out
    // of the rx buffer and reposts the buffer at once (B31); the device sees it at the
    // next poll.
    model
        .deliver(&host_header(Op::Rw, 5000, 1234), b"hello, guest")
        .unwrap();
    vsock.poll(Instant::from_millis(2));
    assert_eq!(vsock.recv_queue(conn), Ok(12));
    assert!(vsock.readiness(conn).unwrap().contains(Readiness::READABLE));
    let mut buf = [0u8; 64];
    let n = vsock.recv(conn, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello, guest");
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::WouldBlock));
    vsock.poll(Instant::from_millis(2));
    assert_eq!(model.available(0), 128, "rx buffer reposted");
    assert!(
        model.drain_tx().is_empty(),
        "B28: no credit update per packet"
    );

    // Data out: header carries our credit (B9), fwd_cnt counts consumed bytes (B27).
    assert_eq!(vsock.send(conn, b"hello, host"), Ok(11));
    let data = expect_one(&mut model);
    assert_eq!(data.header.op, Op::Rw as u16);
    assert_eq!(data.header.len, 11);
    assert_eq!((data.header.src_port, data.header.dst_port), (1234, 5000));
    assert_eq!(data.header.buf_alloc, RX_PER_SOCKET as u32);
    assert_eq!(data.header.fwd_cnt, 12);
    assert_eq!(data.payload, b"hello, host");

    // B25: never beyond the peer's credit (32 KiB advertised, 11 bytes in flight).
    let big = vec![7u8; 40 * 1024];
    let sent = vsock.send(conn, &big).unwrap();
    assert_eq!(sent, 32 * 1024 - 11);
    let total: usize = model.drain_tx().iter().map(|p| p.payload.len()).sum();
    assert_eq!(total, sent);
    // Out of credit: WouldBlock. The peer holds all 32 KiB unacknowledged and reports
    // them as it reads: no CREDIT_REQUEST until the credit probe (B29).
    assert_eq!(vsock.send(conn, &big), Err(Error::WouldBlock));
    assert!(model.drain_tx().is_empty(), "no CREDIT_REQUEST yet");
    // The peer consumes: a CREDIT_UPDATE opens the window again.
    let mut update = host_header(Op::CreditUpdate, 5000, 1234);
    update.fwd_cnt = (32 * 1024) as u32;
    model.deliver(&update, &[]).unwrap();
    vsock.poll(Instant::from_millis(3));
    assert_eq!(vsock.send(conn, &big[..100]), Ok(100));
    model.drain_tx();

    // B29: CREDIT_REQUEST is answered with CREDIT_UPDATE.
    model
        .deliver(&host_header(Op::CreditRequest, 5000, 1234), &[])
        .unwrap();
    vsock.poll(Instant::from_millis(4));
    let credit = expect_one(&mut model);
    assert_eq!(credit.header.op, Op::CreditUpdate as u16);
    assert_eq!(
        (credit.header.buf_alloc, credit.header.fwd_cnt),
        (RX_PER_SOCKET as u32, 12)
    );

    // B13: a packet for no socket gets an RST with the addresses swapped.
    model
        .deliver(&host_header(Op::Rw, 6000, 4444), b"x")
        .unwrap();
    vsock.poll(Instant::from_millis(5));
    let rst = expect_one(&mut model);
    assert_eq!(rst.header.op, Op::Rst as u16);
    assert_eq!((rst.header.src_port, rst.header.dst_port), (4444, 6000));
    assert_eq!(rst.header.dst_cid, HOST_CID);
    // B14: an RST for no socket is dropped silently.
    model
        .deliver(&host_header(Op::Rst, 6000, 4444), &[])
        .unwrap();
    vsock.poll(Instant::from_millis(6));
    assert!(model.drain_tx().is_empty());

    // B33/B34: the peer shuts down both ways: RST back, data then end of stream.
    model
        .deliver(&host_header(Op::Rw, 5000, 1234), b"bye")
        .unwrap();
    let mut shutdown = host_header(Op::Shutdown, 5000, 1234);
    shutdown.flags = 3;
    model.deliver(&shutdown, &[]).unwrap();
    vsock.poll(Instant::from_millis(7));
    let rst = expect_one(&mut model);
    assert_eq!(rst.header.op, Op::Rst as u16);
    assert_eq!((rst.header.src_port, rst.header.dst_port), (1234, 5000));
    assert!(vsock.readiness(conn).unwrap().contains(Readiness::HANG_UP));
    let n = vsock.recv(conn, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"bye");
    assert_eq!(vsock.recv(conn, &mut buf), Ok(0));
    vsock.close(conn).unwrap();
    assert!(
        model.drain_tx().is_empty(),
        "B36: no SHUTDOWN after the connection ended"
    );
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::InvalidHandle));

    // The peer reconnects from the same port (the tuple was freed).
    model
        .deliver(&host_header(Op::Request, 5000, 1234), &[])
        .unwrap();
    vsock.poll(Instant::from_millis(8));
    assert_eq!(expect_one(&mut model).header.op, Op::Response as u16);

    // B8: kicks only when the device asked (the model always asks for the next buffer).
    assert!(model.notifications(1) > 0);
    assert!(vsock.stats().tx_kicks <= vsock.stats().tx_packets);
}

#[test]
fn b33_peer_reset_after_data_keeps_data_then_reports_reset() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 4096);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let listener = listen_on_own_cid(&mut vsock);
    model
        .deliver(&host_header(Op::Request, 7000, 1234), &[])
        .unwrap();
    vsock.poll(Instant::ZERO);
    model.drain_tx();
    let (conn, _) = vsock.accept(listener).unwrap();
    model
        .deliver(&host_header(Op::Rw, 7000, 1234), b"data")
        .unwrap();
    model
        .deliver(&host_header(Op::Rst, 7000, 1234), &[])
        .unwrap();
    vsock.poll(Instant::ZERO);
    assert!(model.drain_tx().is_empty(), "B14: no RST for an RST");
    let mut buf = [0u8; 16];
    assert_eq!(vsock.recv(conn, &mut buf), Ok(4));
    assert_eq!(vsock.recv(conn, &mut buf), Err(Error::ConnectionReset));
    vsock.close(conn).unwrap();

    // B30: a second connection may not overrun its 4 KiB receive buffer.
    model
        .deliver(&host_header(Op::Request, 7001, 1234), &[])
        .unwrap();
    vsock.poll(Instant::ZERO);
    assert_eq!(expect_one(&mut model).header.op, Op::Response as u16);
    let (second, _) = vsock.accept(listener).unwrap();
    model
        .deliver(&host_header(Op::Rw, 7001, 1234), &[1u8; 3000])
        .unwrap();
    model
        .deliver(&host_header(Op::Rw, 7001, 1234), &[2u8; 1500])
        .unwrap();
    vsock.poll(Instant::ZERO);
    let rst = expect_one(&mut model);
    assert_eq!(rst.header.op, Op::Rst as u16);
    assert_eq!(rst.header.dst_port, 7001);
    let mut big = [0u8; 4096];
    assert_eq!(
        vsock.recv(second, &mut big),
        Ok(3000),
        "accepted data stays readable"
    );
    assert!(big[..3000].iter().all(|&b| b == 1));
    assert_eq!(vsock.recv(second, &mut big), Err(Error::ConnectionReset));
}

#[test]
fn malformed_device_input_is_dropped_and_the_driver_keeps_working() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * 4096);
    let mut vsock = bring_up(&transport, test_config(), &mut storage);
    let _listener = listen_on_own_cid(&mut vsock);

    // B10: header shorter than 44 bytes, len beyond what was written, wrong dst_cid,
    // unknown op: all dropped without a reply.
    model.deliver_raw(&[0u8; 20], 20).unwrap();
    let mut lying = [0u8; 60];
    Header {
        len: 1000,
        ..host_header(Op::Rw, 5000, 1234)
    }
    .emit(&mut lying)
    .unwrap();
    model.deliver_raw(&lying, 60).unwrap();
    model
        .deliver(
            &Header {
                dst_cid: 99,
                ..host_header(Op::Request, 5000, 1234)
            },
            &[],
        )
        .unwrap();
    model
        .deliver(
            &Header {
                op: 42,
                ..host_header(Op::Rw, 5000, 1234)
            },
            &[],
        )
        .unwrap();
    // B6: used length larger than the buffer, and an id that was never posted.
    model.deliver_raw(&[0u8; 44], u32::MAX).unwrap();
    model.push_used(0, 9999, 44).unwrap();
    vsock.poll(Instant::ZERO);
    assert!(model.drain_tx().is_empty());
    assert_eq!(vsock.stats().bad_used_entries, 2);
    assert_eq!(model.available(0), 128, "every valid buffer reposted");

    // B11: an unknown socket type is answered with RST of that type.
    model
        .deliver(
            &Header {
                socket_type: 9,
                ..host_header(Op::Request, 5000, 1234)
            },
            &[],
        )
        .unwrap();
    vsock.poll(Instant::ZERO);
    let rst = expect_one(&mut model);
    assert_eq!((rst.header.op, rst.header.socket_type), (Op::Rst as u16, 9));

    // Still serving.
    model
        .deliver(&host_header(Op::Request, 5000, 1234), &[])
        .unwrap();
    vsock.poll(Instant::ZERO);
    assert_eq!(expect_one(&mut model).header.op, Op::Response as u16);
}

#[test]
fn b2_reserved_cid_fails_bring_up_and_b1_wrong_device_is_no_device() {
    let mut slots = [const { SocketSlot::EMPTY }; 1];
    let mut rx_memory = vec![0u8; 4096];
    for cid in [0u64, 1, 2, 0xFFFF_FFFF, 1 << 32] {
        let transport = FakeTransport::new(cid, FEATURES);
        let result =
            VsockDevice::<FakeHal, _>::new(transport, test_config(), &mut slots, &mut rx_memory);
        assert_eq!(result.err(), Some(Error::DeviceError), "cid {cid:#x}");
    }
    let transport = FakeTransport::new(3, FEATURES);
    transport.state().device_type = virtio_drivers::transport::DeviceType::Network;
    let result =
        VsockDevice::<FakeHal, _>::new(transport, test_config(), &mut slots, &mut rx_memory);
    assert_eq!(result.err(), Some(Error::NoDevice));
}
