//! The socket table and the public API: [`VsockDevice`] owns the device and a fixed table
//! of sockets addressed by [`SocketHandle`]s; all progress happens in [`VsockDevice::poll`].

use crate::addr::{VsockAddr, VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_CID_LOCAL, VMADDR_PORT_ANY};
use crate::conn::{Connection, CreditProbe, Owed, Reply, State};
use crate::device::{Arrival, QueueConfig, Stats, VirtioVsock};
use crate::error::{Error, Result};
use crate::send_queue::SendQueue;
use crate::time::Instant;
use crate::wire::{Header, Op, ShutdownFlags, SocketType, EVENT_TRANSPORT_RESET, HEADER_LEN};
use bitflags::bitflags;
use core::time::Duration;
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;
#[cfg(feature = "async")]
use {crate::waker::WakerSlot, core::task::Waker};

/// First port handed out by `bind(VMADDR_PORT_ANY)` and implicit binds (B21).
const EPHEMERAL_FIRST: u32 = 49152;
/// Last ephemeral port (B21).
const EPHEMERAL_LAST: u32 = 0xFFFF_FFFE;
/// RSTs answering packets for no connection that can wait for tx space; while this many
/// wait, no packet is taken from the device (B7, B13).
const STRAY_RST_CAPACITY: usize = 64;

/// Settings fixed at construction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Descriptors per virtqueue (a power of two; capped by the device and by 256).
    pub queue_size: u16,
    /// Bytes per receive DMA buffer, including the 44-byte header (B4).
    pub rx_buffer_size: usize,
    /// Largest transmitted packet, including the 44-byte header (B25); at most 64 KiB of
    /// payload.
    pub tx_packet_size: usize,
    /// Bytes of DMA memory for packets on their way to the device, shared by all
    /// connections: a packet takes what its length needs, in 512-byte chunks (at most
    /// 4 MiB are used).
    pub tx_memory: usize,
    /// Bytes a connection may hold in transmit memory beyond the peer's credit: `send`
    /// takes them at once and they go out as the peer makes room. 0: `send` takes only
    /// what the peer has room for now.
    pub send_buffer: usize,
    /// How long a `connect` waits for the peer (B19).
    pub connect_timeout: Duration,
    /// How long a graceful `close` waits for the peer's RST (B36).
    pub close_timeout: Duration,
    /// Whether `bind` may take ports below 1024 (B22).
    pub allow_privileged_ports: bool,
    /// Largest packet, including the 44-byte header, sent to another guest (a peer CID
    /// above 2); packets to the host and the hypervisor take `tx_packet_size`. A device
    /// that connects sibling guests may hand one guest's packet whole to one receive
    /// buffer of the other and lose what does not fit (vhost-device-vsock 0.3.0 does,
    /// without telling either side). The default, 3776, is what the receive buffers of
    /// Linux 6.1 take; raise it for siblings known to take more (this driver's take
    /// `rx_buffer_size`).
    pub sibling_packet_size: usize,
    /// Whether the kernel takes the device's interrupts: then
    /// [`VsockDevice::arm_interrupts`] asks the device for one before the kernel sleeps.
    /// Without it the device never interrupts and `arm_interrupts` always says to poll.
    pub interrupts: bool,
}

impl Config {
    /// Settings for bulk transfers, at more than three times the DMA memory of
    /// [`Config::default`]: receive buffers that take a whole 64 KiB packet (65,580 bytes
    /// with its header; a host backend fills one buffer per read of its socket, so larger
    /// buffers mean fewer, larger reads), 1 MiB of transmit memory and a 256 KiB send
    /// buffer per connection. DMA memory: 128 × 65,580 bytes of receive buffers (8 MiB)
    /// and 1 MiB for transmit, about 9.1 MiB against the default's 2.6 MiB. What it buys
    /// is measured by `cargo xtask bench qemu` (README, "Benchmarks"). Receive memory per
    /// connection (`buf_alloc`) is the caller's `rx_memory`, as always.
    pub fn throughput() -> Self {
        Config {
            rx_buffer_size: 64 * 1024 + 44,
            tx_memory: 1024 * 1024,
            send_buffer: 256 * 1024,
            ..Config::default()
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            queue_size: 128,
            rx_buffer_size: 16 * 1024,
            tx_packet_size: 64 * 1024 + 44,
            tx_memory: 512 * 1024,
            send_buffer: 128 * 1024,
            connect_timeout: Duration::from_secs(2),
            close_timeout: Duration::from_secs(8),
            allow_privileged_ports: false,
            sibling_packet_size: 3776,
            interrupts: false,
        }
    }
}

/// A copyable name for a socket in a [`VsockDevice`]. A handle used after `close` gets
/// [`Error::InvalidHandle`], never another socket that reused the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketHandle {
    index: u16,
    generation: u16,
}

bitflags! {
    /// What a socket is ready for, as `poll(2)` would report it.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct Readiness: u8 {
        /// `recv` (or `accept`) would not return `WouldBlock`.
        const READABLE = 1;
        /// `send` would not return `WouldBlock` (it takes bytes or fails at once), or a
        /// connect finished.
        const WRITABLE = 2;
        /// The peer will send no more, or the connection is over.
        const HANG_UP = 4;
        /// A pending error waits for `take_error`.
        const ERROR = 8;
    }
}

/// How to shut a connection down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shutdown {
    /// No more receiving (`SHUT_RD`).
    Read,
    /// No more sending (`SHUT_WR`).
    Write,
    /// Both (`SHUT_RDWR`).
    Both,
}

/// Storage for one socket. Hand the driver a slice of these (`[SocketSlot::EMPTY; N]`);
/// each is 280 bytes on x86-64 (312 with the feature `async`).
#[derive(Debug)]
pub struct SocketSlot {
    generation: u16,
    socket: Option<Socket>,
    /// The connection's data waiting to go out. It outlives the socket until the device
    /// takes its memory back; the slot is free for a new socket only once it is empty.
    send_queue: SendQueue,
    /// The task waiting for the socket to become readable (feature `async`).
    #[cfg(feature = "async")]
    recv_waker: WakerSlot,
    /// The task waiting for the socket to become writable.
    #[cfg(feature = "async")]
    send_waker: WakerSlot,
}

impl SocketSlot {
    /// Wakes the tasks waiting on this slot's socket, whatever for.
    #[cfg(feature = "async")]
    fn wake_tasks(&mut self) {
        self.recv_waker.wake();
        self.send_waker.wake();
    }

    /// An unused slot.
    pub const EMPTY: SocketSlot = SocketSlot {
        generation: 0,
        socket: None,
        send_queue: SendQueue::new(),
        #[cfg(feature = "async")]
        recv_waker: WakerSlot::EMPTY,
        #[cfg(feature = "async")]
        send_waker: WakerSlot::EMPTY,
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Created, maybe bound; neither listening nor connected.
    Unconnected,
    /// Listening with a backlog; `waiting` connections wait in its queue (those whose
    /// `Role::Stream::listener` names this slot), so that `accept` on an empty queue and
    /// the backlog check of a REQUEST walk no slots.
    Listening { backlog: usize, waiting: usize },
    /// A connection. `accept_order` is `Some` while it waits in its listener's queue.
    Stream {
        conn: Connection,
        listener: Option<u16>,
        accept_order: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Socket {
    local_port: Option<u32>,
    role: Role,
    /// Closed by the user: the handle is gone, the slot finishes the close alone.
    orphaned: bool,
    /// Start of unread data in this slot's receive ring.
    rx_head: usize,
    /// Bytes of unread data.
    rx_len: usize,
}

impl Socket {
    const fn new() -> Self {
        Socket {
            local_port: None,
            role: Role::Unconnected,
            orphaned: false,
            rx_head: 0,
            rx_len: 0,
        }
    }

    fn conn(&self) -> Option<&Connection> {
        match &self.role {
            Role::Stream { conn, .. } => Some(conn),
            _ => None,
        }
    }

    fn conn_mut(&mut self) -> Option<&mut Connection> {
        match &mut self.role {
            Role::Stream { conn, .. } => Some(conn),
            _ => None,
        }
    }

    /// Whether this socket owns packets of the tuple (peer, local port).
    fn matches(&self, peer_cid: u64, peer_port: u32, local_port: u32) -> bool {
        self.conn().is_some_and(|conn| {
            conn.is_live()
                && conn.local_port == local_port
                && conn.peer.port == peer_port
                && u64::from(conn.peer.cid) == peer_cid
        })
    }
}

/// Appends `data` to the ring `ring[head..head+len]` (wrapping). Bytes beyond the free
/// space are not stored; callers check credit first, so none are.
fn ring_push(ring: &mut [u8], head: usize, len: &mut usize, data: &[u8]) {
    let capacity = ring.len();
    if capacity == 0 {
        return;
    }
    let n = data.len().min(capacity - *len);
    // head < capacity and len <= capacity: one subtraction wraps (no division).
    let mut tail = head + *len;
    if tail >= capacity {
        tail -= capacity;
    }
    let first = n.min(capacity - tail);
    ring[tail..tail + first].copy_from_slice(&data[..first]);
    ring[..n - first].copy_from_slice(&data[first..n]);
    *len += n;
}

/// Sends what `conn` has waiting, in the order its peer must see it, while the device
/// takes packets (B7): its REQUEST or RESPONSE, the data its credit covers (B25), its
/// credit packets, its SHUTDOWN once no data waits before it, or only the RST that ends
/// it. Every header is made here, as it enters the ring, with the credit fields of this
/// moment (B9, B43). What does not go out stays owed; returns whether anything waits.
fn transmit<H: Hal, T: Transport>(
    conn: &mut Connection,
    queue: &mut SendQueue,
    device: &mut VirtioVsock<H, T>,
    guest_cid: u32,
) -> bool {
    if conn.owed.contains(Owed::RST) {
        if !send_control(conn, device, guest_cid, Op::Rst) {
            return true;
        }
        conn.owed = Owed::empty();
    }
    if !conn.is_live() {
        // Over: nothing more goes out; a queue left waits for `release_dead_queues`.
        conn.owed = Owed::empty();
        return !queue.is_empty();
    }
    for (what, op) in Owed::SETUP {
        if conn.owed.contains(what) {
            if !send_control(conn, device, guest_cid, op) {
                return true;
            }
            conn.owed.remove(what);
        }
    }
    if matches!(conn.state, State::Connected | State::Closing { .. }) {
        queue.dispatch(device, conn, guest_cid);
    }
    for (what, op) in Owed::CREDIT {
        if conn.owed.contains(what) {
            if !send_control(conn, device, guest_cid, op) {
                return true;
            }
            conn.owed.remove(what);
        }
    }
    if conn.owed.contains(Owed::SHUTDOWN) && queue.is_empty() {
        if !send_control(conn, device, guest_cid, Op::Shutdown) {
            return true;
        }
        conn.owed.remove(Owed::SHUTDOWN);
    }
    !conn.owed.is_empty() || !queue.is_empty()
}

/// Puts a control packet of `conn` on the ring, its header made now (SHUTDOWN carries the
/// flags of `local_shutdown`); returns `false` when the device has no room for it.
fn send_control<H: Hal, T: Transport>(
    conn: &mut Connection,
    device: &mut VirtioVsock<H, T>,
    guest_cid: u32,
    op: Op,
) -> bool {
    let flags = if op == Op::Shutdown {
        conn.local_shutdown.bits()
    } else {
        0
    };
    let header = Header {
        flags,
        ..conn.header(guest_cid, op)
    };
    if device.send(&header, &[]).is_err() {
        return false;
    }
    conn.credit.on_header_sent(header.buf_alloc, header.fwd_cnt);
    true
}

/// Where one connection's arriving data goes straight to, while that connection's
/// receive ring is empty: the caller of `recv` or `recv_with` (see [`VsockDevice::recv`]).
struct DirectRead<'b> {
    /// The slot of the connection.
    index: usize,
    sink: DirectSink<'b>,
    /// Bytes the sink took.
    taken: usize,
}

/// `recv_with`'s reader: shown bytes, returns how many it took.
type Reader<'b> = &'b mut dyn FnMut(&[u8]) -> usize;

/// The caller's side of a [`DirectRead`].
enum DirectSink<'b> {
    /// `recv`'s buffer, filled in order, packet by packet ([`DirectRead::wants`]).
    Buffer(&'b mut [u8]),
    /// `recv_with`'s reader, shown the first data where it lies, once; `None` after that.
    Reader(Option<Reader<'b>>),
    /// The bytes the reader of a packet read in part took where it lay ([`PartlyRead`]),
    /// counted as consumed when the packet is taken at last.
    Consumed(usize),
}

impl<'b> DirectRead<'b> {
    fn new(index: usize, sink: DirectSink<'b>) -> Self {
        DirectRead {
            index,
            sink,
            taken: 0,
        }
    }

    /// Whether to take the next packet, whose payload `next_payload` gives (`None`:
    /// unknown; asked only once the sink holds something): while the sink has room, and,
    /// once it holds something, only a packet that fits whole. A packet cut at the end of
    /// `recv`'s buffer would leave its rest to be copied into the receive buffer and out
    /// again; left where the device put it, the next call takes it with one copy.
    fn wants(&self, next_payload: impl FnOnce() -> Option<usize>) -> bool {
        match &self.sink {
            DirectSink::Buffer(buf) => {
                let room = buf.len().saturating_sub(self.taken);
                room > 0 && (self.taken == 0 || next_payload().is_none_or(|n| n <= room))
            }
            DirectSink::Reader(read) => read.is_some(),
            DirectSink::Consumed(_) => false,
        }
    }

    /// The size of `recv`'s buffer while it holds nothing: a packet with more payload is
    /// read in part where it lies ([`PartlyRead`]) rather than cut, when it may be.
    fn empty_buffer(&self) -> Option<usize> {
        match &self.sink {
            DirectSink::Buffer(buf) if self.taken == 0 => Some(buf.len()),
            _ => None,
        }
    }

    /// Gives the sink what it takes of `payload` and returns the rest.
    fn take<'p>(&mut self, payload: &'p [u8]) -> &'p [u8] {
        let n = match &mut self.sink {
            DirectSink::Buffer(buf) => {
                let n = payload.len().min(buf.len() - self.taken);
                buf[self.taken..self.taken + n].copy_from_slice(&payload[..n]);
                n
            }
            DirectSink::Reader(read) => read
                .take()
                .map_or(0, |read| read(payload).min(payload.len())),
            DirectSink::Consumed(consumed) => (*consumed).min(payload.len()),
        };
        self.taken += n;
        &payload[n..]
    }
}

/// The socket table and everything that is not the device.
struct Sockets<'a> {
    slots: &'a mut [SocketSlot],
    rx_memory: &'a mut [u8],
    rx_per_socket: usize,
    /// RSTs answering packets for no connection, waiting for tx space (B7, B13). A
    /// connection's own control packets wait as what it owes ([`Owed`]).
    stray_rsts: heapless::Deque<Header, STRAY_RST_CAPACITY>,
    /// The slot that last came to owe a packet: it goes out right after the received
    /// packet (or the call) that caused it.
    touched: Option<usize>,
    next_ephemeral: u32,
    next_accept_order: u64,
    config: Config,
    guest_cid: u32,
    /// The slot the last received packet belonged to: packets come in runs per
    /// connection, so it is tried before the scan (B12 still decides).
    last_match: usize,
    /// Some slot may hold data or owe a control packet that has not gone out: `poll`
    /// walks the slots to send them only then.
    send_waiting: bool,
    /// Something happened since the timer walk last ran that may arm, change or end a
    /// connection's timer: a packet came for a connection with a timer, an event came,
    /// or a call began or ended a connection or queued data (`poll` walks the slots for
    /// the timers only then, when `send_waiting`, or once `next_timer` is due).
    timers_changed: bool,
    /// The earliest timer the last walk left armed (a connect or close timeout, a credit
    /// probe); `None` for none.
    next_timer: Option<Instant>,
    /// One past the highest slot that may hold a socket or queued data: the walks of
    /// every poll stop there (new sockets take the lowest free slot).
    in_use_end: usize,
    /// Payload bytes that went into a socket's receive buffer rather than straight to
    /// `recv` or `recv_with` ([`Stats::rx_buffered_bytes`]).
    rx_buffered_bytes: u64,
    /// Some task may wait on a socket (feature `async`): `poll` looks at the wakers only
    /// then.
    #[cfg(feature = "async")]
    tasks_waiting: bool,
}

/// A vsock device with its sockets: the one owner of the queues (see the crate docs).
pub struct VsockDevice<'a, H: Hal, T: Transport> {
    device: VirtioVsock<H, T>,
    sockets: Sockets<'a>,
    now: Instant,
    /// The data the last `poll` left in the device's used ring for its reader (see
    /// [`VsockDevice::poll`]).
    left: Option<LeftData>,
    /// The packet `recv` read in part where the device put it (see [`VsockDevice::recv`]).
    partly_read: Option<PartlyRead>,
}

/// Whether `poll` may leave the packet of `header` to a reader as far as its op goes: data
/// with a payload, or a CREDIT_REQUEST or CREDIT_UPDATE without (see
/// [`Sockets::reader_would_take`]).
fn is_data_or_credit(header: &Header) -> bool {
    let data = header.op == Op::Rw as u16 && header.len > 0;
    let credit = (header.op == Op::CreditRequest as u16 || header.op == Op::CreditUpdate as u16)
        && header.len == 0;
    data || credit
}

/// Whether `next` belongs to the same connection as `first` (the same addresses, ports
/// and type) and carries the same credit fields.
fn same_stream_and_credit(first: &Header, next: &Header) -> bool {
    let stream = |h: &Header| {
        (
            h.src_cid,
            h.dst_cid,
            h.src_port,
            h.dst_port,
            h.socket_type,
            h.buf_alloc,
            h.fwd_cnt,
        )
    };
    stream(first) == stream(next)
}

/// The smallest packet that, when it is the only one the device delivered, `poll` looks
/// at to leave it to its reader ([`VsockDevice::poll`]). Looking costs the driver 100 to
/// 150 instructions (the used entries and headers read, the connection found), as much
/// as copying a few KiB once more: a ping-pong of small messages or a lone control packet
/// would pay it for nothing.
const LEAVE_MIN_PAYLOAD: usize = 4096;

/// Where unread data in the device's used ring stands and whose it is ([`LeftData`],
/// [`PartlyRead`]).
#[derive(Clone, Copy, Debug)]
struct InUsedRing {
    /// The receive buffers taken back so far then ([`VirtioVsock::rx_taken`]): while that
    /// has not moved, the packets are still there.
    at: u16,
    /// The slot of their connection, and its generation then (a handle of a socket that
    /// took the slot later does not match).
    index: usize,
    generation: u16,
}

impl InUsedRing {
    /// Whether the data is still there, `rx_taken` being [`VirtioVsock::rx_taken`] now.
    fn still_there(&self, rx_taken: u16) -> bool {
        self.at == rx_taken
    }

    /// Whether the data is still there and `handle`'s.
    fn is_for(&self, handle: SocketHandle, rx_taken: u16) -> bool {
        self.still_there(rx_taken)
            && self.index == usize::from(handle.index)
            && self.generation == handle.generation
    }
}

/// Received packets `poll` left where the device put them, data (and credit packets) for
/// one connection, for its `recv` to take with one copy (or `recv_with` with none); the
/// next `poll` that finds them there takes them.
#[derive(Clone, Copy, Debug)]
struct LeftData {
    place: InUsedRing,
    /// Their payload's length (of a packet read in part, what its reader has not read).
    len: usize,
}

/// A packet `recv` read in part where the device put it, because the caller's buffer was
/// smaller than its payload: it stays first in the device's used ring while its reader
/// reads on, so that the rest is copied once, not into the receive buffer and out again.
/// Its receive buffer goes back to the device once its payload is read (B31), or once
/// anything else must be taken: then its rest goes to the receive buffer, as a cut
/// packet's would.
#[derive(Clone, Copy, Debug)]
struct PartlyRead {
    /// While it is still there, the packet is first in the used ring.
    place: InUsedRing,
    /// Its header as read then: when it is taken, the packet must still have it.
    header: Header,
    /// Payload bytes its reader took.
    offset: usize,
}

impl<'a, H: Hal, T: Transport> VsockDevice<'a, H, T> {
    /// Brings up the device behind `transport` and gives it `slots` (one per socket) and
    /// `rx_memory`, split evenly into one receive ring per slot: each connection advertises
    /// `rx_memory.len() / slots.len()` bytes of receive buffer (`buf_alloc`).
    ///
    /// Errors: [`Error::NoDevice`] when the transport is not a socket device,
    /// [`Error::InvalidArgument`] for empty storage or bad sizes, [`Error::NoBufferSpace`]
    /// when DMA memory runs out, [`Error::DeviceError`] for a device reporting a reserved CID.
    pub fn new(
        transport: T,
        config: Config,
        slots: &'a mut [SocketSlot],
        rx_memory: &'a mut [u8],
    ) -> Result<Self> {
        if slots.is_empty()
            || slots.len() > usize::from(u16::MAX)
            || config.sibling_packet_size <= HEADER_LEN
        {
            return Err(Error::InvalidArgument);
        }
        let rx_per_socket = (rx_memory.len() / slots.len()).min(u32::MAX as usize);
        if rx_per_socket == 0 {
            return Err(Error::InvalidArgument);
        }
        let device = VirtioVsock::new(
            transport,
            QueueConfig {
                queue_size: config.queue_size,
                rx_buffer_size: config.rx_buffer_size,
                tx_packet_size: config.tx_packet_size,
                tx_memory: config.tx_memory,
            },
        )?;
        for slot in slots.iter_mut() {
            slot.socket = None;
            // Buffers of an earlier device's memory, if the slots were used before.
            slot.send_queue.forget();
        }
        let guest_cid = device.guest_cid();
        Ok(VsockDevice {
            device,
            sockets: Sockets {
                slots,
                rx_memory,
                rx_per_socket,
                stray_rsts: heapless::Deque::new(),
                touched: None,
                next_ephemeral: EPHEMERAL_FIRST,
                next_accept_order: 0,
                last_match: 0,
                send_waiting: false,
                timers_changed: false,
                next_timer: None,
                in_use_end: 0,
                rx_buffered_bytes: 0,
                #[cfg(feature = "async")]
                tasks_waiting: false,
                config,
                guest_cid,
            },
            now: Instant::ZERO,
            left: None,
            partly_read: None,
        })
    }

    /// Our CID (`IOCTL_VM_SOCKETS_GET_LOCAL_CID`).
    pub fn local_cid(&self) -> u32 {
        self.device.guest_cid()
    }

    /// Device counters, kicks included, and [`Stats::rx_buffered_bytes`].
    pub fn stats(&self) -> Stats {
        Stats {
            rx_buffered_bytes: self.sockets.rx_buffered_bytes,
            ..self.device.stats()
        }
    }

    /// Bytes of transmit memory ([`Config::tx_memory`]) in use now: data waiting for
    /// credit, and packets the device has not returned yet.
    pub fn tx_memory_in_use(&self) -> usize {
        self.device.tx_memory_in_use()
    }

    /// Bytes of receive buffer each connection advertises (`buf_alloc`).
    pub fn rx_buffer_per_socket(&self) -> usize {
        self.sockets.rx_per_socket
    }

    /// Does all the work: reclaims sent buffers, takes received packets and device events,
    /// sends replies, fires timeouts, and notifies the device once per queue. Call it often;
    /// `now` must not go backwards.
    ///
    /// When every packet the device has delivered is data for one connection whose
    /// receive buffer is empty, and nothing else (no control packet but the peer's
    /// CREDIT_REQUESTs and CREDIT_UPDATEs, which `recv` answers when it takes them, B29;
    /// no new credit in the headers, B26; at most a quarter of the receive queue and
    /// within our credit, B30), and they are more than one packet or 4 KiB or more,
    /// `poll` leaves them in the device's used ring for that connection's `recv` (or
    /// `recv_with`) to take: it then copies the data once, straight into the caller's
    /// buffer, not into the receive buffer first (see [`VsockDevice::recv`]). The
    /// connection reads as having that data meanwhile ([`VsockDevice::readiness`],
    /// [`VsockDevice::recv_queue`], [`VsockDevice::peek`]), so a task that waits for it is
    /// woken. Left data waits one `poll` at most: a `poll` that finds it still there
    /// takes it, and [`VsockDevice::arm_interrupts`] returns `false` while it is there.
    pub fn poll(&mut self, now: Instant) {
        self.now = now;
        self.device.reclaim_tx();
        self.take_arrivals(None, true);
        self.sockets.fire_timers(now);
        // Credit that came in moves waiting data (B25); what the timers made connections
        // owe goes out with it.
        self.sockets.dispatch_all(&mut self.device, now);
        self.sockets.release_dead_queues(&mut self.device);
        self.sockets.send_stray_rsts(&mut self.device);
        self.device.watch_queues(now);
        self.device.flush();
        #[cfg(feature = "async")]
        self.wake_ready_tasks();
    }

    /// Registers the task that waits for `handle` to become readable: `recv` would not
    /// return `WouldBlock` (data, end of stream or an error), or for a listener `accept`
    /// would not. [`VsockDevice::poll`] wakes it once that is so, and forgets it; a task
    /// registers again each time it finds the socket not ready. One task per socket and
    /// direction: registering another wakes the one before (feature `async`).
    #[cfg(feature = "async")]
    pub fn register_recv_waker(&mut self, handle: SocketHandle, waker: &Waker) -> Result<()> {
        self.sockets.get(handle)?;
        self.sockets.slots[usize::from(handle.index)]
            .recv_waker
            .register(waker);
        self.sockets.tasks_waiting = true;
        Ok(())
    }

    /// Registers the task that waits for `handle` to become writable: `send` would take
    /// bytes or fail at once, or a `connect` finished (see
    /// [`VsockDevice::register_recv_waker`]).
    #[cfg(feature = "async")]
    pub fn register_send_waker(&mut self, handle: SocketHandle, waker: &Waker) -> Result<()> {
        self.sockets.get(handle)?;
        self.sockets.slots[usize::from(handle.index)]
            .send_waker
            .register(waker);
        self.sockets.tasks_waiting = true;
        Ok(())
    }

    /// Wakes the tasks whose socket became ready for what they wait for, and only those;
    /// a task whose socket is gone (closed under it) is woken too, to find out.
    #[cfg(feature = "async")]
    fn wake_ready_tasks(&mut self) {
        if !self.sockets.tasks_waiting {
            return;
        }
        let mut still_waiting = false;
        for index in self.sockets.slots_in_use() {
            let slot = &self.sockets.slots[index];
            if !slot.recv_waker.is_registered() && !slot.send_waker.is_registered() {
                continue;
            }
            let handle = SocketHandle {
                index: index as u16,
                generation: slot.generation,
            };
            let ready = self.readiness(handle).unwrap_or(Readiness::all());
            let slot = &mut self.sockets.slots[index];
            if ready.intersects(Readiness::READABLE | Readiness::HANG_UP | Readiness::ERROR) {
                slot.recv_waker.wake();
            }
            if ready.intersects(Readiness::WRITABLE | Readiness::ERROR) {
                slot.send_waker.wake();
            }
            still_waiting |= slot.recv_waker.is_registered() || slot.send_waker.is_registered();
        }
        self.sockets.tasks_waiting = still_waiting;
    }

    /// When the kernel must call [`VsockDevice::poll`] at the latest if nothing else
    /// happens: the earliest connect or close timeout (B19, B36), credit probe (B29) or
    /// check of a device that sits on work (see [`VirtioVsock::watch_queues`]). `None` when
    /// only the device, or a call, can make work: then a kernel that armed the interrupts
    /// may sleep until one comes. A deadline already past means now.
    pub fn poll_at(&self) -> Option<Instant> {
        match (self.sockets.next_deadline(), self.device.poll_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Before the kernel sleeps, after polling until there was nothing left to do: asks
    /// the device to interrupt when something waits for it (every received packet and
    /// device event; a transmit packet taken back only while data or a control packet
    /// waits for transmit memory or a descriptor), then looks at the rings once more.
    ///
    /// Returns `true` when it is safe to sleep until the interrupt or
    /// [`VsockDevice::poll_at`]; `false` when the device returned something meanwhile (it
    /// may not interrupt for that): poll again instead of sleeping. The next
    /// [`VsockDevice::poll`] (or `recv`) takes the request back, so busy stretches run
    /// without interrupts. Always `false` unless [`Config::interrupts`] is set: the device
    /// then never interrupts, and a kernel must poll.
    ///
    /// ```text
    /// loop {
    ///     vsock.poll(now());
    ///     serve(&mut vsock); // until it has nothing left to do
    ///     if vsock.arm_interrupts() {
    ///         sleep_until_interrupt_or(vsock.poll_at()); // then vsock.ack_interrupt()
    ///     }
    /// }
    /// ```
    pub fn arm_interrupts(&mut self) -> bool {
        if !self.sockets.config.interrupts {
            return false;
        }
        let tx = self.device.tx_outstanding() > 0 && self.sockets.waits_for_device(&self.device);
        self.device.arm_interrupts(tx)
    }

    /// Acknowledges the device's interrupt; returns whether it was this device's (`false`
    /// for another device's on a shared line). Call it from the kernel's main loop (the
    /// driver is not interrupt-safe), then [`VsockDevice::poll`]; counted in
    /// [`Stats::interrupts`].
    pub fn ack_interrupt(&mut self) -> bool {
        self.device.ack_interrupt()
    }

    /// Takes device events, then received packets while RSTs for no connection can wait
    /// (B7), and sends the replies. With `direct`, its connection's data goes to `direct`
    /// while that has room, and no packet is taken after that; a packet larger than
    /// `recv`'s empty buffer is read in part ([`PartlyRead`]). For `poll`, packets that
    /// are all data for one reader are left to it, once ([`VsockDevice::poll`]). A packet
    /// read in part goes first: its reader reads on, or it is taken.
    fn take_arrivals(&mut self, mut direct: Option<&mut DirectRead<'_>>, for_poll: bool) {
        // Busy: no interrupts until the kernel arms them again.
        self.device.disarm_interrupts();
        if !self.device.has_arrivals() {
            // Nothing left or read in part either.
            self.left = None;
            self.partly_read = None;
            // The turn of a waiting loop: nothing came in, only replies owed from before
            // may go out.
            self.sockets.send_replies(&mut self.device);
            return;
        }
        // Data the last poll left and nobody took is taken now.
        let left_before = self.left.take();
        let rx_taken = self.device.rx_taken();
        let first_look =
            for_poll && left_before.is_none_or(|left| !left.place.still_there(rx_taken));
        // A packet read in part is first in the used ring: its reader reads on, the first
        // look of a `poll` may leave it with what came after it, anything else takes it.
        if let Some(part) = self
            .partly_read
            .filter(|part| part.place.still_there(rx_taken))
        {
            let place = part.place;
            let sockets = &self.sockets;
            let reader = direct.as_deref_mut().filter(|direct| {
                direct.index == place.index && sockets.generation_is(place.index, place.generation)
            });
            match reader {
                Some(reader) => {
                    if self.read_on(reader) {
                        return;
                    }
                }
                None if first_look => {}
                None => self.finish_partly_read(),
            }
        } else {
            self.partly_read = None;
        }
        // Events first: after a TRANSPORT_RESET, packets to the new CID in this same poll
        // must find it (B40).
        while let Some(event) = self.device.next_event() {
            self.sockets.timers_changed = true;
            match event {
                Some(EVENT_TRANSPORT_RESET) => {
                    self.device.reread_guest_cid();
                    self.sockets.on_transport_reset(self.device.guest_cid());
                }
                Some(other) => log::debug!("vsock: ignoring event {other}"),
                None => {}
            }
        }
        self.sockets.send_replies(&mut self.device);
        if first_look {
            self.left = self.data_for_one_reader();
            if self.left.is_some() {
                return;
            }
        }
        self.finish_partly_read();
        while !self.sockets.stray_rsts.is_full()
            && direct
                .as_ref()
                .is_none_or(|d| d.wants(|| self.device.next_payload_len()))
        {
            if let Some(direct) = direct.as_deref_mut() {
                if self.start_partly_read(direct) {
                    break;
                }
            }
            let sockets = &mut self.sockets;
            let direct = direct.as_deref_mut();
            let took = self.device.receive(|arrival| match arrival {
                Arrival::Packet(header, payload) => sockets.on_packet(header, payload, direct),
                Arrival::Truncated { header, written } => sockets.on_truncated(header, written),
            });
            if !took {
                break;
            }
            self.sockets.send_replies(&mut self.device);
        }
    }

    /// When every packet the device has delivered is for one connection whose reader would
    /// take it itself ([`Sockets::reader_would_take`]), some of them data, within the
    /// credit we gave (data that is not is for `poll` to reset now, B30), and they hold
    /// at most a quarter of the receive buffers: that connection and their payload's
    /// length, for `poll` to leave them to the reader. A single packet of less than
    /// [`LEAVE_MIN_PAYLOAD`] bytes is not looked at: its second copy costs less than the
    /// look.
    fn data_for_one_reader(&mut self) -> Option<LeftData> {
        let pending = self.device.rx_pending();
        if pending == 0 || pending > self.device.rx_queue_size() / 4 {
            return None;
        }
        if pending == 1 && self.device.next_payload_len()? < LEAVE_MIN_PAYLOAD {
            return None;
        }
        let first = self.device.arrived_header(0)?;
        let index = self.sockets.reader_would_take(&first)?;
        let mut len = first.len as usize;
        // The connection's checks hold for every packet like the first.
        for ahead in 1..pending {
            let next = self.device.arrived_header(ahead)?;
            if !is_data_or_credit(&next) || !same_stream_and_credit(&first, &next) {
                return None;
            }
            len += next.len as usize;
        }
        // The receive buffer is empty, so the credit is all of it.
        let generation = self.sockets.slots.get(index)?.generation;
        // A packet read in part is the first of them; what its reader took is not left.
        let read = self.partly_read.map_or(0, |part| part.offset);
        (len > 0 && len <= self.sockets.rx_per_socket).then(|| LeftData {
            place: InUsedRing {
                at: self.device.rx_taken(),
                index,
                generation,
            },
            len: len.saturating_sub(read),
        })
    }

    /// When the next packet is data for `direct`'s connection with more payload than
    /// `recv`'s empty buffer holds, and the packet is one `poll` would leave to that reader
    /// ([`Sockets::reader_would_take`], within the credit we gave): fills the buffer from
    /// it where it lies and keeps it there ([`PartlyRead`]). Returns whether it did.
    fn start_partly_read(&mut self, direct: &mut DirectRead<'_>) -> bool {
        let Some(room) = direct.empty_buffer() else {
            return false;
        };
        if self.device.next_payload_len().is_none_or(|len| len <= room) {
            return false;
        }
        let at = self.device.rx_taken();
        let Some(generation) = self.sockets.slots.get(direct.index).map(|s| s.generation) else {
            return false;
        };
        let Some((header, payload)) = self.device.arrived_packet(0) else {
            return false;
        };
        // The receive buffer is empty, so the credit is all of it.
        let its_readers_data = header.op == Op::Rw as u16
            && header.len as usize <= self.sockets.rx_per_socket
            && self.sockets.reader_would_take(&header) == Some(direct.index);
        if !its_readers_data {
            return false;
        }
        let offset = payload.len() - direct.take(payload).len();
        self.partly_read = Some(PartlyRead {
            place: InUsedRing {
                at,
                index: direct.index,
                generation,
            },
            header,
            offset,
        });
        true
    }

    /// Gives `direct` more of the packet read in part, where it lies. Returns whether the
    /// packet is still read only in part (then nothing after it may be taken); a packet
    /// read to its end is taken.
    ///
    /// Its header is not read again: [`VsockDevice::finish_partly_read`] checks it.
    fn read_on(&mut self, direct: &mut DirectRead<'_>) -> bool {
        let Some(part) = &mut self.partly_read else {
            return false;
        };
        let end = HEADER_LEN + part.header.len as usize;
        let still_in_part = match self.device.arrived_bytes(0) {
            Some(packet) if packet.len() == end => {
                let unread = packet.get(HEADER_LEN + part.offset..).unwrap_or_default();
                let rest = direct.take(unread);
                part.offset += unread.len() - rest.len();
                !rest.is_empty()
            }
            // Not the packet that was read: taking it resets the connection.
            _ => false,
        };
        if !still_in_part {
            self.finish_partly_read();
        }
        still_in_part
    }

    /// Takes the packet read in part out of the used ring, its receive buffer back to the
    /// device: the bytes its reader took count as consumed (B27), the rest goes to the
    /// receive buffer. A packet that is no longer the one that was read (a device that
    /// rewrote its used ring or the buffer) resets the connection, whose reader has bytes
    /// of the packet it read.
    fn finish_partly_read(&mut self) {
        let Some(part) = self.partly_read.take() else {
            return;
        };
        let InUsedRing {
            index, generation, ..
        } = part.place;
        let same_socket = self.sockets.generation_is(index, generation);
        let mut consumed = DirectRead::new(index, DirectSink::Consumed(part.offset));
        let mut as_read = false;
        let sockets = &mut self.sockets;
        self.device.receive(|arrival| match arrival {
            Arrival::Packet(header, payload) if *header == part.header => {
                as_read = true;
                sockets.on_packet(header, payload, same_socket.then_some(&mut consumed));
            }
            Arrival::Packet(header, payload) => sockets.on_packet(header, payload, None),
            Arrival::Truncated { header, written } => sockets.on_truncated(header, written),
        });
        if !as_read && same_socket {
            log::warn!(
                "vsock: the device changed a packet that was being read ({} bytes of {} read); resetting",
                part.offset,
                part.header.len
            );
            self.sockets.owe(index, Owed::RST);
            self.sockets.reset_connection(index, Error::ConnectionReset);
        }
        self.sockets.send_replies(&mut self.device);
    }

    /// Takes the packet `handle`'s reader read in part, if there is one, before a call
    /// changes what the connection receives: as if it had been cut at the first `recv`.
    fn finish_partly_read_of(&mut self, handle: SocketHandle) {
        let rx_taken = self.device.rx_taken();
        if self
            .partly_read
            .is_some_and(|part| part.place.is_for(handle, rx_taken))
        {
            self.finish_partly_read();
        }
    }

    /// Creates a stream socket (`socket(AF_VSOCK, SOCK_STREAM, 0)`).
    pub fn stream_socket(&mut self) -> Result<SocketHandle> {
        let sockets = &mut self.sockets;
        let index = sockets.free_slot().ok_or(Error::TooManySockets)?;
        sockets.occupy(index, Socket::new());
        let slot = &sockets.slots[index];
        Ok(SocketHandle {
            index: index as u16,
            generation: slot.generation,
        })
    }

    /// Binds to `addr` (B22): `VMADDR_PORT_ANY` picks an ephemeral port; the CID must be
    /// `VMADDR_CID_ANY` or ours.
    pub fn bind(&mut self, handle: SocketHandle, addr: VsockAddr) -> Result<()> {
        let sockets = &mut self.sockets;
        let socket = sockets.get(handle)?;
        if socket.local_port.is_some() {
            return Err(Error::InvalidArgument);
        }
        if addr.cid != VMADDR_CID_ANY && addr.cid != sockets.guest_cid {
            return Err(Error::AddrNotAvailable);
        }
        let port = if addr.port == VMADDR_PORT_ANY {
            sockets.ephemeral_port()?
        } else {
            if addr.port < 1024 && !sockets.config.allow_privileged_ports {
                return Err(Error::AccessDenied);
            }
            if sockets.port_in_use(addr.port) {
                return Err(Error::AddrInUse);
            }
            addr.port
        };
        sockets.get_mut(handle)?.local_port = Some(port);
        Ok(())
    }

    /// Listens for connections, keeping up to `backlog` of them waiting for `accept` (B15).
    pub fn listen(&mut self, handle: SocketHandle, backlog: usize) -> Result<()> {
        let socket = self.sockets.get_mut(handle)?;
        match socket.role {
            Role::Unconnected if socket.local_port.is_some() => {
                socket.role = Role::Listening {
                    backlog: backlog.max(1),
                    waiting: 0,
                };
                Ok(())
            }
            Role::Listening {
                backlog: ref mut current,
                ..
            } => {
                *current = backlog.max(1);
                Ok(())
            }
            // B22; a connecting or connected socket cannot listen either: EINVAL, as
            // POSIX listen(2) (and vsock(4)'s "invalid parameter") has it.
            Role::Unconnected | Role::Stream { .. } => Err(Error::InvalidArgument),
        }
    }

    /// Takes the oldest waiting connection of a listening socket: its handle and the
    /// peer's address. `WouldBlock` when none waits (B22).
    pub fn accept(&mut self, handle: SocketHandle) -> Result<(SocketHandle, VsockAddr)> {
        let sockets = &mut self.sockets;
        match sockets.get(handle)?.role {
            Role::Listening { waiting: 0, .. } => return Err(Error::WouldBlock),
            Role::Listening { .. } => {}
            _ => return Err(Error::InvalidArgument),
        }
        let index = sockets
            .oldest_waiting(handle.index)
            .ok_or(Error::WouldBlock)?;
        sockets.forget_waiting(handle.index);
        let slot = &mut sockets.slots[index];
        let Some(Socket {
            role: Role::Stream { conn, listener, .. },
            ..
        }) = &mut slot.socket
        else {
            return Err(Error::WouldBlock);
        };
        *listener = None;
        let peer = conn.peer;
        Ok((
            SocketHandle {
                index: index as u16,
                generation: slot.generation,
            },
            peer,
        ))
    }

    /// Starts connecting to `peer` (B19, B20): returns `InProgress`; completion makes the
    /// socket writable, failure makes it errored (see [`VsockDevice::take_error`]).
    pub fn connect(&mut self, handle: SocketHandle, peer: VsockAddr) -> Result<()> {
        self.sockets.timers_changed = true;
        let guest_cid = self.sockets.guest_cid;
        let socket = self.sockets.get(handle)?;
        match socket.role {
            Role::Listening { .. } => return Err(Error::InvalidArgument),
            Role::Stream { conn, .. } => {
                return Err(match conn.state {
                    State::Connecting { .. } => Error::Already,
                    _ => Error::IsConnected,
                })
            }
            Role::Unconnected => {}
        }
        let cid = match peer.cid {
            VMADDR_CID_ANY => VMADDR_CID_HOST,
            VMADDR_CID_LOCAL => return Err(Error::InvalidCid),
            cid if cid == guest_cid => return Err(Error::InvalidCid),
            cid => cid,
        };
        if peer.port == VMADDR_PORT_ANY {
            return Err(Error::InvalidArgument);
        }
        let local_port = match socket.local_port {
            Some(port) => port,
            None => self.sockets.ephemeral_port()?,
        };
        let deadline = self.now + self.sockets.config.connect_timeout;
        let conn = self.sockets.new_connection(
            local_port,
            VsockAddr::new(cid, peer.port),
            State::Connecting { deadline },
        );
        let socket = self.sockets.get_mut(handle)?;
        socket.local_port = Some(local_port);
        socket.role = Role::Stream {
            conn,
            listener: None,
            accept_order: 0,
        };
        let index = usize::from(handle.index);
        self.sockets.owe(index, Owed::REQUEST);
        self.sockets.dispatch(index, &mut self.device);
        self.device.flush();
        Err(Error::InProgress)
    }

    /// Sends as much of `data` as the connection can take now; returns the number of bytes
    /// taken. Bytes the peer has room for go out at once; up to [`Config::send_buffer`]
    /// more wait in transmit memory and go out as the peer makes room (B25: never beyond
    /// its credit). `WouldBlock` when nothing could be taken. The device is notified
    /// before `send` returns, where it asked to be (B8).
    pub fn send(&mut self, handle: SocketHandle, data: &[u8]) -> Result<usize> {
        let index = self.sendable(handle)?;
        if data.is_empty() {
            return Ok(0);
        }
        if self.sockets.send_at_once(index, &mut self.device, data) {
            // One send is one batch (B8). Nothing waits, so no timer changed.
            self.device.flush();
            return Ok(data.len());
        }
        self.sockets.timers_changed = true;
        let mut sent = 0;
        while sent < data.len() {
            let rest = &data[sent..];
            let n = self
                .sockets
                .append(index, &mut self.device, rest.len(), |space| {
                    let n = space.len().min(rest.len());
                    space[..n].copy_from_slice(&rest[..n]);
                    n
                });
            if n == 0 {
                break;
            }
            sent += n;
            // A long send keeps the device busy as it goes (B8).
            self.device.flush_tx_batch();
        }
        self.after_send(index, sent)
    }

    /// Sends bytes written in place: `write` gets free space in transmit memory (the DMA
    /// memory the device reads, so the bytes are never copied again), fills the start of
    /// it and returns how many bytes it wrote. Returns that number, or `WouldBlock` when
    /// there is no space now (the same room as for [`VsockDevice::send`]; one call gives
    /// at most one packet's space, so call it again for more).
    pub fn send_with(
        &mut self,
        handle: SocketHandle,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) -> Result<usize> {
        self.sockets.timers_changed = true;
        let index = self.sendable(handle)?;
        let n = self
            .sockets
            .append(index, &mut self.device, usize::MAX, write);
        self.after_send(index, n)
    }

    /// Bytes `send` took that wait for the peer's credit (or a free descriptor) and have
    /// not gone to the device yet.
    pub fn send_queue(&self, handle: SocketHandle) -> Result<usize> {
        self.sockets.get(handle)?;
        Ok(self.sockets.slots[usize::from(handle.index)]
            .send_queue
            .unsent())
    }

    /// The space the next [`VsockDevice::send_with`] would offer now (`send` may take
    /// more, packet after packet); 0 when it would return `WouldBlock` or an error.
    pub fn send_room(&self, handle: SocketHandle) -> Result<usize> {
        let socket = self.sockets.get(handle)?;
        let conn = socket.conn().ok_or(Error::NotConnected)?;
        if conn.state != State::Connected || conn.sending_shut() {
            return Ok(0);
        }
        let queue = &self.sockets.slots[usize::from(handle.index)].send_queue;
        Ok(queue.room(&self.device, conn, self.sockets.config.send_buffer))
    }

    /// The slot of a connection that may send, or why not.
    fn sendable(&mut self, handle: SocketHandle) -> Result<usize> {
        let conn = self.sockets.conn_mut(handle)?;
        match conn.state {
            State::Connected => {}
            State::Connecting { .. } => return Err(Error::WouldBlock),
            State::Closing { .. } => return Err(Error::BrokenPipe),
            State::Closed if conn.reset => {
                return Err(conn.pending_error.take().unwrap_or(Error::ConnectionReset))
            }
            State::Closed => return Err(Error::BrokenPipe),
        }
        if conn.sending_shut() {
            return Err(Error::BrokenPipe);
        }
        Ok(usize::from(handle.index))
    }

    /// After `sent` bytes were taken: asks for credit when blocked on it (B29), notifies
    /// the device (B8), and gives the caller its result.
    fn after_send(&mut self, index: usize, sent: usize) -> Result<usize> {
        if self
            .sockets
            .ask_credit_if_blocked(index, sent == 0, self.now)
        {
            self.sockets.dispatch(index, &mut self.device);
        }
        // One send is one batch (B8): the device hears of it now, if it asked to. With
        // EVENT_IDX a device that is still working through earlier packets has not asked,
        // so a run of sends to a busy device costs no notification.
        self.device.flush();
        if sent == 0 {
            Err(Error::WouldBlock)
        } else {
            Ok(sent)
        }
    }

    /// Receives into `buf`; `Ok(0)` at end of stream (B33), `WouldBlock` when no data waits.
    ///
    /// When nothing waits in the socket's receive buffer, `recv` first takes what the
    /// device has delivered, as [`VsockDevice::poll`] would, and copies this connection's
    /// data straight into `buf`: a reader that keeps up gets its bytes with one copy, not
    /// two. Once `buf` holds something, it stops before the first packet that would not
    /// fit in the rest whole (the next call takes it). A first packet larger than `buf`
    /// is read in part where it lies: the next calls read on from it, and its receive
    /// buffer goes back to the device once it is read to its end. A call that must take
    /// what came after it first (a second `poll`, another socket's `recv`, `peek`, and
    /// `shutdown`, `close` or `abort` of this socket) puts its rest into the socket's
    /// receive buffer; a packet the device changed meanwhile resets the connection.
    pub fn recv(&mut self, handle: SocketHandle, buf: &mut [u8]) -> Result<usize> {
        if !buf.is_empty() {
            let sink = DirectSink::Buffer(&mut *buf);
            if let Some(n) = self.recv_direct(handle, sink) {
                return Ok(n);
            }
        }
        let n = self.sockets.read(handle, buf, true)?;
        self.after_recv(handle, n);
        Ok(n)
    }

    /// Receives in place: `read` gets the oldest unread bytes where they are and returns
    /// how many it took; those are consumed (at most all it was given). Returns that
    /// number; `Ok(0)` at end of stream and `WouldBlock` when no data waits, without
    /// calling `read`.
    ///
    /// The bytes are one contiguous piece (call again for the rest): a piece of the
    /// socket's receive buffer, or, when that is empty, the data of the next packet for
    /// this connection in the device's receive buffer, with no copy at all. To find that
    /// packet `recv_with` takes what the device has delivered, as `recv` does; what
    /// `read` leaves of the packet is kept in the socket's receive buffer.
    pub fn recv_with(
        &mut self,
        handle: SocketHandle,
        read: impl FnOnce(&[u8]) -> usize,
    ) -> Result<usize> {
        let mut read = Some(read);
        let mut once = |bytes: &[u8]| read.take().map_or(0, |read| read(bytes));
        if let Some(n) = self.recv_direct(handle, DirectSink::Reader(Some(&mut once))) {
            return Ok(n);
        }
        let n = self
            .sockets
            .read_with(handle, true, |first, _| once(first).min(first.len()))?;
        self.after_recv(handle, n);
        Ok(n)
    }

    /// When `handle`'s receive buffer is empty and the device has delivered something:
    /// takes it, giving this connection's data to `sink` first. Returns what the sink
    /// took, or `None` when it was given nothing (then the receive buffer is read as
    /// before).
    fn recv_direct(&mut self, handle: SocketHandle, sink: DirectSink<'_>) -> Option<usize> {
        // Only new packets with nothing buffered make a direct read (what earlier packets
        // made us owe goes out at the next poll). The device's used indices are the
        // cheaper look, so they come first.
        if !self.device.has_arrivals() || !self.sockets.nothing_buffered(handle) {
            return None;
        }
        let mut direct = DirectRead::new(usize::from(handle.index), sink);
        self.take_arrivals_in_call(Some(&mut direct));
        let given = match direct.sink {
            DirectSink::Buffer(_) | DirectSink::Consumed(_) => direct.taken > 0,
            DirectSink::Reader(read) => read.is_none(),
        };
        if !given {
            return None;
        }
        self.after_recv(handle, direct.taken);
        Some(direct.taken)
    }

    /// [`VsockDevice::take_arrivals`] for a call other than `poll` (`recv`, `recv_with`,
    /// `peek`): then wakes the tasks the packets for other sockets made ready, and sends
    /// the replies as one batch.
    fn take_arrivals_in_call(&mut self, direct: Option<&mut DirectRead<'_>>) {
        self.take_arrivals(direct, false);
        #[cfg(feature = "async")]
        self.wake_ready_tasks();
        // Replies go out in batches, as `send`'s packets do. The device sees the reposted
        // buffers at the next poll or credit update: a reader that drained them all finds
        // nothing, polls, and shows it the whole batch at once (B8).
        self.device.flush_tx_batch();
    }

    /// After `n` bytes were consumed: B28, tell the peer about the space we made, when
    /// its view ran low.
    fn after_recv(&mut self, handle: SocketHandle, n: usize) {
        let index = usize::from(handle.index);
        if n > 0 && self.sockets.credit_update_due(index) {
            self.sockets.owe(index, Owed::CREDIT_UPDATE);
            self.sockets.dispatch(index, &mut self.device);
            self.device.flush();
        }
    }

    /// Copies waiting data into `buf` without consuming it.
    pub fn peek(&mut self, handle: SocketHandle, buf: &mut [u8]) -> Result<usize> {
        if self.unread_in_device(handle).is_some() {
            // What `poll` left for `recv`, or the rest of a packet `recv` read in part,
            // goes to the receive buffer, to be shown.
            self.take_arrivals_in_call(None);
        }
        self.sockets.read(handle, buf, false)
    }

    /// Bytes waiting to be received: in the socket's receive buffer, or, when that is
    /// empty, in the packets [`VsockDevice::poll`] left for `recv` or the rest of a packet
    /// `recv` read in part.
    pub fn recv_queue(&self, handle: SocketHandle) -> Result<usize> {
        let buffered = self.sockets.get(handle)?.rx_len;
        Ok(buffered + self.unread_in_device(handle).unwrap_or(0))
    }

    /// The unread bytes of `handle`'s connection still where the device put them, while
    /// they are there: what the last `poll` left for its reader, or the rest of a packet
    /// `recv` read in part.
    fn unread_in_device(&self, handle: SocketHandle) -> Option<usize> {
        let rx_taken = self.device.rx_taken();
        let left = self.left.filter(|left| left.place.is_for(handle, rx_taken));
        let part = self
            .partly_read
            .filter(|part| part.place.is_for(handle, rx_taken));
        left.map(|left| left.len)
            .or_else(|| part.map(|part| (part.header.len as usize).saturating_sub(part.offset)))
    }

    /// Shuts down one or both directions (B35): sends SHUTDOWN with the matching flags.
    pub fn shutdown(&mut self, handle: SocketHandle, how: Shutdown) -> Result<()> {
        self.finish_partly_read_of(handle);
        self.sockets.timers_changed = true;
        let conn = self.sockets.conn_mut(handle)?;
        if conn.state != State::Connected {
            return Err(Error::NotConnected);
        }
        let flags = match how {
            Shutdown::Read => ShutdownFlags::RECEIVE,
            Shutdown::Write => ShutdownFlags::SEND,
            Shutdown::Both => ShutdownFlags::all(),
        };
        conn.local_shutdown |= flags;
        // The SHUTDOWN goes out after the data already taken (now, if none waits).
        let index = usize::from(handle.index);
        self.sockets.owe(index, Owed::SHUTDOWN);
        self.sockets.dispatch(index, &mut self.device);
        self.device.flush();
        Ok(())
    }

    /// Closes the socket (B36). The handle is invalid at once; a connection is shut down
    /// gracefully in the background (SHUTDOWN, then the peer's RST or a timeout).
    pub fn close(&mut self, handle: SocketHandle) -> Result<()> {
        self.finish_partly_read_of(handle);
        self.sockets.timers_changed = true;
        self.sockets.get(handle)?;
        let index = handle.index as usize;
        let close_deadline = self.now + self.sockets.config.close_timeout;
        let sockets = &mut self.sockets;
        let slot = &mut sockets.slots[index];
        slot.generation = slot.generation.wrapping_add(1);
        // Tasks waiting on the socket find out that it is gone.
        #[cfg(feature = "async")]
        slot.wake_tasks();
        let Some(socket) = slot.socket.as_mut() else {
            return Ok(());
        };
        socket.orphaned = true;
        match &mut socket.role {
            Role::Stream { conn, .. } => match conn.state {
                State::Connected => {
                    conn.state = State::Closing {
                        deadline: close_deadline,
                    };
                    conn.local_shutdown = ShutdownFlags::all();
                    // SHUTDOWN after the data already taken: that still goes out while
                    // the close waits (B36).
                    sockets.owe(index, Owed::SHUTDOWN);
                }
                State::Connecting { .. } => {
                    conn.state = State::Closed;
                    sockets.owe(index, Owed::RST);
                    sockets.free(index);
                }
                State::Closing { .. } => {}
                State::Closed => sockets.free(index),
            },
            Role::Listening { .. } => {
                sockets.reset_waiting(index as u16, &mut self.device);
                sockets.free(index);
            }
            Role::Unconnected => sockets.free(index),
        }
        self.sockets.dispatch(index, &mut self.device);
        self.device.flush();
        Ok(())
    }

    /// Resets the connection now (RST) and frees the socket (B36).
    pub fn abort(&mut self, handle: SocketHandle) -> Result<()> {
        self.finish_partly_read_of(handle);
        self.sockets.timers_changed = true;
        let socket = self.sockets.get(handle)?;
        let index = handle.index as usize;
        let live = socket.conn().is_some_and(Connection::is_live);
        let listening = matches!(socket.role, Role::Listening { .. });
        if live {
            self.sockets.owe(index, Owed::RST);
        }
        if listening {
            self.sockets.reset_waiting(handle.index, &mut self.device);
        }
        let slot = &mut self.sockets.slots[index];
        slot.generation = slot.generation.wrapping_add(1);
        #[cfg(feature = "async")]
        slot.wake_tasks();
        self.sockets.free(index);
        self.sockets.dispatch(index, &mut self.device);
        self.sockets.release_dead_queues(&mut self.device);
        self.device.flush();
        Ok(())
    }

    /// What the socket is ready for.
    pub fn readiness(&self, handle: SocketHandle) -> Result<Readiness> {
        let sockets = &self.sockets;
        let socket = sockets.get(handle)?;
        let mut ready = Readiness::empty();
        match &socket.role {
            Role::Unconnected => {}
            Role::Listening { waiting, .. } => {
                if *waiting > 0 {
                    ready |= Readiness::READABLE;
                }
            }
            Role::Stream { conn, .. } => {
                if conn.pending_error.is_some() {
                    ready |= Readiness::ERROR | Readiness::READABLE | Readiness::WRITABLE;
                }
                let ended =
                    conn.state == State::Closed || conn.peer_shutdown.contains(ShutdownFlags::SEND);
                // After our own `shutdown(Read)`, `recv` returns `Ok(0)` at once: readable,
                // as poll(2) reports it (B35).
                let read_shut = conn.local_shutdown.contains(ShutdownFlags::RECEIVE);
                if socket.rx_len > 0
                    || ended
                    || read_shut
                    || self.unread_in_device(handle).is_some()
                {
                    ready |= Readiness::READABLE;
                }
                if ended {
                    ready |= Readiness::HANG_UP;
                }
                // WRITABLE: `send` would not return `WouldBlock`, either because it can
                // take bytes or because it fails at once (as poll(2) reports POLLOUT).
                let send_fails = matches!(conn.state, State::Closed | State::Closing { .. })
                    || conn.sending_shut();
                let send_takes = self.send_room(handle)? > 0;
                if send_fails || send_takes {
                    ready |= Readiness::WRITABLE;
                }
            }
        }
        Ok(ready)
    }

    /// Takes the pending error, once (`SO_ERROR`).
    pub fn take_error(&mut self, handle: SocketHandle) -> Result<Option<Error>> {
        let socket = self.sockets.get_mut(handle)?;
        Ok(socket.conn_mut().and_then(|conn| conn.pending_error.take()))
    }

    /// The address the socket is bound to.
    pub fn local_addr(&self, handle: SocketHandle) -> Result<VsockAddr> {
        let socket = self.sockets.get(handle)?;
        let port = socket.local_port.ok_or(Error::InvalidArgument)?;
        Ok(VsockAddr::new(self.sockets.guest_cid, port))
    }

    /// The address of the connected peer.
    pub fn peer_addr(&self, handle: SocketHandle) -> Result<VsockAddr> {
        let socket = self.sockets.get(handle)?;
        socket.conn().map(|c| c.peer).ok_or(Error::NotConnected)
    }
}

/// The open socket `handle` names in `slots`.
fn socket_mut(slots: &mut [SocketSlot], handle: SocketHandle) -> Result<&mut Socket> {
    let slot = slots
        .get_mut(usize::from(handle.index))
        .ok_or(Error::InvalidHandle)?;
    match &mut slot.socket {
        Some(socket) if slot.generation == handle.generation && !socket.orphaned => Ok(socket),
        _ => Err(Error::InvalidHandle),
    }
}

impl Sockets<'_> {
    fn get(&self, handle: SocketHandle) -> Result<&Socket> {
        let slot = self
            .slots
            .get(usize::from(handle.index))
            .ok_or(Error::InvalidHandle)?;
        match &slot.socket {
            Some(socket) if slot.generation == handle.generation && !socket.orphaned => Ok(socket),
            _ => Err(Error::InvalidHandle),
        }
    }

    fn get_mut(&mut self, handle: SocketHandle) -> Result<&mut Socket> {
        socket_mut(self.slots, handle)
    }

    fn conn_mut(&mut self, handle: SocketHandle) -> Result<&mut Connection> {
        self.get_mut(handle)?.conn_mut().ok_or(Error::NotConnected)
    }

    /// A connection of ours with `peer`: it advertises our share of the receive memory, and
    /// its packets to another guest stay within `Config::sibling_packet_size`.
    fn new_connection(&self, local_port: u32, peer: VsockAddr, state: State) -> Connection {
        let mut conn = Connection::new(local_port, peer, state, self.rx_per_socket as u32);
        if peer.cid > VMADDR_CID_HOST {
            let limit = self.config.sibling_packet_size.saturating_sub(HEADER_LEN);
            conn.max_payload = u32::try_from(limit).unwrap_or(u32::MAX);
        }
        conn
    }

    /// Puts `socket` into slot `index` (a free one).
    fn occupy(&mut self, index: usize, socket: Socket) {
        if let Some(slot) = self.slots.get_mut(index) {
            slot.socket = Some(socket);
            self.in_use_end = self.in_use_end.max(index + 1);
        }
    }

    /// The slots the walks of every poll look at (see `in_use_end`).
    fn slots_in_use(&self) -> core::ops::Range<usize> {
        0..self.in_use_end.min(self.slots.len())
    }

    /// Lowers `in_use_end` past empty slots at the end.
    fn shrink_in_use(&mut self) {
        while let Some(last) = self.in_use_end.checked_sub(1) {
            match self.slots.get(last) {
                Some(slot) if slot.socket.is_some() || !slot.send_queue.is_empty() => break,
                _ => self.in_use_end = last,
            }
        }
    }

    fn free_slot(&self) -> Option<usize> {
        self.slots
            .iter()
            .position(|slot| slot.socket.is_none() && slot.send_queue.is_empty())
    }

    fn conn_at(&mut self, index: usize) -> Option<&mut Connection> {
        self.slots
            .get_mut(index)
            .and_then(|slot| slot.socket.as_mut())
            .and_then(Socket::conn_mut)
    }

    /// Appends to the send queue of the connection in slot `index` (see
    /// [`SendQueue::append`]) and submits what its credit covers.
    fn append<H: Hal, T: Transport>(
        &mut self,
        index: usize,
        device: &mut VirtioVsock<H, T>,
        size_hint: usize,
        write: impl FnOnce(&mut [u8]) -> usize,
    ) -> usize {
        let send_buffer = self.config.send_buffer;
        let Some(slot) = self.slots.get_mut(index) else {
            return 0;
        };
        let Some(conn) = slot.socket.as_mut().and_then(Socket::conn_mut) else {
            return 0;
        };
        let n = slot
            .send_queue
            .append(device, conn, send_buffer, size_hint, write);
        self.dispatch(index, device);
        n
    }

    /// [`SendQueue::send_at_once`] for the connection in slot `index`, which must owe no
    /// control packet (those go first, by [`transmit`]). Returns whether `data` went out.
    fn send_at_once<H: Hal, T: Transport>(
        &mut self,
        index: usize,
        device: &mut VirtioVsock<H, T>,
        data: &[u8],
    ) -> bool {
        let guest_cid = self.guest_cid;
        let Some(slot) = self.slots.get_mut(index) else {
            return false;
        };
        let SocketSlot {
            socket, send_queue, ..
        } = slot;
        let Some(conn) = socket.as_mut().and_then(Socket::conn_mut) else {
            return false;
        };
        conn.owed.is_empty() && send_queue.send_at_once(device, conn, guest_cid, data)
    }

    /// Sends what the connection in slot `index` has waiting (see [`transmit`]); what
    /// does not go out stays owed, for the walk of the next poll. A closed connection
    /// without a handle is freed once its RST is out.
    fn dispatch<H: Hal, T: Transport>(&mut self, index: usize, device: &mut VirtioVsock<H, T>) {
        if self.touched == Some(index) {
            self.touched = None;
        }
        let guest_cid = self.guest_cid;
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        let SocketSlot {
            socket, send_queue, ..
        } = slot;
        let Some(conn) = socket.as_mut().and_then(Socket::conn_mut) else {
            return;
        };
        let rst_owed = conn.owed.contains(Owed::RST);
        self.send_waiting |= transmit(conn, send_queue, device, guest_cid);
        if rst_owed && !conn.owed.contains(Owed::RST) {
            self.after_state_change(index);
        }
    }

    /// [`Sockets::dispatch`] for every connection with something waiting.
    /// Data still blocked on credit asks for more (B29), as a refused `send` does.
    fn dispatch_all<H: Hal, T: Transport>(&mut self, device: &mut VirtioVsock<H, T>, now: Instant) {
        if !self.send_waiting {
            return;
        }
        // `dispatch` sets it again for whatever still waits.
        self.send_waiting = false;
        for index in self.slots_in_use() {
            let slot = &self.slots[index];
            let waiting = !slot.send_queue.is_empty()
                || slot
                    .socket
                    .as_ref()
                    .and_then(Socket::conn)
                    .is_some_and(|conn| !conn.owed.is_empty());
            if waiting {
                self.dispatch(index, device);
                if self.ask_credit_if_blocked(index, false, now) {
                    self.dispatch(index, device);
                }
                // A queue `dispatch` does not serve (its connection ended) waits for
                // `release_dead_queues`.
                self.send_waiting |= !self.slots[index].send_queue.is_empty();
            }
        }
    }

    /// After a received packet or a call: sends the RSTs for no connection, and what the
    /// connection it concerned came to owe.
    fn send_replies<H: Hal, T: Transport>(&mut self, device: &mut VirtioVsock<H, T>) {
        self.send_stray_rsts(device);
        if let Some(index) = self.touched.take() {
            self.dispatch(index, device);
        }
    }

    /// When the connection in slot `index` is blocked on credit (see
    /// [`Sockets::blocked_on_credit`]) and no request is outstanding, queues a
    /// CREDIT_REQUEST and arms the probe that asks again later if the answer shows none
    /// (B29). Returns whether it queued one.
    ///
    /// While data of ours is still unacknowledged, it only arms the probe: the peer
    /// returns that data's credit once it reads it (Linux, vhost-device-vsock and Cloud
    /// Hypervisor send a CREDIT_UPDATE when their free space runs low, and `dispatch`
    /// cuts a packet that does not fit what is left, so the window fills and it does run
    /// low), and an immediate request would only take the device's time before the data
    /// behind it. A peer that stays silent is asked when the probe fires.
    fn ask_credit_if_blocked(&mut self, index: usize, refused: bool, now: Instant) -> bool {
        if !self.blocked_on_credit(index, refused) {
            return false;
        }
        let needed = self.slots[index].send_queue.front_len().max(1) as u32;
        let Some(conn) = self.conn_at(index) else {
            return false;
        };
        if conn.credit.in_flight() > 0 {
            if conn.credit_probe.is_none() {
                conn.credit_probe = Some(CreditProbe::first(now));
            }
            return false;
        }
        if !conn.credit.take_credit_request(needed) {
            return false;
        }
        conn.credit_probe = Some(CreditProbe::first(now));
        self.owe(index, Owed::CREDIT_REQUEST);
        true
    }

    /// Whether the oldest data waiting in slot `index` needs more credit than the peer
    /// gives, or (`refused`) the caller's bytes were refused with no credit at all.
    fn blocked_on_credit(&self, index: usize, refused: bool) -> bool {
        let Some(slot) = self.slots.get(index) else {
            return false;
        };
        let Some(conn) = slot.socket.as_ref().and_then(Socket::conn) else {
            return false;
        };
        let credit = conn.credit.peer_free() as usize;
        let blocked = if slot.send_queue.is_empty() {
            refused && credit == 0
        } else {
            slot.send_queue.front_len() > credit
        };
        conn.state == State::Connected && blocked
    }

    /// The earliest timer of a connection: a connect or close timeout, or a credit probe.
    fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .get(self.slots_in_use())
            .into_iter()
            .flatten()
            .filter_map(|slot| slot.socket.as_ref()?.conn())
            .filter_map(Connection::next_timer)
            .min()
    }

    /// Whether something waits for the device to take back transmit packets: an RST for
    /// no connection, a control packet a connection owes, data whose credit has come but
    /// which found no descriptor or memory, or a `send` that would find none (every
    /// descriptor, or all transmit memory, is with the device).
    fn waits_for_device<H: Hal, T: Transport>(&self, device: &VirtioVsock<H, T>) -> bool {
        if !self.stray_rsts.is_empty()
            || device.tx_free_descriptors() == 0
            || device.tx_free_chunks() == 0
        {
            return true;
        }
        self.slots
            .get(self.slots_in_use())
            .into_iter()
            .flatten()
            .any(|slot| {
                let Some(conn) = slot.socket.as_ref().and_then(Socket::conn) else {
                    return false;
                };
                let data_fits = !slot.send_queue.is_empty()
                    && slot.send_queue.front_len() <= conn.credit.peer_free() as usize;
                !conn.owed.is_empty() || data_fits
            })
    }

    /// Gives back the memory of data that will never go out: queues of freed slots and of
    /// connections that ended.
    fn release_dead_queues<H: Hal, T: Transport>(&mut self, device: &mut VirtioVsock<H, T>) {
        if !self.send_waiting {
            return;
        }
        let end = self.slots_in_use().end;
        for slot in self.slots.iter_mut().take(end) {
            if slot.send_queue.is_empty() {
                continue;
            }
            let sending = slot
                .socket
                .as_ref()
                .and_then(Socket::conn)
                .is_some_and(|conn| matches!(conn.state, State::Connected | State::Closing { .. }));
            if !sending {
                slot.send_queue.release_all(device);
            }
        }
    }

    /// Frees slot `index` for a new socket. A connection that still owes its RST keeps the
    /// slot, closed, without a handle and out of any accept queue, until the RST is out
    /// (see [`Sockets::dispatch`]).
    fn free(&mut self, index: usize) {
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if let Some(Socket {
            role:
                Role::Stream {
                    listener: Some(listener),
                    ..
                },
            ..
        }) = slot.socket
        {
            self.forget_waiting(listener);
        }
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        match slot.socket.as_mut() {
            Some(Socket {
                role: Role::Stream { conn, listener, .. },
                orphaned,
                ..
            }) if conn.owed.contains(Owed::RST) => {
                conn.state = State::Closed;
                *listener = None;
                *orphaned = true;
                self.send_waiting = true;
            }
            _ => slot.socket = None,
        }
    }

    fn port_in_use(&self, port: u32) -> bool {
        self.slots[self.slots_in_use()]
            .iter()
            .filter_map(|slot| slot.socket.as_ref())
            .any(|socket| {
                socket.local_port == Some(port) && socket.conn().is_none_or(|c| c.is_live())
            })
    }

    fn ephemeral_port(&mut self) -> Result<u32> {
        // Tries as many candidates as there are sockets plus one: one of them must be free.
        for _ in 0..=self.slots.len() {
            let port = self.next_ephemeral;
            self.next_ephemeral = if port >= EPHEMERAL_LAST {
                EPHEMERAL_FIRST
            } else {
                port + 1
            };
            if !self.port_in_use(port) {
                return Ok(port);
            }
        }
        Err(Error::AddrNotAvailable)
    }

    /// The slot of the connection whose reader would take the packet of `header` itself
    /// ([`VsockDevice::recv`]), were it left for it: a data packet, or a credit packet
    /// (CREDIT_REQUEST, CREDIT_UPDATE; a request is answered when `recv` takes it, B29), for
    /// an accepted, connected connection that is open for reading and has nothing in its
    /// receive buffer, and whose header brings nothing but the data or the request: the
    /// peer's credit fields as last reported (B26), nothing sent waiting for them.
    /// Anything else (and anything odd about it) is for `poll` to take.
    fn reader_would_take(&mut self, header: &Header) -> Option<usize> {
        if !is_data_or_credit(header)
            || header.dst_cid != u64::from(self.guest_cid)
            || header.socket_type() != Some(SocketType::Stream)
        {
            return None;
        }
        let index = self.find_connection(header)?;
        let slot = self.slots.get(index)?;
        let socket = slot.socket.as_ref()?;
        let Role::Stream {
            conn,
            listener: None,
            ..
        } = &socket.role
        else {
            return None;
        };
        let open = conn.state == State::Connected
            && !conn.local_shutdown.contains(ShutdownFlags::RECEIVE)
            && !conn.peer_shutdown.contains(ShutdownFlags::SEND);
        let only_data = conn
            .credit
            .peer_fields_unchanged(header.buf_alloc, header.fwd_cnt)
            && slot.send_queue.is_empty()
            && conn.next_timer().is_none();
        (open && only_data && !socket.orphaned && socket.rx_len == 0).then_some(index)
    }

    /// Whether slot `index` still has generation `generation`: no socket took it since.
    fn generation_is(&self, index: usize, generation: u16) -> bool {
        self.slots
            .get(index)
            .is_some_and(|slot| slot.generation == generation)
    }

    /// Whether `handle` is a connection with an empty receive ring.
    fn nothing_buffered(&self, handle: SocketHandle) -> bool {
        self.get(handle)
            .is_ok_and(|socket| socket.conn().is_some() && socket.rx_len == 0)
    }

    /// Gives `read` the unread data of `handle`'s connection, in the two pieces the ring
    /// holds it in (the second empty unless it wraps), and consumes what `read` says it
    /// took (if `consume`; at most all of it). `Ok(0)` at end of stream, `WouldBlock`
    /// when no data waits; `read` is called only when there is data.
    fn read_with(
        &mut self,
        handle: SocketHandle,
        consume: bool,
        read: impl FnOnce(&[u8], &[u8]) -> usize,
    ) -> Result<usize> {
        let per = self.rx_per_socket;
        let start = usize::from(handle.index) * per;
        let socket = socket_mut(self.slots, handle)?;
        let (head, len) = (socket.rx_head, socket.rx_len);
        let Some(conn) = socket.conn_mut() else {
            return Err(Error::NotConnected);
        };
        if len == 0 {
            if conn.local_shutdown.contains(ShutdownFlags::RECEIVE)
                || conn.peer_shutdown.contains(ShutdownFlags::SEND)
            {
                return Ok(0);
            }
            return match conn.state {
                State::Connected => Err(Error::WouldBlock),
                State::Connecting { .. } => Err(Error::WouldBlock),
                State::Closed if conn.reset => Err(Error::ConnectionReset),
                State::Closed | State::Closing { .. } => Ok(0),
            };
        }
        let ring = &self.rx_memory[start..start + per];
        // head < per and len <= per (ring_push keeps them so).
        let first_len = len.min(per - head);
        let first = &ring[head..head + first_len];
        let second = &ring[..len - first_len];
        let n = read(first, second).min(len);
        if consume && n > 0 {
            conn.credit.on_consumed(n as u32);
            socket.rx_len = len - n;
            socket.rx_head = if socket.rx_len == 0 {
                0
            } else if head + n >= per {
                head + n - per
            } else {
                head + n
            };
        }
        Ok(n)
    }

    /// [`Sockets::read_with`], copying into `buf`.
    fn read(&mut self, handle: SocketHandle, buf: &mut [u8], consume: bool) -> Result<usize> {
        if buf.is_empty() {
            // Errors and end of stream still show; an empty read takes nothing.
            return self.read_with(handle, false, |_, _| 0);
        }
        self.read_with(handle, consume, |first, second| {
            let a = first.len().min(buf.len());
            buf[..a].copy_from_slice(&first[..a]);
            let b = second.len().min(buf.len() - a);
            buf[a..a + b].copy_from_slice(&second[..b]);
            a + b
        })
    }

    fn credit_update_due(&self, index: usize) -> bool {
        self.slots
            .get(index)
            .and_then(|slot| slot.socket.as_ref())
            .and_then(Socket::conn)
            .is_some_and(|conn| conn.state == State::Connected && conn.credit.needs_update())
    }

    /// The connection waiting longest in `listener`'s accept queue.
    fn oldest_waiting(&self, listener: u16) -> Option<usize> {
        self.slots[self.slots_in_use()]
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| match slot.socket.as_ref()?.role {
                Role::Stream {
                    listener: Some(l),
                    accept_order,
                    ..
                } if l == listener => Some((accept_order, index)),
                _ => None,
            })
            .min()
            .map(|(_, index)| index)
    }

    /// Counts one connection less in the queue of the listener in slot `listener`: it
    /// was accepted or freed.
    fn forget_waiting(&mut self, listener: u16) {
        if let Some(Role::Listening { waiting, .. }) = self
            .slots
            .get_mut(usize::from(listener))
            .and_then(|slot| slot.socket.as_mut())
            .map(|socket| &mut socket.role)
        {
            *waiting = waiting.saturating_sub(1);
        }
    }

    /// Resets and frees every connection still waiting in `listener`'s queue.
    fn reset_waiting<H: Hal, T: Transport>(
        &mut self,
        listener: u16,
        device: &mut VirtioVsock<H, T>,
    ) {
        while let Some(index) = self.oldest_waiting(listener) {
            let live = self.slots[index]
                .socket
                .as_ref()
                .and_then(Socket::conn)
                .is_some_and(Connection::is_live);
            if live {
                self.owe(index, Owed::RST);
            }
            self.free(index);
            self.dispatch(index, device);
        }
    }

    /// Records that the connection in slot `index` owes `what` (see [`Owed`]); it goes out
    /// at the next [`Sockets::dispatch`] of the slot. An RST replaces everything else owed.
    fn owe(&mut self, index: usize, what: Owed) {
        let Some(conn) = self.conn_at(index) else {
            return;
        };
        if what.contains(Owed::RST) {
            conn.owed = Owed::RST;
        } else if !conn.owed.contains(Owed::RST) {
            conn.owed |= what;
        }
        // Sent by whoever comes first: the caller, the reply step after a received
        // packet, or the walk of the next poll.
        self.touched = Some(index);
        self.send_waiting = true;
    }

    /// Keeps an RST answering a packet for no connection until the device takes it.
    fn push_stray_rst(&mut self, header: Header) {
        if self.stray_rsts.push_back(header).is_err() {
            // Unreachable: no packet is taken while the queue is full (B7).
            log::warn!(
                "vsock: RST queue full; dropping the RST to {}:{}",
                header.dst_cid,
                header.dst_port
            );
        }
    }

    /// Moves waiting RSTs for no connection into tx buffers while there is room.
    fn send_stray_rsts<H: Hal, T: Transport>(&mut self, device: &mut VirtioVsock<H, T>) {
        while let Some(header) = self.stray_rsts.front() {
            if device.send(header, &[]).is_err() {
                break;
            }
            self.stray_rsts.pop_front();
        }
    }

    /// An RST answering `header`, addresses swapped (B13), from our current CID.
    fn rst_for(&self, header: &Header) -> Header {
        Header {
            src_cid: u64::from(self.guest_cid),
            ..header.rst_reply()
        }
    }

    /// Dispatches one received packet (B10–B18).
    /// Handles one received packet; data of `direct`'s connection goes to `direct` first.
    fn on_packet(&mut self, header: &Header, payload: &[u8], direct: Option<&mut DirectRead<'_>>) {
        if header.dst_cid != u64::from(self.guest_cid) {
            log::warn!("vsock: dropping packet for CID {}", header.dst_cid);
            return;
        }
        let Some(op) = header.op() else {
            log::warn!("vsock: dropping packet with unknown op {}", header.op);
            return;
        };
        if header.socket_type() != Some(SocketType::Stream) {
            // B11 (and B14: never answer an RST).
            if op != Op::Rst {
                let rst = self.rst_for(header);
                self.push_stray_rst(rst);
            }
            return;
        }
        let found = self.find_connection(header);
        if op.is_control() && header.len != 0 {
            // B10: control packets carry no payload.
            log::warn!("vsock: control op {op:?} with payload; resetting");
            match found {
                Some(index) => {
                    // B9: the connection's RST carries its credit; owed before the reset,
                    // which may free the slot.
                    if op != Op::Rst {
                        self.owe(index, Owed::RST);
                    }
                    self.reset_connection(index, Error::ConnectionReset);
                }
                None if op != Op::Rst => {
                    let rst = self.rst_for(header);
                    self.push_stray_rst(rst);
                }
                None => {}
            }
            return;
        }
        match found {
            Some(index) => {
                self.on_connection_packet(index, header, op, payload, direct);
                // The timer walk has work only for a connection with a timer armed: a
                // probe the credit that came may end, a timeout the packet may have
                // made moot. A packet that ended a timer and left none only makes the
                // walk's `next_timer` early, which costs one walk.
                if self
                    .conn_at(index)
                    .is_some_and(|conn| conn.next_timer().is_some())
                {
                    self.timers_changed = true;
                }
            }
            None if op == Op::Request => self.on_request(header),
            // B14: an RST for no connection is dropped silently.
            None if op == Op::Rst => {}
            None => {
                // B13.
                let rst = self.rst_for(header);
                self.push_stray_rst(rst);
            }
        }
    }

    /// A packet the device cut short (B44): its bytes are gone, so the connection it
    /// belongs to is reset rather than left waiting for them, and so is its peer.
    fn on_truncated(&mut self, header: &Header, written: u32) {
        let found = if header.dst_cid == u64::from(self.guest_cid) {
            self.find_connection(header)
        } else {
            None
        };
        let Some(index) = found else {
            log::warn!(
                "vsock: dropping a truncated rx packet ({written} bytes claimed, op {} from {}:{} to port {}): no connection",
                header.op,
                header.src_cid,
                header.src_port,
                header.dst_port
            );
            return;
        };
        log::warn!(
            "vsock: {}:{} -> port {}: the device truncated a packet ({written} bytes claimed, payload {}); resetting",
            header.src_cid,
            header.src_port,
            header.dst_port,
            header.len
        );
        self.owe(index, Owed::RST);
        self.reset_connection(index, Error::ConnectionReset);
    }

    /// The slot of the live connection `header` belongs to, by its full tuple (B12).
    fn find_connection(&mut self, header: &Header) -> Option<usize> {
        let matches = |slot: &SocketSlot| {
            slot.socket
                .as_ref()
                .is_some_and(|s| s.matches(header.src_cid, header.src_port, header.dst_port))
        };
        if self.slots.get(self.last_match).is_some_and(matches) {
            return Some(self.last_match);
        }
        let found = self.slots[self.slots_in_use()].iter().position(matches)?;
        self.last_match = found;
        Some(found)
    }

    fn reset_connection(&mut self, index: usize, error: Error) {
        if let Some(socket) = self.slots.get_mut(index).and_then(|s| s.socket.as_mut()) {
            if let Some(conn) = socket.conn_mut() {
                conn.fail(Some(error));
            }
            self.after_state_change(index);
        }
    }

    fn on_connection_packet(
        &mut self,
        index: usize,
        header: &Header,
        op: Op,
        payload: &[u8],
        direct: Option<&mut DirectRead<'_>>,
    ) {
        let Some(socket) = self
            .slots
            .get_mut(index)
            .and_then(|slot| slot.socket.as_mut())
        else {
            return;
        };
        let ring_empty = socket.rx_len == 0;
        let Some(conn) = socket.conn_mut() else {
            return;
        };
        let outcome = conn.on_packet(header, op);
        if outcome.deliver {
            let mut rest = payload;
            // Straight to the reader only while nothing older waits in the ring.
            if let Some(direct) = direct.filter(|d| d.index == index && ring_empty) {
                rest = direct.take(payload);
                // B27: those bytes are consumed now.
                conn.credit.on_consumed((payload.len() - rest.len()) as u32);
            }
            let ring_start = index * self.rx_per_socket;
            let per = self.rx_per_socket;
            let head = socket.rx_head;
            let mut len = socket.rx_len;
            // Credit was checked: rx_len + payload <= buf_alloc = ring size (B30).
            let ring = &mut self.rx_memory[ring_start..ring_start + per];
            ring_push(ring, head, &mut len, rest);
            socket.rx_len = len;
            self.rx_buffered_bytes += rest.len() as u64;
        }
        match outcome.reply {
            Reply::Nothing => {}
            // B9: an RST of a connection carries its buf_alloc and fwd_cnt.
            Reply::Rst => self.owe(index, Owed::RST),
            Reply::CreditUpdate => self.owe(index, Owed::CREDIT_UPDATE),
        }
        self.after_state_change(index);
    }

    /// Frees closed sockets nobody holds a handle to, and drops reset connections from
    /// accept queues (B22). A waiting connection the peer closed in order (B34) stays in
    /// the queue: its data remains readable until the socket is closed.
    fn after_state_change(&mut self, index: usize) {
        let Some(socket) = self.slots.get(index).and_then(|s| s.socket.as_ref()) else {
            return;
        };
        if let Role::Stream { conn, listener, .. } = &socket.role {
            let reset_while_waiting = listener.is_some() && conn.reset;
            if !conn.is_live() && (socket.orphaned || reset_while_waiting) {
                self.free(index);
            }
        }
    }

    /// A REQUEST for no existing connection (B15, B16).
    fn on_request(&mut self, header: &Header) {
        let listener = self.slots[self.slots_in_use()].iter().position(|slot| {
            slot.socket.as_ref().is_some_and(|s| {
                !s.orphaned
                    && s.local_port == Some(header.dst_port)
                    && matches!(s.role, Role::Listening { .. })
            })
        });
        let Some(listener) = listener else {
            let rst = self.rst_for(header);
            self.push_stray_rst(rst);
            return;
        };
        let Some(Role::Listening { backlog, waiting }) =
            self.slots[listener].socket.as_ref().map(|s| s.role)
        else {
            return;
        };
        let free = self.free_slot();
        let (Some(index), true) = (free, waiting < backlog) else {
            log::debug!("vsock: backlog full on port {}", header.dst_port);
            let rst = self.rst_for(header);
            self.push_stray_rst(rst);
            return;
        };
        let Ok(peer_cid) = u32::try_from(header.src_cid) else {
            let rst = self.rst_for(header);
            self.push_stray_rst(rst);
            return;
        };
        let mut conn = self.new_connection(
            header.dst_port,
            VsockAddr::new(peer_cid, header.src_port),
            State::Connected,
        );
        conn.credit.update_peer(header.buf_alloc, header.fwd_cnt);
        let accept_order = self.next_accept_order;
        self.next_accept_order += 1;
        if let Some(Role::Listening { waiting, .. }) =
            self.slots[listener].socket.as_mut().map(|s| &mut s.role)
        {
            *waiting += 1;
        }
        self.occupy(
            index,
            Socket {
                local_port: Some(header.dst_port),
                role: Role::Stream {
                    conn,
                    listener: Some(listener as u16),
                    accept_order,
                },
                orphaned: false,
                rx_head: 0,
                rx_len: 0,
            },
        );
        self.owe(index, Owed::RESPONSE);
    }

    /// Fires connect and close timeouts (B19, B36).
    fn fire_timers(&mut self, now: Instant) {
        // Nothing to do until a timer is due, unless a connection changed since the last
        // walk or data waits (whose credit the walk watches): the idle turns of a
        // waiting loop skip the walk.
        if !self.timers_changed && !self.send_waiting && self.next_timer.is_none_or(|due| now < due)
        {
            return;
        }
        self.timers_changed = false;
        let mut next_timer: Option<Instant> = None;
        for index in self.slots_in_use() {
            let slot = &mut self.slots[index];
            // Most slots hold no connection: they are passed over before their send queue
            // is read.
            let Some(conn) = slot.socket.as_mut().and_then(Socket::conn_mut) else {
                continue;
            };
            // Credit the oldest waiting data needs (B29).
            let waiting = !slot.send_queue.is_empty();
            let needed = slot.send_queue.front_len().max(1) as u32;
            // The connection's timer still armed after this walk's work on it.
            let timer = match conn.state {
                State::Connecting { deadline } if now >= deadline => {
                    conn.fail(Some(Error::TimedOut));
                    // Tell the peer to forget a late REQUEST.
                    self.owe(index, Owed::RST);
                    None
                }
                State::Closing { deadline } if now >= deadline => {
                    self.owe(index, Owed::RST);
                    self.free(index);
                    None
                }
                State::Connected | State::Closing { .. } => {
                    let peer_stopped_reading = conn.peer_shutdown.contains(ShutdownFlags::RECEIVE);
                    // Data that waits for credit keeps a probe armed, whether or not the
                    // application calls `send` again.
                    if waiting
                        && conn.credit.peer_free() < needed
                        && conn.credit_probe.is_none()
                        && !peer_stopped_reading
                    {
                        conn.credit_probe = Some(CreditProbe::first(now));
                    }
                    let mut owed = Owed::empty();
                    if let Some(probe) = conn.credit_probe {
                        if conn.credit.peer_free() >= needed || peer_stopped_reading {
                            conn.credit_probe = None;
                        } else if now >= probe.due {
                            conn.credit_probe = Some(probe.next(now));
                            owed = Owed::CREDIT_UPDATE;
                            if conn.credit.take_repeat_credit_request(needed) {
                                owed |= Owed::CREDIT_REQUEST;
                            }
                        }
                    }
                    let timer = conn.next_timer();
                    if !owed.is_empty() {
                        self.owe(index, owed);
                    }
                    timer
                }
                State::Connecting { .. } | State::Closed => conn.next_timer(),
            };
            self.after_state_change(index);
            if let Some(due) = timer {
                next_timer = Some(next_timer.map_or(due, |earliest| earliest.min(due)));
            }
        }
        self.next_timer = next_timer;
        self.shrink_in_use();
    }

    /// B40: every connection fails with `ConnectionReset` (no packets: what they owed is
    /// forgotten); listeners stay.
    fn on_transport_reset(&mut self, guest_cid: u32) {
        self.guest_cid = guest_cid;
        self.stray_rsts.clear();
        self.touched = None;
        for index in 0..self.slots.len() {
            if let Some(conn) = self.slots[index].socket.as_mut().and_then(Socket::conn_mut) {
                conn.owed = Owed::empty();
                if conn.is_live() {
                    conn.fail(Some(Error::ConnectionReset));
                }
            }
            self.after_state_change(index);
        }
    }
}
