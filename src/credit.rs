//! Credit-based flow control for one connection (virtio spec 5.10.6.3).
//!
//! All counters are free-running `u32`s compared with wrapping arithmetic (B23).

/// The flow-control state of one connection, both directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Credit {
    /// Our receive buffer capacity, advertised as `buf_alloc` (B27).
    buf_alloc: u32,
    /// Bytes our application has consumed (B27).
    fwd_cnt: u32,
    /// Bytes received from the peer.
    rx_cnt: u32,
    /// The `fwd_cnt` we last told the peer about.
    fwd_cnt_sent: u32,
    /// The `buf_alloc` we last told the peer about.
    buf_alloc_sent: u32,
    /// The peer's receive buffer size.
    peer_buf_alloc: u32,
    /// Bytes the peer's application has consumed, as last reported.
    peer_fwd_cnt: u32,
    /// Bytes we have sent.
    tx_cnt: u32,
    /// A `CREDIT_REQUEST` was sent and no credit has come since (B29).
    credit_requested: bool,
    /// The peer sent a packet after our last `CREDIT_REQUEST`: it was answered.
    request_answered: bool,
}

/// The peer sent more than the credit we gave it (B30).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditOverrun;

impl Credit {
    /// A new connection's credit with our receive capacity `buf_alloc`; the peer has
    /// advertised nothing yet.
    pub const fn new(buf_alloc: u32) -> Self {
        Credit {
            buf_alloc,
            fwd_cnt: 0,
            rx_cnt: 0,
            fwd_cnt_sent: 0,
            buf_alloc_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            credit_requested: false,
            request_answered: false,
        }
    }

    /// Records the peer's credit fields from a packet header (B26).
    pub fn update_peer(&mut self, peer_buf_alloc: u32, peer_fwd_cnt: u32) {
        self.peer_buf_alloc = peer_buf_alloc;
        self.peer_fwd_cnt = peer_fwd_cnt;
        self.request_answered = true;
        if self.peer_free() > 0 {
            self.credit_requested = false;
        }
    }

    /// Whether [`Credit::update_peer`] with these fields would change nothing: the peer
    /// reports what it last reported, and no CREDIT_REQUEST of ours waits for the answer
    /// that any header is.
    pub const fn peer_fields_unchanged(&self, peer_buf_alloc: u32, peer_fwd_cnt: u32) -> bool {
        self.peer_buf_alloc == peer_buf_alloc
            && self.peer_fwd_cnt == peer_fwd_cnt
            && self.request_answered
            && !(self.credit_requested && self.peer_free() > 0)
    }

    /// Bytes we may send now (B24): `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`, and 0 when
    /// the peer shrank its buffer or reports a `fwd_cnt` ahead of what we sent.
    pub const fn peer_free(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.in_flight())
    }

    /// Bytes we sent that the peer has not reported consumed: `tx_cnt - peer_fwd_cnt`.
    pub const fn in_flight(&self) -> u32 {
        self.tx_cnt.wrapping_sub(self.peer_fwd_cnt)
    }

    /// Whether the peer, once it has read what we have in flight, has less than
    /// `min(peer_buf_alloc / 4, 64 KiB)` free: the point where Linux and
    /// vhost-device-vsock send a CREDIT_UPDATE without being asked. Short of it, a packet
    /// that needs more credit than is left is cut to fit (`SendQueue::dispatch`).
    pub const fn peer_updates_unasked(&self) -> bool {
        let low = self.peer_buf_alloc / 4;
        let low = if low < 64 * 1024 { low } else { 64 * 1024 };
        self.in_flight() > self.peer_buf_alloc - low
    }

    /// Records `n` bytes sent. The caller has checked `n <= peer_free()` (B25).
    pub fn on_sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// Bytes received and not yet consumed by the application.
    pub const fn rx_held(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }

    /// Accounts `n` received bytes, or reports that they exceed the credit we gave (B30).
    pub fn on_received(&mut self, n: u32) -> Result<(), CreditOverrun> {
        // What the peer may have in flight is bounded by the largest buf_alloc we ever
        // advertised from the fwd_cnt it knows; our real space is `buf_alloc - rx_held`.
        let free = self.buf_alloc.saturating_sub(self.rx_held());
        if n > free {
            return Err(CreditOverrun);
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
        Ok(())
    }

    /// Records that the application consumed `n` bytes.
    pub fn on_consumed(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// The `(buf_alloc, fwd_cnt)` a header entering the ring now carries (B9, B43).
    pub const fn fields(&self) -> (u32, u32) {
        (self.buf_alloc, self.fwd_cnt)
    }

    /// Records that a header with these credit fields entered the ring: from now on they
    /// are the peer's view of our space. Call it only once the header is on the ring.
    pub fn on_header_sent(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.buf_alloc_sent = buf_alloc;
        self.fwd_cnt_sent = fwd_cnt;
    }

    /// The space the peer believes we have: what we last advertised minus what it sent
    /// since.
    pub const fn peer_view_of_free(&self) -> u32 {
        let unacknowledged = self.rx_cnt.wrapping_sub(self.fwd_cnt_sent);
        self.buf_alloc_sent.saturating_sub(unacknowledged)
    }

    /// Whether a `CREDIT_UPDATE` should go out now (B28): the peer's view of our free
    /// space has fallen below `min(64 KiB, buf_alloc / 2)` (at least 1, so that a 1-byte
    /// window is reopened too) and telling it would show more.
    pub fn needs_update(&self) -> bool {
        let threshold = (self.buf_alloc / 2).clamp(1, 64 * 1024);
        let view = self.peer_view_of_free();
        let real = self.buf_alloc.saturating_sub(self.rx_held());
        view < threshold && real > view
    }

    /// Whether to send a `CREDIT_REQUEST` now: we have less credit than the `needed` bytes
    /// of the data waiting and have not asked yet (B29). Marks the request as outstanding.
    pub fn take_credit_request(&mut self, needed: u32) -> bool {
        if self.peer_free() < needed && !self.credit_requested {
            self.mark_requested();
            true
        } else {
            false
        }
    }

    /// Whether to ask again: still less credit than `needed`, and no request is
    /// outstanding (the peer answered the last one, or credit came since): at most one is
    /// ever outstanding (B29). Marks the new one outstanding.
    pub fn take_repeat_credit_request(&mut self, needed: u32) -> bool {
        if self.peer_free() < needed && (!self.credit_requested || self.request_answered) {
            self.mark_requested();
            true
        } else {
            false
        }
    }

    fn mark_requested(&mut self) {
        self.credit_requested = true;
        self.request_answered = false;
    }

    /// The peer's receive buffer size, as last reported.
    pub const fn peer_buf_alloc(&self) -> u32 {
        self.peer_buf_alloc
    }

    /// Our advertised receive capacity.
    pub const fn buf_alloc(&self) -> u32 {
        self.buf_alloc
    }

    /// Bytes consumed by our application (free-running).
    pub const fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt
    }

    /// Bytes sent by us (free-running).
    pub const fn tx_cnt(&self) -> u32 {
        self.tx_cnt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_credit_is_peer_space_minus_in_flight() {
        let mut c = Credit::new(4096);
        assert_eq!(c.peer_free(), 0, "no credit before the peer advertises");
        c.update_peer(1000, 0);
        assert_eq!(c.peer_free(), 1000);
        c.on_sent(600);
        assert_eq!(c.peer_free(), 400);
        c.update_peer(1000, 600);
        assert_eq!(c.peer_free(), 1000);
    }

    #[test]
    fn b24_shrinking_peer_buffer_yields_zero_not_a_huge_number() {
        let mut c = Credit::new(4096);
        c.update_peer(1000, 0);
        c.on_sent(900);
        c.update_peer(100, 0);
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn b24_peer_fwd_cnt_ahead_of_tx_cnt_yields_zero() {
        let mut c = Credit::new(4096);
        c.update_peer(1000, 50);
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn b23_counters_wrap_around_u32() {
        let mut c = Credit::new(4096);
        c.tx_cnt = u32::MAX - 10;
        c.update_peer(100, u32::MAX - 10);
        assert_eq!(c.peer_free(), 100);
        c.on_sent(50);
        assert_eq!(c.tx_cnt(), 39);
        assert_eq!(c.peer_free(), 50);
        c.update_peer(100, 39);
        assert_eq!(c.peer_free(), 100);

        let mut r = Credit::new(100);
        r.rx_cnt = u32::MAX - 5;
        r.fwd_cnt = u32::MAX - 5;
        r.on_received(60).unwrap();
        assert_eq!(r.rx_held(), 60);
        r.on_consumed(60);
        assert_eq!(r.rx_held(), 0);
        assert_eq!(r.fwd_cnt(), 54);
        r.on_received(100).unwrap();
        assert_eq!(r.on_received(1), Err(CreditOverrun));
    }

    #[test]
    fn b30_receiving_beyond_buf_alloc_is_an_overrun() {
        let mut c = Credit::new(100);
        c.on_received(70).unwrap();
        assert_eq!(c.on_received(31), Err(CreditOverrun));
        assert_eq!(c.rx_held(), 70, "an overrun is not accounted");
        c.on_consumed(70);
        c.on_received(100).unwrap();
    }

    #[test]
    fn b28_credit_update_only_when_peer_view_runs_low() {
        let mut c = Credit::new(256 * 1024);
        assert_eq!(c.fields(), (256 * 1024, 0));
        c.on_header_sent(256 * 1024, 0);
        c.on_received(100 * 1024).unwrap();
        c.on_consumed(100 * 1024);
        // Peer still thinks 156 KiB are free: above the 64 KiB threshold.
        assert!(!c.needs_update());
        c.on_received(100 * 1024).unwrap();
        c.on_consumed(100 * 1024);
        // Peer thinks 56 KiB are free, we really have 256 KiB.
        assert!(c.needs_update());
        assert_eq!(c.fields(), (256 * 1024, 200 * 1024));
        c.on_header_sent(256 * 1024, 200 * 1024);
        assert!(!c.needs_update());
    }

    #[test]
    fn b28_no_update_when_it_would_not_show_more_space() {
        let mut c = Credit::new(1024);
        c.on_header_sent(1024, 0);
        c.on_received(1000).unwrap();
        // Nothing consumed: the peer's view equals reality, an update is useless.
        assert!(!c.needs_update());
        c.on_consumed(1);
        assert!(c.needs_update());
    }

    #[test]
    fn b28_a_one_byte_window_is_reopened() {
        // Found by tests/properties.rs: with buf_alloc 1 the threshold was 0, so no update
        // ever went out and a one-way stream to us stalled after the first byte.
        let mut c = Credit::new(1);
        c.on_header_sent(1, 0);
        c.on_received(1).unwrap();
        assert!(!c.needs_update(), "nothing consumed yet");
        c.on_consumed(1);
        assert!(c.needs_update());
        assert_eq!(c.fields(), (1, 1));
        c.on_header_sent(1, 1);
        assert!(!c.needs_update());
    }

    #[test]
    fn b29_repeat_request_only_when_none_is_outstanding() {
        let mut c = Credit::new(1000);
        c.update_peer(100, 0);
        c.on_sent(100);
        assert!(
            c.take_repeat_credit_request(1),
            "out of credit, nothing outstanding: ask"
        );
        assert!(
            !c.take_repeat_credit_request(1),
            "the request is unanswered"
        );
        assert!(!c.take_credit_request(1), "nor a first one");
        c.update_peer(100, 0);
        assert!(
            c.take_repeat_credit_request(1),
            "answered without credit: ask again"
        );
        assert!(!c.take_repeat_credit_request(1));
        c.update_peer(200, 0);
        assert!(
            !c.take_repeat_credit_request(1),
            "credit came: nothing to ask"
        );
        assert!(
            c.take_repeat_credit_request(150),
            "credit, but less than the waiting packet needs: ask"
        );
    }

    #[test]
    fn peer_updates_unasked_once_what_is_in_flight_leaves_it_under_a_quarter() {
        let mut c = Credit::new(0);
        c.update_peer(64 * 1024, 0);
        c.on_sent(48 * 1024);
        assert!(
            !c.peer_updates_unasked(),
            "16 KiB left is not under a quarter"
        );
        c.on_sent(1);
        assert!(c.peer_updates_unasked());
        // Large buffers: Linux updates under 64 KiB free, whatever the buffer.
        c.update_peer(1024 * 1024, 48 * 1024 + 1);
        c.on_sent(900 * 1024);
        assert!(!c.peer_updates_unasked(), "124 KiB left");
        c.on_sent(60 * 1024 + 1);
        assert!(c.peer_updates_unasked());
    }

    #[test]
    fn b29_one_credit_request_outstanding_at_most() {
        let mut c = Credit::new(1024);
        c.update_peer(10, 0);
        c.on_sent(10);
        assert!(c.take_credit_request(1));
        assert!(!c.take_credit_request(1));
        c.update_peer(10, 10);
        c.on_sent(10);
        assert!(c.take_credit_request(1), "new credit re-arms the request");
    }
}
