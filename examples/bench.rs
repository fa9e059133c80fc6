//! Benchmark guest: serves the workloads of `cargo xtask bench qemu` with one of three
//! drivers, picked on the kernel command line, so that one ELF and one copy of the
//! workload code serve every driver:
//!
//! | `driver=`     | what |
//! | ------------- | ---- |
//! | `ours`        | vsock-guest's `VsockDevice` with `Config::default()` and 256 KiB of receive memory per socket |
//! | `ours-throughput` | the same; the host adds `preset=throughput`, so it runs `Config::throughput()` |
//! | `theirs`      | virtio-drivers' `VsockConnectionManager` at its defaults: `VsockConnectionManager::new(VirtIOSocket::new(..))` (512-byte RX buffers, 8-entry queues, 1 KiB per connection) |
//! | `theirs-best` | the same at its best settings: 64 KiB + 44-byte RX buffers, `new_with_capacity(.., 256 KiB)` |
//!
//! `queue=`, `rx=`, `tx=`, `tx_memory=` and `send_buffer=` on the command line change our
//! driver's `Config` (`queue_size`, `rx_buffer_size`, `tx_packet_size`, `tx_memory`,
//! `send_buffer`) for
//! experiments (`cargo xtask bench qemu --guest-args "rx=16384"`); the guest says which
//! settings it runs with. `wait=irq|poll` says how our driver waits for the peer: halted
//! until the device interrupts or a deadline (`irq`, the default; `boot::wait`) or
//! spinning on `poll`; virtio-drivers' driver always spins.
//!
//! The host measures every time; the guest only serves. It listens on port 5000 (`port=`
//! changes it) and prints `bench: ready` once it does. Each host connection starts with a
//! one-line command; a trailing `seq=<n>` word is ignored by the guest and echoed in its
//! log, so the host can match results to requests:
//!
//! - `send <total> <write> [in-place]`: the guest sends `total` bytes of the pattern below
//!   in writes of `write` bytes (at most 64 KiB), then waits for the host to close. Each
//!   write fills a buffer with the pattern and sends it; with `in-place`, our driver
//!   instead writes the pattern straight into its transmit memory with `send_with` (its
//!   zero-copy call), while virtio-drivers, which has no such call, does what it always
//!   does (its `send` hands the filled buffer itself to the device).
//! - `recv <total> <chunk> [in-place]`: the host sends `total` bytes of the pattern; the
//!   guest reads them `chunk` bytes at a time, checks every byte and answers
//!   `ok <bytes> <bad>\n`, then waits for the host to close. With `in-place`, our driver
//!   checks the bytes where they arrived (`recv_with`) instead of copying them out first;
//!   virtio-drivers, which has no such call, reads into a buffer as always.
//! - `pingpong`: the guest sends back every byte it reads, until the host closes.
//! - `cycles <n>`: the guest answers `go\n`; the next `n` connections that close without
//!   a command are connect/close cycles, summed up in one log line after the last.
//! - `exit`: the guest answers `bye\n`, waits for the host to close and exits QEMU with
//!   status 33.
//!
//! After each command the guest logs one line, `bench: result "<command>" ok=1
//! guest_us=<t> bytes=<n> driver_us=<d> app_us=<p> busy_us=<u> kick_us=<k> kicks_rx=<a> kicks_tx=<b> kicks_event=<c> ...`:
//! the time spent inside the driver's calls (timed with the architecture's counter
//! around each call, both drivers alike; the application's work and the waits for the
//! peer that a zero-copy call runs inside it do not count), the application's own work
//! on the data (`app_us`: filling buffers with the pattern and checking what arrived,
//! wherever that runs), the guest's busy time (the stretches of its
//! loop, between two waits for the peer, in which a call accepted a connection or took
//! or gave bytes; the rest of the time it waited for the device or the peer, which
//! no work of the guest's would shorten), the time spent in the notifications
//! themselves (the register write that traps to the VMM; part of the driver's time), the
//! notifications
//! (kicks) the driver sent on each virtqueue from accepting the connection to the end of
//! the workload, counted in a wrapper around the transport (so both drivers are counted
//! the same way), ours the CREDIT_UPDATEs it received and CREDIT_REQUESTs it sent in that
//! time (`credit_updates_rx=<u> credit_requests_tx=<r>`), ours the received bytes that
//! went through a socket's receive buffer instead of straight to `recv`
//! (`rx_buffered_bytes=<b>`: copied twice), ours how it waited in that
//! time (`interrupts=<i> halts=<h> timer_wakes=<w> backstop_finds=<f> halted_us=<t>`:
//! device interrupts taken, halts, halts the timer ended, polls after a backstop's halt
//! that found work, time spent halted; all 0 with `wait=poll`), the quantiles of the
//! guest's own work per busy stretch (`work_stretches=<n> work_p50_ns=.. work_p90_ns=..
//! work_p99_ns=.. work_p999_ns=.. work_max_ns=..`: from the start of the last poll
//! before the stretch's wait to the next wait, less the notifications; in a ping-pong one
//! stretch per round trip), and the driver's own
//! counters (ours: `VsockDevice::stats()`, cumulative; theirs: the packets its `poll`
//! rejected). A failed
//! workload logs `ok=0 error=<why>`.
//!
//! Before the driver starts, the guest times plain memory work (the pattern fill and a
//! memcpy of 4 MiB) and logs `bench: reference fill_us=.. copy_us=.. bytes=..`, which the
//! host prints beside the results.
//!
//! virtio-drivers' driver does not send credit updates by itself, so after every `recv`
//! that returned bytes this guest calls `update_credit`, as a real user must; it also
//! skips packets its `poll` rejects as malformed (vhost-device-vsock 0.3.0 sometimes hands
//! the guest a zeroed header), as our driver does, and counts them.
//!
//! The data pattern: byte `i` of a stream is byte `i % 8` (little-endian) of
//! `pattern_word(i / 8)`, so a lost, repeated or reordered chunk shows;
//! `xtask/src/bench.rs` has the same function.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod boot;

#[cfg(target_os = "none")]
boot::entry!(main);

#[cfg(target_os = "none")]
mod bench {
    use crate::boot;
    use core::fmt::{self, Write as _};
    use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use log::{error, info, warn};
    use spin::Mutex;
    use virtio_drivers::device::socket::{
        SocketError, VirtIOSocket, VsockAddr as TheirAddr, VsockConnectionManager, VsockEventType,
    };
    use virtio_drivers::transport::{
        DeviceStatus, DeviceType, InterruptStatus, SomeTransport, Transport,
    };
    use virtio_drivers::PhysAddr;
    use vsock_guest::{Config, SocketHandle, SocketSlot, VsockAddr, VsockDevice, VMADDR_CID_ANY};
    use zerocopy::{FromBytes, Immutable, IntoBytes};

    /// The control port unless `port=` says otherwise.
    const DEFAULT_PORT: u32 = 5000;
    /// Socket slots for our driver: the listener, one session, and connections that are
    /// still finishing their close.
    const SOCKETS: usize = 16;
    /// Receive memory per socket for our driver (what each connection advertises).
    const RX_PER_SOCKET: usize = 256 * 1024;
    /// Listen backlog for our driver.
    const BACKLOG: usize = 8;
    /// Heap for virtio-drivers' driver: its RX buffers (8 x 64 KiB at most) and one ring
    /// buffer per connection (256 KiB at most).
    const HEAP_SIZE: usize = 8 << 20;
    /// virtio-drivers' largest useful RX buffer: a 64 KiB payload and the header.
    const THEIR_BEST_RX: usize = 64 * 1024 + 44;
    /// virtio-drivers' per-connection buffer at its best settings.
    const THEIR_BEST_CAPACITY: u32 = 256 * 1024;
    /// Largest write or read the workloads use.
    const MAX_IO: usize = 64 * 1024;
    /// Longest command line.
    const MAX_LINE: usize = 128;
    /// Connections virtio-drivers' manager accepted that the guest has not taken yet, and
    /// peers whose disconnection the guest remembers. Its manager accepts and closes
    /// connections inside `poll`, so a burst of connect/close cycles can be over before
    /// the guest looks at them.
    const PENDING: usize = 64;

    static SLOTS: Mutex<[SocketSlot; SOCKETS]> = Mutex::new([SocketSlot::EMPTY; SOCKETS]);
    static RX_MEMORY: Mutex<[u8; SOCKETS * RX_PER_SOCKET]> =
        Mutex::new([0; SOCKETS * RX_PER_SOCKET]);
    static HEAP: Mutex<[u8; HEAP_SIZE]> = Mutex::new([0; HEAP_SIZE]);
    static BUFFER: Mutex<[u8; MAX_IO]> = Mutex::new([0; MAX_IO]);

    fn now_micros() -> u64 {
        boot::time::now_micros()
    }

    // ------------------------------------------------------------------ counting kicks

    /// Notifications sent per virtqueue: 0 RX, 1 TX, 2 event.
    static KICKS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
    /// Counter ticks spent in the notifications themselves: the write to the device's
    /// notify register, which traps to the VMM (under TCG, QEMU's I/O dispatch and its
    /// eventfd write to the backend).
    static KICK_TICKS: AtomicU64 = AtomicU64::new(0);

    fn kicks() -> [u64; 3] {
        [0, 1, 2].map(|queue| KICKS[queue].load(Ordering::Relaxed))
    }

    // ------------------------------------------------------------ timing the driver

    /// Counter ticks spent inside the driver's calls, summed by [`Timed`]: the driver's own
    /// work, without the application's pattern work a zero-copy call calls back into
    /// ([`APP_TICKS`]) or the waits inside a call that loops ([`WAIT_TICKS`]).
    static DRIVER_TICKS: AtomicU64 = AtomicU64::new(0);
    /// Counter ticks of the application's own work on the data: filling buffers with the
    /// pattern and checking received bytes against it ([`app_work`]), wherever it runs
    /// (before a copying `send`, inside a zero-copy call). The same code for every driver.
    static APP_TICKS: AtomicU64 = AtomicU64::new(0);
    /// Counter ticks spent in [`counted_wait`]'s waits (halted, or nothing when spinning).
    static WAIT_TICKS: AtomicU64 = AtomicU64::new(0);

    /// Runs the application's work on the data, counting its time in [`APP_TICKS`].
    fn app_work<R>(work: impl FnOnce() -> R) -> R {
        let start = boot::arch::counter();
        let result = work();
        APP_TICKS.fetch_add(
            boot::arch::counter().saturating_sub(start),
            Ordering::Relaxed,
        );
        result
    }

    // ------------------------------------------------- the guest's busy time

    /// Counter ticks of the guest's loop that moved something: the stretches between two
    /// waits ([`Driver::idle`]) in which a call accepted a connection or took or gave
    /// bytes. The rest of a workload's time the guest waited for the device or the peer
    /// (spinning or halted), which no work of the guest's would shorten.
    static BUSY_TICKS: AtomicU64 = AtomicU64::new(0);
    /// A call moved something since the last wait.
    static MOVED: AtomicBool = AtomicBool::new(false);
    /// When the last wait ended (counter ticks).
    static LAST_WAIT_END: AtomicU64 = AtomicU64::new(0);

    /// Notes that a call moved something (see [`BUSY_TICKS`]).
    fn progressed() {
        MOVED.store(true, Ordering::Relaxed);
    }

    /// Runs `wait` (a halt, or nothing when the driver spins), first counting the loop's
    /// time since the previous wait as busy if it moved something, and that stretch's
    /// work in [`WORK_HISTOGRAM`].
    fn counted_wait(wait: impl FnOnce()) {
        let now = boot::arch::counter();
        if MOVED.swap(false, Ordering::Relaxed) {
            let since = now.saturating_sub(LAST_WAIT_END.load(Ordering::Relaxed));
            BUSY_TICKS.fetch_add(since, Ordering::Relaxed);
            let kicks = KICK_TICKS
                .load(Ordering::Relaxed)
                .saturating_sub(STRETCH_ORIGIN_KICK_TICKS.load(Ordering::Relaxed));
            let work = now
                .saturating_sub(STRETCH_ORIGIN.load(Ordering::Relaxed))
                .saturating_sub(kicks);
            WORK_HISTOGRAM.record(work);
        }
        STRETCH_ORIGIN.store(LAST_POLL_START.load(Ordering::Relaxed), Ordering::Relaxed);
        STRETCH_ORIGIN_KICK_TICKS.store(
            LAST_POLL_KICK_TICKS.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        wait();
        let end = boot::arch::counter();
        WAIT_TICKS.fetch_add(end.saturating_sub(now), Ordering::Relaxed);
        LAST_WAIT_END.store(end, Ordering::Relaxed);
    }

    // ------------------------------------------ the work of each busy stretch

    /// When the latest `poll` began, and [`KICK_TICKS`] then.
    static LAST_POLL_START: AtomicU64 = AtomicU64::new(0);
    static LAST_POLL_KICK_TICKS: AtomicU64 = AtomicU64::new(0);
    /// Where the next busy stretch's work is counted from: the start of the last `poll`
    /// before the wait that precedes it (that poll found the rings without the news the
    /// stretch handles, so the news came after it began), and [`KICK_TICKS`] then.
    static STRETCH_ORIGIN: AtomicU64 = AtomicU64::new(0);
    static STRETCH_ORIGIN_KICK_TICKS: AtomicU64 = AtomicU64::new(0);

    /// The guest's own work per busy stretch: from [`STRETCH_ORIGIN`] to the next wait,
    /// less the time in notifications. In a ping-pong each round trip's echo is one
    /// stretch, and the counting starts before the byte can have arrived, so a driver
    /// whose work (notifications aside) cost nothing would have made that round trip
    /// at least this much faster; the host turns the quantiles into a lower bound of such
    /// a driver's median and p99 (`xtask/src/bench.rs`, `quantile_floor`).
    static WORK_HISTOGRAM: WorkHistogram = WorkHistogram::new();

    /// Counts of durations in bins of [`WorkHistogram::BIN_NS`], the last bin holding
    /// everything longer, and the longest exactly.
    struct WorkHistogram {
        bins: [AtomicU64; WorkHistogram::BINS],
        longest_ticks: AtomicU64,
    }

    impl WorkHistogram {
        const BINS: usize = 1024;
        const BIN_NS: u64 = 100;
        /// The quantiles the result line reports, as `work_p<name>_ns=`.
        const QUANTILES: [(&'static str, u64); 4] =
            [("50", 500), ("90", 900), ("99", 990), ("999", 999)];

        const fn new() -> Self {
            WorkHistogram {
                bins: [const { AtomicU64::new(0) }; WorkHistogram::BINS],
                longest_ticks: AtomicU64::new(0),
            }
        }

        fn nanos(ticks: u64) -> u64 {
            let hz = u128::from(boot::time::counter_hz().max(1));
            u64::try_from(u128::from(ticks) * 1_000_000_000 / hz).unwrap_or(u64::MAX)
        }

        fn record(&self, ticks: u64) {
            let bin = usize::try_from(Self::nanos(ticks) / Self::BIN_NS)
                .unwrap_or(usize::MAX)
                .min(Self::BINS - 1);
            self.bins[bin].fetch_add(1, Ordering::Relaxed);
            self.longest_ticks.fetch_max(ticks, Ordering::Relaxed);
        }

        fn clear(&self) {
            for bin in &self.bins {
                bin.store(0, Ordering::Relaxed);
            }
            self.longest_ticks.store(0, Ordering::Relaxed);
        }

        /// Writes `work_stretches=<n> work_p50_ns=.. work_p90_ns=.. work_p99_ns=..
        /// work_p999_ns=.. work_max_ns=..`. Each quantile `q` (in thousandths) is an
        /// upper edge: at most `(1 - q) n` stretches took longer.
        fn write(&self, out: &mut dyn fmt::Write) -> fmt::Result {
            let counts: [u64; Self::BINS] =
                core::array::from_fn(|bin| self.bins[bin].load(Ordering::Relaxed));
            let stretches: u64 = counts.iter().sum();
            let longest = Self::nanos(self.longest_ticks.load(Ordering::Relaxed));
            write!(out, "work_stretches={stretches} ")?;
            for (name, thousandths) in Self::QUANTILES {
                // Longer stretches allowed above the edge.
                let allowed = stretches * (1000 - thousandths) / 1000;
                let mut above = 0;
                let mut edge = longest;
                for bin in (0..Self::BINS - 1).rev() {
                    if above + counts[bin + 1] > allowed {
                        break;
                    }
                    above += counts[bin + 1];
                    edge = (bin as u64 + 1) * Self::BIN_NS;
                }
                write!(out, "work_p{name}_ns={} ", edge.min(longest))?;
            }
            write!(out, "work_max_ns={longest} ")
        }
    }

    /// What the result line reports as differences: kicks per queue and the ticks spent
    /// in them, the ticks spent inside the driver, the guest's busy ticks, and the credit
    /// packets, buffered bytes and waits where the driver counts them.
    #[derive(Clone, Copy)]
    struct Counters {
        kicks: [u64; 3],
        kick_ticks: u64,
        driver_ticks: u64,
        app_ticks: u64,
        busy_ticks: u64,
        credit: Option<CreditCounts>,
        wait: Option<WaitCounts>,
        rx_buffered_bytes: Option<u64>,
    }

    impl Counters {
        fn now<D: Driver>(driver: &D) -> Self {
            Counters {
                kicks: kicks(),
                kick_ticks: KICK_TICKS.load(Ordering::Relaxed),
                driver_ticks: DRIVER_TICKS.load(Ordering::Relaxed),
                app_ticks: APP_TICKS.load(Ordering::Relaxed),
                busy_ticks: BUSY_TICKS.load(Ordering::Relaxed),
                credit: driver.credit_counts(),
                wait: driver.wait_counts(),
                rx_buffered_bytes: driver.rx_buffered_bytes(),
            }
        }
    }

    /// How a driver that sleeps waited (ours, `boot::wait`): device interrupts taken,
    /// halts, halts the timer ended, and of those the backstop's that found work.
    #[derive(Clone, Copy)]
    struct WaitCounts {
        interrupts: u64,
        halts: u64,
        timer_wakes: u64,
        backstop_finds: u64,
        halted_us: u64,
    }

    /// CREDIT_UPDATEs received and CREDIT_REQUESTs sent: how the peer's window paced a
    /// transfer (ours counts them in `Stats`; virtio-drivers does not say).
    #[derive(Clone, Copy)]
    struct CreditCounts {
        updates_received: u64,
        requests_sent: u64,
    }

    /// A driver whose every call is timed with the architecture's counter (the TSC on
    /// x86-64, `CNTVCT_EL0` on aarch64) into [`DRIVER_TICKS`]: the guest's own work inside
    /// the driver, both drivers measured alike. The pattern work a zero-copy call calls
    /// back into ([`APP_TICKS`]) and the waits of a call that loops until it is done
    /// ([`WAIT_TICKS`]) are the application's and the device's time, not the driver's.
    struct Timed<D>(D);

    impl<D: Driver> Timed<D> {
        fn time<R>(&mut self, call: impl FnOnce(&mut D) -> R) -> R {
            self.time_from(boot::arch::counter(), call)
        }

        /// [`Timed::time`] from a counter value the caller read just before.
        fn time_from<R>(&mut self, start: u64, call: impl FnOnce(&mut D) -> R) -> R {
            let app = APP_TICKS.load(Ordering::Relaxed);
            let waited = WAIT_TICKS.load(Ordering::Relaxed);
            let result = call(&mut self.0);
            let spent = boot::arch::counter().saturating_sub(start);
            let not_the_driver = (APP_TICKS.load(Ordering::Relaxed) - app)
                + (WAIT_TICKS.load(Ordering::Relaxed) - waited);
            DRIVER_TICKS.fetch_add(spent.saturating_sub(not_the_driver), Ordering::Relaxed);
            result
        }
    }

    impl<D: Driver> Driver for Timed<D> {
        type Conn = D::Conn;
        fn poll(&mut self) -> Result<()> {
            let start = boot::arch::counter();
            LAST_POLL_START.store(start, Ordering::Relaxed);
            LAST_POLL_KICK_TICKS.store(KICK_TICKS.load(Ordering::Relaxed), Ordering::Relaxed);
            self.time_from(start, |driver| driver.poll())
        }
        fn idle(&mut self) {
            // Not timed: halting is not the driver's work.
            self.0.idle();
        }
        fn accept(&mut self) -> Option<Self::Conn> {
            let conn = self.time(|driver| driver.accept());
            if conn.is_some() {
                progressed();
            }
            conn
        }
        fn send(&mut self, conn: Self::Conn, data: &[u8]) -> Result<usize> {
            let taken = self.time(|driver| driver.send(conn, data));
            if taken.as_ref().is_ok_and(|&n| n > 0) {
                progressed();
            }
            taken
        }
        fn log_send_stall(&self, conn: Self::Conn) {
            self.0.log_send_stall(conn);
        }
        fn recv(&mut self, conn: Self::Conn, buf: &mut [u8]) -> Result<Recv> {
            let read = self.time(|driver| driver.recv(conn, buf));
            if !matches!(read, Ok(Recv::Empty)) {
                progressed();
            }
            read
        }
        fn send_pattern_in_place(
            &mut self,
            conn: Self::Conn,
            offset: u64,
            buffer: &mut [u8],
        ) -> Result<()> {
            self.time(|driver| driver.send_pattern_in_place(conn, offset, buffer))
        }
        fn check_in_place(
            &mut self,
            conn: Self::Conn,
            offset: u64,
            want: usize,
            buffer: &mut [u8],
        ) -> Result<Checked> {
            let checked = self.time(|driver| driver.check_in_place(conn, offset, want, buffer));
            if !matches!(checked, Ok(Checked::Empty)) {
                progressed();
            }
            checked
        }
        fn close(&mut self, conn: Self::Conn) {
            self.time(|driver| driver.close(conn));
            progressed();
        }
        fn counters(&self, out: &mut dyn fmt::Write) -> fmt::Result {
            self.0.counters(out)
        }
        fn credit_counts(&self) -> Option<CreditCounts> {
            self.0.credit_counts()
        }
        fn rx_buffered_bytes(&self) -> Option<u64> {
            self.0.rx_buffered_bytes()
        }
        fn wait_counts(&self) -> Option<WaitCounts> {
            self.0.wait_counts()
        }
    }

    /// The boot transport, counting every `notify` (a kick: an exit to the hypervisor).
    pub struct CountingTransport(SomeTransport<'static>);

    impl Transport for CountingTransport {
        fn device_type(&self) -> DeviceType {
            self.0.device_type()
        }
        fn read_device_features(&mut self) -> u64 {
            self.0.read_device_features()
        }
        fn write_driver_features(&mut self, driver_features: u64) {
            self.0.write_driver_features(driver_features)
        }
        fn max_queue_size(&mut self, queue: u16) -> u32 {
            self.0.max_queue_size(queue)
        }
        fn notify(&mut self, queue: u16) {
            if let Some(count) = KICKS.get(usize::from(queue)) {
                count.fetch_add(1, Ordering::Relaxed);
            }
            let start = boot::arch::counter();
            self.0.notify(queue);
            let spent = boot::arch::counter().saturating_sub(start);
            KICK_TICKS.fetch_add(spent, Ordering::Relaxed);
        }
        fn get_status(&self) -> DeviceStatus {
            self.0.get_status()
        }
        fn set_status(&mut self, status: DeviceStatus) {
            self.0.set_status(status)
        }
        fn set_guest_page_size(&mut self, guest_page_size: u32) {
            self.0.set_guest_page_size(guest_page_size)
        }
        fn requires_legacy_layout(&self) -> bool {
            self.0.requires_legacy_layout()
        }
        fn queue_set(
            &mut self,
            queue: u16,
            size: u32,
            descriptors: PhysAddr,
            driver_area: PhysAddr,
            device_area: PhysAddr,
        ) {
            self.0
                .queue_set(queue, size, descriptors, driver_area, device_area)
        }
        fn queue_unset(&mut self, queue: u16) {
            self.0.queue_unset(queue)
        }
        fn queue_used(&mut self, queue: u16) -> bool {
            self.0.queue_used(queue)
        }
        fn ack_interrupt(&mut self) -> InterruptStatus {
            self.0.ack_interrupt()
        }
        fn read_config_generation(&self) -> u32 {
            self.0.read_config_generation()
        }
        fn read_config_space<T: FromBytes + IntoBytes>(
            &self,
            offset: usize,
        ) -> virtio_drivers::Result<T> {
            self.0.read_config_space(offset)
        }
        fn write_config_space<T: IntoBytes + Immutable>(
            &mut self,
            offset: usize,
            value: T,
        ) -> virtio_drivers::Result<()> {
            self.0.write_config_space(offset, value)
        }
    }

    // ------------------------------------------------------------------ the pattern

    /// Word `index` of the data pattern (see the module documentation).
    fn pattern_word(index: u64) -> u64 {
        (index ^ 0x5555_5555_5555_5555)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29)
    }

    fn pattern_byte(offset: u64) -> u8 {
        pattern_word(offset / 8).to_le_bytes()[(offset % 8) as usize]
    }

    /// Fills `buf` with the pattern from stream offset `offset`. Never inlined, here and
    /// in `count_mismatches`: every caller (the reference timing, both drivers, the
    /// copying and the in-place paths) runs the same machine code, whose speed under TCG
    /// otherwise changes with where it was inlined.
    #[inline(never)]
    fn fill_pattern(offset: u64, buf: &mut [u8]) {
        app_work(|| fill_pattern_untimed(offset, buf));
    }

    fn fill_pattern_untimed(offset: u64, buf: &mut [u8]) {
        let head = ((8 - offset % 8) % 8).min(buf.len() as u64) as usize;
        let (first, rest) = buf.split_at_mut(head);
        for (i, byte) in first.iter_mut().enumerate() {
            *byte = pattern_byte(offset + i as u64);
        }
        let aligned = offset + head as u64;
        let mut words = rest.chunks_exact_mut(8);
        let mut index = aligned / 8;
        for word in &mut words {
            word.copy_from_slice(&pattern_word(index).to_le_bytes());
            index += 1;
        }
        let tail = words.into_remainder();
        for (i, byte) in tail.iter_mut().enumerate() {
            *byte = pattern_byte(index * 8 + i as u64);
        }
    }

    /// Counts the bytes of `buf` that differ from the pattern at stream offset `offset`.
    #[inline(never)]
    fn count_mismatches(offset: u64, buf: &[u8]) -> u64 {
        app_work(|| count_mismatches_untimed(offset, buf))
    }

    fn count_mismatches_untimed(offset: u64, buf: &[u8]) -> u64 {
        let head = ((8 - offset % 8) % 8).min(buf.len() as u64) as usize;
        let (first, rest) = buf.split_at(head);
        let mut bad = 0;
        for (i, &byte) in first.iter().enumerate() {
            bad += u64::from(byte != pattern_byte(offset + i as u64));
        }
        let mut index = (offset + head as u64) / 8;
        // Eight words at a time, with one test per block. Under TCG every branch ends a
        // translation block; with a test per word this check ran at a seventh of the
        // fill's speed (which the compiler unrolls to a branch per four words).
        let mut blocks = rest.chunks_exact(64);
        for block in &mut blocks {
            let mut differ = 0;
            for (k, word) in block.chunks_exact(8).enumerate() {
                differ |= le_word(word) ^ pattern_word(index + k as u64);
            }
            // Opaque to the compiler, which would otherwise test the words one by one.
            if core::hint::black_box(differ) != 0 {
                for (k, word) in block.chunks_exact(8).enumerate() {
                    bad += bytes_off(le_word(word), pattern_word(index + k as u64));
                }
            }
            index += 8;
        }
        let mut words = blocks.remainder().chunks_exact(8);
        for word in &mut words {
            bad += bytes_off(le_word(word), pattern_word(index));
            index += 1;
        }
        for (i, &byte) in words.remainder().iter().enumerate() {
            bad += u64::from(byte != pattern_byte(index * 8 + i as u64));
        }
        bad
    }

    /// The little-endian word of an 8-byte chunk (`chunks_exact(8)`).
    fn le_word(word: &[u8]) -> u64 {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(word);
        u64::from_le_bytes(bytes)
    }

    /// How many of the eight bytes of `word` differ from those of `expected`.
    fn bytes_off(word: u64, expected: u64) -> u64 {
        let differ = word ^ expected;
        (0..8).filter(|k| (differ >> (8 * k)) & 0xff != 0).count() as u64
    }

    // ------------------------------------------------------------------ the drivers

    /// What a read found.
    enum Recv {
        Data(usize),
        /// Nothing now.
        Empty,
        /// The peer closed its side and everything it sent has been read.
        Eof,
    }

    /// What a checking read found: bytes read and how many of them were wrong.
    enum Checked {
        Data(usize, u64),
        Empty,
        Eof,
    }

    /// A driver failure, with the driver's own words.
    #[derive(Clone, Copy, Debug)]
    enum Failure {
        Ours(vsock_guest::Error),
        Theirs(virtio_drivers::Error),
        Protocol(&'static str),
    }

    impl fmt::Display for Failure {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                Failure::Ours(e) => write!(f, "vsock-guest: {e}"),
                Failure::Theirs(e) => write!(f, "virtio-drivers: {e}"),
                Failure::Protocol(what) => f.write_str(what),
            }
        }
    }

    type Result<T> = core::result::Result<T, Failure>;

    /// What the workloads need from a driver. Every call is non-blocking; `poll` makes
    /// progress.
    trait Driver: Sized {
        type Conn: Copy;
        /// Called where the guest waits for the peer, before the next `poll`: ours
        /// halts there (`wait=irq`, `boot::wait`) when nothing moved; theirs spins.
        /// Either way through [`counted_wait`].
        fn idle(&mut self) {
            counted_wait(|| {});
        }
        fn poll(&mut self) -> Result<()>;
        /// A new connection on the control port, if one is waiting.
        fn accept(&mut self) -> Option<Self::Conn>;
        /// Bytes taken (0: no room now).
        fn send(&mut self, conn: Self::Conn, data: &[u8]) -> Result<usize>;
        /// Logs what a `send` that has taken nothing for seconds waits for, as far as the
        /// driver shows it.
        fn log_send_stall(&self, _conn: Self::Conn) {}
        fn recv(&mut self, conn: Self::Conn, buf: &mut [u8]) -> Result<Recv>;
        /// Sends `n` bytes of the pattern from stream offset `offset` the driver's
        /// zero-copy way: by default, fill `buffer` and send it (virtio-drivers' `send`
        /// shares the buffer with the device).
        fn send_pattern_in_place(
            &mut self,
            conn: Self::Conn,
            offset: u64,
            buffer: &mut [u8],
        ) -> Result<()> {
            fill_pattern(offset, buffer);
            send_all(self, conn, buffer)
        }
        /// Reads up to `want` bytes the driver's zero-copy way and counts the ones that
        /// differ from the pattern at stream offset `offset`: by default as
        /// [`check_copied`] does. `Checked::Empty` when nothing waits.
        fn check_in_place(
            &mut self,
            conn: Self::Conn,
            offset: u64,
            want: usize,
            buffer: &mut [u8],
        ) -> Result<Checked> {
            check_copied(self, conn, offset, want, buffer)
        }
        fn close(&mut self, conn: Self::Conn);
        /// The driver's own counters, for the result line.
        fn counters(&self, out: &mut dyn fmt::Write) -> fmt::Result;
        /// The driver's credit counters, where it keeps them.
        fn credit_counts(&self) -> Option<CreditCounts> {
            None
        }
        /// Received bytes that went through a socket's receive buffer (copied in, and out
        /// again by `recv`), where the driver counts them.
        fn rx_buffered_bytes(&self) -> Option<u64> {
            None
        }
        /// How the driver waited so far, where it sleeps.
        fn wait_counts(&self) -> Option<WaitCounts> {
            None
        }
    }

    type OurDevice = VsockDevice<'static, boot::hal::BootHal, CountingTransport>;

    struct Ours {
        device: OurDevice,
        listener: SocketHandle,
        waiter: boot::wait::Waiter,
    }

    impl Ours {
        /// Our driver with `Config::default()`, where the command line does not say
        /// otherwise (`queue=`, `rx=`, `tx=`, `tx_memory=`; see the module docs and
        /// `boot::config`).
        fn new(transport: CountingTransport, port: u32, info: &boot::BootInfo) -> Result<Self> {
            let slots = spin::MutexGuard::leak(SLOTS.lock());
            let rx_memory = spin::MutexGuard::leak(RX_MEMORY.lock());
            let default = Config::default();
            let mut config = boot::config::from_cmdline(info);
            let waiter = boot::wait::Waiter::new("bench", info, &mut config);
            let mut device =
                VsockDevice::new(transport, config, slots, rx_memory).map_err(Failure::Ours)?;
            let listener = device.stream_socket().map_err(Failure::Ours)?;
            device
                .bind(listener, VsockAddr::new(VMADDR_CID_ANY, port))
                .map_err(Failure::Ours)?;
            device.listen(listener, BACKLOG).map_err(Failure::Ours)?;
            info!(
                "bench: driver ours (vsock-guest), {}: {}-entry queues, {} B RX buffers, TX packets up to {} B in {} KiB, {} KiB send buffer, {} KiB receive memory per socket",
                if (Config { interrupts: false, ..config }) == default { "Config::default()" } else { "Config changed on the command line" },
                config.queue_size,
                config.rx_buffer_size,
                config.tx_packet_size,
                config.tx_memory / 1024,
                config.send_buffer / 1024,
                device.rx_buffer_per_socket() / 1024
            );
            Ok(Ours {
                device,
                listener,
                waiter,
            })
        }
    }

    impl Driver for Ours {
        type Conn = SocketHandle;

        fn poll(&mut self) -> Result<()> {
            self.waiter.poll(&mut self.device);
            Ok(())
        }

        fn idle(&mut self) {
            counted_wait(|| self.waiter.idle(&mut self.device, false, None));
        }

        fn accept(&mut self) -> Option<SocketHandle> {
            match self.device.accept(self.listener) {
                Ok((handle, _)) => Some(handle),
                Err(vsock_guest::Error::WouldBlock) => None,
                Err(e) => {
                    warn!("bench: accept failed: {e}");
                    None
                }
            }
        }

        fn log_send_stall(&self, conn: SocketHandle) {
            warn!(
                "bench: send waits: send_queue={:?} send_room={:?} tx_memory_in_use={} readiness={:?} {:?}",
                self.device.send_queue(conn),
                self.device.send_room(conn),
                self.device.tx_memory_in_use(),
                self.device.readiness(conn),
                self.device.stats()
            );
        }

        fn send(&mut self, conn: SocketHandle, data: &[u8]) -> Result<usize> {
            match self.device.send(conn, data) {
                Ok(n) => Ok(n),
                Err(vsock_guest::Error::WouldBlock) => Ok(0),
                Err(e) => Err(Failure::Ours(e)),
            }
        }

        fn send_pattern_in_place(
            &mut self,
            conn: SocketHandle,
            offset: u64,
            buffer: &mut [u8],
        ) -> Result<()> {
            let n = buffer.len();
            let mut done = 0;
            let mut watch = SendStallLog::new();
            while done < n {
                let result = self.device.send_with(conn, |space| {
                    let k = space.len().min(n - done);
                    fill_pattern(offset + done as u64, &mut space[..k]);
                    k
                });
                match result {
                    Ok(k) => {
                        done += k;
                        watch.progressed();
                        progressed();
                    }
                    Err(vsock_guest::Error::WouldBlock) => {
                        self.idle();
                        self.poll()?;
                        watch.waited(self, conn);
                    }
                    Err(e) => return Err(Failure::Ours(e)),
                }
            }
            Ok(())
        }

        fn check_in_place(
            &mut self,
            conn: SocketHandle,
            offset: u64,
            want: usize,
            _buffer: &mut [u8],
        ) -> Result<Checked> {
            let mut bad = 0;
            match self.device.recv_with(conn, |bytes| {
                let n = bytes.len().min(want);
                bad = count_mismatches(offset, &bytes[..n]);
                n
            }) {
                Ok(0) => Ok(Checked::Eof),
                Ok(n) => Ok(Checked::Data(n, bad)),
                Err(vsock_guest::Error::WouldBlock) => Ok(Checked::Empty),
                Err(e) => Err(Failure::Ours(e)),
            }
        }

        fn recv(&mut self, conn: SocketHandle, buf: &mut [u8]) -> Result<Recv> {
            match self.device.recv(conn, buf) {
                Ok(0) => Ok(Recv::Eof),
                Ok(n) => Ok(Recv::Data(n)),
                Err(vsock_guest::Error::WouldBlock) => Ok(Recv::Empty),
                Err(e) => Err(Failure::Ours(e)),
            }
        }

        fn close(&mut self, conn: SocketHandle) {
            if let Err(e) = self.device.close(conn) {
                warn!("bench: close failed: {e}");
            }
        }

        fn counters(&self, out: &mut dyn fmt::Write) -> fmt::Result {
            let stats = self.device.stats();
            write!(
                out,
                "stats_rx_kicks={} stats_tx_kicks={} rx_packets={} tx_packets={} rx_dropped={}",
                stats.rx_kicks,
                stats.tx_kicks,
                stats.rx_packets,
                stats.tx_packets,
                stats.rx_dropped,
            )
        }

        fn wait_counts(&self) -> Option<WaitCounts> {
            let wait = self.waiter.stats();
            Some(WaitCounts {
                interrupts: self.device.stats().interrupts,
                halts: wait.halts,
                timer_wakes: wait.timer_wakes,
                backstop_finds: wait.backstop_finds,
                halted_us: wait.halted_micros,
            })
        }

        fn credit_counts(&self) -> Option<CreditCounts> {
            let stats = self.device.stats();
            Some(CreditCounts {
                updates_received: stats.rx_credit_updates,
                requests_sent: stats.tx_credit_requests,
            })
        }

        fn rx_buffered_bytes(&self) -> Option<u64> {
            Some(self.device.stats().rx_buffered_bytes)
        }
    }

    struct Theirs<const RX: usize> {
        manager: VsockConnectionManager<boot::hal::BootHal, CountingTransport, RX>,
        port: u32,
        /// Connections the manager accepted, not yet taken by `accept`.
        pending: heapless::Deque<TheirAddr, PENDING>,
        /// Peers that disconnected, oldest first; a read finds end of stream once the
        /// data is drained.
        closed: heapless::Deque<TheirAddr, PENDING>,
        /// Packets `poll` rejected as malformed and this guest skipped.
        bad_packets: u64,
        credit_updates: u64,
    }

    impl<const RX: usize> Theirs<RX> {
        fn new(
            manager: VsockConnectionManager<boot::hal::BootHal, CountingTransport, RX>,
            port: u32,
        ) -> Self {
            let mut theirs = Theirs {
                manager,
                port,
                pending: heapless::Deque::new(),
                closed: heapless::Deque::new(),
                bad_packets: 0,
                credit_updates: 0,
            };
            theirs.manager.listen(port);
            theirs
        }

        fn is_closed(&self, peer: TheirAddr) -> bool {
            self.closed.iter().any(|p| *p == peer)
        }

        fn mark_closed(&mut self, peer: TheirAddr) {
            if self.is_closed(peer) {
                return;
            }
            if self.closed.is_full() {
                // Forget the oldest: long gone, or its reader will get NotConnected.
                self.closed.pop_front();
            }
            let _ = self.closed.push_back(peer);
        }

        fn forget_closed(&mut self, peer: TheirAddr) {
            let kept = self.closed.len();
            for _ in 0..kept {
                if let Some(p) = self.closed.pop_front() {
                    if p != peer {
                        let _ = self.closed.push_back(p);
                    }
                }
            }
        }
    }

    fn is_bad_packet(error: &virtio_drivers::Error) -> bool {
        matches!(
            error,
            virtio_drivers::Error::SocketDeviceError(
                SocketError::InvalidOperation
                    | SocketError::UnknownOperation(_)
                    | SocketError::InvalidNumber
                    | SocketError::UnexpectedDataInPacket
                    | SocketError::BufferTooShort
            )
        )
    }

    impl<const RX: usize> Driver for Theirs<RX> {
        type Conn = TheirAddr;

        fn poll(&mut self) -> Result<()> {
            // `poll` handles one RX packet per call; take what is there, a batch at most.
            for _ in 0..64 {
                match self.manager.poll() {
                    Ok(Some(event)) => {
                        if event.destination.port != self.port {
                            continue;
                        }
                        match event.event_type {
                            VsockEventType::ConnectionRequest => {
                                // The manager has accepted it (we listen on the port).
                                self.forget_closed(event.source);
                                if self.pending.push_back(event.source).is_err() {
                                    warn!("bench: too many pending connections");
                                }
                            }
                            VsockEventType::Disconnected { .. } => self.mark_closed(event.source),
                            _ => {}
                        }
                    }
                    Ok(None) => break,
                    Err(e) if is_bad_packet(&e) => self.bad_packets += 1,
                    Err(e) => return Err(Failure::Theirs(e)),
                }
            }
            Ok(())
        }

        fn accept(&mut self) -> Option<TheirAddr> {
            self.pending.pop_front()
        }

        fn send(&mut self, conn: TheirAddr, data: &[u8]) -> Result<usize> {
            match self.manager.send(conn, self.port, data) {
                Ok(()) => Ok(data.len()),
                Err(virtio_drivers::Error::SocketDeviceError(
                    SocketError::InsufficientBufferSpaceInPeer,
                )) => Ok(0),
                Err(e) => Err(Failure::Theirs(e)),
            }
        }

        fn recv(&mut self, conn: TheirAddr, buf: &mut [u8]) -> Result<Recv> {
            match self.manager.recv(conn, self.port, buf) {
                Ok(0) if self.is_closed(conn) => Ok(Recv::Eof),
                Ok(0) => Ok(Recv::Empty),
                Ok(n) => {
                    // virtio-drivers leaves credit updates to its user. After the last
                    // bytes of a closed connection the manager has dropped it already.
                    match self.manager.update_credit(conn, self.port) {
                        Ok(()) => self.credit_updates += 1,
                        Err(virtio_drivers::Error::SocketDeviceError(
                            SocketError::NotConnected,
                        )) if self.is_closed(conn) => {}
                        Err(e) => return Err(Failure::Theirs(e)),
                    }
                    Ok(Recv::Data(n))
                }
                Err(virtio_drivers::Error::SocketDeviceError(SocketError::NotConnected))
                    if self.is_closed(conn) =>
                {
                    Ok(Recv::Eof)
                }
                Err(e) => Err(Failure::Theirs(e)),
            }
        }

        fn close(&mut self, conn: TheirAddr) {
            self.forget_closed(conn);
            // The manager drops a connection itself once the peer shut it down (with an
            // RST); otherwise close it now.
            match self.manager.force_close(conn, self.port) {
                Ok(())
                | Err(virtio_drivers::Error::SocketDeviceError(SocketError::NotConnected)) => {}
                Err(e) => warn!("bench: force_close failed: {e}"),
            }
        }

        fn counters(&self, out: &mut dyn fmt::Write) -> fmt::Result {
            write!(
                out,
                "bad_packets={} credit_updates={}",
                self.bad_packets, self.credit_updates
            )
        }
    }

    // ------------------------------------------------------------------ the workloads

    /// Counters over a batch of connect/close cycles.
    struct Cycles {
        expected: u64,
        done: u64,
        started_us: u64,
        counters: Counters,
        line: heapless::String<MAX_LINE>,
    }

    /// Reads up to `want` bytes into `buffer` with `recv` and counts the ones that differ
    /// from the pattern at stream offset `offset`.
    fn check_copied<D: Driver>(
        driver: &mut D,
        conn: D::Conn,
        offset: u64,
        want: usize,
        buffer: &mut [u8],
    ) -> Result<Checked> {
        Ok(match driver.recv(conn, &mut buffer[..want])? {
            Recv::Data(n) => Checked::Data(n, count_mismatches(offset, &buffer[..n])),
            Recv::Empty => Checked::Empty,
            Recv::Eof => Checked::Eof,
        })
    }

    /// Has a send loop log what it waits for (`Driver::log_send_stall`) when it has moved
    /// nothing for 5 s, and again every 5 s: a stalled run then shows where it stands.
    struct SendStallLog {
        since: u64,
    }

    impl SendStallLog {
        const LOG_AFTER_US: u64 = 5_000_000;

        fn new() -> Self {
            SendStallLog {
                since: now_micros(),
            }
        }

        fn progressed(&mut self) {
            self.since = now_micros();
        }

        fn waited<D: Driver>(&mut self, driver: &D, conn: D::Conn) {
            if now_micros() - self.since > Self::LOG_AFTER_US {
                driver.log_send_stall(conn);
                self.since = now_micros();
            }
        }
    }

    /// Waits for the peer: the driver halts if it can ([`Driver::idle`]), then polls.
    fn wait<D: Driver>(driver: &mut D) -> Result<()> {
        driver.idle();
        driver.poll()
    }

    fn send_all<D: Driver>(driver: &mut D, conn: D::Conn, data: &[u8]) -> Result<()> {
        let mut offset = 0;
        let mut watch = SendStallLog::new();
        while offset < data.len() {
            match driver.send(conn, &data[offset..])? {
                0 => {
                    wait(driver)?;
                    watch.waited(driver, conn);
                }
                n => {
                    offset += n;
                    watch.progressed();
                    progressed();
                }
            }
        }
        Ok(())
    }

    /// Reads and drops whatever comes until the peer closes.
    fn wait_eof<D: Driver>(driver: &mut D, conn: D::Conn) -> Result<()> {
        let mut scratch = [0u8; 256];
        loop {
            match driver.recv(conn, &mut scratch)? {
                Recv::Data(_) => {}
                Recv::Empty => wait(driver)?,
                Recv::Eof => return Ok(()),
            }
        }
    }

    /// The command line: `Ok(None)` when the peer closed before sending anything (a
    /// connect/close cycle). Bytes after the newline stay in `line[start..len]`.
    fn read_command<D: Driver>(
        driver: &mut D,
        conn: D::Conn,
        line: &mut [u8; MAX_LINE],
    ) -> Result<Option<(usize, usize, usize)>> {
        let mut len = 0;
        loop {
            if let Some(newline) = line[..len].iter().position(|&b| b == b'\n') {
                return Ok(Some((newline, newline + 1, len)));
            }
            if len == line.len() {
                return Err(Failure::Protocol("command line too long"));
            }
            match driver.recv(conn, &mut line[len..])? {
                Recv::Data(n) => len += n,
                Recv::Empty => wait(driver)?,
                Recv::Eof if len == 0 => return Ok(None),
                Recv::Eof => return Err(Failure::Protocol("closed inside the command line")),
            }
        }
    }

    fn number(word: Option<&str>, what: &'static str) -> Result<u64> {
        word.and_then(|w| w.parse().ok())
            .ok_or(Failure::Protocol(what))
    }

    /// What a finished command reports.
    enum Outcome {
        /// A workload ran: log a result line.
        Done {
            bad: u64,
        },
        /// `cycles`: counting starts.
        Cycles(u64),
        Exit,
    }

    /// How far a command got, also when it failed.
    struct Progress {
        /// When the workload itself was done (before waiting for the host to close).
        finished_us: u64,
        /// Payload bytes sent (handed to the driver) or received and checked.
        bytes: u64,
    }

    /// Runs one command on `conn` (everything up to the host's close).
    fn run_command<D: Driver>(
        driver: &mut D,
        conn: D::Conn,
        command: &str,
        leftover: &[u8],
        buffer: &mut [u8; MAX_IO],
        progress: &mut Progress,
    ) -> Result<Outcome> {
        let mut words = command.split_ascii_whitespace();
        let verb = words.next().unwrap_or("");
        let outcome = match verb {
            "send" => {
                let total = number(words.next(), "send: byte count")?;
                let write = number(words.next(), "send: write size")? as usize;
                if write == 0 || write > MAX_IO {
                    return Err(Failure::Protocol("send: write size not in 1..=65536"));
                }
                let in_place = words.next() == Some("in-place");
                let mut sent = 0u64;
                while sent < total {
                    let n = (total - sent).min(write as u64) as usize;
                    if in_place {
                        driver.send_pattern_in_place(conn, sent, &mut buffer[..n])?;
                    } else {
                        fill_pattern(sent, &mut buffer[..n]);
                        send_all(driver, conn, &buffer[..n])?;
                    }
                    sent += n as u64;
                    progress.bytes = sent;
                }
                Outcome::Done { bad: 0 }
            }
            "recv" => {
                let total = number(words.next(), "recv: byte count")?;
                let chunk = number(words.next(), "recv: read size")? as usize;
                if chunk == 0 || chunk > MAX_IO {
                    return Err(Failure::Protocol("recv: read size not in 1..=65536"));
                }
                let in_place = words.next() == Some("in-place");
                let mut got = leftover.len() as u64;
                let mut bad = count_mismatches(0, leftover);
                while got < total {
                    let want = (total - got).min(chunk as u64) as usize;
                    let read = if in_place {
                        driver.check_in_place(conn, got, want, &mut buffer[..])?
                    } else {
                        check_copied(driver, conn, got, want, &mut buffer[..])?
                    };
                    match read {
                        Checked::Data(n, wrong) => {
                            bad += wrong;
                            got += n as u64;
                            progress.bytes = got;
                        }
                        Checked::Empty => wait(driver)?,
                        Checked::Eof => return Err(Failure::Protocol("recv: closed early")),
                    }
                }
                let mut reply: heapless::String<64> = heapless::String::new();
                let _ = writeln!(reply, "ok {got} {bad}");
                send_all(driver, conn, reply.as_bytes())?;
                Outcome::Done { bad }
            }
            "pingpong" => {
                send_all(driver, conn, leftover)?;
                let mut bytes = [0u8; 64];
                loop {
                    match driver.recv(conn, &mut bytes)? {
                        Recv::Data(n) => send_all(driver, conn, &bytes[..n])?,
                        Recv::Empty => wait(driver)?,
                        Recv::Eof => break,
                    }
                }
                progress.finished_us = now_micros();
                return Ok(Outcome::Done { bad: 0 });
            }
            "cycles" => {
                let n = number(words.next(), "cycles: count")?;
                send_all(driver, conn, b"go\n")?;
                Outcome::Cycles(n)
            }
            "exit" => {
                send_all(driver, conn, b"bye\n")?;
                Outcome::Exit
            }
            _ => return Err(Failure::Protocol("unknown command")),
        };
        progress.finished_us = now_micros();
        wait_eof(driver, conn)?;
        Ok(outcome)
    }

    fn log_result<D: Driver>(
        driver: &D,
        command: &str,
        result: core::result::Result<u64, Failure>,
        elapsed_us: u64,
        bytes: u64,
        before: Counters,
    ) {
        let after = Counters::now(driver);
        let hz = boot::time::counter_hz().max(1);
        let micros = |ticks: u64| u128::from(ticks) * 1_000_000 / u128::from(hz);
        let driver_us = micros(after.driver_ticks.saturating_sub(before.driver_ticks));
        let app_us = micros(after.app_ticks.saturating_sub(before.app_ticks));
        let busy_us = micros(after.busy_ticks.saturating_sub(before.busy_ticks));
        let kick_us = micros(after.kick_ticks.saturating_sub(before.kick_ticks));
        let mut line: heapless::String<1024> = heapless::String::new();
        let _ = write!(line, "bench: result \"{command}\" ");
        match result {
            Ok(bad) => {
                let _ = write!(line, "ok=1 bad={bad} ");
            }
            Err(e) => {
                let _ = write!(line, "ok=0 error=\"{e}\" ");
            }
        }
        let _ = write!(
            line,
            "guest_us={elapsed_us} bytes={bytes} driver_us={driver_us} app_us={app_us} busy_us={busy_us} kick_us={kick_us} kicks_rx={} kicks_tx={} kicks_event={} ",
            after.kicks[0] - before.kicks[0],
            after.kicks[1] - before.kicks[1],
            after.kicks[2] - before.kicks[2],
        );
        if let (Some(after), Some(before)) = (after.credit, before.credit) {
            let _ = write!(
                line,
                "credit_updates_rx={} credit_requests_tx={} ",
                after.updates_received - before.updates_received,
                after.requests_sent - before.requests_sent,
            );
        }
        if let (Some(after), Some(before)) = (after.rx_buffered_bytes, before.rx_buffered_bytes) {
            let _ = write!(line, "rx_buffered_bytes={} ", after - before);
        }
        if let (Some(after), Some(before)) = (after.wait, before.wait) {
            let _ = write!(
                line,
                "interrupts={} halts={} timer_wakes={} backstop_finds={} halted_us={} ",
                after.interrupts - before.interrupts,
                after.halts - before.halts,
                after.timer_wakes - before.timer_wakes,
                after.backstop_finds - before.backstop_finds,
                after.halted_us - before.halted_us,
            );
        }
        let _ = WORK_HISTOGRAM.write(&mut line);
        let _ = driver.counters(&mut line);
        info!("{line}");
    }

    /// Measures what plain memory work costs in this guest, before any driver runs: the
    /// pattern fill of `REFERENCE_BYTES` (what `send` does per byte) into the 64 KiB
    /// buffer, and a copy of as many bytes from that buffer into a 512 KiB ring of the heap
    /// arena, in 64 KiB blocks (what a copying `send` does into transmit memory). The ring
    /// is written once before the timing: the first write to a page of guest memory costs a
    /// page fault in the host, which no driver pays per packet. Logged as
    /// `bench: reference fill_us=.. copy_us=.. bytes=..` for the host's table.
    fn reference(arena: &mut [u8; HEAP_SIZE], buffer: &mut [u8; MAX_IO]) {
        const REFERENCE_BYTES: usize = HEAP_SIZE / 2;
        const COPY_RING: usize = 512 * 1024;
        let started = now_micros();
        let mut offset = 0;
        while offset < REFERENCE_BYTES {
            fill_pattern(offset as u64, &mut buffer[..]);
            core::hint::black_box(&mut buffer[..]);
            offset += MAX_IO;
        }
        let fill_us = now_micros() - started;
        // The check a receiving workload runs on what arrived, over the pattern the buffer
        // holds now.
        let held = (offset - MAX_IO) as u64;
        let started = now_micros();
        let (mut checked, mut bad) = (0, 0);
        while checked < REFERENCE_BYTES {
            bad += count_mismatches(held, core::hint::black_box(&buffer[..]));
            checked += MAX_IO;
        }
        let check_us = now_micros() - started;
        if bad != 0 {
            warn!("bench: the reference check found {bad} bytes off the pattern");
        }
        let ring = &mut arena[..COPY_RING];
        for block in ring.chunks_mut(MAX_IO) {
            block.copy_from_slice(&buffer[..]);
        }
        let started = now_micros();
        let mut copied = 0;
        while copied < REFERENCE_BYTES {
            for block in ring.chunks_mut(MAX_IO) {
                block.copy_from_slice(core::hint::black_box(&buffer[..]));
                copied += MAX_IO;
            }
            core::hint::black_box(&mut ring[..]);
        }
        let copy_us = now_micros() - started;
        info!(
            "bench: reference fill_us={fill_us} check_us={check_us} copy_us={copy_us} bytes={REFERENCE_BYTES}"
        );
    }

    fn serve<D: Driver>(driver: D, port: u32) -> ! {
        let mut driver = Timed(driver);
        let buffer = spin::MutexGuard::leak(BUFFER.lock());
        let mut cycles = Cycles {
            expected: 0,
            done: 0,
            started_us: 0,
            counters: Counters::now(&driver),
            line: heapless::String::new(),
        };
        info!("bench: listening on port {port}");
        info!("bench: ready");
        loop {
            if let Err(e) = driver.poll() {
                error!("bench: poll failed: {e}");
            }
            // Serve every waiting connection before polling again.
            while let Some(conn) = driver.accept() {
                serve_connection(&mut driver, conn, &mut cycles, buffer);
            }
            // Nothing to accept: sleep until news (ours with `wait=irq`).
            driver.idle();
        }
    }

    /// Serves one connection from accept to close.
    fn serve_connection<D: Driver>(
        driver: &mut D,
        conn: D::Conn,
        cycles: &mut Cycles,
        buffer: &mut [u8; MAX_IO],
    ) {
        let before = Counters::now(driver);
        let started_us = now_micros();
        let mut line = [0u8; MAX_LINE];
        let (end, start, len) = match read_command(driver, conn, &mut line) {
            Ok(Some(command)) => command,
            Ok(None) => {
                // A connect/close cycle.
                driver.close(conn);
                if cycles.done < cycles.expected {
                    cycles.done += 1;
                    if cycles.done == cycles.expected {
                        let elapsed = now_micros() - cycles.started_us;
                        log_result(driver, &cycles.line, Ok(0), elapsed, 0, cycles.counters);
                    }
                }
                return;
            }
            Err(e) => {
                warn!("bench: reading a command failed: {e}");
                driver.close(conn);
                return;
            }
        };
        let command = core::str::from_utf8(&line[..end]).unwrap_or("").trim();
        WORK_HISTOGRAM.clear();
        let mut progress = Progress {
            finished_us: started_us,
            bytes: 0,
        };
        let result = run_command(
            driver,
            conn,
            command,
            &line[start..len],
            buffer,
            &mut progress,
        );
        if result.is_err() {
            progress.finished_us = now_micros();
        }
        driver.close(conn);
        let elapsed = progress.finished_us - started_us;
        let bytes = progress.bytes;
        match result {
            Ok(Outcome::Done { bad }) => {
                log_result(driver, command, Ok(bad), elapsed, bytes, before)
            }
            Ok(Outcome::Cycles(n)) => {
                WORK_HISTOGRAM.clear();
                *cycles = Cycles {
                    expected: n,
                    done: 0,
                    started_us: now_micros(),
                    counters: Counters::now(driver),
                    line: heapless::String::new(),
                };
                let _ = cycles.line.push_str(command);
            }
            Ok(Outcome::Exit) => {
                info!("bench: exit requested");
                boot::exit_success();
            }
            Err(e) => log_result(driver, command, Err(e), elapsed, bytes, before),
        }
    }

    pub fn run(info: &boot::BootInfo) -> ! {
        let port = info
            .cmdline_value("port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_PORT);
        let name = info.cmdline_value("driver").unwrap_or("ours");
        let Some(transport) = boot::virtio::find_vsock() else {
            error!("bench: no virtio socket device");
            boot::exit_failure();
        };
        let transport = CountingTransport(transport);
        let arena: &'static mut [u8; HEAP_SIZE] = spin::MutexGuard::leak(HEAP.lock());
        reference(arena, &mut BUFFER.lock());
        let failed = |e: Failure| -> ! {
            error!("bench: bring-up of {name} failed: {e}");
            boot::exit_failure();
        };
        match name {
            "ours" | "ours-throughput" => serve(
                Ours::new(transport, port, info).unwrap_or_else(|e| failed(e)),
                port,
            ),
            "theirs" | "theirs-best" => {
                boot::heap::init(arena);
                if name == "theirs" {
                    let socket = VirtIOSocket::<boot::hal::BootHal, _>::new(transport)
                        .unwrap_or_else(|e| failed(Failure::Theirs(e)));
                    info!("bench: driver theirs (virtio-drivers VsockConnectionManager::new): 512 B RX buffers, 8-entry queues, 1 KiB per connection");
                    serve(Theirs::new(VsockConnectionManager::new(socket), port), port)
                } else {
                    let socket =
                        VirtIOSocket::<boot::hal::BootHal, _, THEIR_BEST_RX>::new(transport)
                            .unwrap_or_else(|e| failed(Failure::Theirs(e)));
                    info!(
                        "bench: driver theirs-best (virtio-drivers): {THEIR_BEST_RX} B RX buffers, 8-entry queues, {} KiB per connection",
                        THEIR_BEST_CAPACITY / 1024
                    );
                    serve(
                        Theirs::new(
                            VsockConnectionManager::new_with_capacity(socket, THEIR_BEST_CAPACITY),
                            port,
                        ),
                        port,
                    )
                }
            }
            other => {
                error!(
                    "bench: unknown driver={other} (ours, ours-throughput, theirs, theirs-best)"
                );
                boot::exit_failure();
            }
        }
    }
}

#[cfg(target_os = "none")]
fn main(info: &boot::BootInfo) -> ! {
    bench::run(info)
}

#[cfg(not(target_os = "none"))]
fn main() {
    println!(
        "bench is a bare-metal guest for x86_64-unknown-none or aarch64-unknown-none; run it with `cargo xtask bench qemu`"
    );
}
