//! The driver's own work per operation, for profiling under callgrind: `cargo xtask
//! profile` runs this program under `valgrind --tool=callgrind` and prints the
//! instructions spent inside the driver's public calls per operation. Instruction counts
//! do not depend on the machine's load, so a change to the per-poll or per-connection
//! work shows as a difference of a few percent where timings (`cargo xtask bench`) would
//! drown it in noise.
//!
//! The host side is the device model's scripted host (`testing::HostPeer`), one step at a
//! time, in this thread; its own work is outside the driver's calls and is not counted.
//! The guest serves like the benchmark guest (`examples/bench.rs`): a listener on port
//! 1234 with 64 connection slots and `Config::default()`.
//!
//! `driver_work pingpong N`: one connection, N one-byte round trips (host sends a byte,
//! the guest polls, reads it and sends it back).
//! `driver_work cycles N`: N connections, each accepted, ended by the host, read to end
//! of stream and closed by the guest.
//! `driver_work idle N`: one connection and nothing arriving: N turns of a guest's wait
//! loop (`recv` finds nothing, then `poll`), what a spinning guest pays between packets.

use vsock_guest::testing::{FakeHal, FakeTransport, HostPeer, DEVICE_FEATURES};
use vsock_guest::wire::ShutdownFlags;
use vsock_guest::{Config, Error, Instant, SocketSlot, VsockAddr, VsockDevice, VMADDR_CID_ANY};

const GUEST_CID: u64 = 3;
const PORT: u32 = 1234;
/// The listener and 64 connections, as the echo and benchmark guests have.
const SLOTS: usize = 65;

fn main() {
    let mut args = std::env::args().skip(1);
    let workload = args.next().unwrap_or_else(|| "pingpong".into());
    let count: u64 = args
        .next()
        .map(|n| n.parse().expect("N is a number"))
        .unwrap_or(1000);

    let config = Config::default();
    let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
    let mut host = HostPeer::new(&transport);
    let mut slots = [const { SocketSlot::EMPTY }; SLOTS];
    let mut rx_memory = vec![0u8; SLOTS * config.rx_buffer_size];
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
            let id = host.connect(PORT);
            host.settle(&mut vsock, tick());
            let conn = vsock.accept(listener).expect("the connection waits").0;
            host.settle(&mut vsock, tick());
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
            let id = host.connect(PORT);
            host.settle(&mut vsock, tick());
            let conn = vsock.accept(listener).expect("the connection waits").0;
            host.settle(&mut vsock, tick());
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
        other => panic!("unknown workload {other:?}: pingpong, cycles or idle"),
    }
    assert!(host.violations().is_empty(), "{:?}", host.violations());
    println!("{workload} {count}: done");
}

/// Runs one call of the driver: the only frames `cargo xtask profile` counts
/// (callgrind's `--toggle-collect`), so the scripted host's work is left out.
#[inline(never)]
fn in_driver<R>(call: impl FnOnce() -> R) -> R {
    call()
}
