//! A lean device for the host benchmark: a `Hal` whose physical addresses are host
//! addresses, a `Transport` with registers in shared memory, and a device thread that
//! services the split rings of either driver at full speed and plays the host's side of
//! each workload.
//!
//! It is not the `testing` device model: that one is stepped by the test, single-threaded,
//! and goes through an address table so Miri accepts it. `virtio-drivers`' socket driver
//! waits inside `send` for the device to consume its buffer, so the benchmark needs a
//! device that runs on its own thread; identity-mapped addresses keep it lean.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use vsock_guest::wire::{Header, Op, SocketType, HEADER_LEN};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The guest's CID.
pub const GUEST_CID: u64 = 3;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The host port the guest connects to.
pub const HOST_PORT: u32 = 5000;
/// The host's receive buffer; it consumes at once.
const HOST_BUF_ALLOC: u32 = 4 << 20;
/// Features the device offers: VERSION_1, RING_EVENT_IDX and STREAM (no indirect
/// descriptors, so both drivers use the same ring layout).
const DEVICE_FEATURES: u64 = (1 << 32) | (1 << 29) | 1;

/// DMA memory from the host allocator; physical address = host address.
pub struct BenchHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned memory that nothing else references
// until `dma_dealloc` frees it with the same layout; `share` hands out the buffer's own
// address, which the device thread only uses while the driver keeps the buffer shared.
unsafe impl Hal for BenchHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let Ok(layout) = Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE) else {
            return (0, NonNull::dangling());
        };
        // SAFETY: the layout has a non-zero size.
        match NonNull::new(unsafe { alloc_zeroed(layout) }) {
            Some(ptr) => (ptr.as_ptr().expose_provenance() as PhysAddr, ptr),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let Ok(layout) = Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE) else {
            return -1;
        };
        // SAFETY: `vaddr` came from `dma_alloc` with this layout (the caller's contract).
        unsafe { dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(std::ptr::with_exposed_provenance_mut(paddr as usize))
            .unwrap_or(NonNull::dangling())
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.cast::<u8>().as_ptr().expose_provenance() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// One queue as the driver registered it.
#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    size: u32,
    desc: PhysAddr,
    driver: PhysAddr,
    device: PhysAddr,
}

/// Registers shared by the transport (driver side) and the device thread.
pub struct Registers {
    status: AtomicU32,
    driver_features: AtomicU64,
    queues: Mutex<[Option<QueueRegs>; 3]>,
    /// Notifications per queue (rx, tx, event).
    pub kicks: [AtomicU64; 3],
}

/// The driver's view of the device.
#[derive(Clone)]
pub struct BenchTransport {
    registers: Arc<Registers>,
}

impl Transport for BenchTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Socket
    }

    fn read_device_features(&mut self) -> u64 {
        DEVICE_FEATURES
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.registers
            .driver_features
            .store(driver_features, Ordering::SeqCst);
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        256
    }

    fn notify(&mut self, queue: u16) {
        if let Some(kicks) = self.registers.kicks.get(usize::from(queue)) {
            kicks.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_truncate(self.registers.status.load(Ordering::SeqCst))
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.registers.status.store(status.bits(), Ordering::SeqCst);
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        if let Ok(mut queues) = self.registers.queues.lock() {
            if let Some(slot) = queues.get_mut(usize::from(queue)) {
                *slot = Some(QueueRegs {
                    size,
                    desc: descriptors,
                    driver: driver_area,
                    device: device_area,
                });
            }
        }
    }

    fn queue_unset(&mut self, queue: u16) {
        if let Ok(mut queues) = self.registers.queues.lock() {
            if let Some(slot) = queues.get_mut(usize::from(queue)) {
                *slot = None;
            }
        }
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.registers
            .queues
            .lock()
            .is_ok_and(|queues| queues.get(usize::from(queue)).is_some_and(Option::is_some))
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        0
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> Result<T, virtio_drivers::Error> {
        let config = GUEST_CID.to_le_bytes();
        let bytes = config
            .get(offset..)
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        T::read_from_prefix(bytes)
            .map(|(value, _)| value)
            .map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> Result<(), virtio_drivers::Error> {
        Err(virtio_drivers::Error::Unsupported)
    }
}

/// The device side of one split ring, over identity-mapped memory.
struct Ring {
    size: u16,
    desc: usize,
    avail: usize,
    used: usize,
    last_avail: u16,
    used_idx: u16,
}

impl Ring {
    fn new(regs: QueueRegs) -> Self {
        Ring {
            size: regs.size as u16,
            desc: regs.desc as usize,
            avail: regs.driver as usize,
            used: regs.device as usize,
            last_avail: 0,
            used_idx: 0,
        }
    }

    fn ptr<T>(addr: usize) -> *mut T {
        std::ptr::with_exposed_provenance_mut(addr)
    }

    fn avail_idx(&self) -> u16 {
        // SAFETY: the avail ring's idx field lies in the driver's live DMA allocation and is
        // only written by the driver, atomically enough for a u16 on this host.
        unsafe { AtomicU16::from_ptr(Self::ptr(self.avail + 2)).load(Ordering::Acquire) }
    }

    /// The head of the next available chain, if any.
    fn pop_avail(&mut self) -> Option<u16> {
        if self.avail_idx() == self.last_avail {
            return None;
        }
        let slot = usize::from(self.last_avail % self.size);
        // SAFETY: the slot is inside the avail ring (slot < size).
        let head = unsafe { Self::ptr::<u16>(self.avail + 4 + 2 * slot).read_volatile() };
        self.last_avail = self.last_avail.wrapping_add(1);
        // Ask for a kick once the driver publishes past what we have taken (EVENT_IDX).
        // SAFETY: avail_event follows the used ring's `size` entries.
        unsafe {
            Self::ptr::<u16>(self.used + 4 + 8 * usize::from(self.size))
                .write_volatile(self.last_avail)
        };
        Some(head)
    }

    /// Descriptor `index`: (address, length, flags, next).
    fn descriptor(&self, index: u16) -> (usize, usize, u16, u16) {
        let base = self.desc + 16 * usize::from(index % self.size);
        // SAFETY: the descriptor lies in the descriptor table (index reduced mod size).
        unsafe {
            (
                Self::ptr::<u64>(base).read_volatile() as usize,
                Self::ptr::<u32>(base + 8).read_volatile() as usize,
                Self::ptr::<u16>(base + 12).read_volatile(),
                Self::ptr::<u16>(base + 14).read_volatile(),
            )
        }
    }

    /// The chain starting at `head`, as (address, length, device-writable) segments.
    fn chain(&self, head: u16, out: &mut Vec<(usize, usize, bool)>) {
        out.clear();
        let mut index = head;
        for _ in 0..self.size {
            let (addr, len, flags, next) = self.descriptor(index);
            out.push((addr, len, flags & 2 != 0));
            if flags & 1 == 0 {
                break;
            }
            index = next;
        }
    }

    fn push_used(&mut self, head: u16, len: u32) {
        let slot = usize::from(self.used_idx % self.size);
        let elem = self.used + 4 + 8 * slot;
        // SAFETY: the element lies in the used ring (slot < size); idx is published after it
        // with release ordering.
        unsafe {
            Self::ptr::<u32>(elem).write_volatile(u32::from(head));
            Self::ptr::<u32>(elem + 4).write_volatile(len);
            self.used_idx = self.used_idx.wrapping_add(1);
            AtomicU16::from_ptr(Self::ptr(self.used + 2)).store(self.used_idx, Ordering::Release);
        }
    }
}

/// What the host does on each connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRole {
    /// Consume whatever the guest sends.
    Sink,
    /// Send this many bytes to the guest once connected, with payloads of at most `chunk`.
    Source { total: u64, chunk: usize },
    /// Send every received byte back.
    Echo,
}

/// Counters the device thread publishes.
#[derive(Default)]
pub struct HostCounters {
    /// Payload bytes received from the guest.
    pub received: AtomicU64,
    /// Payload bytes delivered to the guest.
    pub delivered: AtomicU64,
    /// RW packets received from the guest.
    pub packets_from_guest: AtomicU64,
    /// Packets put into the guest's receive queue.
    pub packets_to_guest: AtomicU64,
    /// Connections the host accepted.
    pub accepted: AtomicU64,
    /// RSTs the guest sent or the host sent after a guest shutdown.
    pub closed: AtomicU64,
    /// Device loop iterations, for diagnosing a stuck run.
    pub loops: AtomicU64,
    /// The TX avail index the device last saw.
    pub tx_avail_seen: AtomicU64,
    /// Guest packets popped from the TX ring.
    pub tx_popped: AtomicU64,
    /// Where the device thread is: 1 waiting for DRIVER_OK, 2 set up, 3 running.
    pub phase: AtomicU64,
}

/// One connection as the host sees it.
struct HostConn {
    guest_port: u32,
    guest_buf_alloc: u32,
    guest_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes received (and consumed) from the guest.
    rx_cnt: u32,
    /// The `fwd_cnt` last told to the guest.
    fwd_cnt_sent: u32,
    /// Bytes still to send to the guest.
    to_send: u64,
}

impl HostConn {
    fn guest_free(&self) -> u32 {
        self.guest_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.guest_fwd_cnt))
    }
}

/// The device thread's state.
struct Host {
    role: HostRole,
    conns: Vec<HostConn>,
    control: VecDeque<Header>,
    counters: Arc<HostCounters>,
    scratch: Vec<u8>,
    segments: Vec<(usize, usize, bool)>,
    /// A payload template for data packets.
    pattern: Vec<u8>,
}

impl Host {
    fn header(&self, conn: &HostConn, op: Op, len: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            src_port: HOST_PORT,
            dst_port: conn.guest_port,
            len,
            socket_type: SocketType::Stream as u16,
            op: op as u16,
            flags: 0,
            buf_alloc: HOST_BUF_ALLOC,
            fwd_cnt: conn.rx_cnt,
        }
    }

    fn conn_index(&self, guest_port: u32) -> Option<usize> {
        self.conns.iter().position(|c| c.guest_port == guest_port)
    }

    /// Handles one packet from the guest.
    fn on_packet(&mut self, header: &Header, payload: &[u8]) {
        let Some(op) = header.op() else {
            return;
        };
        let index = self.conn_index(header.src_port);
        if op == Op::Request {
            if index.is_none() {
                let conn = HostConn {
                    guest_port: header.src_port,
                    guest_buf_alloc: header.buf_alloc,
                    guest_fwd_cnt: header.fwd_cnt,
                    tx_cnt: 0,
                    rx_cnt: 0,
                    fwd_cnt_sent: 0,
                    to_send: match self.role {
                        HostRole::Source { total, .. } => total,
                        _ => 0,
                    },
                };
                let response = self.header(&conn, Op::Response, 0);
                self.control.push_back(response);
                self.conns.push(conn);
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        let Some(index) = index else {
            return;
        };
        let conn = &mut self.conns[index];
        conn.guest_buf_alloc = header.buf_alloc;
        conn.guest_fwd_cnt = header.fwd_cnt;
        match op {
            Op::Rw => {
                conn.rx_cnt = conn.rx_cnt.wrapping_add(payload.len() as u32);
                self.counters
                    .received
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
                self.counters
                    .packets_from_guest
                    .fetch_add(1, Ordering::Relaxed);
                if self.role == HostRole::Echo {
                    conn.to_send += payload.len() as u64;
                }
                // Like vhost: a credit update once a quarter of the buffer was consumed.
                if conn.rx_cnt.wrapping_sub(conn.fwd_cnt_sent) >= HOST_BUF_ALLOC / 4 {
                    conn.fwd_cnt_sent = conn.rx_cnt;
                    let update = self.header(&self.conns[index], Op::CreditUpdate, 0);
                    self.control.push_back(update);
                }
            }
            Op::CreditRequest => {
                conn.fwd_cnt_sent = conn.rx_cnt;
                let update = self.header(&self.conns[index], Op::CreditUpdate, 0);
                self.control.push_back(update);
            }
            Op::Shutdown => {
                let rst = self.header(&self.conns[index], Op::Rst, 0);
                self.control.push_back(rst);
                self.conns.swap_remove(index);
                self.counters.closed.fetch_add(1, Ordering::Relaxed);
            }
            Op::Rst => {
                self.conns.swap_remove(index);
                self.counters.closed.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// The next packet for the guest that fits `capacity` bytes, header included.
    fn next_for_guest(&mut self, capacity: usize) -> Option<(Header, usize)> {
        if let Some(header) = self.control.pop_front() {
            return Some((header, 0));
        }
        let limit = match self.role {
            HostRole::Source { chunk, .. } => chunk,
            _ => usize::MAX,
        };
        let room = capacity.checked_sub(HEADER_LEN)?.min(limit);
        let position = self
            .conns
            .iter()
            .position(|c| c.to_send > 0 && c.guest_free() > 0)?;
        let conn = &mut self.conns[position];
        let len = (conn.to_send.min(u64::from(conn.guest_free())) as usize).min(room);
        if len == 0 {
            return None;
        }
        conn.to_send -= len as u64;
        conn.tx_cnt = conn.tx_cnt.wrapping_add(len as u32);
        conn.fwd_cnt_sent = conn.rx_cnt;
        let header = self.header(&self.conns[position], Op::Rw, len as u32);
        Some((header, len))
    }
}

/// A running device: the transport to hand the driver and the device thread.
pub struct BenchDevice {
    /// Registers, for kick counts.
    pub registers: Arc<Registers>,
    /// What the host has seen.
    pub counters: Arc<HostCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl BenchDevice {
    /// Starts a device whose host plays `role`; returns it and the driver's transport.
    pub fn start(role: HostRole) -> (Self, BenchTransport) {
        let registers = Arc::new(Registers {
            status: AtomicU32::new(0),
            driver_features: AtomicU64::new(0),
            queues: Mutex::new([None; 3]),
            kicks: Default::default(),
        });
        let counters = Arc::new(HostCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let registers = Arc::clone(&registers);
            let counters = Arc::clone(&counters);
            let stop = Arc::clone(&stop);
            // Everything the device thread needs is allocated here: it never allocates
            // while it runs.
            let host = Host {
                role,
                conns: Vec::with_capacity(256),
                control: VecDeque::with_capacity(4096),
                counters: Arc::clone(&counters),
                scratch: Vec::with_capacity(128 * 1024),
                segments: Vec::with_capacity(256),
                pattern: (0..70 * 1024).map(|i| i as u8).collect(),
            };
            std::thread::spawn(move || run_device(&registers, counters, &stop, host))
        };
        let transport = BenchTransport {
            registers: Arc::clone(&registers),
        };
        (
            BenchDevice {
                registers,
                counters,
                stop,
                thread: Some(thread),
            },
            transport,
        )
    }

    /// What the device thread has done, for diagnosing a stuck run.
    pub fn debug_state(&self) -> String {
        format!(
            "phase {}, status {:#x}, loops {}, tx avail seen {}, tx popped {}, queues {:?}, thread running {}",
            self.counters.phase.load(Ordering::Relaxed),
            self.registers.status.load(Ordering::SeqCst),
            self.counters.loops.load(Ordering::Relaxed),
            self.counters.tx_avail_seen.load(Ordering::Relaxed),
            self.counters.tx_popped.load(Ordering::Relaxed),
            self.registers.queues.lock().map(|q| *q).ok(),
            self.thread.as_ref().is_some_and(|t| !t.is_finished())
        )
    }

    /// Total notifications the driver sent.
    pub fn kicks(&self) -> u64 {
        self.registers
            .kicks
            .iter()
            .map(|k| k.load(Ordering::Relaxed))
            .sum()
    }
}

impl BenchDevice {
    /// Stops the device thread. Call it before the driver frees its queues.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for BenchDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_device(
    registers: &Registers,
    counters: Arc<HostCounters>,
    stop: &AtomicBool,
    mut host: Host,
) {
    const DRIVER_OK: u32 = 4;
    counters.phase.store(1, Ordering::Relaxed);
    // Wait for the driver to finish bring-up.
    let queues = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        if registers.status.load(Ordering::SeqCst) & DRIVER_OK != 0 {
            if let Ok(queues) = registers.queues.lock() {
                if let [Some(rx), Some(tx), Some(_event)] = *queues {
                    break (rx, tx);
                }
            }
        }
        std::thread::yield_now();
    };
    counters.phase.store(2, Ordering::Relaxed);
    let mut rx = Ring::new(queues.0);
    let mut tx = Ring::new(queues.1);
    host.counters = counters;
    let mut rx_pending: Option<u16> = None;
    host.counters.phase.store(3, Ordering::Relaxed);
    while !stop.load(Ordering::Relaxed) {
        host.counters.loops.fetch_add(1, Ordering::Relaxed);
        host.counters
            .tx_avail_seen
            .store(u64::from(tx.avail_idx()), Ordering::Relaxed);
        let mut busy = false;
        // Guest → host.
        while let Some(head) = tx.pop_avail() {
            busy = true;
            host.counters.tx_popped.fetch_add(1, Ordering::Relaxed);
            tx.chain(head, &mut host.segments);
            host.scratch.clear();
            for &(addr, len, _) in &host.segments {
                // SAFETY: the driver published this readable buffer; it stays valid and
                // unchanged until we return it through the used ring below.
                let bytes = unsafe { std::slice::from_raw_parts(Ring::ptr::<u8>(addr), len) };
                host.scratch.extend_from_slice(bytes);
            }
            let scratch = std::mem::take(&mut host.scratch);
            if let Ok((header, payload)) = Header::parse_packet(&scratch, scratch.len()) {
                host.on_packet(&header, payload);
            }
            host.scratch = scratch;
            tx.push_used(head, 0);
        }
        // Host → guest.
        loop {
            let head = match rx_pending.take() {
                Some(head) => head,
                None => match rx.pop_avail() {
                    Some(head) => head,
                    None => break,
                },
            };
            rx.chain(head, &mut host.segments);
            let Some(&(addr, capacity, true)) = host.segments.first() else {
                rx.push_used(head, 0);
                continue;
            };
            let Some((header, len)) = host.next_for_guest(capacity) else {
                rx_pending = Some(head);
                break;
            };
            busy = true;
            // SAFETY: the driver published this writable buffer of `capacity` bytes and does
            // not touch it until we return it through the used ring.
            let buffer = unsafe { std::slice::from_raw_parts_mut(Ring::ptr::<u8>(addr), capacity) };
            if header.emit(buffer).is_ok() {
                let start = host.counters.delivered.load(Ordering::Relaxed) as usize % 256;
                buffer[HEADER_LEN..HEADER_LEN + len]
                    .copy_from_slice(&host.pattern[start..start + len]);
            }
            fence(Ordering::Release);
            rx.push_used(head, (HEADER_LEN + len) as u32);
            host.counters
                .delivered
                .fetch_add(len as u64, Ordering::Relaxed);
            host.counters
                .packets_to_guest
                .fetch_add(1, Ordering::Relaxed);
        }
        if !busy {
            std::hint::spin_loop();
        }
    }
}
