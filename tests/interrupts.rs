//! Sleeping until there is work: interrupts asked for only when something waits for them
//! (`VsockDevice::arm_interrupts`), the re-arm race closed, and `poll_at`'s deadlines.
//!
//! The device model interrupts exactly as a device does: with `VIRTIO_F_EVENT_IDX` when
//! the used index passes the driver's `used_event`, without it unless the available ring's
//! `NO_INTERRUPT` flag is set. Each test runs with and without `EVENT_IDX`.

mod common;

use common::{
    bring_up, from_host, listen, ms, new_transport, pattern, serve_host, storage, test_config,
    Device, GUEST_CID, HOST_BUF_ALLOC, HOST_CID, MAX_TX_PAYLOAD, VERSION_1,
};
use core::time::Duration;
use vsock_guest::conn::CREDIT_PROBE_FIRST;
use vsock_guest::device::DEVICE_STALL;
use vsock_guest::testing::{DeviceModel, FakeTransport};
use vsock_guest::wire::Op;
use vsock_guest::{Config, Error, VsockAddr};

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;

/// `VIRTIO_VSOCK_F_STREAM`.
const STREAM: u64 = 1;
/// `VIRTIO_F_RING_EVENT_IDX`.
const EVENT_IDX: u64 = 1 << 29;

/// The two ways a device can be asked for interrupts.
const FEATURE_SETS: [(&str, u64); 2] = [
    ("EVENT_IDX", VERSION_1 | EVENT_IDX | STREAM),
    ("ring flag", VERSION_1 | STREAM),
];

/// `test_config()` with interrupts taken.
fn with_interrupts() -> Config {
    Config {
        interrupts: true,
        ..test_config()
    }
}

fn device_with(features: u64) -> (FakeTransport, DeviceModel) {
    let transport = FakeTransport::new(GUEST_CID, features);
    let model = DeviceModel::new(&transport);
    (transport, model)
}

fn interrupts(model: &DeviceModel) -> [u64; 3] {
    [RX, TX, EVENT].map(|queue| model.interrupts(queue))
}

/// The host sends `count` one-byte packets on the connection.
fn host_sends(model: &mut DeviceModel, count: usize) {
    for i in 0..count {
        model
            .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), &[i as u8])
            .unwrap();
    }
}

#[test]
fn a_device_never_interrupts_a_driver_that_polls() {
    for (what, features) in FEATURE_SETS {
        // Interrupts off (the default): arm_interrupts says to poll, and arms nothing.
        let (transport, mut model) = device_with(features);
        let mut memory = storage(2, 2 * 16 * 1024);
        let (mut vsock, _, conn) = serve_host(&transport, &mut model, &mut memory, test_config());
        assert!(!vsock.arm_interrupts(), "{what}");
        host_sends(&mut model, 3);
        vsock.poll(ms(2));
        assert_eq!(vsock.send(conn, b"x"), Ok(1));
        model.drain_tx();
        assert_eq!(interrupts(&model), [0, 0, 0], "{what}");
        assert!(!vsock.ack_interrupt());

        // Interrupts on, but a busy loop that never arms them: none either.
        let (transport, mut model) = device_with(features);
        let mut memory = storage(2, 2 * 16 * 1024);
        let (mut vsock, _, conn) =
            serve_host(&transport, &mut model, &mut memory, with_interrupts());
        for round in 0..5 {
            host_sends(&mut model, 4);
            vsock.poll(ms(2 + round));
            let mut buf = [0u8; 16];
            assert_eq!(vsock.recv(conn, &mut buf), Ok(4));
            assert_eq!(vsock.send(conn, &buf[..4]), Ok(4));
            model.drain_tx();
        }
        assert_eq!(interrupts(&model), [0, 0, 0], "{what}");
        assert_eq!(vsock.stats().interrupts, 0);
    }
}

#[test]
fn an_armed_device_interrupts_for_what_arrives_and_the_next_poll_disarms_it() {
    for (what, features) in FEATURE_SETS {
        let (transport, mut model) = device_with(features);
        let mut memory = storage(2, 2 * 16 * 1024);
        let (mut vsock, _, conn) =
            serve_host(&transport, &mut model, &mut memory, with_interrupts());
        vsock.poll(ms(2));
        model.drain_tx();
        assert!(
            vsock.arm_interrupts(),
            "{what}: nothing waits, safe to sleep"
        );
        assert_eq!(interrupts(&model), [0, 0, 0]);
        host_sends(&mut model, 3);
        let raised = model.interrupts(RX);
        if features & EVENT_IDX != 0 {
            assert_eq!(
                raised, 1,
                "{what}: one interrupt, however many packets follow"
            );
        } else {
            assert!(raised >= 1, "{what}");
        }
        assert!(vsock.ack_interrupt(), "{what}: it was ours");
        assert!(!vsock.ack_interrupt(), "{what}: and only once");
        assert_eq!(vsock.stats().interrupts, 1);
        // The kernel polls: busy again, no interrupt for what follows.
        vsock.poll(ms(3));
        let mut buf = [0u8; 16];
        assert_eq!(vsock.recv(conn, &mut buf), Ok(3));
        host_sends(&mut model, 5);
        vsock.poll(ms(4));
        assert_eq!(model.interrupts(RX), raised, "{what}: disarmed by the poll");
        assert_eq!(vsock.recv(conn, &mut buf), Ok(5));
        // Armed again, an event interrupts too (a transport reset must wake a sleeper).
        assert!(vsock.arm_interrupts(), "{what}");
        model.push_event(7).unwrap();
        assert_eq!(model.interrupts(EVENT), 1, "{what}");
        assert!(vsock.ack_interrupt());
    }
}

#[test]
fn arming_after_a_packet_landed_says_poll_again_instead_of_sleeping() {
    for (what, features) in FEATURE_SETS {
        let (transport, mut model) = device_with(features);
        let mut memory = storage(2, 2 * 16 * 1024);
        let (mut vsock, _, conn) =
            serve_host(&transport, &mut model, &mut memory, with_interrupts());
        vsock.poll(ms(2));
        // A packet lands after the last poll and before the kernel arms: the device, told
        // not to interrupt, raises none for it. Arming sees it and says to poll.
        host_sends(&mut model, 1);
        assert_eq!(model.interrupts(RX), 0);
        assert!(!vsock.arm_interrupts(), "{what}: a packet is waiting");
        vsock.poll(ms(3));
        let mut buf = [0u8; 4];
        assert_eq!(vsock.recv(conn, &mut buf), Ok(1), "{what}");
        // Nothing waits now: safe to sleep; the next packet interrupts.
        assert!(vsock.arm_interrupts(), "{what}");
        host_sends(&mut model, 1);
        assert!(model.interrupts(RX) >= 1, "{what}");
        assert!(vsock.ack_interrupt());
        // An event that lands before arming: the same.
        vsock.poll(ms(4));
        model.push_event(7).unwrap();
        assert!(!vsock.arm_interrupts(), "{what}: an event is waiting");
        vsock.poll(ms(5));
        assert!(vsock.arm_interrupts(), "{what}");
    }
}

#[test]
fn transmit_completions_interrupt_only_while_a_sender_waits_for_the_device() {
    for (what, features) in FEATURE_SETS {
        // Room to spare: the device takes the packet, and nobody needs to hear of it.
        let (transport, mut model) = device_with(features);
        let mut memory = storage(2, 2 * 16 * 1024);
        let config = Config {
            queue_size: 8,
            ..with_interrupts()
        };
        let (mut vsock, _, conn) = serve_host(&transport, &mut model, &mut memory, config);
        vsock.poll(ms(2));
        assert_eq!(vsock.send(conn, b"hello"), Ok(5));
        assert!(vsock.arm_interrupts(), "{what}");
        assert_eq!(model.drain_tx().len(), 1);
        assert_eq!(model.interrupts(TX), 0, "{what}: no sender waits");
        assert!(!vsock.ack_interrupt());
        // Every descriptor with the device, and more data to send: now the device's
        // taking a packet is what the sender waits for.
        vsock.poll(ms(3));
        let data = pattern(9 * MAX_TX_PAYLOAD);
        assert_eq!(vsock.send(conn, &data), Ok(8 * MAX_TX_PAYLOAD));
        assert_eq!(vsock.send(conn, &data), Err(Error::WouldBlock));
        assert!(vsock.arm_interrupts(), "{what}");
        assert!(model.pop_tx().is_some());
        assert!(model.interrupts(TX) >= 1, "{what}: the sender is woken");
        assert!(vsock.ack_interrupt());
        vsock.poll(ms(4));
        assert_eq!(
            vsock.send(conn, &data[..MAX_TX_PAYLOAD]),
            Ok(MAX_TX_PAYLOAD)
        );
    }
}

#[test]
fn poll_at_gives_each_kind_of_deadline_and_none_when_only_the_device_can_make_work() {
    let (transport, mut model) = new_transport();
    let mut memory = storage(4, 4 * 16 * 1024);
    let config = Config {
        connect_timeout: Duration::from_millis(500),
        close_timeout: Duration::from_millis(3000),
        ..with_interrupts()
    };
    let mut vsock: Device<'_> = bring_up(&transport, config, &mut memory);
    let listener = listen(&mut vsock);
    vsock.poll(ms(10));
    assert_eq!(
        vsock.poll_at(),
        None,
        "idle, listening: only the device makes work"
    );

    // A connect: its timeout.
    let client = vsock.stream_socket().unwrap();
    assert_eq!(
        vsock.connect(client, VsockAddr::new(HOST_CID as u32, 7000)),
        Err(Error::InProgress)
    );
    assert_eq!(vsock.poll_at(), Some(ms(510)));
    vsock.abort(client).unwrap();
    // The device holds the REQUEST and the RST: the queue watch looks again 100 ms on.
    vsock.poll(ms(20));
    assert_eq!(vsock.poll_at(), Some(ms(20) + DEVICE_STALL));
    model.drain_tx();
    vsock.poll(ms(21));
    assert_eq!(
        vsock.poll_at(),
        None,
        "the device took them: nothing to watch"
    );

    // A connection blocked on credit: its probe.
    let conn = {
        let request = from_host(Op::Request, 100, 0);
        model.deliver(&request, &[]).unwrap();
        vsock.poll(ms(30));
        model.drain_tx();
        vsock.accept(listener).unwrap().0
    };
    assert_eq!(vsock.send(conn, &pattern(100)), Ok(100));
    assert_eq!(vsock.send(conn, b"x"), Err(Error::WouldBlock));
    model.drain_tx();
    assert_eq!(vsock.poll_at(), Some(ms(30) + CREDIT_PROBE_FIRST));
    // The probe fires and the next one waits twice as long.
    vsock.poll(ms(40));
    model.drain_tx();
    assert_eq!(vsock.poll_at(), Some(ms(40) + 2 * CREDIT_PROBE_FIRST));

    // A close (its timeout counts from the last poll, at 40 ms), beside the probe: the
    // earlier one.
    vsock.close(conn).unwrap();
    vsock.poll(ms(50));
    model.drain_tx();
    assert_eq!(vsock.poll_at(), Some(ms(40) + 2 * CREDIT_PROBE_FIRST));
    // The probe is gone once credit comes; the close timeout stays.
    model
        .deliver(&from_host(Op::CreditUpdate, 1 << 20, 100), &[])
        .unwrap();
    vsock.poll(ms(55));
    model.drain_tx();
    assert_eq!(vsock.poll_at(), Some(ms(3040)));

    // A device that sits on a transmit packet: the watch's check, 100 ms on.
    let (transport, mut model) = new_transport();
    let mut memory2 = storage(2, 2 * 16 * 1024);
    let (mut vsock, _, conn) = serve_host(&transport, &mut model, &mut memory2, with_interrupts());
    vsock.poll(ms(2));
    model.drain_tx();
    vsock.poll(ms(3));
    assert_eq!(vsock.poll_at(), None);
    assert_eq!(vsock.send(conn, b"held"), Ok(4));
    vsock.poll(ms(4));
    assert_eq!(vsock.poll_at(), Some(ms(4) + DEVICE_STALL));
    assert_eq!(model.drain_tx().len(), 1);
    vsock.poll(ms(5));
    assert_eq!(vsock.poll_at(), None, "taken back: nothing to watch");
}
