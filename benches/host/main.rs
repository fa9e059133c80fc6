//! Host benchmark: vsock-guest against `virtio-drivers`' `VsockConnectionManager`, on the
//! same lean device (see `device.rs`) in the same run, alternating A/B.
//!
//! `cargo xtask bench host` runs it (`cargo bench --bench host -- [--quick] [--full]
//! [--json FILE]`). Every workload prints the median of its repetitions for our driver,
//! for virtio-drivers at its defaults (512-byte RX buffers, 1 KiB per-connection buffer,
//! 8-entry queues) and at its best settings (64 KiB RX buffers, 256 KiB per connection),
//! and the ratios. A plain `memcpy` of the same bytes is the reference for the per-byte
//! cost.

mod device;

use device::{BenchDevice, BenchHal, BenchTransport, HostRole, HOST_CID, HOST_PORT};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use virtio_drivers::device::socket::{
    SocketError, VirtIOSocket, VsockAddr as TheirAddr, VsockConnectionManager, VsockEventType,
};
use vsock_guest::{
    Config, Error, Instant as VsInstant, Readiness, SocketHandle, SocketSlot, VsockAddr,
    VsockDevice,
};

/// Sockets our driver gets.
const OUR_SOCKETS: usize = 72;
/// Receive buffer per socket for our driver.
const OUR_RX_PER_SOCKET: usize = 256 * 1024;
/// virtio-drivers' largest useful RX buffer: a 64 KiB payload and the header.
const THEIR_BEST_RX: usize = 64 * 1024 + 44;
/// virtio-drivers' per-connection buffer at its best settings.
const THEIR_BEST_CAPACITY: u32 = 256 * 1024;
/// How long one measurement may run before it is declared stuck.
const STUCK: Duration = Duration::from_secs(120);

/// One measurement.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    seconds: f64,
    /// Payload bytes moved (or operations for count workloads).
    units: u64,
    /// Packets the host saw or sent.
    packets: u64,
    /// Notifications the driver sent.
    kicks: u64,
    /// Ours, host→guest with packets of 4 KiB or more: the time spent in the driver calls
    /// that moved data (a `recv` that returned bytes, a `poll` that received some),
    /// without the waits for the device thread in between. The wall time of these rows
    /// is the pipeline's: the device thread writes every byte into the receive buffers
    /// meanwhile.
    busy_seconds: Option<f64>,
}

impl Sample {
    fn rate(&self) -> f64 {
        self.units as f64 / self.seconds
    }
}

/// What a workload measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// `produced`: the application writes every byte before it sends it (a producer, not a
    /// resend of an unchanged buffer): virtio-drivers' application fills its buffer and
    /// sends it; ours writes in place (`send_with`). Without it both send one unchanged
    /// buffer over and over, which the device thread then reads from a warm cache.
    GuestToHost {
        total: u64,
        write: usize,
        produced: bool,
    },
    /// `in_place`: our driver takes the bytes where they arrived (`recv_with`) instead of
    /// copying them into a buffer; virtio-drivers, which has no such call, copies as
    /// always.
    HostToGuest {
        total: u64,
        chunk: usize,
        in_place: bool,
    },
    PingPong {
        round_trips: u64,
    },
    ConnectClose {
        cycles: u64,
    },
    ManyConnections {
        connections: usize,
        each: u64,
    },
}

impl Kind {
    fn name(&self) -> String {
        match *self {
            Kind::GuestToHost {
                total,
                write,
                produced,
            } => format!(
                "guest->host {} MiB, {} writes{}",
                total >> 20,
                size(write),
                if produced {
                    ", produced (ours in place)"
                } else {
                    ""
                }
            ),
            Kind::HostToGuest {
                total,
                chunk,
                in_place,
            } => format!(
                "host->guest {} MiB, {} packets{}",
                total >> 20,
                size(chunk),
                if in_place { ", read in place" } else { "" }
            ),
            Kind::PingPong { round_trips } => format!("1-byte ping-pong x {round_trips}"),
            Kind::ConnectClose { cycles } => format!("connect/close x {cycles}"),
            Kind::ManyConnections { connections, each } => {
                format!("{connections} connections x {} KiB guest->host", each >> 10)
            }
        }
    }

    fn unit(&self) -> &'static str {
        match self {
            Kind::GuestToHost { .. } | Kind::HostToGuest { .. } | Kind::ManyConnections { .. } => {
                "MiB/s"
            }
            Kind::PingPong { .. } => "round trips/s",
            Kind::ConnectClose { .. } => "cycles/s",
        }
    }

    fn scale(&self) -> f64 {
        match self.unit() {
            "MiB/s" => (1 << 20) as f64,
            _ => 1.0,
        }
    }

    fn role(&self) -> HostRole {
        match *self {
            Kind::HostToGuest { total, chunk, .. } => HostRole::Source { total, chunk },
            Kind::PingPong { .. } => HostRole::Echo,
            _ => HostRole::Sink,
        }
    }
}

fn size(bytes: usize) -> String {
    if bytes >= 1024 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

fn host() -> VsockAddr {
    VsockAddr::new(HOST_CID as u32, HOST_PORT)
}

fn their_host() -> TheirAddr {
    TheirAddr {
        cid: HOST_CID,
        port: HOST_PORT,
    }
}

fn check_stuck(started: Instant, what: &str) {
    if started.elapsed() > STUCK {
        eprintln!("bench: {what} made no progress for {}s", STUCK.as_secs());
        std::process::exit(1);
    }
}

/// In a wait that began at `started`: spins at first, then gives the CPU away on every
/// call. Once (a slow spell of this VM) the device thread ran 119 loops in the 30 s a
/// connect waited for it, while this thread spun.
fn relax(started: Instant) {
    if started.elapsed() > Duration::from_millis(1) {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

// ---------------------------------------------------------------- our driver

struct Ours {
    epoch: Instant,
    /// Our driver's settings: `Config::default()` unless `VSOCK_BENCH_QUEUE`,
    /// `VSOCK_BENCH_RX` (receive buffer bytes), `VSOCK_BENCH_TX` (largest packet, header
    /// included) or `VSOCK_BENCH_TX_MEMORY` (bytes) say otherwise.
    config: Config,
}

/// `Config::default()` with the overrides from the environment, and a connect timeout
/// of 30 s: the device thread can lose its core for seconds when the VM is starved (one
/// run saw it loop 96 times in the default 2 s), and virtio-drivers' connect has no
/// timeout to fail on.
fn our_config() -> Config {
    fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }
    let default = Config::default();
    Config {
        queue_size: env("VSOCK_BENCH_QUEUE").unwrap_or(default.queue_size),
        rx_buffer_size: env("VSOCK_BENCH_RX").unwrap_or(default.rx_buffer_size),
        tx_packet_size: env("VSOCK_BENCH_TX").unwrap_or(default.tx_packet_size),
        tx_memory: env("VSOCK_BENCH_TX_MEMORY").unwrap_or(default.tx_memory),
        connect_timeout: Duration::from_secs(30),
        ..default
    }
}

impl Ours {
    fn now(&self) -> VsInstant {
        VsInstant::from_micros(self.epoch.elapsed().as_micros() as u64)
    }

    fn run(&self, kind: Kind) -> Sample {
        let (device, transport) = BenchDevice::start(kind.role());
        let mut slots: Vec<SocketSlot> = (0..OUR_SOCKETS).map(|_| SocketSlot::EMPTY).collect();
        let mut rx_memory = vec![0u8; OUR_SOCKETS * OUR_RX_PER_SOCKET];
        let config = Config {
            connect_timeout: Duration::from_secs(30),
            ..self.config
        };
        let mut vsock = VsockDevice::<BenchHal, BenchTransport>::new(
            transport,
            config,
            &mut slots,
            &mut rx_memory,
        )
        .expect("our bring-up");
        let kicks_before = device.kicks();
        let mut busy_seconds = None;
        let started = Instant::now();
        let units = match kind {
            Kind::GuestToHost {
                total,
                write,
                produced,
            } => {
                let socket = self.connect(&mut vsock, &device);
                if produced {
                    self.produce_all(&mut vsock, socket, total, write);
                } else {
                    self.send_all(&mut vsock, socket, total, write);
                }
                // Bytes send took may still wait in the send buffer: poll until the
                // host has them all.
                wait_until(|| {
                    vsock.poll(self.now());
                    device.counters.received.load(Ordering::Relaxed) >= total
                });
                total
            }
            Kind::HostToGuest {
                total,
                chunk,
                in_place,
            } => {
                let socket = self.connect(&mut vsock, &device);
                let mut buf = vec![0u8; chunk.max(1)];
                let mut got = 0;
                let mut busy = Duration::ZERO;
                // Two clock reads per call would be a good part of the work per call for
                // small packets: their rows are not timed this way.
                let timed = chunk >= 4096;
                let clock = || timed.then(Instant::now);
                let since = |call: Option<Instant>| call.map_or(Duration::ZERO, |t| t.elapsed());
                while got < total {
                    let call = clock();
                    let read = if in_place {
                        vsock.recv_with(socket, |bytes| bytes.len().min(chunk))
                    } else {
                        vsock.recv(socket, &mut buf)
                    };
                    match read {
                        Ok(n) => {
                            busy += since(call);
                            got += n as u64;
                        }
                        Err(Error::WouldBlock) => {
                            let waiting = vsock.recv_queue(socket).unwrap_or(0);
                            let now = self.now();
                            let call = clock();
                            vsock.poll(now);
                            if vsock.recv_queue(socket).unwrap_or(0) > waiting {
                                busy += since(call);
                            }
                            check_stuck(started, "our host->guest");
                        }
                        Err(e) => panic!("our recv: {e}"),
                    }
                }
                busy_seconds = timed.then_some(busy.as_secs_f64());
                total
            }
            Kind::PingPong { round_trips } => {
                let socket = self.connect(&mut vsock, &device);
                let mut byte = [0u8; 1];
                for _ in 0..round_trips {
                    self.send_all(&mut vsock, socket, 1, 1);
                    loop {
                        match vsock.recv(socket, &mut byte) {
                            Ok(1) => break,
                            Ok(_) => panic!("our recv: end of stream"),
                            Err(Error::WouldBlock) => vsock.poll(self.now()),
                            Err(e) => panic!("our recv: {e}"),
                        }
                    }
                }
                round_trips
            }
            Kind::ConnectClose { cycles } => {
                for _ in 0..cycles {
                    let socket = self.connect(&mut vsock, &device);
                    vsock.close(socket).expect("our close");
                    vsock.poll(self.now());
                }
                wait_until(|| {
                    vsock.poll(self.now());
                    device.counters.closed.load(Ordering::Relaxed) >= cycles
                });
                cycles
            }
            Kind::ManyConnections { connections, each } => {
                let sockets: Vec<SocketHandle> = (0..connections)
                    .map(|_| self.connect(&mut vsock, &device))
                    .collect();
                let mut sent = vec![0u64; connections];
                let chunk = vec![0x5a_u8; 4096];
                while sent.iter().any(|&s| s < each) {
                    for (socket, sent) in sockets.iter().zip(sent.iter_mut()) {
                        if *sent < each {
                            let n = chunk.len().min((each - *sent) as usize);
                            match vsock.send(*socket, &chunk[..n]) {
                                Ok(n) => *sent += n as u64,
                                Err(Error::WouldBlock) => {}
                                Err(e) => panic!("our send: {e}"),
                            }
                        }
                    }
                    vsock.poll(self.now());
                    check_stuck(started, "our many connections");
                }
                let total = each * connections as u64;
                // Bytes send took may still wait in the send buffer: poll until the
                // host has them all.
                wait_until(|| {
                    vsock.poll(self.now());
                    device.counters.received.load(Ordering::Relaxed) >= total
                });
                total
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        let sample = Sample {
            seconds,
            units,
            packets: device.counters.packets_from_guest.load(Ordering::Relaxed)
                + device.counters.packets_to_guest.load(Ordering::Relaxed),
            kicks: device.kicks() - kicks_before,
            busy_seconds,
        };
        // The device must stop touching the rings before the driver frees them.
        let mut device = device;
        device.stop();
        drop(vsock);
        sample
    }

    fn connect(
        &self,
        vsock: &mut VsockDevice<'_, BenchHal, BenchTransport>,
        device: &BenchDevice,
    ) -> SocketHandle {
        let socket = vsock.stream_socket().expect("our socket");
        match vsock.connect(socket, host()) {
            Ok(()) | Err(Error::InProgress) => {}
            Err(e) => panic!("our connect: {e}"),
        }
        let started = Instant::now();
        loop {
            vsock.poll(self.now());
            if let Ok(Some(e)) = vsock.take_error(socket) {
                panic!(
                    "our connect failed: {e}; host accepted {}, kicks {}, stats {:?}, device {}",
                    device.counters.accepted.load(Ordering::Relaxed),
                    device.kicks(),
                    vsock.stats(),
                    device.debug_state()
                );
            }
            if vsock
                .readiness(socket)
                .is_ok_and(|r| r.contains(Readiness::WRITABLE))
            {
                return socket;
            }
            check_stuck(started, "our connect");
            relax(started);
        }
    }

    /// `send_all` for a producing application: each write's bytes are written in place.
    fn produce_all(
        &self,
        vsock: &mut VsockDevice<'_, BenchHal, BenchTransport>,
        socket: SocketHandle,
        total: u64,
        write: usize,
    ) {
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            let left = write.min((total - sent) as usize);
            let mut done = 0;
            while done < left {
                let offset = sent + done as u64;
                let result = vsock.send_with(socket, |space| {
                    let k = space.len().min(left - done);
                    produce(&mut space[..k], offset);
                    k
                });
                match result {
                    Ok(k) => done += k,
                    Err(Error::WouldBlock) => {
                        vsock.poll(self.now());
                        check_stuck(started, "our send_with");
                    }
                    Err(e) => panic!("our send_with: {e}"),
                }
            }
            sent += left as u64;
        }
    }

    fn send_all(
        &self,
        vsock: &mut VsockDevice<'_, BenchHal, BenchTransport>,
        socket: SocketHandle,
        total: u64,
        write: usize,
    ) {
        let chunk = vec![0xa5_u8; write];
        let started = Instant::now();
        let mut sent = 0u64;
        while sent < total {
            let n = write.min((total - sent) as usize);
            match vsock.send(socket, &chunk[..n]) {
                Ok(n) => sent += n as u64,
                Err(Error::WouldBlock) => {
                    vsock.poll(self.now());
                    check_stuck(started, "our send");
                }
                Err(e) => panic!("our send: {e}"),
            }
        }
    }
}

fn wait_until(mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        check_stuck(started, "waiting for the host");
        relax(started);
    }
}

// ---------------------------------------------------------------- virtio-drivers

type Theirs<const RX: usize> = VsockConnectionManager<BenchHal, BenchTransport, RX>;

fn their_run<const RX: usize>(kind: Kind, capacity: u32) -> Sample {
    let (device, transport) = BenchDevice::start(kind.role());
    let driver =
        VirtIOSocket::<BenchHal, BenchTransport, RX>::new(transport).expect("their bring-up");
    let mut manager = Theirs::<RX>::new_with_capacity(driver, capacity);
    let kicks_before = device.kicks();
    let started = Instant::now();
    let units = match kind {
        Kind::GuestToHost {
            total,
            write,
            produced,
        } => {
            their_connect(&mut manager, 40000);
            their_send_all(&mut manager, 40000, total, write, produced);
            wait_until(|| device.counters.received.load(Ordering::Relaxed) >= total);
            total
        }
        Kind::HostToGuest { total, chunk, .. } => {
            their_connect(&mut manager, 40000);
            let mut buf = vec![0u8; chunk.max(1)];
            let mut got = 0u64;
            while got < total {
                manager.poll().expect("their poll");
                let n = manager
                    .recv(their_host(), 40000, &mut buf)
                    .expect("their recv");
                if n > 0 {
                    got += n as u64;
                    // virtio-drivers leaves credit updates to the caller.
                    manager
                        .update_credit(their_host(), 40000)
                        .expect("their credit update");
                }
                check_stuck(started, "their host->guest");
            }
            total
        }
        Kind::PingPong { round_trips } => {
            their_connect(&mut manager, 40000);
            let mut byte = [0u8; 1];
            for _ in 0..round_trips {
                their_send_all(&mut manager, 40000, 1, 1, false);
                loop {
                    manager.poll().expect("their poll");
                    if manager
                        .recv(their_host(), 40000, &mut byte)
                        .expect("their recv")
                        == 1
                    {
                        manager
                            .update_credit(their_host(), 40000)
                            .expect("their credit update");
                        break;
                    }
                }
            }
            round_trips
        }
        Kind::ConnectClose { cycles } => {
            for cycle in 0..cycles {
                let port = 40000 + (cycle % 1000) as u32;
                their_connect(&mut manager, port);
                manager
                    .shutdown(their_host(), port)
                    .expect("their shutdown");
                loop {
                    if let Some(event) = manager.poll().expect("their poll") {
                        if matches!(event.event_type, VsockEventType::Disconnected { .. }) {
                            break;
                        }
                    }
                    check_stuck(started, "their close");
                }
            }
            cycles
        }
        Kind::ManyConnections { connections, each } => {
            let ports: Vec<u32> = (0..connections as u32).map(|i| 40000 + i).collect();
            for &port in &ports {
                their_connect(&mut manager, port);
            }
            let mut sent = vec![0u64; connections];
            let chunk = vec![0x5a_u8; 4096];
            while sent.iter().any(|&s| s < each) {
                for (&port, sent) in ports.iter().zip(sent.iter_mut()) {
                    if *sent < each {
                        let n = chunk.len().min((each - *sent) as usize);
                        match manager.send(their_host(), port, &chunk[..n]) {
                            Ok(()) => *sent += n as u64,
                            Err(virtio_drivers::Error::SocketDeviceError(
                                SocketError::InsufficientBufferSpaceInPeer,
                            )) => {}
                            Err(e) => panic!("their send: {e:?}"),
                        }
                    }
                }
                while manager.poll().expect("their poll").is_some() {}
                check_stuck(started, "their many connections");
            }
            let total = each * connections as u64;
            wait_until(|| device.counters.received.load(Ordering::Relaxed) >= total);
            total
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let sample = Sample {
        seconds,
        units,
        packets: device.counters.packets_from_guest.load(Ordering::Relaxed)
            + device.counters.packets_to_guest.load(Ordering::Relaxed),
        kicks: device.kicks() - kicks_before,
        busy_seconds: None,
    };
    // The device must stop touching the rings before the driver frees them.
    let mut device = device;
    device.stop();
    drop(manager);
    sample
}

fn their_connect<const RX: usize>(manager: &mut Theirs<RX>, port: u32) {
    manager.connect(their_host(), port).expect("their connect");
    let started = Instant::now();
    loop {
        if let Some(event) = manager.poll().expect("their poll") {
            if event.source.port == HOST_PORT
                && event.destination.port == port
                && event.event_type == VsockEventType::Connected
            {
                return;
            }
        }
        check_stuck(started, "their connect");
        relax(started);
    }
}

/// What a producing application writes: every byte of each write, a value per write.
fn produce(buf: &mut [u8], offset: u64) {
    buf.fill((offset / 4096) as u8);
}

fn their_send_all<const RX: usize>(
    manager: &mut Theirs<RX>,
    port: u32,
    total: u64,
    write: usize,
    produced: bool,
) {
    let mut chunk = vec![0xa5_u8; write];
    let started = Instant::now();
    let mut sent = 0u64;
    let mut filled = None;
    while sent < total {
        let n = write.min((total - sent) as usize);
        if produced && filled != Some(sent) {
            produce(&mut chunk[..n], sent);
            filled = Some(sent);
        }
        match manager.send(their_host(), port, &chunk[..n]) {
            Ok(()) => sent += n as u64,
            Err(virtio_drivers::Error::SocketDeviceError(
                SocketError::InsufficientBufferSpaceInPeer,
            )) => {
                manager.poll().expect("their poll");
                check_stuck(started, "their send");
            }
            Err(e) => panic!("their send: {e:?}"),
        }
    }
}

// ---------------------------------------------------------------- reporting

fn median(samples: &mut [Sample]) -> Option<Sample> {
    samples.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    samples.get(samples.len() / 2).copied()
}

/// The time a plain memcpy takes for `total` bytes in copies of `block` bytes, from one
/// place to the next slot of a 512 KiB ring (as the driver's buffers are reused).
fn memcpy_seconds(total: u64, block: usize) -> f64 {
    const RING: usize = 512 * 1024;
    let source = vec![0x33_u8; block];
    let mut ring = vec![0u8; RING.max(block)];
    let slots = ring.len() / block;
    let started = Instant::now();
    let mut copied = 0;
    let mut slot = 0;
    while copied < total {
        ring[slot * block..(slot + 1) * block].copy_from_slice(std::hint::black_box(&source));
        std::hint::black_box(&mut ring);
        slot = (slot + 1) % slots;
        copied += block as u64;
    }
    started.elapsed().as_secs_f64()
}

struct Options {
    repetitions: usize,
    scale: u64,
    json: Option<String>,
    only: Option<String>,
    /// Which drivers run: any of `ours`, `theirs`, `theirs-best` (all by default).
    drivers: Vec<String>,
}

impl Options {
    fn runs(&self, driver: &str) -> bool {
        self.drivers.is_empty() || self.drivers.iter().any(|d| d == driver)
    }
}

fn options() -> Options {
    let mut options = Options {
        repetitions: 5,
        scale: 1,
        json: None,
        only: None,
        drivers: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => {
                options.repetitions = 3;
                options.scale = 8;
            }
            "--full" => options.scale = 0,
            "--json" => options.json = args.next(),
            "--only" => options.only = args.next(),
            "--driver" => {
                options.drivers = args
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            _ => {} // cargo bench passes --bench
        }
    }
    options
}

fn main() {
    let options = options();
    let mib = |n: u64| -> u64 { (n << 20).checked_div(options.scale).unwrap_or(n << 20) };
    // 64-byte writes move 16 MiB by default: one packet each, and virtio-drivers waits
    // for every packet.
    let small = if options.scale == 0 {
        mib(256)
    } else {
        mib(16)
    };
    let workloads = [
        Kind::GuestToHost {
            total: mib(256),
            write: 64 * 1024,
            produced: false,
        },
        Kind::GuestToHost {
            total: mib(256),
            write: 4096,
            produced: false,
        },
        Kind::GuestToHost {
            total: small,
            write: 64,
            produced: false,
        },
        Kind::GuestToHost {
            total: mib(256),
            write: 64 * 1024,
            produced: true,
        },
        Kind::GuestToHost {
            total: mib(256),
            write: 4096,
            produced: true,
        },
        Kind::HostToGuest {
            total: mib(256),
            chunk: 64 * 1024,
            in_place: false,
        },
        Kind::HostToGuest {
            total: mib(256),
            chunk: 4096,
            in_place: false,
        },
        Kind::HostToGuest {
            total: small,
            chunk: 64,
            in_place: false,
        },
        Kind::HostToGuest {
            total: mib(256),
            chunk: 64 * 1024,
            in_place: true,
        },
        Kind::PingPong {
            round_trips: 20_000,
        },
        Kind::ConnectClose { cycles: 1000 },
        Kind::ManyConnections {
            connections: 64,
            each: mib(4),
        },
    ];
    let ours = Ours {
        epoch: Instant::now(),
        config: our_config(),
    };
    println!(
        "ours: queue {}, rx buffers {} B, tx packets up to {} B in {} KiB",
        ours.config.queue_size,
        ours.config.rx_buffer_size,
        ours.config.tx_packet_size,
        ours.config.tx_memory / 1024
    );
    println!(
        "host benchmark: median of {} runs each, A/B alternating, device on its own thread",
        options.repetitions
    );
    let mut memcpy_ns_per_byte = Vec::new();
    for block in [64 * 1024, 4096, 64] {
        let total = if block == 64 { small } else { mib(256) };
        let seconds = memcpy_seconds(total, block);
        memcpy_ns_per_byte.push((block, seconds * 1e9 / total as f64));
        println!(
            "reference: memcpy in {} blocks: {:.3} ns/byte ({:.0} MiB/s)",
            size(block),
            seconds * 1e9 / total as f64,
            total as f64 / seconds / (1 << 20) as f64
        );
    }
    println!();
    println!(
        "{:<60} {:>14} {:>14} {:>14} {:>8} {:>8} {:>10} {:>12}",
        "workload", "ours", "theirs", "theirs best", "x def", "x best", "ns/unit", "kicks/MiB"
    );
    let mut results = Vec::new();
    let workloads: Vec<Kind> = workloads
        .into_iter()
        .filter(|kind| {
            options
                .only
                .as_ref()
                .is_none_or(|only| kind.name().contains(only.as_str()))
        })
        .collect();
    for kind in &workloads {
        let mut ours_samples = Vec::new();
        let mut default_samples = Vec::new();
        let mut best_samples = Vec::new();
        for _ in 0..options.repetitions {
            if options.runs("ours") {
                ours_samples.push(ours.run(*kind));
            }
            if options.runs("theirs") {
                default_samples.push(their_run::<512>(*kind, 1024));
            }
            if options.runs("theirs-best") {
                best_samples.push(their_run::<THEIR_BEST_RX>(*kind, THEIR_BEST_CAPACITY));
            }
        }
        let ours_median = median(&mut ours_samples);
        let default_median = median(&mut default_samples);
        let best_median = median(&mut best_samples);
        let scale = kind.scale();
        let rate = |sample: Option<Sample>| sample.map(|s| s.rate() / scale);
        let ratio = |theirs: Option<Sample>| Some(ours_median?.rate() / theirs?.rate());
        let per_unit_ns = ours_median.map(|s| s.seconds * 1e9 / s.units as f64);
        let kicks_per_mib = ours_median.map(|s| {
            if kind.unit() == "MiB/s" {
                s.kicks as f64 / (s.units as f64 / (1 << 20) as f64)
            } else {
                s.kicks as f64
            }
        });
        let show = |value: Option<f64>, precision: usize, suffix: &str| {
            value.map_or_else(|| "-".to_owned(), |v| format!("{v:.precision$}{suffix}"))
        };
        println!(
            "{:<60} {:>14} {:>14} {:>14} {:>8} {:>8} {:>10} {:>12}",
            kind.name(),
            show(rate(ours_median), 1, ""),
            show(rate(default_median), 1, ""),
            show(rate(best_median), 1, ""),
            show(ratio(default_median), 2, "x"),
            show(ratio(best_median), 2, "x"),
            show(per_unit_ns, 3, ""),
            show(kicks_per_mib, 1, "")
        );
        // The driver's own time per byte against a memcpy in blocks of the packet size.
        let own = ours_median.and_then(|s| Some(s.busy_seconds? * 1e9 / s.units as f64));
        let reference = match kind {
            Kind::HostToGuest { chunk, .. } => memcpy_ns_per_byte
                .iter()
                .find(|(block, _)| *block == *chunk)
                .map(|(_, ns)| *ns),
            _ => None,
        };
        if let (Some(own_ns), Some(memcpy_ns)) = (own, reference) {
            println!(
                "    our driver's own time in that row (calls that moved data, not the waits for the device): {own_ns:.3} ns/byte, {:.2}x the memcpy reference",
                own_ns / memcpy_ns
            );
        }
        results.push(serde_json::json!({
            "workload": kind.name(),
            "ours_own_ns_per_byte": own,
            "memcpy_ns_per_byte": reference,
            "unit": kind.unit(),
            "ours": rate(ours_median),
            "theirs_default": rate(default_median),
            "theirs_best": rate(best_median),
            "ratio_default": ratio(default_median),
            "ratio_best": ratio(best_median),
            "ours_ns_per_unit": per_unit_ns,
            "ours_packets": ours_median.map(|s| s.packets),
            "ours_kicks": ours_median.map(|s| s.kicks),
            "theirs_default_kicks": default_median.map(|s| s.kicks),
            "theirs_best_kicks": best_median.map(|s| s.kicks),
        }));
    }
    println!("\nunits: MiB/s for transfers (ns/unit = ns per byte), operations per second otherwise (ns/unit = ns per operation); x = ours / theirs");
    if let Some(path) = options.json {
        let json = serde_json::to_string_pretty(&results).unwrap_or_default();
        if let Err(e) = std::fs::write(&path, json) {
            eprintln!("bench: cannot write {path}: {e}");
        } else {
            println!("results written to {path}");
        }
    }
}
