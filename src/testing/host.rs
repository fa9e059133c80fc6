//! [`HostPeer`]: the host end of every connection, scripted by the test, on top of the
//! [`DeviceModel`].

use super::hal::FakeHal;
use super::model::{DeviceModel, ModelError, Packet};
use super::transport::FakeTransport;
use crate::socket::VsockDevice;
use crate::time::Instant;
use crate::wire::{
    Header, Op, ShutdownFlags, SocketType, EVENT_TRANSPORT_RESET, HEADER_LEN, MAX_PAYLOAD,
};
use std::collections::VecDeque;
use std::vec::Vec;

/// The host's CID (`VMADDR_CID_HOST`), the default CID of a [`HostPeer`].
pub const HOST_CID: u64 = 2;
/// First port [`HostPeer::connect`] connects from.
pub const FIRST_HOST_PORT: u32 = 40_000;
/// Receive buffer a [`HostPeer`] connection advertises unless told otherwise.
pub const DEFAULT_HOST_BUF_ALLOC: u32 = 256 * 1024;
/// Rounds of [`HostPeer::settle`] before it gives up on a conversation that never ends.
pub const SETTLE_LIMIT: usize = 10_000;

const RX: usize = 0;
/// Receive buffer size assumed until the driver has posted one.
const ASSUMED_RX_BUFFER: u32 = 4096;

/// Names a connection of a [`HostPeer`] (an index; never reused within one peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(usize);

impl ConnId {
    /// The index of the connection, in the order the peer created them.
    pub const fn index(self) -> usize {
        self.0
    }
}

/// Where a host connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// The host sent REQUEST and waits for the guest's RESPONSE.
    Connecting,
    /// Established.
    Connected,
    /// The guest answered the host's REQUEST with RST.
    Refused,
    /// The guest sent RST (also the normal end after the host's SHUTDOWN of both
    /// directions).
    ResetByGuest,
    /// The host sent RST: [`HostPeer::reset`], or its answer to the guest's SHUTDOWN of
    /// both directions or to a protocol error.
    ResetByHost,
    /// [`HostPeer::transport_reset`] dropped it.
    TransportReset,
}

impl ConnState {
    /// Whether packets of the tuple still belong to this connection.
    pub const fn is_open(self) -> bool {
        matches!(self, ConnState::Connecting | ConnState::Connected)
    }
}

/// How a [`HostPeer`] listener answers a guest's REQUEST.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptMode {
    /// RESPONSE, and the connection waits for [`HostPeer::accept`].
    Accept,
    /// RESPONSE twice (a buggy host); the connection is accepted.
    AcceptTwice,
    /// RST, as if the backlog were full.
    Refuse,
    /// No answer at all: the guest's connect times out.
    Ignore,
}

/// Something the guest did that the virtio spec or `BEHAVIOUR.md` forbids, as the host saw
/// it. A correct driver leaves [`HostPeer::violations`] empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// A tx buffer that is not exactly one packet: a header and `len` bytes (B4).
    Malformed {
        /// Bytes in the buffer.
        bytes: usize,
    },
    /// A tx descriptor the device could not read.
    BadDescriptor(ModelError),
    /// `src_cid` is not the guest's CID (B9).
    WrongSrcCid(Header),
    /// An op the spec does not define.
    UnknownOp(Header),
    /// A socket type other than stream, on anything but an RST answering one (B9, B11).
    WrongType(Header),
    /// A control packet with a payload (B10).
    ControlWithPayload(Header),
    /// An RW packet without payload (B25).
    EmptyRw(Header),
    /// A payload over 64 KiB (B25).
    OversizedPayload(Header),
    /// More data than the credit the host had given (B25). `allowed` is what the host's
    /// delivered advertisements permitted at that point.
    CreditExceeded {
        /// The offending packet.
        header: Header,
        /// Bytes the guest could still send.
        allowed: u64,
    },
    /// A `fwd_cnt` claiming more bytes consumed than the host ever sent (B27).
    FwdCntAhead(Header),
    /// Data after the guest's own SHUTDOWN(SEND) (B35).
    DataAfterShutdown(Header),
}

/// A way to damage a packet, for [`HostPeer::inject_corrupt`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corruption {
    /// Header `len` larger than the bytes written (B10).
    LenBeyondWritten,
    /// Header `len` larger than the receive buffer itself (B10).
    LenBeyondBuffer,
    /// Fewer than 44 bytes written (B6).
    Truncated,
    /// A used-ring length larger than the buffer (B6).
    UsedLenBeyondBuffer,
    /// An op the spec does not define (B10).
    UnknownOp(u16),
    /// A socket type the driver does not know (B11).
    UnknownType(u16),
    /// A `dst_cid` other than the guest's (B10).
    WrongDstCid(u64),
    /// A control op (CREDIT_UPDATE) carrying a payload (B10).
    ControlWithPayload,
}

/// One connection as the host sees it. Counters are `u64` totals; on the wire they wrap
/// as `u32`.
#[derive(Clone, Debug)]
pub struct HostConn {
    host_port: u32,
    guest_port: u32,
    state: ConnState,
    guest_shutdown: ShutdownFlags,
    host_shutdown: ShutdownFlags,
    // Receive side.
    buf_alloc: u32,
    rx_cnt: u64,
    fwd_cnt: u64,
    received: VecDeque<u8>,
    /// `fwd_cnt + buf_alloc` of the latest packet queued: the guest's view of the host's
    /// space once it has everything.
    advertised_limit: u64,
    /// Largest `fwd_cnt + buf_alloc` in a packet the guest has received.
    granted_limit: u64,
    /// While credit is withheld: the `(buf_alloc, fwd_cnt)` every packet carries.
    frozen: Option<(u32, u64)>,
    // Send side.
    tx_cnt: u64,
    guest_buf_alloc: u32,
    guest_fwd_cnt: u32,
}

impl HostConn {
    fn new(host_port: u32, guest_port: u32, state: ConnState, buf_alloc: u32) -> Self {
        HostConn {
            host_port,
            guest_port,
            state,
            guest_shutdown: ShutdownFlags::empty(),
            host_shutdown: ShutdownFlags::empty(),
            buf_alloc,
            rx_cnt: 0,
            fwd_cnt: 0,
            received: VecDeque::new(),
            advertised_limit: 0,
            granted_limit: 0,
            frozen: None,
            tx_cnt: 0,
            guest_buf_alloc: 0,
            guest_fwd_cnt: 0,
        }
    }

    /// The host's port.
    pub fn host_port(&self) -> u32 {
        self.host_port
    }

    /// The guest's port.
    pub fn guest_port(&self) -> u32 {
        self.guest_port
    }

    /// Where the connection stands.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// SHUTDOWN flags the guest sent (sticky).
    pub fn guest_shutdown(&self) -> ShutdownFlags {
        self.guest_shutdown
    }

    /// SHUTDOWN flags the host sent (sticky).
    pub fn host_shutdown(&self) -> ShutdownFlags {
        self.host_shutdown
    }

    /// The host's receive buffer, as advertised (`buf_alloc`).
    pub fn buf_alloc(&self) -> u32 {
        self.buf_alloc
    }

    /// Bytes received from the guest in total.
    pub fn rx_cnt(&self) -> u64 {
        self.rx_cnt
    }

    /// Bytes the host application consumed in total (`fwd_cnt`).
    pub fn fwd_cnt(&self) -> u64 {
        self.fwd_cnt
    }

    /// Bytes received and not yet consumed.
    pub fn unread(&self) -> usize {
        self.received.len()
    }

    /// Bytes the host sent in total.
    pub fn tx_cnt(&self) -> u64 {
        self.tx_cnt
    }

    /// The guest's receive buffer, from its latest header.
    pub fn guest_buf_alloc(&self) -> u32 {
        self.guest_buf_alloc
    }

    /// The guest's `fwd_cnt`, from its latest header.
    pub fn guest_fwd_cnt(&self) -> u32 {
        self.guest_fwd_cnt
    }

    /// Bytes sent and not yet consumed by the guest, as far as the host knows.
    pub fn guest_in_flight(&self) -> u32 {
        (self.tx_cnt as u32).wrapping_sub(self.guest_fwd_cnt)
    }

    /// Bytes the host may send now: `guest_buf_alloc - (tx_cnt - guest_fwd_cnt)`, never
    /// negative.
    pub fn guest_credit(&self) -> u32 {
        self.guest_buf_alloc.saturating_sub(self.guest_in_flight())
    }

    /// Whether credit is being withheld ([`HostPeer::withhold_credit`]).
    pub fn is_withholding_credit(&self) -> bool {
        self.frozen.is_some()
    }

    /// The `(buf_alloc, fwd_cnt)` for a packet sent now, and the limit it grants.
    fn stamp(&mut self) -> (u32, u32, u64) {
        let (buf_alloc, fwd_cnt) = self.frozen.unwrap_or((self.buf_alloc, self.fwd_cnt));
        let limit = fwd_cnt + u64::from(buf_alloc);
        self.advertised_limit = limit;
        (buf_alloc, fwd_cnt as u32, limit)
    }

    /// Whether the guest's view of the host's free space ran low (under the buffer's
    /// `1 / low_space_divisor`, at most 64 KiB; the divisor is at least 1) and an update
    /// would show more.
    fn wants_credit_update(&self, low_space_divisor: u32) -> bool {
        if self.frozen.is_some() || !self.state.is_open() {
            return false;
        }
        let view = self.advertised_limit.saturating_sub(self.rx_cnt);
        let real = u64::from(self.buf_alloc).saturating_sub(self.received.len() as u64);
        let threshold = u64::from((self.buf_alloc / low_space_divisor).clamp(1, 64 * 1024));
        view < threshold && real > view
    }
}

/// A device action waiting for the driver to have room for it.
#[derive(Clone, Debug)]
enum Outgoing {
    /// Packet bytes for the next rx buffer, with the used length to report, and the
    /// credit limit it grants on a connection.
    Packet {
        bytes: Vec<u8>,
        used_len: u32,
        grant: Option<(ConnId, u64)>,
    },
    /// A raw used-ring entry.
    Used { queue: usize, id: u32, len: u32 },
    /// A device event; `TRANSPORT_RESET` also switches the guest CID.
    Event { id: u32, new_cid: Option<u64> },
}

/// The host side of vsock, played by the test: it consumes what the driver sends, answers
/// as a well-behaved host (Linux `virtio_transport_common`) does, and can be told to
/// misbehave in every way the driver must survive.
///
/// The peer never runs on its own: [`HostPeer::step`] takes the packets the driver has put
/// on the tx ring and delivers what the host has to say, [`HostPeer::settle`] alternates
/// that with [`VsockDevice::poll`] until both sides are quiet. Every action (data, control
/// packets, corrupted packets, raw used-ring entries, events) goes through one queue in
/// order, delivered as soon as the driver has posted room for it, or at most
/// [`set_rx_per_step`](HostPeer::set_rx_per_step) per step.
///
/// Well-behaved by default:
/// - listeners ([`listen`](HostPeer::listen)) answer REQUEST with RESPONSE, anything for
///   no connection gets RST (never an RST for an RST);
/// - [`send`](HostPeer::send) never exceeds the guest's credit, every packet carries the
///   host's `buf_alloc`/`fwd_cnt`, [`recv`](HostPeer::recv) consumes and sends a
///   CREDIT_UPDATE when the guest's view of the host's space runs low, CREDIT_REQUEST is
///   answered;
/// - the guest's SHUTDOWN of both directions is answered with RST.
///
/// And it checks the guest: every packet the driver sends is validated (addresses, type,
/// op, length, credit); what is wrong lands in [`violations`](HostPeer::violations).
#[derive(Debug)]
pub struct HostPeer {
    model: DeviceModel,
    cid: u64,
    guest_cid: u64,
    /// CIDs the guest had before transport resets: its packets from then are dropped.
    stale_cids: Vec<u64>,
    conns: Vec<HostConn>,
    listeners: Vec<(u32, AcceptMode)>,
    accepted: VecDeque<ConnId>,
    outbox: VecDeque<Outgoing>,
    tx_per_step: Option<usize>,
    rx_per_step: Option<usize>,
    default_buf_alloc: u32,
    rx_buffer_len: u32,
    next_port: u32,
    answer_shutdown: bool,
    answer_credit_requests: bool,
    low_space_divisor: u32,
    violations: Vec<Violation>,
    delivered: u64,
    dropped: u64,
}

impl HostPeer {
    /// The host (CID 2) behind `transport`. Create it before or after the driver; it reads
    /// the guest's CID from the transport's config space.
    pub fn new(transport: &FakeTransport) -> Self {
        let guest_cid = u64::from_le_bytes(transport.state().config);
        HostPeer {
            model: DeviceModel::new(transport),
            cid: HOST_CID,
            guest_cid,
            stale_cids: Vec::new(),
            conns: Vec::new(),
            listeners: Vec::new(),
            accepted: VecDeque::new(),
            outbox: VecDeque::new(),
            tx_per_step: None,
            rx_per_step: None,
            default_buf_alloc: DEFAULT_HOST_BUF_ALLOC,
            rx_buffer_len: 0,
            next_port: FIRST_HOST_PORT,
            answer_shutdown: true,
            answer_credit_requests: true,
            low_space_divisor: 2,
            violations: Vec::new(),
            delivered: 0,
            dropped: 0,
        }
    }

    /// The device model underneath, for raw access.
    pub fn model(&self) -> &DeviceModel {
        &self.model
    }

    /// The device model underneath, for raw access. Packets taken from it directly bypass
    /// the peer's bookkeeping.
    pub fn model_mut(&mut self) -> &mut DeviceModel {
        &mut self.model
    }

    /// The host's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Plays a peer with another CID (a sibling VM, or the hypervisor) instead of the host.
    pub fn set_cid(&mut self, cid: u64) {
        self.cid = cid;
    }

    /// The guest's CID as the host knows it.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Receive buffer new connections advertise (default [`DEFAULT_HOST_BUF_ALLOC`]).
    pub fn set_default_buf_alloc(&mut self, buf_alloc: u32) {
        self.default_buf_alloc = buf_alloc;
    }

    /// Tx buffers the device consumes per [`step`](HostPeer::step): `None` (the default) for
    /// all of them, `Some(0)` for a device that stopped consuming the tx ring.
    pub fn set_tx_per_step(&mut self, limit: Option<usize>) {
        self.tx_per_step = limit;
    }

    /// Packets the device delivers per [`step`](HostPeer::step): `None` (the default) for
    /// all it can, at once, as soon as they are queued; `Some(n)` for at most `n`, and only
    /// in `step`.
    pub fn set_rx_per_step(&mut self, limit: Option<usize>) {
        self.rx_per_step = limit;
    }

    /// Whether the guest's SHUTDOWN of both directions is answered with RST (default
    /// `true`). `false` plays a host that never finishes a close (the guest's close
    /// timeout then sends RST).
    pub fn set_answer_shutdown(&mut self, answer: bool) {
        self.answer_shutdown = answer;
    }

    /// Whether CREDIT_REQUEST is answered with CREDIT_UPDATE (default `true`).
    pub fn set_answer_credit_requests(&mut self, answer: bool) {
        self.answer_credit_requests = answer;
    }

    /// When the host volunteers a CREDIT_UPDATE: once the guest's view of its free space
    /// falls under `1 / divisor` of its buffer (at most 64 KiB) and an update would show
    /// more. The default, 2, returns credit early; 4 plays vhost-device-vsock 0.3.0, which
    /// updates once more than three quarters of its buffer were forwarded since it last
    /// sent the guest a packet (`vsock_conn.rs`, `send_bytes`), and Linux at its default
    /// 256 KiB buffer (free space under 64 KiB).
    pub fn set_low_space_divisor(&mut self, divisor: u32) {
        self.low_space_divisor = divisor.max(1);
    }

    /// What the guest did wrong so far.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Takes the violations recorded so far.
    pub fn take_violations(&mut self) -> Vec<Violation> {
        core::mem::take(&mut self.violations)
    }

    /// Actions queued and not yet delivered (no room in the driver's rings, or the
    /// per-step limit).
    pub fn pending(&self) -> usize {
        self.outbox.len()
    }

    /// Packets delivered into rx buffers so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Queued packets the device could not place (too big for the rx buffer).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The connection `id`.
    ///
    /// # Panics
    /// If `id` is not one of this peer's.
    pub fn conn(&self, id: ConnId) -> &HostConn {
        &self.conns[id.0]
    }

    /// Every connection so far, closed ones included, oldest first.
    pub fn conns(&self) -> impl Iterator<Item = (ConnId, &HostConn)> {
        self.conns.iter().enumerate().map(|(i, c)| (ConnId(i), c))
    }

    /// The open connection of the tuple (host port, guest port), if any.
    pub fn find(&self, host_port: u32, guest_port: u32) -> Option<ConnId> {
        self.conns
            .iter()
            .rposition(|c| {
                c.state.is_open() && c.host_port == host_port && c.guest_port == guest_port
            })
            .map(ConnId)
    }

    /// Accepts guest connections to `host_port`, answering with RESPONSE.
    pub fn listen(&mut self, host_port: u32) {
        self.listen_with(host_port, AcceptMode::Accept);
    }

    /// Accepts guest connections to `host_port` the way `mode` says.
    pub fn listen_with(&mut self, host_port: u32, mode: AcceptMode) {
        self.listeners.retain(|(port, _)| *port != host_port);
        self.listeners.push((host_port, mode));
    }

    /// Stops listening on `host_port`: later REQUESTs get RST.
    pub fn unlisten(&mut self, host_port: u32) {
        self.listeners.retain(|(port, _)| *port != host_port);
    }

    /// The oldest guest connection to `host_port` not accepted yet.
    pub fn accept(&mut self, host_port: u32) -> Option<ConnId> {
        let position = self
            .accepted
            .iter()
            .position(|id| self.conns[id.0].host_port == host_port)?;
        self.accepted.remove(position)
    }

    /// Connects to `guest_port` from the next free host port: sends REQUEST. The
    /// connection is [`Connecting`](ConnState::Connecting) until the guest answers.
    pub fn connect(&mut self, guest_port: u32) -> ConnId {
        let host_port = self.next_port;
        self.next_port = self.next_port.wrapping_add(1);
        self.connect_from(host_port, guest_port)
    }

    /// Connects to `guest_port` from `host_port` (sends REQUEST), even if that tuple is in
    /// use (a duplicate REQUEST, B17).
    pub fn connect_from(&mut self, host_port: u32, guest_port: u32) -> ConnId {
        let id = ConnId(self.conns.len());
        self.conns.push(HostConn::new(
            host_port,
            guest_port,
            ConnState::Connecting,
            self.default_buf_alloc,
        ));
        self.queue_control(id, Op::Request, 0);
        id
    }

    /// Sends as much of `data` as the guest's credit allows, in packets that fit the
    /// guest's rx buffers; returns the bytes taken. 0 when nothing can be sent: no
    /// credit, not connected, or either side shut that direction down.
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> usize {
        let conn = &self.conns[id.0];
        if conn.state != ConnState::Connected
            || conn.host_shutdown.contains(ShutdownFlags::SEND)
            || conn.guest_shutdown.contains(ShutdownFlags::RECEIVE)
        {
            return 0;
        }
        let n = data.len().min(conn.guest_credit() as usize);
        self.send_data(id, &data[..n]);
        n
    }

    /// Sends all of `data` whatever the state, the shutdowns and the guest's credit: a host
    /// that overruns the credit (B30), or sends after its own SHUTDOWN (B33).
    pub fn send_unchecked(&mut self, id: ConnId, data: &[u8]) {
        self.send_data(id, data);
    }

    fn send_data(&mut self, id: ConnId, data: &[u8]) {
        let chunk = self.max_payload();
        for piece in data.chunks(chunk) {
            let header = self.stamped(id, Op::Rw, 0);
            let conn = &mut self.conns[id.0];
            conn.tx_cnt += piece.len() as u64;
            let grant = header.1;
            self.queue_packet(&header.0, piece, Some((id, grant)));
        }
        self.flush_if_eager();
    }

    /// Largest payload of one packet to the guest: what its rx buffers hold.
    pub fn max_payload(&mut self) -> usize {
        if let Some(len) = self.model.next_buffer_len(RX) {
            self.rx_buffer_len = len;
        }
        let len = if self.rx_buffer_len == 0 {
            ASSUMED_RX_BUFFER
        } else {
            self.rx_buffer_len
        };
        (len as usize)
            .saturating_sub(HEADER_LEN)
            .clamp(1, MAX_PAYLOAD)
    }

    /// Consumes up to `max` received bytes (the host application reads them) and sends a
    /// CREDIT_UPDATE when the guest's view of the host's space has run low.
    pub fn recv(&mut self, id: ConnId, max: usize) -> Vec<u8> {
        let conn = &mut self.conns[id.0];
        let n = max.min(conn.received.len());
        let data: Vec<u8> = conn.received.drain(..n).collect();
        conn.fwd_cnt += n as u64;
        if n > 0 && conn.wants_credit_update(self.low_space_divisor) {
            self.queue_control(id, Op::CreditUpdate, 0);
        }
        data
    }

    /// Consumes everything received so far (see [`recv`](HostPeer::recv)).
    pub fn recv_all(&mut self, id: ConnId) -> Vec<u8> {
        self.recv(id, usize::MAX)
    }

    /// Changes the host's receive buffer (`buf_alloc`) and tells the guest with a
    /// CREDIT_UPDATE, unless credit is withheld. Shrinking below what is unread is allowed.
    pub fn set_buf_alloc(&mut self, id: ConnId, buf_alloc: u32) {
        self.conns[id.0].buf_alloc = buf_alloc;
        if self.conns[id.0].frozen.is_none() && self.conns[id.0].state.is_open() {
            self.queue_control(id, Op::CreditUpdate, 0);
        }
    }

    /// While `withhold` is true every packet on `id` carries the `buf_alloc` and
    /// `fwd_cnt` of this moment, however much the host consumes, and no CREDIT_UPDATE
    /// goes out (CREDIT_REQUEST is answered with the frozen values). Setting it back to
    /// false sends a CREDIT_UPDATE with the real values.
    pub fn withhold_credit(&mut self, id: ConnId, withhold: bool) {
        let conn = &mut self.conns[id.0];
        match (withhold, conn.frozen) {
            (true, None) => conn.frozen = Some((conn.buf_alloc, conn.fwd_cnt)),
            (false, Some(_)) => {
                conn.frozen = None;
                if conn.state.is_open() {
                    self.queue_control(id, Op::CreditUpdate, 0);
                }
            }
            _ => {}
        }
    }

    /// Shuts down `flags` of the connection (sticky) and sends SHUTDOWN with all flags
    /// shut so far (B32).
    pub fn shutdown(&mut self, id: ConnId, flags: ShutdownFlags) {
        let conn = &mut self.conns[id.0];
        conn.host_shutdown |= flags;
        let all = conn.host_shutdown.bits();
        self.queue_control(id, Op::Shutdown, all);
    }

    /// Resets the connection: sends RST, and the host forgets the connection.
    pub fn reset(&mut self, id: ConnId) {
        self.queue_control(id, Op::Rst, 0);
        let conn = &mut self.conns[id.0];
        if conn.state.is_open() {
            conn.state = ConnState::ResetByHost;
        }
    }

    /// Sends control op `op` with `flags` on the connection's tuple now, whatever its
    /// state, stamped with the host's credit, and changes nothing on the host side: a
    /// second RESPONSE, a duplicate REQUEST, an RST or SHUTDOWN the host then ignores.
    pub fn send_control(&mut self, id: ConnId, op: Op, flags: u32) {
        self.queue_control(id, op, flags);
    }

    /// The header of a packet from the host on the connection's tuple, with the host's
    /// current credit: a start for hand-made packets ([`inject`](HostPeer::inject)).
    pub fn header_for(&self, id: ConnId, op: Op) -> Header {
        let conn = &self.conns[id.0];
        let (buf_alloc, fwd_cnt) = conn.frozen.unwrap_or((conn.buf_alloc, conn.fwd_cnt));
        Header {
            buf_alloc,
            fwd_cnt: fwd_cnt as u32,
            ..self.header_to(conn.host_port, conn.guest_port, op)
        }
    }

    /// The header of a packet from `host_port` to `guest_port` with no credit: for packets
    /// on tuples the host has no connection for (an unsolicited RESPONSE, say).
    pub fn header_to(&self, host_port: u32, guest_port: u32, op: Op) -> Header {
        Header {
            src_cid: self.cid,
            dst_cid: self.guest_cid,
            src_port: host_port,
            dst_port: guest_port,
            len: 0,
            socket_type: SocketType::Stream as u16,
            op: op as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// Delivers `header` (exactly as given: its `len` is not corrected) followed by
    /// `payload`. Changes nothing on the host side.
    pub fn inject(&mut self, header: &Header, payload: &[u8]) {
        let mut bytes = std::vec![0u8; HEADER_LEN + payload.len()];
        // The buffer is at least HEADER_LEN long.
        let _ = header.emit(&mut bytes);
        bytes[HEADER_LEN..].copy_from_slice(payload);
        let used_len = bytes.len() as u32;
        self.inject_raw(bytes, used_len);
    }

    /// Writes `bytes` into the next rx buffer and returns it with `used_len` as the length
    /// written, whatever they are.
    pub fn inject_raw(&mut self, bytes: Vec<u8>, used_len: u32) {
        self.outbox.push_back(Outgoing::Packet {
            bytes,
            used_len,
            grant: None,
        });
        self.flush_if_eager();
    }

    /// Puts a used-ring entry on `queue` (0 rx, 1 tx, 2 event) with any `id` and `len`:
    /// an id never posted, one posted but not used, a length beyond the buffer (B6).
    ///
    /// The used ring holds as many entries as the queue has descriptors: entries beyond
    /// what the driver has read overwrite older ones, exactly as a device writing them
    /// would, and the driver then reads replayed buffers it cannot tell from real ones.
    pub fn inject_used(&mut self, queue: usize, id: u32, len: u32) {
        self.outbox.push_back(Outgoing::Used { queue, id, len });
        self.flush_if_eager();
    }

    /// Sends a damaged packet on the connection's tuple (dropped or answered with RST by a
    /// correct driver, never taken as data). Changes nothing on the host side.
    pub fn inject_corrupt(&mut self, id: ConnId, corruption: Corruption) {
        let buffer = self.max_payload() + HEADER_LEN;
        let rw = |peer: &Self, payload: &[u8]| Header {
            len: payload.len() as u32,
            ..peer.header_for(id, Op::Rw)
        };
        let payload = [0xA5u8; 8];
        match corruption {
            Corruption::LenBeyondWritten => {
                let header = Header {
                    len: 100,
                    ..rw(self, &payload)
                };
                self.inject(&header, &payload);
            }
            Corruption::LenBeyondBuffer => {
                let header = Header {
                    len: buffer as u32 + 1,
                    ..rw(self, &payload)
                };
                self.inject(&header, &payload);
            }
            Corruption::Truncated => {
                let mut bytes = std::vec![0u8; HEADER_LEN];
                let _ = self.header_for(id, Op::CreditUpdate).emit(&mut bytes);
                bytes.truncate(HEADER_LEN / 2);
                let len = bytes.len() as u32;
                self.inject_raw(bytes, len);
            }
            Corruption::UsedLenBeyondBuffer => {
                let mut bytes = std::vec![0u8; HEADER_LEN + payload.len()];
                let _ = rw(self, &payload).emit(&mut bytes);
                self.inject_raw(bytes, buffer as u32 + 1);
            }
            Corruption::UnknownOp(op) => {
                let header = Header {
                    op,
                    ..rw(self, &payload)
                };
                self.inject(&header, &payload);
            }
            Corruption::UnknownType(socket_type) => {
                let header = Header {
                    socket_type,
                    ..self.header_for(id, Op::Request)
                };
                self.inject(&header, &[]);
            }
            Corruption::WrongDstCid(dst_cid) => {
                let header = Header {
                    dst_cid,
                    ..rw(self, &payload)
                };
                self.inject(&header, &payload);
            }
            Corruption::ControlWithPayload => {
                let header = Header {
                    len: payload.len() as u32,
                    ..self.header_for(id, Op::CreditUpdate)
                };
                self.inject(&header, &payload);
            }
        }
    }

    /// Sends device event `id` on the event queue (an unknown id, say: B39).
    pub fn fire_event(&mut self, id: u32) {
        self.outbox.push_back(Outgoing::Event { id, new_cid: None });
        self.flush_if_eager();
    }

    /// A transport reset (after migration, B40): the host forgets every connection and
    /// everything not delivered yet, then switches the guest to `new_cid` (config space)
    /// and fires `TRANSPORT_RESET` as soon as an event buffer is posted. Packets the guest
    /// sent under its old CID are dropped from then on.
    pub fn transport_reset(&mut self, new_cid: u64) {
        self.outbox.clear();
        for conn in &mut self.conns {
            if conn.state.is_open() {
                conn.state = ConnState::TransportReset;
            }
        }
        self.accepted.clear();
        self.outbox.push_back(Outgoing::Event {
            id: EVENT_TRANSPORT_RESET,
            new_cid: Some(new_cid),
        });
        self.flush_if_eager();
    }

    /// One round of the device: takes the packets the driver sent (up to the tx limit),
    /// answers them, and delivers what is queued (up to the rx limit). Returns the packets
    /// taken.
    pub fn step(&mut self) -> Vec<Packet> {
        let budget = self.tx_per_step.unwrap_or(usize::MAX);
        let mut taken = Vec::new();
        let mut consumed = 0;
        while consumed < budget {
            let Some(next) = self.model.pop_tx_bytes() else {
                break;
            };
            consumed += 1;
            match next {
                Ok(bytes) => {
                    if let Some(packet) = self.on_guest_bytes(&bytes) {
                        taken.push(packet);
                    }
                }
                Err(e) => self.violations.push(Violation::BadDescriptor(e)),
            }
        }
        self.flush(self.rx_per_step.unwrap_or(usize::MAX));
        taken
    }

    /// Alternates [`VsockDevice::poll`] at `now` with [`step`](HostPeer::step) until
    /// neither side has anything left to say (at most [`SETTLE_LIMIT`] rounds). Returns the
    /// packets the driver sent meanwhile.
    pub fn settle(
        &mut self,
        vsock: &mut VsockDevice<'_, FakeHal, FakeTransport>,
        now: Instant,
    ) -> Vec<Packet> {
        let mut all = Vec::new();
        for _ in 0..SETTLE_LIMIT {
            vsock.poll(now);
            let delivered = self.delivered;
            let pending = self.outbox.len();
            let packets = self.step();
            let progress =
                !packets.is_empty() || self.delivered != delivered || self.outbox.len() != pending;
            all.extend(packets);
            if !progress {
                break;
            }
        }
        all
    }

    fn flush_if_eager(&mut self) {
        if self.rx_per_step.is_none() {
            self.flush(usize::MAX);
        }
    }

    /// Delivers queued actions in order while the driver has room, at most `limit`
    /// packets.
    fn flush(&mut self, limit: usize) {
        let mut packets = 0;
        while let Some(next) = self.outbox.front() {
            match next {
                Outgoing::Packet { .. } => {
                    if packets >= limit {
                        break;
                    }
                    let Some(room) = self.model.next_buffer_len(RX) else {
                        break;
                    };
                    self.rx_buffer_len = room;
                    let Some(Outgoing::Packet {
                        bytes,
                        used_len,
                        grant,
                    }) = self.outbox.pop_front()
                    else {
                        break;
                    };
                    packets += 1;
                    if bytes.len() > room as usize {
                        // Only hand-made packets can be this big; a device would drop them.
                        self.dropped += 1;
                        continue;
                    }
                    match self.model.deliver_raw(&bytes, used_len) {
                        Ok(_) => {
                            self.delivered += 1;
                            if let Some((id, limit)) = grant {
                                let conn = &mut self.conns[id.0];
                                conn.granted_limit = conn.granted_limit.max(limit);
                            }
                        }
                        Err(_) => self.dropped += 1,
                    }
                }
                Outgoing::Used { queue, id, len } => {
                    let (queue, id, len) = (*queue, *id, *len);
                    // A queue not set up yet takes no entries: drop it.
                    let _ = self.model.push_used(queue, id, len);
                    self.outbox.pop_front();
                }
                Outgoing::Event { id, new_cid } => {
                    let (id, new_cid) = (*id, *new_cid);
                    if self.model.available(2) == 0 {
                        break;
                    }
                    if let Some(cid) = new_cid {
                        self.model.set_guest_cid(cid);
                        if cid != self.guest_cid {
                            self.stale_cids.push(self.guest_cid);
                        }
                        self.guest_cid = cid;
                    }
                    let _ = self.model.push_event(id);
                    self.outbox.pop_front();
                }
            }
        }
    }

    /// The header of a packet on `id` stamped with the host's credit, and the limit it
    /// grants.
    fn stamped(&mut self, id: ConnId, op: Op, flags: u32) -> (Header, u64) {
        let (cid, guest_cid) = (self.cid, self.guest_cid);
        let conn = &mut self.conns[id.0];
        let (buf_alloc, fwd_cnt, limit) = conn.stamp();
        (
            Header {
                src_cid: cid,
                dst_cid: guest_cid,
                src_port: conn.host_port,
                dst_port: conn.guest_port,
                len: 0,
                socket_type: SocketType::Stream as u16,
                op: op as u16,
                flags,
                buf_alloc,
                fwd_cnt,
            },
            limit,
        )
    }

    fn queue_packet(&mut self, header: &Header, payload: &[u8], grant: Option<(ConnId, u64)>) {
        let mut bytes = std::vec![0u8; HEADER_LEN + payload.len()];
        let header = Header {
            len: payload.len() as u32,
            ..*header
        };
        // The buffer is at least HEADER_LEN long.
        let _ = header.emit(&mut bytes);
        bytes[HEADER_LEN..].copy_from_slice(payload);
        let used_len = bytes.len() as u32;
        self.outbox.push_back(Outgoing::Packet {
            bytes,
            used_len,
            grant,
        });
    }

    fn queue_control(&mut self, id: ConnId, op: Op, flags: u32) {
        let (header, limit) = self.stamped(id, op, flags);
        self.queue_packet(&header, &[], Some((id, limit)));
        self.flush_if_eager();
    }

    /// An RST answering `header` (addresses swapped), for no connection.
    fn queue_rst_for(&mut self, header: &Header) {
        self.queue_packet(&header.rst_reply(), &[], None);
    }

    /// Validates and answers one tx buffer of the driver.
    fn on_guest_bytes(&mut self, bytes: &[u8]) -> Option<Packet> {
        let Ok((header, payload)) = Header::parse_packet(bytes, bytes.len()) else {
            self.violations
                .push(Violation::Malformed { bytes: bytes.len() });
            return None;
        };
        if bytes.len() != HEADER_LEN + payload.len() {
            self.violations
                .push(Violation::Malformed { bytes: bytes.len() });
        }
        let packet = Packet {
            header,
            payload: payload.to_vec(),
        };
        self.on_guest_packet(&packet);
        Some(packet)
    }

    fn on_guest_packet(&mut self, packet: &Packet) {
        let header = packet.header;
        if header.src_cid != self.guest_cid {
            if self.stale_cids.contains(&header.src_cid) {
                // Sent before the guest saw the transport reset: the device drops it.
                return;
            }
            self.violations.push(Violation::WrongSrcCid(header));
        }
        if header.dst_cid != self.cid {
            // For another peer (a sibling VM): not ours to answer.
            return;
        }
        let Some(op) = header.op() else {
            self.violations.push(Violation::UnknownOp(header));
            return;
        };
        if header.socket_type() != Some(SocketType::Stream) {
            if op != Op::Rst {
                self.violations.push(Violation::WrongType(header));
            }
            return;
        }
        if op.is_control() && header.len != 0 {
            self.violations.push(Violation::ControlWithPayload(header));
        }
        if op == Op::Rw && header.len == 0 {
            self.violations.push(Violation::EmptyRw(header));
        }
        if header.len as usize > MAX_PAYLOAD {
            self.violations.push(Violation::OversizedPayload(header));
        }
        match self.find(header.dst_port, header.src_port) {
            Some(id) => self.on_conn_packet(id, packet, op),
            None => match op {
                Op::Request => self.on_request(&header),
                // Never an RST for an RST.
                Op::Rst => {}
                _ => {
                    self.queue_rst_for(&header);
                    self.flush_if_eager();
                }
            },
        }
    }

    fn on_request(&mut self, header: &Header) {
        let mode = self
            .listeners
            .iter()
            .find(|(port, _)| *port == header.dst_port)
            .map(|(_, mode)| *mode);
        match mode {
            None | Some(AcceptMode::Refuse) => {
                self.queue_rst_for(header);
                self.flush_if_eager();
            }
            Some(AcceptMode::Ignore) => {}
            Some(mode @ (AcceptMode::Accept | AcceptMode::AcceptTwice)) => {
                let id = ConnId(self.conns.len());
                let mut conn = HostConn::new(
                    header.dst_port,
                    header.src_port,
                    ConnState::Connected,
                    self.default_buf_alloc,
                );
                conn.guest_buf_alloc = header.buf_alloc;
                conn.guest_fwd_cnt = header.fwd_cnt;
                self.conns.push(conn);
                self.accepted.push_back(id);
                self.queue_control(id, Op::Response, 0);
                if mode == AcceptMode::AcceptTwice {
                    self.queue_control(id, Op::Response, 0);
                }
            }
        }
    }

    fn on_conn_packet(&mut self, id: ConnId, packet: &Packet, op: Op) {
        let header = packet.header;
        let conn = &mut self.conns[id.0];
        conn.guest_buf_alloc = header.buf_alloc;
        conn.guest_fwd_cnt = header.fwd_cnt;
        if u64::from(conn.guest_in_flight()) > conn.tx_cnt {
            self.violations.push(Violation::FwdCntAhead(header));
        }
        if conn.state == ConnState::Connecting {
            match op {
                Op::Response => conn.state = ConnState::Connected,
                Op::Rst => conn.state = ConnState::Refused,
                _ => {
                    conn.state = ConnState::ResetByHost;
                    self.queue_control(id, Op::Rst, 0);
                }
            }
            return;
        }
        match op {
            Op::Request => {} // A duplicate: ignored.
            Op::Response => {
                conn.state = ConnState::ResetByHost;
                self.queue_control(id, Op::Rst, 0);
            }
            Op::Rst => conn.state = ConnState::ResetByGuest,
            Op::Shutdown => {
                conn.guest_shutdown |= header.shutdown_flags();
                if conn.guest_shutdown == ShutdownFlags::all() && self.answer_shutdown {
                    conn.state = ConnState::ResetByHost;
                    self.queue_control(id, Op::Rst, 0);
                }
            }
            Op::Rw => {
                if conn.guest_shutdown.contains(ShutdownFlags::SEND) {
                    self.violations.push(Violation::DataAfterShutdown(header));
                }
                let len = packet.payload.len() as u64;
                let allowed = conn.granted_limit.saturating_sub(conn.rx_cnt);
                if len > allowed {
                    self.violations
                        .push(Violation::CreditExceeded { header, allowed });
                }
                conn.rx_cnt += len;
                conn.received.extend(&packet.payload);
            }
            Op::CreditUpdate => {}
            Op::CreditRequest => {
                if self.answer_credit_requests {
                    self.queue_control(id, Op::CreditUpdate, 0);
                }
            }
        }
    }
}
