//! The state machine of one stream connection: a packet in, a state change and the reply to
//! send. Pure: no queues, no buffers; the socket layer moves the bytes.

use crate::addr::VsockAddr;
use crate::credit::Credit;
use crate::error::Error;
use crate::time::Instant;
use crate::wire::{Header, Op, ShutdownFlags, SocketType};
use bitflags::bitflags;
use core::time::Duration;

/// First wait before asking a silent peer for credit again (B29).
pub const CREDIT_PROBE_FIRST: Duration = Duration::from_millis(10);
/// Longest wait between credit probes.
pub const CREDIT_PROBE_MAX: Duration = Duration::from_secs(1);

/// When to ask again for credit while we are blocked on it.
///
/// B29 allows one outstanding `CREDIT_REQUEST`. A peer answers it with a `CREDIT_UPDATE`
/// that may still show no space; after that we ask again, with a doubling wait, until
/// credit arrives or the peer shuts down its receiving side. Each probe sends a
/// `CREDIT_UPDATE` of ours, and a new request only once the last one was answered: some
/// peers only resume a stalled connection on a packet from us (vhost-device-vsock 0.3.0
/// stops flushing its host-side buffer until the guest sends a `CREDIT_UPDATE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditProbe {
    /// When the next probe goes out.
    pub due: Instant,
    /// The wait before the probe after that.
    pub interval: Duration,
}

impl CreditProbe {
    /// The probe armed by the first `CREDIT_REQUEST` at `now`.
    pub fn first(now: Instant) -> Self {
        CreditProbe {
            due: now + CREDIT_PROBE_FIRST,
            interval: CREDIT_PROBE_FIRST,
        }
    }

    /// The probe after this one fired at `now`: twice the wait, at most [`CREDIT_PROBE_MAX`].
    pub fn next(self, now: Instant) -> Self {
        let interval = (self.interval * 2).min(CREDIT_PROBE_MAX);
        CreditProbe {
            due: now + interval,
            interval,
        }
    }
}

bitflags! {
    /// The control packets a connection owes its peer, at most one of each. A header is
    /// made for each only as it enters the ring, so it carries the credit fields of that
    /// moment (B43), and none is ever dropped for want of queue space: the state is
    /// bounded by the number of sockets, not by a queue.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Owed: u8 {
        /// REQUEST: our `connect`.
        const REQUEST = 1 << 0;
        /// RESPONSE: the peer's REQUEST was taken into a listener's queue (B15).
        const RESPONSE = 1 << 1;
        /// CREDIT_UPDATE (B28, B29).
        const CREDIT_UPDATE = 1 << 2;
        /// CREDIT_REQUEST (B29).
        const CREDIT_REQUEST = 1 << 3;
        /// SHUTDOWN with the flags of `local_shutdown`, once no data waits before it
        /// (B35, B36).
        const SHUTDOWN = 1 << 4;
        /// RST: the connection's last packet; nothing else goes out after it.
        const RST = 1 << 5;
    }
}

impl Owed {
    /// The packets that go out before the connection's data, in this order.
    pub const SETUP: [(Owed, Op); 2] =
        [(Owed::REQUEST, Op::Request), (Owed::RESPONSE, Op::Response)];
    /// The packets that go out after the data the credit covers, in this order.
    pub const CREDIT: [(Owed, Op); 2] = [
        (Owed::CREDIT_UPDATE, Op::CreditUpdate),
        (Owed::CREDIT_REQUEST, Op::CreditRequest),
    ];
}

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// We sent REQUEST and wait for RESPONSE until the deadline.
    Connecting {
        /// When the connect fails with `TimedOut`.
        deadline: Instant,
    },
    /// Established; data may flow in the directions not shut down.
    Connected,
    /// We sent SHUTDOWN(both) for `close` and wait for the peer's RST until the deadline.
    Closing {
        /// When we give up and send RST.
        deadline: Instant,
    },
    /// Over: an RST was sent or received. The tuple is free for a new connection.
    Closed,
}

/// The packet to send in answer, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Nothing.
    Nothing,
    /// RST.
    Rst,
    /// CREDIT_UPDATE.
    CreditUpdate,
}

/// What the socket layer must do after [`Connection::on_packet`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The reply to send.
    pub reply: Reply,
    /// Whether the packet's payload is accepted into the receive buffer (credit already
    /// accounted).
    pub deliver: bool,
}

impl Outcome {
    const fn reply(reply: Reply) -> Self {
        Outcome {
            reply,
            deliver: false,
        }
    }
}

/// One stream connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Our port.
    pub local_port: u32,
    /// The peer's address.
    pub peer: VsockAddr,
    /// Where the connection stands.
    pub state: State,
    /// Flow control.
    pub credit: Credit,
    /// Shutdown flags the peer sent (sticky, B32).
    pub peer_shutdown: ShutdownFlags,
    /// Shutdown flags we sent (sticky).
    pub local_shutdown: ShutdownFlags,
    /// The connection ended by an RST (ours or the peer's) rather than an orderly close.
    pub reset: bool,
    /// The error to report once through `take_error` (`SO_ERROR`).
    pub pending_error: Option<Error>,
    /// Armed while we are blocked on the peer's credit (B29).
    pub credit_probe: Option<CreditProbe>,
    /// Control packets waiting to go out.
    pub owed: Owed,
    /// Largest payload of one packet to this peer, besides the device's own limit (see
    /// `Config::sibling_packet_size`).
    pub max_payload: u32,
}

impl Connection {
    /// A connection in `state` with our receive capacity `buf_alloc`.
    pub const fn new(local_port: u32, peer: VsockAddr, state: State, buf_alloc: u32) -> Self {
        Connection {
            local_port,
            peer,
            state,
            credit: Credit::new(buf_alloc),
            peer_shutdown: ShutdownFlags::empty(),
            local_shutdown: ShutdownFlags::empty(),
            reset: false,
            pending_error: None,
            credit_probe: None,
            owed: Owed::empty(),
            max_payload: u32::MAX,
        }
    }

    /// A header of this connection from `guest_cid`, with no payload, and its credit
    /// fields as they are now (B9, B43): make it just before it enters the ring, then
    /// record it with [`Credit::on_header_sent`].
    pub const fn header(&self, guest_cid: u32, op: Op) -> Header {
        let (buf_alloc, fwd_cnt) = self.credit.fields();
        Header {
            src_cid: guest_cid as u64,
            dst_cid: self.peer.cid as u64,
            src_port: self.local_port,
            dst_port: self.peer.port,
            len: 0,
            socket_type: SocketType::Stream as u16,
            op: op as u16,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    /// Whether our sending direction is shut, by us or by the peer (B33, B35): `send`
    /// fails with `BrokenPipe`.
    pub fn sending_shut(&self) -> bool {
        self.local_shutdown.contains(ShutdownFlags::SEND)
            || self.peer_shutdown.contains(ShutdownFlags::RECEIVE)
    }

    /// The earliest of this connection's timers: its connect or close timeout, or its
    /// credit probe. `None` when none is armed.
    pub fn next_timer(&self) -> Option<Instant> {
        let timeout = match self.state {
            State::Connecting { deadline } | State::Closing { deadline } => Some(deadline),
            State::Connected | State::Closed => None,
        };
        let probe = self.credit_probe.map(|probe| probe.due);
        match (timeout, probe) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether packets of this tuple still belong to this connection.
    pub const fn is_live(&self) -> bool {
        !matches!(self.state, State::Closed)
    }

    /// Ends the connection with an RST (sent or received) and the given pending error.
    pub fn fail(&mut self, error: Option<Error>) {
        self.state = State::Closed;
        self.reset = true;
        if error.is_some() {
            self.pending_error = error;
        }
    }

    /// Handles one packet of this connection's tuple with a known `op`. The header's credit
    /// fields are taken first (B26).
    pub fn on_packet(&mut self, header: &Header, op: Op) -> Outcome {
        match self.state {
            State::Connecting { .. } => self.on_packet_connecting(header, op),
            State::Connected => self.on_packet_connected(header, op),
            State::Closing { .. } => self.on_packet_closing(header, op),
            State::Closed => Outcome::reply(Reply::Nothing),
        }
    }

    fn on_packet_connecting(&mut self, header: &Header, op: Op) -> Outcome {
        match op {
            Op::Response => {
                self.credit.update_peer(header.buf_alloc, header.fwd_cnt);
                self.state = State::Connected;
                Outcome::reply(Reply::Nothing)
            }
            Op::Rst => {
                self.fail(Some(Error::ConnectionRefused));
                Outcome::reply(Reply::Nothing)
            }
            // B18: anything else while connecting resets the attempt.
            _ => {
                self.fail(Some(Error::ConnectionReset));
                Outcome::reply(Reply::Rst)
            }
        }
    }

    fn on_packet_connected(&mut self, header: &Header, op: Op) -> Outcome {
        // B17: a duplicate REQUEST is dropped whole, its credit fields too (it is not a
        // header of this connection, B26): the connection is untouched.
        if op == Op::Request {
            return Outcome::reply(Reply::Nothing);
        }
        self.credit.update_peer(header.buf_alloc, header.fwd_cnt);
        match op {
            Op::Request => Outcome::reply(Reply::Nothing),
            // B18: a RESPONSE nobody asked for.
            Op::Response => {
                log::warn!(
                    "vsock: unexpected RESPONSE on {}:{}",
                    self.peer,
                    self.local_port
                );
                self.fail(Some(Error::ConnectionReset));
                Outcome::reply(Reply::Rst)
            }
            Op::Rst => {
                // B38: buffered data stays readable; an orderly close (both flags seen,
                // or both directions shut down by us: B37) that ends in RST is not an
                // error.
                if self.peer_shutdown != ShutdownFlags::all()
                    && self.local_shutdown != ShutdownFlags::all()
                {
                    self.fail(Some(Error::ConnectionReset));
                } else {
                    self.state = State::Closed;
                }
                Outcome::reply(Reply::Nothing)
            }
            Op::Shutdown => {
                self.peer_shutdown |= header.shutdown_flags();
                if self.peer_shutdown == ShutdownFlags::all() {
                    // B34: free the tuple so the peer can reconnect from the same port.
                    self.state = State::Closed;
                    Outcome::reply(Reply::Rst)
                } else {
                    Outcome::reply(Reply::Nothing)
                }
            }
            Op::Rw => {
                if self.peer_shutdown.contains(ShutdownFlags::SEND) {
                    // B33: data after the peer said it would send no more.
                    log::warn!("vsock: data after SHUTDOWN(SEND) from {}", self.peer);
                    self.fail(Some(Error::ConnectionReset));
                    return Outcome::reply(Reply::Rst);
                }
                if self.credit.on_received(header.len).is_err() {
                    // B30: never buffer beyond what we advertised.
                    log::warn!("vsock: {} overran its credit; resetting", self.peer);
                    self.fail(Some(Error::ConnectionReset));
                    return Outcome::reply(Reply::Rst);
                }
                Outcome {
                    reply: Reply::Nothing,
                    deliver: header.len > 0,
                }
            }
            Op::CreditUpdate => Outcome::reply(Reply::Nothing),
            // B29.
            Op::CreditRequest => Outcome::reply(Reply::CreditUpdate),
        }
    }

    fn on_packet_closing(&mut self, header: &Header, op: Op) -> Outcome {
        // B17, as in `on_packet_connected`.
        if op == Op::Request {
            return Outcome::reply(Reply::Nothing);
        }
        self.credit.update_peer(header.buf_alloc, header.fwd_cnt);
        match op {
            Op::Rst => {
                self.state = State::Closed;
                Outcome::reply(Reply::Nothing)
            }
            Op::Shutdown => {
                self.peer_shutdown |= header.shutdown_flags();
                if self.peer_shutdown == ShutdownFlags::all() {
                    self.state = State::Closed;
                    Outcome::reply(Reply::Rst)
                } else {
                    Outcome::reply(Reply::Nothing)
                }
            }
            Op::CreditRequest => Outcome::reply(Reply::CreditUpdate),
            Op::Response => {
                self.state = State::Closed;
                Outcome::reply(Reply::Rst)
            }
            // We shut down receiving: data is dropped; the rest needs no answer.
            Op::Request | Op::Rw | Op::CreditUpdate => Outcome::reply(Reply::Nothing),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: VsockAddr = VsockAddr::new(2, 5000);

    fn header(op: Op, len: u32, flags: u32) -> Header {
        Header {
            src_cid: 2,
            dst_cid: 3,
            src_port: PEER.port,
            dst_port: 1234,
            len,
            socket_type: SocketType::Stream as u16,
            op: op as u16,
            flags,
            buf_alloc: 1000,
            fwd_cnt: 0,
        }
    }

    fn connected() -> Connection {
        let mut conn = Connection::new(1234, PEER, State::Connected, 100);
        conn.credit.update_peer(1000, 0);
        conn
    }

    #[test]
    fn data_is_delivered_within_credit() {
        let mut conn = connected();
        let out = conn.on_packet(&header(Op::Rw, 60, 0), Op::Rw);
        assert_eq!(
            out,
            Outcome {
                reply: Reply::Nothing,
                deliver: true
            }
        );
        assert_eq!(conn.credit.rx_held(), 60);
    }

    #[test]
    fn b30_overrun_resets() {
        let mut conn = connected();
        conn.on_packet(&header(Op::Rw, 60, 0), Op::Rw);
        let out = conn.on_packet(&header(Op::Rw, 41, 0), Op::Rw);
        assert_eq!(out.reply, Reply::Rst);
        assert!(!out.deliver);
        assert_eq!(conn.state, State::Closed);
        assert_eq!(conn.pending_error, Some(Error::ConnectionReset));
    }

    #[test]
    fn b26_credit_fields_are_taken_before_the_op() {
        let mut conn = connected();
        let mut h = header(Op::CreditUpdate, 0, 0);
        h.buf_alloc = 4096;
        h.fwd_cnt = 0;
        conn.on_packet(&h, Op::CreditUpdate);
        assert_eq!(conn.credit.peer_free(), 4096);
    }

    #[test]
    fn b29_credit_request_gets_credit_update() {
        let mut conn = connected();
        let out = conn.on_packet(&header(Op::CreditRequest, 0, 0), Op::CreditRequest);
        assert_eq!(out.reply, Reply::CreditUpdate);
    }

    #[test]
    fn b33_peer_send_shutdown_then_data_resets() {
        let mut conn = connected();
        let out = conn.on_packet(&header(Op::Shutdown, 0, 2), Op::Shutdown);
        assert_eq!(out.reply, Reply::Nothing);
        assert_eq!(conn.state, State::Connected);
        assert_eq!(conn.peer_shutdown, ShutdownFlags::SEND);
        let out = conn.on_packet(&header(Op::Rw, 1, 0), Op::Rw);
        assert_eq!(out.reply, Reply::Rst);
        assert_eq!(conn.pending_error, Some(Error::ConnectionReset));
    }

    #[test]
    fn b34_both_flags_rst_and_free_the_tuple() {
        let mut conn = connected();
        conn.on_packet(&header(Op::Shutdown, 0, 1), Op::Shutdown);
        let out = conn.on_packet(&header(Op::Shutdown, 0, 2), Op::Shutdown);
        assert_eq!(out.reply, Reply::Rst);
        assert_eq!(conn.state, State::Closed);
        assert!(!conn.reset, "an orderly close is not a reset");
        assert_eq!(conn.pending_error, None);
    }

    #[test]
    fn b38_rst_marks_reset() {
        let mut conn = connected();
        conn.on_packet(&header(Op::Rw, 10, 0), Op::Rw);
        let out = conn.on_packet(&header(Op::Rst, 0, 0), Op::Rst);
        assert_eq!(out.reply, Reply::Nothing, "B14: never RST an RST");
        assert!(conn.reset);
        assert_eq!(conn.credit.rx_held(), 10, "buffered data stays");
    }

    #[test]
    fn b37_rst_after_our_shutdown_of_both_directions_is_the_orderly_end() {
        // Found by tests/properties.rs: `shutdown(Both)`, then the peer's RST (Linux
        // answers a SHUTDOWN of both directions with RST) was reported as a reset.
        let mut conn = connected();
        conn.on_packet(&header(Op::Rw, 10, 0), Op::Rw);
        conn.local_shutdown = ShutdownFlags::all();
        let out = conn.on_packet(&header(Op::Rst, 0, 0), Op::Rst);
        assert_eq!(out.reply, Reply::Nothing);
        assert_eq!(conn.state, State::Closed);
        assert!(!conn.reset);
        assert_eq!(conn.pending_error, None);
        assert_eq!(conn.credit.rx_held(), 10, "buffered data stays");

        // One direction only: still a reset.
        let mut conn = connected();
        conn.local_shutdown = ShutdownFlags::SEND;
        conn.on_packet(&header(Op::Rst, 0, 0), Op::Rst);
        assert_eq!(conn.pending_error, Some(Error::ConnectionReset));
    }

    #[test]
    fn b17_duplicate_request_is_ignored() {
        let mut conn = connected();
        let before = conn;
        let out = conn.on_packet(&header(Op::Request, 0, 0), Op::Request);
        assert_eq!(out.reply, Reply::Nothing);
        assert_eq!(conn, before);
    }

    #[test]
    fn b17_duplicate_request_with_other_credit_fields_changes_nothing() {
        let deadline = Instant::from_millis(8000);
        for state in [State::Connected, State::Closing { deadline }] {
            let mut conn = connected();
            conn.credit.on_sent(600);
            conn.state = state;
            let before = conn;
            let mut request = header(Op::Request, 0, 0);
            request.buf_alloc = 64;
            request.fwd_cnt = 7;
            let out = conn.on_packet(&request, Op::Request);
            assert_eq!(out.reply, Reply::Nothing);
            assert_eq!(conn, before, "{state:?}");
            assert_eq!(conn.credit.peer_free(), 400);
        }
    }

    #[test]
    fn b18_connecting_rules() {
        let deadline = Instant::from_millis(2000);
        let mut conn = Connection::new(50000, PEER, State::Connecting { deadline }, 100);
        conn.on_packet(&header(Op::Response, 0, 0), Op::Response);
        assert_eq!(conn.state, State::Connected);
        assert_eq!(conn.credit.peer_free(), 1000);

        let mut refused = Connection::new(50000, PEER, State::Connecting { deadline }, 100);
        refused.on_packet(&header(Op::Rst, 0, 0), Op::Rst);
        assert_eq!(refused.pending_error, Some(Error::ConnectionRefused));

        let mut odd = Connection::new(50000, PEER, State::Connecting { deadline }, 100);
        let out = odd.on_packet(&header(Op::Rw, 0, 0), Op::Rw);
        assert_eq!(out.reply, Reply::Rst);
        assert_eq!(odd.pending_error, Some(Error::ConnectionReset));
    }

    #[test]
    fn closing_ends_on_rst_or_both_shutdowns() {
        let deadline = Instant::from_millis(8000);
        let mut conn = connected();
        conn.state = State::Closing { deadline };
        assert_eq!(
            conn.on_packet(&header(Op::Rst, 0, 0), Op::Rst).reply,
            Reply::Nothing
        );
        assert_eq!(conn.state, State::Closed);

        let mut conn = connected();
        conn.state = State::Closing { deadline };
        let out = conn.on_packet(&header(Op::Shutdown, 0, 3), Op::Shutdown);
        assert_eq!(out.reply, Reply::Rst);
        assert_eq!(conn.state, State::Closed);
    }
}
