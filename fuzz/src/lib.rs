//! The fuzz targets' bodies, as a library so that the same code also runs as an ordinary
//! test on stable (`cargo test` in `fuzz/`) over a few fixed inputs.
//!
//! Both targets drive a live [`VsockDevice`] on the crate's device model (feature
//! `testing`). What they check besides "no panic, no undefined behaviour, no overflow"
//! (cargo fuzz builds with debug assertions and AddressSanitizer):
//!
//! - every buffer the driver puts on the tx ring is exactly one well-formed packet: known
//!   op, stream type (an RST answering an unknown type excepted), no payload on control
//!   ops, RW never empty and never over the tx buffer, `src_cid` one the guest has had;
//! - no socket ever holds more received bytes than its receive buffer (B30, B42);
//! - the guest CID is never a reserved one (B2);
//! - all DMA memory is returned when the device is dropped.

use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use virtio_drivers::transport::DeviceType;
use vsock_guest::testing::{
    ConnId, FakeHal, FakeTransport, HostPeer, Packet, Violation, DEVICE_FEATURES,
};
use vsock_guest::wire::{Header, Op, ShutdownFlags, SocketType, HEADER_LEN, MAX_PAYLOAD};
use vsock_guest::{
    Config, Error, Instant, Shutdown, SocketHandle, SocketSlot, VsockAddr, VsockDevice,
};

type Device<'a> = VsockDevice<'a, FakeHal, FakeTransport>;

const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1234;
const HOST_PORT: u32 = 5000;
const SLOTS: usize = 4;
/// Operations per input at most, so one input stays fast.
const MAX_OPS: usize = 256;

/// A port, mostly one that means something to the driver.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Port {
    GuestListen,
    Host(u8),
    GuestEphemeral(u8),
    Any(u32),
}

impl Port {
    fn get(self) -> u32 {
        match self {
            Port::GuestListen => GUEST_PORT,
            Port::Host(n) => HOST_PORT + u32::from(n % 4),
            Port::GuestEphemeral(n) => 49152 + u32::from(n % 8),
            Port::Any(port) => port,
        }
    }
}

/// A packet with a header built from parts, mostly plausible, so that inputs reach deep
/// connection states; any field may still be anything.
#[derive(Arbitrary, Debug)]
struct PacketSpec {
    src_cid: Option<u64>,
    dst_cid: Option<u64>,
    src_port: Port,
    dst_port: Port,
    socket_type: Option<u16>,
    op: u8,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    /// A `len` other than the payload's.
    len: Option<u32>,
    /// A used length other than the bytes written.
    used_len: Option<u32>,
    payload: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
enum FuzzOp {
    // What the device writes.
    Raw {
        bytes: Vec<u8>,
        used_len: Option<u32>,
    },
    Packet(PacketSpec),
    Used {
        queue: u8,
        id: u32,
        len: u32,
    },
    Event(u32),
    SetCid(u64),
    TransportReset(u64),
    // Device timing.
    ConsumeTx(u8),
    Poll(u16),
    // The scripted host.
    HostConnect(Port),
    HostSend {
        conn: u8,
        len: u16,
        unchecked: bool,
    },
    HostRecv {
        conn: u8,
        len: u16,
    },
    HostControl {
        conn: u8,
        op: u8,
        flags: u32,
    },
    HostShutdown {
        conn: u8,
        flags: u8,
    },
    HostReset(u8),
    HostWithhold {
        conn: u8,
        on: bool,
    },
    HostStep {
        tx: Option<u8>,
        rx: Option<u8>,
    },
    // The guest's calls.
    Socket,
    Bind {
        sock: u8,
        port: Port,
    },
    Listen {
        sock: u8,
        backlog: u8,
    },
    Accept(u8),
    Connect {
        sock: u8,
        cid: u32,
        port: Port,
    },
    Send {
        sock: u8,
        len: u16,
    },
    Recv {
        sock: u8,
        len: u16,
        peek: bool,
    },
    Shutdown {
        sock: u8,
        how: u8,
    },
    Close(u8),
    Abort(u8),
    Check(u8),
}

/// The driver's settings, from the input.
#[derive(Arbitrary, Debug)]
struct Settings {
    queue_size: u8,
    rx_buffer_size: u16,
    tx_packet_size: u16,
    rx_per_socket: u16,
}

impl Settings {
    fn config(&self) -> Config {
        Config {
            queue_size: [2, 4, 8, 16][usize::from(self.queue_size % 4)],
            rx_buffer_size: usize::from(self.rx_buffer_size % 4200) + 1,
            tx_packet_size: usize::from(self.tx_packet_size % 4200) + 1,
            ..Config::default()
        }
    }

    fn rx_per_socket(&self) -> usize {
        usize::from(self.rx_per_socket % 8192) + 1
    }
}

/// The pieces one run works on.
struct World<'a> {
    vsock: Device<'a>,
    host: HostPeer,
    sockets: Vec<SocketHandle>,
    conns: Vec<ConnId>,
    /// Every CID the guest has had (its packets may carry any of them).
    cids: Vec<u64>,
    now: u64,
    tx_payload: usize,
}

/// With `FUZZ_TRACE` set, the operations and the driver's packets are printed.
fn trace() -> bool {
    std::env::var_os("FUZZ_TRACE").is_some()
}

/// Checks one buffer the driver put on the tx ring.
fn check_tx_bytes(bytes: &[u8], cids: &[u64], tx_payload: usize) {
    let (header, payload) = Header::parse_packet(bytes, bytes.len())
        .unwrap_or_else(|e| panic!("tx buffer is not a packet ({e:?}): {bytes:?}"));
    assert_eq!(
        bytes.len(),
        HEADER_LEN + payload.len(),
        "B4: one packet per buffer"
    );
    check_tx_header(&header, cids, tx_payload);
}

fn check_tx_header(header: &Header, cids: &[u64], tx_payload: usize) {
    let op = header
        .op()
        .unwrap_or_else(|| panic!("unknown op sent: {header:?}"));
    assert!(
        header.socket_type() == Some(SocketType::Stream) || op == Op::Rst,
        "B9: type {} on {op:?}",
        header.socket_type
    );
    if op == Op::Rw {
        assert!(header.len > 0, "B25: empty RW");
        assert!(
            header.len as usize <= tx_payload.min(MAX_PAYLOAD),
            "B25: RW too big"
        );
    } else {
        assert_eq!(header.len, 0, "B10: control op {op:?} with payload");
    }
    assert!(
        cids.contains(&header.src_cid),
        "B9: src_cid {} not ours ({cids:?})",
        header.src_cid
    );
}

impl World<'_> {
    fn now(&self) -> Instant {
        Instant::from_millis(self.now)
    }

    fn socket(&self, n: u8) -> Option<SocketHandle> {
        (!self.sockets.is_empty()).then(|| self.sockets[usize::from(n) % self.sockets.len()])
    }

    fn conn(&self, n: u8) -> Option<ConnId> {
        (!self.conns.is_empty()).then(|| self.conns[usize::from(n) % self.conns.len()])
    }

    fn note_cid(&mut self) {
        let cid = u64::from(self.vsock.local_cid());
        assert!(cid > 2 && cid < 0xFFFF_FFFF, "B2: reserved CID {cid}");
        if !self.cids.contains(&cid) {
            self.cids.push(cid);
        }
    }

    /// A CID put in config space: the guest may take it at any later poll (several
    /// resets may take effect within one `settle`), so its packets may carry it.
    fn offer_cid(&mut self, cid: u64) {
        if cid > 2 && cid < 0xFFFF_FFFF && !self.cids.contains(&cid) {
            self.cids.push(cid);
        }
    }

    fn poll(&mut self) {
        self.vsock.poll(self.now());
        self.note_cid();
    }

    /// Checks packets the host took; the CID may have changed while they were sent.
    fn check_packets(&mut self, packets: &[Packet]) {
        self.note_cid();
        for packet in packets {
            if trace() {
                eprintln!("  guest sent {:?}", packet.header);
            }
            check_tx_header(&packet.header, &self.cids, self.tx_payload);
        }
    }

    /// The host's own shape checks must find nothing (credit checks are left out: raw
    /// packets grant credit the host does not know about).
    fn check_host(&mut self) {
        for violation in self.host.take_violations() {
            match violation {
                Violation::CreditExceeded { .. }
                | Violation::FwdCntAhead(_)
                | Violation::WrongSrcCid(_)
                | Violation::DataAfterShutdown(_) => {}
                other => panic!("the host saw {other:?}"),
            }
        }
    }

    fn check_sockets(&self) {
        let per = self.vsock.rx_buffer_per_socket();
        for &socket in &self.sockets {
            if let Ok(held) = self.vsock.recv_queue(socket) {
                assert!(held <= per, "B30: {held} bytes held, {per} advertised");
            }
        }
    }

    fn apply(&mut self, op: FuzzOp) {
        match op {
            FuzzOp::Raw { bytes, used_len } => {
                let used_len = used_len.unwrap_or(bytes.len() as u32);
                let _ = self.host.model_mut().deliver_raw(&bytes, used_len);
            }
            FuzzOp::Packet(spec) => {
                let payload = &spec.payload;
                let header = Header {
                    src_cid: spec.src_cid.unwrap_or(2),
                    dst_cid: spec.dst_cid.unwrap_or(u64::from(self.vsock.local_cid())),
                    src_port: spec.src_port.get(),
                    dst_port: spec.dst_port.get(),
                    len: spec.len.unwrap_or(payload.len() as u32),
                    socket_type: spec.socket_type.unwrap_or(SocketType::Stream as u16),
                    op: u16::from(spec.op % 9),
                    flags: spec.flags,
                    buf_alloc: spec.buf_alloc,
                    fwd_cnt: spec.fwd_cnt,
                };
                let mut bytes = vec![0u8; HEADER_LEN + payload.len()];
                header.emit(&mut bytes).unwrap();
                bytes[HEADER_LEN..].copy_from_slice(payload);
                let used_len = spec.used_len.unwrap_or(bytes.len() as u32);
                let _ = self.host.model_mut().deliver_raw(&bytes, used_len);
            }
            FuzzOp::Used { queue, id, len } => {
                let _ = self
                    .host
                    .model_mut()
                    .push_used(usize::from(queue % 3), id, len);
            }
            FuzzOp::Event(id) => {
                let _ = self.host.model_mut().push_event(id);
            }
            FuzzOp::SetCid(cid) => {
                self.offer_cid(cid);
                self.host.model_mut().set_guest_cid(cid);
            }
            FuzzOp::TransportReset(cid) => {
                self.offer_cid(cid);
                self.host.transport_reset(cid);
            }
            FuzzOp::ConsumeTx(n) => {
                for _ in 0..n {
                    match self.host.model_mut().pop_tx_bytes() {
                        Some(Ok(bytes)) => check_tx_bytes(&bytes, &self.cids, self.tx_payload),
                        Some(Err(e)) => panic!("unreadable tx descriptor: {e:?}"),
                        None => break,
                    }
                }
            }
            FuzzOp::Poll(ms) => {
                self.now += u64::from(ms);
                self.poll();
            }
            FuzzOp::HostConnect(port) => {
                let id = self.host.connect(port.get());
                self.conns.push(id);
            }
            FuzzOp::HostSend {
                conn,
                len,
                unchecked,
            } => {
                if let Some(id) = self.conn(conn) {
                    let data = vec![0x5A; usize::from(len % 9000)];
                    if unchecked {
                        self.host.send_unchecked(id, &data);
                    } else {
                        self.host.send(id, &data);
                    }
                }
            }
            FuzzOp::HostRecv { conn, len } => {
                if let Some(id) = self.conn(conn) {
                    self.host.recv(id, usize::from(len));
                }
            }
            FuzzOp::HostControl { conn, op, flags } => {
                if let Some(id) = self.conn(conn) {
                    if let Some(op) = Op::from_raw(u16::from(op % 8)) {
                        self.host.send_control(id, op, flags);
                    }
                }
            }
            FuzzOp::HostShutdown { conn, flags } => {
                if let Some(id) = self.conn(conn) {
                    let flags = ShutdownFlags::from_bits_truncate(u32::from(flags));
                    self.host.shutdown(id, flags);
                }
            }
            FuzzOp::HostReset(conn) => {
                if let Some(id) = self.conn(conn) {
                    self.host.reset(id);
                }
            }
            FuzzOp::HostWithhold { conn, on } => {
                if let Some(id) = self.conn(conn) {
                    self.host.withhold_credit(id, on);
                }
            }
            FuzzOp::HostStep { tx, rx } => {
                self.host.set_tx_per_step(tx.map(usize::from));
                self.host.set_rx_per_step(rx.map(usize::from));
                let packets = self.host.step();
                self.check_packets(&packets);
                while let Some(id) = self.host.accept(HOST_PORT) {
                    self.conns.push(id);
                }
            }
            FuzzOp::Socket => {
                if let Ok(socket) = self.vsock.stream_socket() {
                    self.sockets.push(socket);
                }
            }
            FuzzOp::Bind { sock, port } => {
                if let Some(socket) = self.socket(sock) {
                    let _ = self
                        .vsock
                        .bind(socket, VsockAddr::new(u32::MAX, port.get()));
                }
            }
            FuzzOp::Listen { sock, backlog } => {
                if let Some(socket) = self.socket(sock) {
                    let _ = self.vsock.listen(socket, usize::from(backlog));
                }
            }
            FuzzOp::Accept(sock) => {
                if let Some(socket) = self.socket(sock) {
                    if let Ok((conn, _)) = self.vsock.accept(socket) {
                        self.sockets.push(conn);
                    }
                }
            }
            FuzzOp::Connect { sock, cid, port } => {
                if let Some(socket) = self.socket(sock) {
                    let _ = self.vsock.connect(socket, VsockAddr::new(cid, port.get()));
                }
            }
            FuzzOp::Send { sock, len } => {
                if let Some(socket) = self.socket(sock) {
                    let data = vec![0xC3; usize::from(len % 9000)];
                    if let Ok(n) = self.vsock.send(socket, &data) {
                        assert!(n <= data.len());
                    }
                }
            }
            FuzzOp::Recv { sock, len, peek } => {
                if let Some(socket) = self.socket(sock) {
                    let mut buf = vec![0u8; usize::from(len % 9000)];
                    let result = if peek {
                        self.vsock.peek(socket, &mut buf)
                    } else {
                        self.vsock.recv(socket, &mut buf)
                    };
                    if let Ok(n) = result {
                        assert!(n <= buf.len());
                    }
                }
            }
            FuzzOp::Shutdown { sock, how } => {
                if let Some(socket) = self.socket(sock) {
                    let how =
                        [Shutdown::Read, Shutdown::Write, Shutdown::Both][usize::from(how % 3)];
                    let _ = self.vsock.shutdown(socket, how);
                }
            }
            FuzzOp::Close(sock) => {
                if let Some(socket) = self.socket(sock) {
                    let _ = self.vsock.close(socket);
                }
            }
            FuzzOp::Abort(sock) => {
                if let Some(socket) = self.socket(sock) {
                    let _ = self.vsock.abort(socket);
                }
            }
            FuzzOp::Check(sock) => {
                if let Some(socket) = self.socket(sock) {
                    let _ = self.vsock.readiness(socket);
                    let _ = self.vsock.take_error(socket);
                    let _ = self.vsock.local_addr(socket);
                    let _ = self.vsock.peer_addr(socket);
                }
            }
        }
        self.note_cid();
        self.check_sockets();
        self.check_host();
    }
}

/// `rx_packets`: bring the driver up with settings from the input, listen on port 1234
/// and connect to the host's port 5000, then run the rest of the input as operations:
/// raw and built packets, used-ring entries, events, CID changes, device timing, a
/// scripted host's moves, and the guest's socket calls.
pub fn rx_packets(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(settings) = Settings::arbitrary(&mut u) else {
        return;
    };
    let live_before = FakeHal::live_allocations();
    {
        let transport = FakeTransport::new(GUEST_CID, DEVICE_FEATURES);
        let mut host = HostPeer::new(&transport);
        host.listen(HOST_PORT);
        let mut slots = [const { SocketSlot::EMPTY }; SLOTS];
        let mut rx_memory = vec![0u8; SLOTS * settings.rx_per_socket()];
        let config = settings.config();
        let vsock = match VsockDevice::<FakeHal, _>::new(
            transport.clone(),
            config,
            &mut slots,
            &mut rx_memory,
        ) {
            Ok(vsock) => vsock,
            Err(e) => {
                // Only settings the driver rejects: buffers that cannot hold a header.
                assert_eq!(e, Error::InvalidArgument);
                assert!(config.rx_buffer_size <= HEADER_LEN || config.tx_packet_size <= HEADER_LEN);
                return;
            }
        };
        let mut world = World {
            vsock,
            host,
            sockets: Vec::new(),
            conns: Vec::new(),
            cids: vec![GUEST_CID],
            now: 0,
            tx_payload: config.tx_packet_size - HEADER_LEN,
        };
        let listener = world.vsock.stream_socket().unwrap();
        world
            .vsock
            .bind(listener, VsockAddr::new(u32::MAX, GUEST_PORT))
            .unwrap();
        world.vsock.listen(listener, 2).unwrap();
        world.sockets.push(listener);
        let client = world.vsock.stream_socket().unwrap();
        assert_eq!(
            world.vsock.connect(client, VsockAddr::new(2, HOST_PORT)),
            Err(Error::InProgress)
        );
        world.sockets.push(client);
        for _ in 0..MAX_OPS {
            let Ok(op) = FuzzOp::arbitrary(&mut u) else {
                break;
            };
            if trace() {
                eprintln!("{op:?}");
            }
            world.apply(op);
        }
        // Whatever happened, the device can be drained and polled.
        world.host.set_tx_per_step(None);
        world.host.set_rx_per_step(None);
        let now = world.now();
        let packets = world.host.settle(&mut world.vsock, now);
        world.check_packets(&packets);
        world.check_host();
        world.check_sockets();
    }
    assert_eq!(
        FakeHal::live_allocations(),
        live_before,
        "DMA memory leaked"
    );
}

/// The device as the input describes it.
#[derive(Arbitrary, Debug)]
struct DeviceSpec {
    guest_cid: u64,
    features: u64,
    not_a_socket: bool,
    max_queue_size: u16,
    settings: Settings,
    /// CIDs to switch to with transport resets after bring-up.
    resets: Vec<(u64, bool)>,
    /// Bytes the host sends after a reset.
    chatter: u16,
}

/// `config_space`: bring-up with an arbitrary guest CID, device type, feature bits and
/// maximum queue size; then, if it came up, a connection with data, and transport resets
/// to arbitrary CIDs (with or without the event).
pub fn config_space(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(spec) = DeviceSpec::arbitrary(&mut u) else {
        return;
    };
    let live_before = FakeHal::live_allocations();
    {
        let transport = FakeTransport::new(spec.guest_cid, spec.features);
        {
            let mut state = transport.state();
            if spec.not_a_socket {
                state.device_type = DeviceType::Network;
            }
            state.max_queue_size = u32::from(spec.max_queue_size);
        }
        let mut host = HostPeer::new(&transport);
        host.listen(HOST_PORT);
        let mut slots = [const { SocketSlot::EMPTY }; SLOTS];
        let mut rx_memory = vec![0u8; SLOTS * spec.settings.rx_per_socket()];
        let config = spec.settings.config();
        let result =
            VsockDevice::<FakeHal, _>::new(transport.clone(), config, &mut slots, &mut rx_memory);
        let offered = spec.features;
        let accepted = transport.state().driver_features;
        assert_eq!(accepted & !offered, 0, "B1: accepted a feature not offered");
        assert_eq!(accepted & 2, 0, "B1: SEQPACKET is not implemented");
        let valid_cid = spec.guest_cid > 2 && spec.guest_cid < 0xFFFF_FFFF;
        let mut vsock = match result {
            Err(e) => {
                let expected = if spec.not_a_socket {
                    e == Error::NoDevice
                } else {
                    matches!(
                        e,
                        Error::NoDevice | Error::DeviceError | Error::InvalidArgument
                    )
                };
                assert!(expected, "bring-up failed with {e:?}");
                if e == Error::DeviceError {
                    assert!(!valid_cid, "valid CID {} refused", spec.guest_cid);
                }
                return;
            }
            Ok(vsock) => vsock,
        };
        assert!(!spec.not_a_socket, "B1: brought up a network device");
        assert!(valid_cid, "B2: came up with CID {}", spec.guest_cid);
        assert_eq!(u64::from(vsock.local_cid()), spec.guest_cid);
        assert!(
            spec.max_queue_size > 0,
            "came up with a device that has no queues"
        );

        let listener = vsock.stream_socket().unwrap();
        vsock
            .bind(listener, VsockAddr::new(u32::MAX, GUEST_PORT))
            .unwrap();
        vsock.listen(listener, 2).unwrap();
        let mut now = 0u64;
        let mut cid = spec.guest_cid;
        for (new_cid, with_event) in spec.resets.iter().take(8) {
            now += 1;
            let conn = host.connect(GUEST_PORT);
            host.settle(&mut vsock, Instant::from_millis(now));
            if let Ok((socket, _)) = vsock.accept(listener) {
                let data = vec![7u8; usize::from(spec.chatter % 5000)];
                host.send(conn, &data);
                host.settle(&mut vsock, Instant::from_millis(now));
                let mut buf = vec![0u8; data.len()];
                let _ = vsock.recv(socket, &mut buf);
                let _ = vsock.send(socket, &buf);
                host.settle(&mut vsock, Instant::from_millis(now));
                let _ = vsock.close(socket);
            }
            if *with_event {
                host.transport_reset(*new_cid);
            } else {
                host.model_mut().set_guest_cid(*new_cid);
            }
            host.settle(&mut vsock, Instant::from_millis(now));
            let local = u64::from(vsock.local_cid());
            if *with_event && *new_cid > 2 && *new_cid < 0xFFFF_FFFF {
                cid = *new_cid;
            }
            // B40: the new CID if valid, else the old one kept.
            assert_eq!(local, cid, "B2/B40: CID after reset");
        }
        for violation in host.take_violations() {
            match violation {
                Violation::Malformed { .. }
                | Violation::BadDescriptor(_)
                | Violation::UnknownOp(_)
                | Violation::WrongType(_)
                | Violation::ControlWithPayload(_)
                | Violation::EmptyRw(_)
                | Violation::OversizedPayload(_) => panic!("the host saw {violation:?}"),
                _ => {}
            }
        }
    }
    assert_eq!(
        FakeHal::live_allocations(),
        live_before,
        "DMA memory leaked"
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    /// The DMA leak check counts allocations process-wide: one test at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// The targets over fixed inputs, so the harness is checked on stable.
    #[test]
    fn targets_run_over_fixed_inputs() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut input = vec![0u8; 4096];
        for round in 0..300 {
            for byte in input.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *byte = seed as u8;
            }
            let len = 64 + round * 13 % 4000;
            super::rx_packets(&input[..len]);
            super::config_space(&input[..len]);
        }
        super::rx_packets(&[]);
        super::config_space(&[]);
    }

    /// Replays every input under `artifacts/<target>/` and `regressions/<target>/` (crashes
    /// found by `cargo fuzz`, kept ones first), on stable.
    #[test]
    fn saved_inputs_pass() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in ["regressions", "artifacts"] {
            for (target, run) in [
                ("rx_packets", super::rx_packets as fn(&[u8])),
                ("config_space", super::config_space as fn(&[u8])),
            ] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
                    continue;
                };
                let mut paths: Vec<_> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
                paths.sort();
                for path in paths {
                    eprintln!("{}", path.display());
                    run(&std::fs::read(&path).unwrap());
                }
            }
        }
    }
}
