//! Bulk sending against a peer with a small receive window (B25, B28, B29): the driver
//! cuts its packets so that the peer's CREDIT_UPDATEs come back while data is still in
//! flight, and keeps the device busy with data rather than with credit requests.
//!
//! The measure is the device's idle steps: the scripted host takes one packet from the
//! transmit ring per step (as a device that handles one packet per turn does), reads all
//! it received at once, and answers with a CREDIT_UPDATE when its free space runs low
//! (as Linux and vhost-device-vsock do). A step in which the device took no data while
//! the transfer was unfinished is a bubble in the pipe: a round trip spent waiting for
//! credit, or a step spent on a credit request.

use vsock_guest::testing::{FakeHal, FakeTransport, HostPeer, DEVICE_FEATURES};
use vsock_guest::wire::Op;
use vsock_guest::{Config, Error, Instant, SocketSlot, VsockAddr, VsockDevice, VMADDR_CID_HOST};

const GUEST_CID: u64 = 3;
const HOST_PORT: u32 = 5000;
/// Bytes each transfer moves: 1 MiB, and 32 KiB under Miri, which runs the driver a
/// thousand times slower (256 KiB took it four minutes).
const TOTAL: usize = if cfg!(miri) { 32 * 1024 } else { 1024 * 1024 };

/// What one transfer of TOTAL bytes cost, counted by the host.
#[derive(Debug, Default)]
struct Transfer {
    /// Steps in which the device took no RW packet before the host had everything.
    bubbles: usize,
    /// CREDIT_REQUESTs the driver sent.
    credit_requests: usize,
    /// CREDIT_UPDATEs the driver received (its `Stats::rx_credit_updates`).
    credit_updates: u64,
    /// RW packets the driver sent.
    data_packets: usize,
    /// Steps until the host had everything.
    steps: usize,
}

/// How the scripted host and the application behave.
#[derive(Clone, Copy)]
struct Setup {
    /// The receive buffer the host's connection advertises.
    window: u32,
    /// The host volunteers a CREDIT_UPDATE once the guest's view of its free space falls
    /// under `1 / low_space_divisor` of the window ([`HostPeer::set_low_space_divisor`]).
    low_space_divisor: u32,
    /// The most bytes the application passes to one `send`.
    write: usize,
}

impl Setup {
    /// A host with `window` that returns credit at half of it; one `send` call offers
    /// everything left.
    fn window(window: u32) -> Self {
        Setup {
            window,
            low_space_divisor: 2,
            write: TOTAL,
        }
    }
}

/// Sends TOTAL bytes from a guest with `config` to a host set up as `setup` says, the host
/// device taking one packet per step; checks that the host received the bytes in order
/// and that it saw no violation of the rules.
fn send_total(config: Config, setup: Setup) -> Transfer {
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    host.set_default_buf_alloc(setup.window);
    host.set_low_space_divisor(setup.low_space_divisor);
    host.listen(HOST_PORT);
    let mut slots = [const { SocketSlot::EMPTY }; 2];
    let mut rx_memory = vec![0u8; 2 * config.rx_buffer_size];
    let mut vsock =
        VsockDevice::<FakeHal, _>::new(transport.clone(), config, &mut slots, &mut rx_memory)
            .expect("bring-up");
    let socket = vsock.stream_socket().unwrap();
    assert_eq!(
        vsock.connect(socket, VsockAddr::new(VMADDR_CID_HOST, HOST_PORT)),
        Err(Error::InProgress)
    );
    host.settle(&mut vsock, Instant::from_millis(1));
    let conn = host.accept(HOST_PORT).expect("the host accepted");
    host.set_tx_per_step(Some(1));

    let data: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    let mut received = Vec::with_capacity(TOTAL);
    let mut transfer = Transfer::default();
    // 10 µs per step: a credit probe (10 ms) would show as a thousand bubbles.
    let mut now = 2_000;
    while received.len() < TOTAL {
        assert!(transfer.steps < 100_000, "stuck: {transfer:?}");
        transfer.steps += 1;
        now += 10;
        let now = Instant::from_micros(now);
        vsock.poll(now);
        while sent < TOTAL {
            let end = TOTAL.min(sent + setup.write);
            match vsock.send(socket, &data[sent..end]) {
                Ok(n) => sent += n,
                Err(Error::WouldBlock) => break,
                Err(e) => panic!("send: {e:?}"),
            }
        }
        let taken = host.step();
        let data_taken = taken
            .iter()
            .filter(|p| p.header.op == Op::Rw as u16)
            .count();
        transfer.data_packets += data_taken;
        transfer.credit_requests += taken
            .iter()
            .filter(|p| p.header.op == Op::CreditRequest as u16)
            .count();
        received.extend(host.recv_all(conn));
        if data_taken == 0 && received.len() < TOTAL {
            transfer.bubbles += 1;
        }
    }
    assert!(received == data, "the host received the bytes in order");
    assert_eq!(host.violations(), []);
    let stats = vsock.stats();
    assert_eq!(stats.tx_credit_requests, transfer.credit_requests as u64);
    transfer.credit_updates = stats.rx_credit_updates;
    transfer
}

#[test]
fn b25_b29_a_64_kib_window_keeps_data_in_flight() {
    // The window vhost-device-vsock advertises by default, with a host that returns
    // credit at half its window and with one that waits until under a quarter is left
    // (vhost-device-vsock itself).
    for low_space_divisor in [2, 4] {
        let setup = Setup {
            low_space_divisor,
            ..Setup::window(64 * 1024)
        };
        let transfer = send_total(Config::default(), setup);
        println!("64 KiB window, host updates under 1/{low_space_divisor}: {transfer:?}");
        // Every packet fits half the window, so one is on the way while the host reads
        // the other, and the driver asks for credit only when nothing of its own is on
        // the way: the device never idles and never spends a step on a request.
        assert_eq!(transfer.credit_requests, 0, "{transfer:?}");
        assert_eq!(transfer.bubbles, 0, "{transfer:?}");
        assert_eq!(
            transfer.data_packets,
            TOTAL.div_ceil(32 * 1024),
            "{transfer:?}"
        );
        // About one update per window (or per half window from the eager host).
        assert!(
            transfer.credit_updates as usize >= (TOTAL / (64 * 1024)).saturating_sub(1),
            "{transfer:?}"
        );
    }
}

#[test]
fn b25_a_large_window_still_gets_the_largest_packets() {
    // No smaller packets where the window has room for four of the largest.
    let transfer = send_total(Config::default(), Setup::window(256 * 1024));
    println!("256 KiB window: {transfer:?}");
    assert_eq!(
        transfer.data_packets,
        TOTAL.div_ceil(64 * 1024),
        "{transfer:?}"
    );
    assert_eq!(transfer.bubbles, 0, "{transfer:?}");
}

#[test]
fn b25_a_tiny_window_is_not_cut_below_4_kib_packets() {
    // A 6 KiB window: a quarter would be 1.5 KiB, but packets stay at 4 KiB (one packet
    // may be cut short where a `send` ran out of room), and the pipe still never idles.
    let transfer = send_total(Config::default(), Setup::window(6 * 1024));
    println!("6 KiB window: {transfer:?}");
    assert!(transfer.data_packets <= TOTAL / 4096 + 1, "{transfer:?}");
    assert_eq!(transfer.credit_requests, 0, "{transfer:?}");
    assert_eq!(transfer.bubbles, 0, "{transfer:?}");
}

#[test]
fn b25_b29_odd_writes_to_a_host_that_returns_credit_late_do_not_wait_for_a_probe() {
    // vhost-device-vsock's rule: no CREDIT_UPDATE until three quarters of its window were
    // forwarded. Writes of odd sizes leave packets of odd sizes, so a packet can need
    // more credit than is left while less than three quarters are in flight.
    let setup = Setup {
        window: 64 * 1024,
        low_space_divisor: 4,
        write: 5000,
    };
    let transfer = send_total(Config::default(), setup);
    println!("64 KiB window, host updates under a quarter, 5000-byte writes: {transfer:?}");
    // Packets that do not fit what is left are cut to fit it (not under 4 KiB): the
    // window fills, the host's space runs low and its update comes unasked.
    assert_eq!(transfer.credit_requests, 0, "{transfer:?}");
    assert_eq!(transfer.bubbles, 0, "{transfer:?}");
}
