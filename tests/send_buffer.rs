//! The send buffer (`Config::send_buffer`) and in-place sends (`send_with`), driven through
//! the device model: `send` takes bytes beyond the peer's credit, and they go out, in
//! order and in whole packets within the credit (B25), as the peer makes room; what waits
//! goes before the SHUTDOWN (B35, B36) and is dropped when it can never be delivered
//! (B33, B36, B38); transmit memory always comes back.

mod common;

use common::{
    accept_host, bring_up, control, from_host, listen, ms, new_transport, pattern, rw_to_host,
    storage, test_config, to_host, MAX_TX_PAYLOAD,
};
use vsock_guest::testing::DeviceModel;
use vsock_guest::wire::{Header, Op, ShutdownFlags};
use vsock_guest::{Config, Error, Readiness, Shutdown};

/// Our receive buffer per connection in these tests.
const PER: u32 = 16 * 1024;

/// `test_config()` with a send buffer of `send_buffer` bytes.
fn buffered(send_buffer: usize) -> Config {
    Config {
        send_buffer,
        ..test_config()
    }
}

/// The host's credit update: receive buffer `buf_alloc`, `fwd_cnt` bytes consumed.
fn credit(model: &mut DeviceModel, buf_alloc: u32, fwd_cnt: u32) {
    model
        .deliver(&from_host(Op::CreditUpdate, buf_alloc, fwd_cnt), &[])
        .unwrap();
}

fn with_flags(flags: ShutdownFlags, header: Header) -> Header {
    Header {
        flags: flags.bits(),
        ..header
    }
}

#[test]
fn send_takes_bytes_beyond_the_credit_and_they_follow_as_credit_comes() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * PER as usize);
    let mut vsock = bring_up(&transport, buffered(3000), &mut storage);
    let listener = listen(&mut vsock);
    // The host has 1000 bytes of room. A packet that waits holds at most that: the host
    // can take it whole once it has read everything before it.
    let conn = accept_host(&mut vsock, &mut model, listener, 1000, ms(1));
    let data = pattern(10_000);

    // 1000 bytes go out now; 3000 more wait; the rest is refused.
    assert_eq!(vsock.send(conn, &data), Ok(4000));
    assert_eq!(vsock.send_queue(conn), Ok(3000));
    assert_eq!(vsock.send(conn, &data[4000..]), Err(Error::WouldBlock));
    assert_eq!(vsock.send_room(conn), Ok(0));
    assert!(!vsock.readiness(conn).unwrap().contains(Readiness::WRITABLE));
    assert_eq!(
        model.drain_tx(),
        // B29: no CREDIT_REQUEST: the host holds 1000 bytes it has not acknowledged and
        // reports them as it reads.
        [rw_to_host(&data[..1000], PER, 0)]
    );
    // The host read 600: not room enough for the waiting 1000-byte packet. With only 400
    // bytes in flight the host's space would not run low, so no update of its own would
    // come: the packet's first 600 bytes go in a packet of their own (B25: what fits).
    credit(&mut model, 1000, 600);
    vsock.poll(ms(2));
    assert_eq!(model.drain_tx(), [rw_to_host(&data[1000..1600], PER, 0)]);
    // All 1000 read: the rest of that packet, and the next needs more than the nothing
    // left.
    credit(&mut model, 1000, 1000);
    vsock.poll(ms(3));
    assert_eq!(model.drain_tx(), [rw_to_host(&data[1600..2000], PER, 0)]);
    assert_eq!(vsock.send_queue(conn), Ok(2000));
    // Room for new bytes behind the ones that wait.
    assert!(vsock.readiness(conn).unwrap().contains(Readiness::WRITABLE));
    assert_eq!(vsock.send_room(conn), Ok(1000));
    assert_eq!(vsock.send(conn, &data[4000..4500]), Ok(500));
    // The host takes everything that waits, in order, each packet within its credit.
    let mut fwd = 2000;
    while vsock.send_queue(conn) != Ok(0) {
        credit(&mut model, 1000, fwd);
        vsock.poll(ms(4));
        for packet in model.drain_tx() {
            if packet.header.op == Op::CreditRequest as u16 {
                continue; // B29: asked while the oldest packet needs more than there is
            }
            assert_eq!(packet.header.op, Op::Rw as u16);
            let at = fwd as usize;
            assert_eq!(packet.payload, &data[at..at + packet.payload.len()]);
            fwd += packet.payload.len() as u32;
        }
    }
    assert_eq!(fwd, 4500);
    vsock.poll(ms(5));
    assert_eq!(
        vsock.tx_memory_in_use(),
        0,
        "every packet went to the device"
    );
}

#[test]
fn small_sends_while_blocked_share_a_packet() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * PER as usize);
    let mut vsock = bring_up(&transport, buffered(64 * 1024), &mut storage);
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, 64 * 1024, ms(1));
    let data = pattern(64 * 1024 + 300);
    // The window is full; thirty 10-byte sends wait in one packet.
    assert_eq!(vsock.send(conn, &data[..64 * 1024]), Ok(64 * 1024));
    assert_eq!(model.drain_tx().len(), 16);
    for i in 0..30 {
        let at = 64 * 1024 + 10 * i;
        assert_eq!(vsock.send(conn, &data[at..at + 10]), Ok(10));
    }
    // The host holds the whole window unacknowledged: no CREDIT_REQUEST (B29).
    assert_eq!(control(&mut model), []);
    credit(&mut model, 64 * 1024, 64 * 1024);
    vsock.poll(ms(2));
    assert_eq!(
        model.drain_tx(),
        [rw_to_host(&data[64 * 1024..], PER, 0)],
        "one packet for the thirty sends"
    );
}

#[test]
fn send_with_writes_in_place() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * PER as usize);
    let mut vsock = bring_up(&transport, buffered(8192), &mut storage);
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, 1000, ms(1));

    // The space offered is what the credit allows for a packet that goes out now.
    let mut offered = 0;
    let n = vsock.send_with(conn, |space| {
        offered = space.len();
        space[..3].copy_from_slice(b"abc");
        3
    });
    assert_eq!((n, offered), (Ok(3), 1000));
    assert_eq!(model.drain_tx(), [rw_to_host(b"abc", PER, 0)]);
    // A writer that writes nothing sends nothing.
    assert_eq!(vsock.send_with(conn, |_| 0), Err(Error::WouldBlock));
    assert_eq!(model.drain_tx(), []);
    // A writer that claims more than it was given is held to the space.
    let n = vsock.send_with(conn, |space| {
        space.fill(b'z');
        usize::MAX
    });
    assert_eq!(n, Ok(997));
    assert_eq!(model.drain_tx(), [rw_to_host(&[b'z'; 997], PER, 0)]);
    // Out of credit: the next packet waits; it may hold the host's whole buffer (a
    // window under 4 KiB is not cut into smaller packets).
    let n = vsock.send_with(conn, |space| {
        offered = space.len();
        space.fill(b'w');
        space.len()
    });
    assert_eq!((n, offered), (Ok(1000), 1000));
    assert_eq!(vsock.send_queue(conn), Ok(1000));
    // The host holds its whole buffer unacknowledged: no CREDIT_REQUEST (B29).
    assert_eq!(control(&mut model), []);
    credit(&mut model, 1000, 1000);
    vsock.poll(ms(2));
    assert_eq!(model.drain_tx(), [rw_to_host(&[b'w'; 1000], PER, 0)]);

    // Not connected, shut down: the writer is not called.
    vsock.shutdown(conn, Shutdown::Write).unwrap();
    let called = std::cell::Cell::new(false);
    let result = vsock.send_with(conn, |_| {
        called.set(true);
        1
    });
    assert_eq!(result, Err(Error::BrokenPipe));
    assert!(!called.get());
}

#[test]
fn b35_shutdown_goes_after_the_data_that_waits() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * PER as usize);
    let mut vsock = bring_up(&transport, buffered(4000), &mut storage);
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, 1000, ms(1));
    let data = pattern(1500);
    assert_eq!(vsock.send(conn, &data), Ok(1500));
    model.drain_tx();
    vsock.shutdown(conn, Shutdown::Write).unwrap();
    assert_eq!(vsock.send(conn, b"x"), Err(Error::BrokenPipe));
    assert_eq!(model.drain_tx(), [], "the SHUTDOWN waits for the 500 bytes");
    credit(&mut model, 1000, 1000);
    vsock.poll(ms(2));
    assert_eq!(
        model.drain_tx(),
        [
            rw_to_host(&data[1000..], PER, 0),
            rw(
                with_flags(ShutdownFlags::SEND, to_host(Op::Shutdown, PER, 0)),
                &[]
            ),
        ]
    );
}

#[test]
fn b36_close_sends_what_waits_then_shuts_down_and_a_timeout_drops_the_rest() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(3, 3 * PER as usize);
    let mut vsock = bring_up(&transport, buffered(4000), &mut storage);
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, 1000, ms(1));
    let data = pattern(3000);
    assert_eq!(vsock.send(conn, &data), Ok(3000));
    model.drain_tx();
    vsock.close(conn).unwrap();
    assert_eq!(model.drain_tx(), []);
    // The close goes on without the handle: 1000 more bytes of room, 1000 go out.
    credit(&mut model, 1000, 1000);
    vsock.poll(ms(2));
    assert_eq!(model.drain_tx(), [rw_to_host(&data[1000..2000], PER, 0)]);
    vsock.poll(ms(3));
    assert!(vsock.tx_memory_in_use() > 0, "1000 bytes still wait");
    // No more room before the close timeout (8 s): RST, no SHUTDOWN, and the memory
    // comes back.
    vsock.poll(ms(8001));
    assert_eq!(control(&mut model), [to_host(Op::Rst, PER, 0)]);
    vsock.poll(ms(8002));
    assert_eq!(vsock.tx_memory_in_use(), 0);
}

#[test]
fn b33_b38_data_that_can_never_be_delivered_is_dropped_and_its_memory_returned() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(3, 3 * PER as usize);
    let mut vsock = bring_up(&transport, buffered(4000), &mut storage);
    let listener = listen(&mut vsock);

    // The host stops receiving (B33): what waits is dropped, sending fails.
    let conn = accept_host(&mut vsock, &mut model, listener, 1000, ms(1));
    assert_eq!(vsock.send(conn, &pattern(2000)), Ok(2000));
    model.drain_tx();
    assert!(vsock.tx_memory_in_use() > 0);
    let shutdown = with_flags(ShutdownFlags::RECEIVE, from_host(Op::Shutdown, 1000, 1000));
    model.deliver(&shutdown, &[]).unwrap();
    vsock.poll(ms(2));
    assert_eq!(model.drain_tx(), []);
    assert_eq!(vsock.send_queue(conn), Ok(0));
    assert_eq!(vsock.tx_memory_in_use(), 0);
    assert_eq!(vsock.send(conn, b"x"), Err(Error::BrokenPipe));
    vsock.abort(conn).unwrap();
    model.drain_tx();

    // The host resets the connection (B38): the same.
    let conn = accept_host(&mut vsock, &mut model, listener, 1000, ms(3));
    assert_eq!(vsock.send(conn, &pattern(2000)), Ok(2000));
    model.drain_tx();
    model.deliver(&from_host(Op::Rst, 1000, 0), &[]).unwrap();
    vsock.poll(ms(4));
    assert_eq!(model.drain_tx(), []);
    assert_eq!(vsock.tx_memory_in_use(), 0);
    assert_eq!(vsock.send(conn, b"x"), Err(Error::ConnectionReset));
    vsock.close(conn).unwrap();

    // abort drops it at once.
    let conn = accept_host(&mut vsock, &mut model, listener, 1000, ms(5));
    assert_eq!(vsock.send(conn, &pattern(2000)), Ok(2000));
    model.drain_tx();
    vsock.abort(conn).unwrap();
    assert_eq!(control(&mut model), [to_host(Op::Rst, PER, 0)]);
    vsock.poll(ms(6));
    assert_eq!(vsock.tx_memory_in_use(), 0);
}

#[test]
fn b25_a_packet_larger_than_the_peers_shrunk_buffer_goes_out_in_parts() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(2, 2 * PER as usize);
    let mut vsock = bring_up(&transport, buffered(8000), &mut storage);
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, 4000, ms(1));
    let data = pattern(5000);
    // 4000 go now, a 1000-byte packet waits.
    assert_eq!(vsock.send(conn, &data), Ok(5000));
    assert_eq!(model.drain_tx(), [rw_to_host(&data[..4000], PER, 0)]);
    // The host shrinks its buffer to 300 bytes, all free: the waiting packet can never
    // go whole, so it goes in parts, each within the credit.
    credit(&mut model, 300, 4000);
    vsock.poll(ms(2));
    let mut sent = Vec::new();
    for round in 0..4 {
        for packet in model.drain_tx() {
            assert!(packet.payload.len() <= 300, "{}", packet.payload.len());
            sent.extend_from_slice(&packet.payload);
        }
        credit(&mut model, 300, 4000 + sent.len() as u32);
        vsock.poll(ms(3 + round));
    }
    assert_eq!(sent, &data[4000..]);
    assert_eq!(vsock.send_queue(conn), Ok(0));
}

#[test]
fn memory_is_shared_and_a_full_arena_refuses_bytes() {
    let (transport, mut model) = new_transport();
    let mut storage = storage(3, 3 * PER as usize);
    // 16 chunks of 512 bytes: room for 7680 bytes of payload in 512-byte packets.
    let config = Config {
        tx_memory: 8192,
        tx_packet_size: 512,
        ..buffered(64 * 1024)
    };
    let mut vsock = bring_up(&transport, config, &mut storage);
    let listener = listen(&mut vsock);
    let conn = accept_host(&mut vsock, &mut model, listener, 1 << 20, ms(1));
    // The device takes nothing: 14 packets of 468 bytes fill what data may take (the
    // RESPONSE holds one chunk until a poll takes it back, and one, a sixteenth of the
    // arena, is kept for control packets).
    let taken = vsock.send(conn, &pattern(20_000)).unwrap();
    assert_eq!(taken, 14 * (512 - 44));
    assert_eq!(vsock.tx_memory_in_use(), 8192 - 512);
    assert_eq!(vsock.send(conn, b"x"), Err(Error::WouldBlock));
    assert_eq!(vsock.send_room(conn), Ok(0));
    assert!(!vsock.readiness(conn).unwrap().contains(Readiness::WRITABLE));
    // A control packet still goes out, in the reserve: here a SHUTDOWN(RECEIVE).
    vsock.shutdown(conn, Shutdown::Read).unwrap();
    assert_eq!(vsock.tx_memory_in_use(), 8192);
    // The device takes them: memory comes back at the next poll.
    let sent = model.drain_tx();
    assert_eq!(sent.len(), 15);
    assert_eq!(sent[14].header.op, Op::Shutdown as u16);
    vsock.poll(ms(2));
    assert_eq!(vsock.tx_memory_in_use(), 0);
    assert!(vsock.readiness(conn).unwrap().contains(Readiness::WRITABLE));
    assert_eq!(MAX_TX_PAYLOAD, 4096);
}

/// The RW (or control) packet `header` with `payload`.
fn rw(header: Header, payload: &[u8]) -> vsock_guest::testing::Packet {
    common::rw(header, payload)
}
