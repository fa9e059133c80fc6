//! B43 over random interleavings: on one connection, the host sends data and
//! CREDIT_REQUESTs, the guest reads and sends, and the device takes the guest's packets
//! a few at a time or not at all (a tx ring full for a while, with replies waiting
//! behind data). The device model checks every header the driver puts on the ring
//! ([`DeviceModel`](vsock_guest::testing::DeviceModel)): `fwd_cnt` and `buf_alloc` never
//! go backwards in ring order, whatever the mix of data and control packets. At the end
//! both streams arrive whole and in order, and the host saw nothing break a rule.
//!
//! Cases: `PROPTEST_CASES` (default 1000).

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use vsock_guest::testing::{ConnId, FakeHal, FakeTransport, HostPeer, DEVICE_FEATURES};
use vsock_guest::wire::Op;
use vsock_guest::{
    Config, Error, Instant, SocketHandle, SocketSlot, VsockAddr, VsockDevice, VMADDR_CID_ANY,
};

type Device<'a> = VsockDevice<'a, FakeHal, FakeTransport>;

const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1234;
/// Socket slots: the listener and the connection.
const SLOTS: usize = 2;
/// Longest sequence of actions in one case; fewer under Miri, which runs one case.
const MAX_ACTIONS: usize = if cfg!(miri) { 32 } else { 128 };

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Byte `offset` of the stream in direction `dir` (0 guest→host, 1 host→guest).
fn stream_byte(dir: u64, offset: u64) -> u8 {
    let x = offset
        .wrapping_add(dir << 60)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

#[derive(Clone, Debug)]
enum Action {
    /// The host sends up to this many bytes (what the guest's credit allows).
    HostSends(usize),
    /// The host asks for the guest's credit.
    HostAsksCredit,
    /// The host application reads up to this many bytes (and may send a CREDIT_UPDATE).
    HostReads(usize),
    /// The guest reads up to this many bytes.
    GuestReads(usize),
    /// The guest sends this many bytes (what `send` takes).
    GuestSends(usize),
    /// The device takes up to `tx` of the guest's packets and delivers up to `rx`.
    Device { tx: usize, rx: usize },
    /// The guest polls, `ms` later.
    Poll { ms: u64 },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (1usize..=3000).prop_map(Action::HostSends),
        2 => Just(Action::HostAsksCredit),
        2 => (1usize..=3000).prop_map(Action::HostReads),
        3 => (1usize..=3000).prop_map(Action::GuestReads),
        3 => (1usize..=3000).prop_map(Action::GuestSends),
        3 => (0usize..=3, 0usize..=3).prop_map(|(tx, rx)| Action::Device { tx, rx }),
        3 => (0u64..=30).prop_map(|ms| Action::Poll { ms }),
    ]
}

#[derive(Clone, Debug)]
struct Setup {
    queue_size: u16,
    /// The guest's receive window (its `buf_alloc`).
    rx_per_socket: usize,
    /// The host's receive window.
    host_buf_alloc: u32,
    send_buffer: usize,
    /// Transmit memory: when data waiting for credit holds all of it, control packets
    /// wait for memory while data packets still go out as credit comes.
    tx_memory: usize,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop::sample::select(vec![4u16, 8]),
        64usize..=4096,
        64u32..=4096,
        prop::sample::select(vec![0usize, 1000, 8192]),
        prop::sample::select(vec![2048usize, 4096, 8192, 65536]),
    )
        .prop_map(
            |(queue_size, rx_per_socket, host_buf_alloc, send_buffer, tx_memory)| Setup {
                queue_size,
                rx_per_socket,
                host_buf_alloc,
                send_buffer,
                tx_memory,
            },
        )
}

struct World<'a> {
    vsock: Device<'a>,
    host: HostPeer,
    socket: SocketHandle,
    conn: ConnId,
    now: u64,
    /// Bytes of each direction sent so far (0 guest→host, 1 host→guest).
    sent: [u64; 2],
    /// Bytes of each direction received and checked so far.
    received: [u64; 2],
}

impl World<'_> {
    fn instant(&self) -> Instant {
        Instant::from_millis(self.now)
    }

    fn check(&mut self, dir: usize, bytes: &[u8]) -> Result<(), TestCaseError> {
        for &byte in bytes {
            let offset = self.received[dir];
            prop_assert_eq!(
                byte,
                stream_byte(dir as u64, offset),
                "direction {} byte {}",
                dir,
                offset
            );
            self.received[dir] += 1;
        }
        prop_assert!(self.received[dir] <= self.sent[dir]);
        Ok(())
    }

    fn guest_reads(&mut self, len: usize) -> Result<(), TestCaseError> {
        let mut buf = vec![0u8; len];
        match self.vsock.recv(self.socket, &mut buf) {
            Ok(n) => self.check(1, &buf[..n]),
            Err(Error::WouldBlock) => Ok(()),
            Err(e) => Err(TestCaseError::fail(format!("guest recv: {e:?}"))),
        }
    }

    fn host_reads(&mut self, len: usize) -> Result<(), TestCaseError> {
        let bytes = self.host.recv(self.conn, len);
        self.check(0, &bytes)
    }

    fn act(&mut self, action: &Action) -> Result<(), TestCaseError> {
        match *action {
            Action::HostSends(len) => {
                let data: Vec<u8> = (0..len as u64)
                    .map(|i| stream_byte(1, self.sent[1] + i))
                    .collect();
                self.sent[1] += self.host.send(self.conn, &data) as u64;
            }
            Action::HostAsksCredit => self.host.send_control(self.conn, Op::CreditRequest, 0),
            Action::HostReads(len) => self.host_reads(len)?,
            Action::GuestReads(len) => self.guest_reads(len)?,
            Action::GuestSends(len) => {
                let data: Vec<u8> = (0..len as u64)
                    .map(|i| stream_byte(0, self.sent[0] + i))
                    .collect();
                match self.vsock.send(self.socket, &data) {
                    Ok(n) => self.sent[0] += n as u64,
                    Err(Error::WouldBlock) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("guest send: {e:?}"))),
                }
            }
            Action::Device { tx, rx } => {
                self.host.set_tx_per_step(Some(tx));
                self.host.set_rx_per_step(Some(rx));
                self.host.step();
            }
            Action::Poll { ms } => {
                self.now += ms;
                self.vsock.poll(self.instant());
            }
        }
        prop_assert_eq!(self.host.violations(), &[]);
        Ok(())
    }

    /// Lets both sides drain: every byte sent arrives, in order.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        self.host.set_tx_per_step(None);
        self.host.set_rx_per_step(None);
        for _ in 0..2000 {
            if self.received == self.sent {
                break;
            }
            self.now += 10;
            let now = self.instant();
            self.host.settle(&mut self.vsock, now);
            self.guest_reads(4096)?;
            self.host_reads(usize::MAX)?;
            self.host.settle(&mut self.vsock, now);
        }
        prop_assert_eq!(self.received, self.sent, "both streams arrive whole");
        prop_assert_eq!(self.host.violations(), &[]);
        Ok(())
    }
}

fn run(setup: &Setup, actions: &[Action]) -> Result<(), TestCaseError> {
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    host.set_default_buf_alloc(setup.host_buf_alloc);
    let mut slots = [const { SocketSlot::EMPTY }; SLOTS];
    let mut rx_memory = vec![0u8; SLOTS * setup.rx_per_socket];
    let config = Config {
        queue_size: setup.queue_size,
        rx_buffer_size: 1024,
        tx_packet_size: 1024,
        tx_memory: setup.tx_memory,
        send_buffer: setup.send_buffer,
        ..Config::default()
    };
    let mut vsock =
        VsockDevice::<FakeHal, _>::new(transport.clone(), config, &mut slots, &mut rx_memory)
            .expect("bring-up");
    let listener = vsock.stream_socket().unwrap();
    vsock
        .bind(listener, VsockAddr::new(VMADDR_CID_ANY, GUEST_PORT))
        .unwrap();
    vsock.listen(listener, 1).unwrap();
    let conn = host.connect(GUEST_PORT);
    host.settle(&mut vsock, Instant::from_millis(0));
    let (socket, _) = vsock.accept(listener).expect("the host's connection");
    let mut world = World {
        vsock,
        host,
        socket,
        conn,
        now: 0,
        sent: [0; 2],
        received: [0; 2],
    };
    for action in actions {
        world.act(action)?;
    }
    world.finish()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// B43: whatever the interleaving, no header of the connection carries an older
    /// `fwd_cnt` or `buf_alloc` than one before it on the ring (the model panics if one
    /// does), and both streams arrive whole.
    #[test]
    fn b43_credit_fields_never_go_backwards_in_ring_order(
        setup in setup(),
        actions in prop::collection::vec(action(), 1..MAX_ACTIONS),
    ) {
        run(&setup, &actions)?;
    }
}

/// A case the property found (2026-12-05): the guest fills the host's whole window,
/// the device takes it, the guest sends a second window's worth that waits for credit,
/// and the host reads part of the first. Every byte must still arrive.
#[test]
fn b43_regression_second_window_waiting_for_credit_arrives() {
    let setup = Setup {
        queue_size: 4,
        rx_per_socket: 64,
        host_buf_alloc: 1449,
        send_buffer: 8192,
        tx_memory: 2048,
    };
    let actions = [
        Action::GuestSends(1449),
        Action::Device { tx: 3, rx: 0 },
        Action::Poll { ms: 0 },
        Action::GuestSends(1449),
        Action::HostReads(632),
        Action::HostReads(92),
    ];
    if let Err(e) = run(&setup, &actions) {
        panic!("{e}");
    }
}
