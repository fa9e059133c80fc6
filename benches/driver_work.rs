//! The driver's own work per operation, for profiling under callgrind: `cargo xtask
//! bench work` runs this program under `valgrind --tool=callgrind` and prints the
//! instructions spent inside the driver's public calls per operation. Instruction counts
//! do not depend on the machine's load, so a change to the per-poll or per-connection
//! work shows as a difference of a few percent where timings (`cargo xtask bench`) would
//! drown it in noise.
//!
//! The host side is the device model's scripted host (`testing::HostPeer`), one step at a
//! time, in this thread; its own work is outside the driver's calls and is not counted.
//! The guest serves like the benchmark guest (`examples/bench.rs`): a listener on port
//! 1234 with 64 connection slots, 256 KiB of receive memory each, and `Config::default()`.
//!
//! `driver_work pingpong N`: one connection, N one-byte round trips (host sends a byte,
//! the guest polls, reads it and sends it back).
//! `driver_work cycles N`: N connections, each accepted, ended by the host, read to end
//! of stream and closed by the guest.
//! `driver_work idle N`: one connection and nothing arriving: N turns of a guest's wait
//! loop (`recv` finds nothing, then `poll`), what a spinning guest pays between packets.
//! `driver_work bulk N WINDOW`: one connection, N MiB guest→host in 64 KiB `send`s to a
//! host whose receive window is WINDOW bytes and which reads everything at each step;
//! the guest sends until `WouldBlock`, then the host steps and the guest polls (one
//! exchange). Prints the exchanges, packets each way and kicks per MiB. The program uses
//! only calls the driver has had since before issue 15, so the same file measures the
//! driver of any commit since (`cargo xtask bench work --base REV`).
//! `driver_work bulk-in N`: one connection, N MiB host→guest, the host sending as much as
//! the guest's credit allows in packets that fill the guest's receive buffers (as
//! vhost-device-vsock does when the host application writes faster than the guest
//! reads), the guest reading with `recv` into a 64 KiB buffer until
//! `WouldBlock` and then polling, as a reader's loop does while it waits (one exchange).
//! Prints the exchanges, the packets each way and the kicks per MiB.
//! `driver_work bulk-in-woken N`: the same, with the guest polling first, then reading
//! until `WouldBlock`: the loop of a kernel that halted and woke up with the host's
//! packets delivered (`poll` first, then serve).
//! `driver_work bulk-in-4k N`: as `bulk-in`, the guest reading into a 4 KiB buffer, a
//! quarter of each 16 KiB packet at a time.

use vsock_guest::testing::{ConnId, FakeHal, FakeTransport, HostPeer, DEVICE_FEATURES};
use vsock_guest::wire::ShutdownFlags;
use vsock_guest::{
    Config, Error, Instant, SocketHandle, SocketSlot, Stats, VsockAddr, VsockDevice, VMADDR_CID_ANY,
};

const GUEST_CID: u64 = 3;
const PORT: u32 = 1234;
/// The listener and 64 connections, as the echo and benchmark guests have.
const SLOTS: usize = 65;
/// Receive memory per socket, as the benchmark guest has (its advertised `buf_alloc`).
const RX_PER_SOCKET: usize = 256 * 1024;
const MIB: u64 = 1024 * 1024;

fn main() {
    let mut args = std::env::args().skip(1);
    let workload = args.next().unwrap_or_else(|| "pingpong".into());
    let count: u64 = args
        .next()
        .map(|n| n.parse().expect("N is a number"))
        .unwrap_or(1000);
    let window: u32 = args
        .next()
        .map(|n| n.parse().expect("WINDOW is a number"))
        .unwrap_or(64 * 1024);

    let config = Config::default();
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    host.set_default_buf_alloc(window);
    let mut slots = [const { SocketSlot::EMPTY }; SLOTS];
    let mut rx_memory = vec![0u8; SLOTS * RX_PER_SOCKET];
    let mut vsock =
        VsockDevice::<FakeHal, _>::new(transport.clone(), config, &mut slots, &mut rx_memory)
            .expect("bring-up");
    let listener = vsock.stream_socket().expect("a socket");
    vsock
        .bind(listener, VsockAddr::new(VMADDR_CID_ANY, PORT))
        .expect("bind");
    vsock.listen(listener, 64).expect("listen");

    let mut micros = 1_000;
    let mut tick = || {
        micros += 10;
        Instant::from_micros(micros)
    };
    match workload.as_str() {
        "pingpong" => {
            let (id, conn) = accepted(&mut host, &mut vsock, listener, &mut tick);
            let mut byte = [0u8; 1];
            for round in 0..count {
                let sent = [round as u8];
                assert_eq!(host.send(id, &sent), 1, "the guest has room");
                host.step();
                in_driver(|| vsock.poll(tick()));
                assert_eq!(in_driver(|| vsock.recv(conn, &mut byte)), Ok(1));
                assert_eq!(in_driver(|| vsock.send(conn, &byte)), Ok(1));
                host.step();
                assert_eq!(host.recv(id, 1), sent, "round {round}");
            }
        }
        "idle" => {
            let (id, conn) = accepted(&mut host, &mut vsock, listener, &mut tick);
            let mut byte = [0u8; 1];
            for _ in 0..count {
                assert_eq!(
                    in_driver(|| vsock.recv(conn, &mut byte)),
                    Err(Error::WouldBlock)
                );
                in_driver(|| vsock.poll(tick()));
            }
            assert!(host.recv(id, 1).is_empty());
        }
        "cycles" => {
            let mut buffer = [0u8; 64];
            for cycle in 0..count {
                let id = host.connect(PORT);
                host.step();
                in_driver(|| vsock.poll(tick()));
                let conn = in_driver(|| vsock.accept(listener))
                    .expect("the connection waits")
                    .0;
                host.step();
                host.shutdown(id, ShutdownFlags::SEND | ShutdownFlags::RECEIVE);
                host.step();
                in_driver(|| vsock.poll(tick()));
                assert_eq!(
                    in_driver(|| vsock.recv(conn, &mut buffer)),
                    Ok(0),
                    "cycle {cycle}"
                );
                in_driver(|| vsock.close(conn)).expect("close");
                host.step();
                in_driver(|| vsock.poll(tick()));
                host.step();
                assert!(
                    matches!(in_driver(|| vsock.accept(listener)), Err(Error::WouldBlock)),
                    "cycle {cycle}: nothing else waits"
                );
            }
        }
        "bulk" => {
            let (id, conn) = accepted(&mut host, &mut vsock, listener, &mut tick);
            let before = vsock.stats();
            let data = vec![0x5a_u8; 64 * 1024];
            let total = count * MIB;
            let (mut sent, mut received, mut exchanges) = (0_u64, 0_u64, 0_u64);
            while received < total {
                while sent < total {
                    let want = (total - sent).min(data.len() as u64) as usize;
                    match in_driver(|| vsock.send(conn, &data[..want])) {
                        Ok(n) => sent += n as u64,
                        Err(Error::WouldBlock) => break,
                        Err(e) => panic!("send: {e:?}"),
                    }
                }
                host.step();
                received += host.recv_all(id).len() as u64;
                in_driver(|| vsock.poll(tick()));
                exchanges += 1;
            }
            let label = format!("bulk {count} MiB, window {window}");
            report_per_mib(&label, count, exchanges, &before, &vsock.stats());
        }
        "bulk-in" | "bulk-in-woken" | "bulk-in-4k" => {
            let woken = workload == "bulk-in-woken";
            let read_size = if workload == "bulk-in-4k" {
                4 * 1024
            } else {
                64 * 1024
            };
            let (id, conn) = accepted(&mut host, &mut vsock, listener, &mut tick);
            let before = vsock.stats();
            let data = vec![0x5a_u8; RX_PER_SOCKET];
            let mut buffer = vec![0_u8; read_size];
            let total = count * MIB;
            let (mut sent, mut received, mut exchanges) = (0_u64, 0_u64, 0_u64);
            while received < total {
                while sent < total {
                    let want = (total - sent).min(data.len() as u64) as usize;
                    match host.send(id, &data[..want]) {
                        0 => break,
                        n => sent += n as u64,
                    }
                }
                host.step();
                if woken {
                    in_driver(|| vsock.poll(tick()));
                }
                // A reader's loop: read until nothing is left, then poll while it waits.
                loop {
                    match in_driver(|| vsock.recv(conn, &mut buffer)) {
                        Ok(n) => received += n as u64,
                        Err(Error::WouldBlock) => break,
                        Err(e) => panic!("recv: {e:?}"),
                    }
                }
                in_driver(|| vsock.poll(tick()));
                exchanges += 1;
            }
            let label = format!("{workload} {count} MiB");
            report_per_mib(&label, count, exchanges, &before, &vsock.stats());
        }
        other => panic!(
            "unknown workload {other:?}: pingpong, cycles, idle, bulk, bulk-in, bulk-in-woken or bulk-in-4k"
        ),
    }
    assert!(host.violations().is_empty(), "{:?}", host.violations());
    println!("{workload} {count}: done");
}

/// Prints a transfer's exchanges, packets each way and kicks per MiB.
fn report_per_mib(label: &str, mib: u64, exchanges: u64, before: &Stats, after: &Stats) {
    let per_mib = |n: u64| n as f64 / mib as f64;
    println!(
        "{label}: per MiB {:.2} exchanges, {:.2} packets received, {:.2} sent, {:.2} kicks",
        per_mib(exchanges),
        per_mib(after.rx_packets - before.rx_packets),
        per_mib(after.tx_packets - before.tx_packets),
        per_mib(after.tx_kicks + after.rx_kicks - before.tx_kicks - before.rx_kicks),
    );
}

/// The host connects to the listener and the guest accepts: the host's connection and
/// the guest's socket. Not counted: set-up, not the work measured.
fn accepted(
    host: &mut HostPeer,
    vsock: &mut VsockDevice<'_, FakeHal, FakeTransport>,
    listener: SocketHandle,
    tick: &mut impl FnMut() -> Instant,
) -> (ConnId, SocketHandle) {
    let id = host.connect(PORT);
    host.settle(vsock, tick());
    let conn = vsock.accept(listener).expect("the connection waits").0;
    host.settle(vsock, tick());
    (id, conn)
}

/// Runs one call of the driver: the only frames `cargo xtask bench work` counts
/// (callgrind's `--toggle-collect`), so the scripted host's work is left out.
#[inline(never)]
fn in_driver<R>(call: impl FnOnce() -> R) -> R {
    call()
}
