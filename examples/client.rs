//! Client guest: connects to a vsock peer, sends `hello from <our cid>\n`, reads one line
//! back, prints it, shuts its side down and waits for the peer's end of stream (so that
//! the peer has seen ours before QEMU stops), closes, and exits QEMU with status 33
//! (`boot::exit_success`); any error or timeout exits with 35.
//!
//! The peer is the host (CID 2) port 4321 unless the kernel command line says otherwise:
//! `-append "cid=3 port=1234"` talks to the echo example in a sibling guest. It waits for
//! the device as `wait=irq|poll` says (halted until an interrupt or a deadline by
//! default; `boot::wait`), and logs the waiter's counts at the end.
//!
//! With `bulk=<bytes>`, the client then sends that many bytes of a pattern on the same
//! connection while it reads them back from an echoing peer, checks every byte, and logs
//! `client: bulk <bytes> bytes each way byte-exact ...` with the rate; this runs the
//! driver's non-blocking `send` and `recv` in one polling loop, since an echo of more
//! than the peer's window cannot be written first and read afterwards. The driver's
//! `Config` words of `boot::config` (`rx=`, `tx=`, ...) apply too: a Linux sibling needs
//! `rx=65580` (README, "Linux siblings").
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod boot;

#[cfg(target_os = "none")]
boot::entry!(main);

#[cfg(target_os = "none")]
mod client {
    use crate::boot;
    use boot::wait::{now, Waiter};
    use core::fmt::Write as _;
    use core::time::Duration;
    use log::{error, info};
    use spin::Mutex;
    use virtio_drivers::transport::SomeTransport;
    use vsock_guest::{
        Config, Error, Readiness, Shutdown, SocketHandle, SocketSlot, VsockAddr, VsockDevice,
        VMADDR_CID_HOST,
    };

    /// Default peer port.
    const DEFAULT_PORT: u32 = 4321;
    /// Socket slots: one connection, with room to spare.
    const SOCKETS: usize = 4;
    /// Receive buffer per socket.
    const RX_PER_SOCKET: usize = 16 * 1024;
    /// How long the whole exchange may take once connected.
    const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
    /// Time the host's vhost-user backend gets to set up our queues.
    const BACKEND_SETTLE_MICROS: u64 = 300_000;
    /// Connect attempts when the peer does not answer in time.
    const CONNECT_ATTEMPTS: u32 = 3;
    /// Longest line accepted back.
    const MAX_LINE: usize = 256;
    /// How long the bulk exchange may go without a byte sent or received.
    const BULK_STALL: Duration = Duration::from_secs(20);
    /// Bytes of the bulk pattern prepared per `send`.
    const BULK_CHUNK: usize = 16 * 1024;
    /// How long the client waits for the peer's end of stream after its own.
    const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

    static SLOTS: Mutex<[SocketSlot; SOCKETS]> = Mutex::new([SocketSlot::EMPTY; SOCKETS]);
    static RX_MEMORY: Mutex<[u8; SOCKETS * RX_PER_SOCKET]> =
        Mutex::new([0; SOCKETS * RX_PER_SOCKET]);

    fn number(info: &boot::BootInfo, key: &str, default: u32) -> u32 {
        info.cmdline_value(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    pub fn run(info: &boot::BootInfo) -> ! {
        let peer = VsockAddr::new(
            number(info, "cid", VMADDR_CID_HOST),
            number(info, "port", DEFAULT_PORT),
        );
        let mut config = boot::config::from_cmdline(info);
        boot::config::log_if_changed("client", &config);
        let bulk = info.cmdline_value("bulk").and_then(|v| v.parse().ok());
        let Some(transport) = boot::virtio::find_vsock() else {
            error!("client: {}", Error::NoDevice);
            boot::exit_failure()
        };
        let mut waiter = Waiter::new("client", info, &mut config);
        let result = exchange(transport, peer, config, bulk, &mut waiter);
        waiter.report();
        match result {
            Ok(()) => boot::exit_success(),
            Err(e) => {
                error!("client: {e}");
                boot::exit_failure()
            }
        }
    }

    /// Connects a new socket to `peer`, waiting until the connect finishes or fails (after
    /// at most the connect timeout).
    fn connect<H: virtio_drivers::Hal, T: virtio_drivers::transport::Transport>(
        device: &mut VsockDevice<'_, H, T>,
        peer: VsockAddr,
        waiter: &mut Waiter,
    ) -> Result<SocketHandle, Error> {
        let socket = device.stream_socket()?;
        match device.connect(socket, peer) {
            Ok(()) | Err(Error::InProgress) => {}
            Err(e) => return Err(e),
        }
        loop {
            waiter.poll(device);
            if let Some(e) = device.take_error(socket)? {
                device.close(socket)?;
                return Err(e);
            }
            if device.readiness(socket)?.contains(Readiness::WRITABLE) {
                return Ok(socket);
            }
            waiter.idle(device, false, None);
        }
    }

    fn exchange(
        transport: SomeTransport<'static>,
        peer: VsockAddr,
        config: Config,
        bulk: Option<u64>,
        waiter: &mut Waiter,
    ) -> Result<(), Error> {
        let slots = spin::MutexGuard::leak(SLOTS.lock());
        let rx_memory = spin::MutexGuard::leak(RX_MEMORY.lock());
        let mut device =
            VsockDevice::<boot::hal::BootHal, _>::new(transport, config, slots, rx_memory)?;
        let cid = device.local_cid();
        // QEMU hands the queues to vhost-user backends without waiting for them to take
        // them; a notification that reaches vhost-device-vsock 0.3.0 before that stops its
        // worker for good (see the README's quirks). Give it a moment before the first
        // packet.
        boot::time::delay_micros(BACKEND_SETTLE_MICROS);
        info!("client: guest cid {cid}, connecting to {peer}");

        let mut attempt = 1;
        let socket = loop {
            match connect(&mut device, peer, waiter) {
                Err(Error::TimedOut) if attempt < CONNECT_ATTEMPTS => {
                    info!("client: no answer from {peer}; trying again");
                    attempt += 1;
                }
                result => break result?,
            }
        };
        let local = device.local_addr(socket)?;
        info!("client: connected from port {} to {peer}", local.port);

        let deadline = now() + EXCHANGE_TIMEOUT;
        let mut hello: heapless::String<64> = heapless::String::new();
        // 64 bytes hold "hello from " and any u32.
        let _ = writeln!(hello, "hello from {cid}");
        let mut written = 0;
        while written < hello.len() {
            waiter.poll(&mut device);
            match device.send(socket, &hello.as_bytes()[written..]) {
                Ok(n) => written += n,
                Err(Error::WouldBlock) if now() < deadline => {
                    waiter.idle(&mut device, false, Some(deadline))
                }
                Err(Error::WouldBlock) => return Err(Error::TimedOut),
                Err(e) => return Err(e),
            }
        }

        let mut line = [0u8; MAX_LINE];
        let mut len = 0;
        loop {
            let Some(free) = line.get_mut(len..len + 1) else {
                error!("client: reply longer than {MAX_LINE} bytes");
                return Err(Error::NoBufferSpace);
            };
            match device.recv(socket, free) {
                Ok(0) => return Err(Error::ConnectionReset),
                Ok(_) if line[len] == b'\n' => break,
                Ok(_) => len += 1,
                Err(Error::WouldBlock) if now() < deadline => {
                    waiter.idle(&mut device, false, Some(deadline));
                    waiter.poll(&mut device);
                }
                Err(Error::WouldBlock) => return Err(Error::TimedOut),
                Err(e) => return Err(e),
            }
        }
        let reply = core::str::from_utf8(&line[..len]).unwrap_or("<not UTF-8>");
        info!("client: got back {reply:?}");
        if let Some(total) = bulk {
            bulk_echo(&mut device, socket, total, waiter)?;
        }
        finish(&mut device, socket, waiter)
    }

    /// Ends the connection as a careful peer does before it goes away: shuts its sending
    /// side down, waits (up to [`FINISH_TIMEOUT`]) for the peer's end of stream, then
    /// closes (at once when the peer has closed already, as a host listener does after
    /// its reply). QEMU stops the moment the guest exits, so a SHUTDOWN still on its way
    /// through the backend when that happens is lost, and the peer would never learn that
    /// we are gone; the peer's answer shows ours arrived.
    fn finish<H: virtio_drivers::Hal, T: virtio_drivers::transport::Transport>(
        device: &mut VsockDevice<'_, H, T>,
        socket: SocketHandle,
        waiter: &mut Waiter,
    ) -> Result<(), Error> {
        match device.shutdown(socket, Shutdown::Write) {
            Ok(()) => {}
            // The peer closed the connection first: nothing to wait for.
            Err(Error::NotConnected | Error::ConnectionReset) => return device.close(socket),
            Err(e) => return Err(e),
        }
        let deadline = now() + FINISH_TIMEOUT;
        let mut rest = [0u8; 256];
        loop {
            waiter.poll(device);
            match device.recv(socket, &mut rest) {
                Ok(0) | Err(Error::ConnectionReset) => break,
                Ok(n) => info!("client: {n} more bytes after our shutdown"),
                Err(Error::WouldBlock) if now() < deadline => {
                    waiter.idle(device, false, Some(deadline))
                }
                Err(Error::WouldBlock) => {
                    info!("client: the peer did not close within {FINISH_TIMEOUT:?}");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        device.close(socket)
    }

    /// Byte `offset` of the bulk pattern: it depends on the position, so a lost, repeated
    /// or reordered chunk shows.
    fn bulk_byte(offset: u64) -> u8 {
        (offset as u8).wrapping_mul(7) ^ ((offset >> 9) as u8) ^ ((offset >> 17) as u8)
    }

    /// Sends `total` pattern bytes on `socket` while reading the echo back and checking
    /// it; fails with `TimedOut` when nothing moves for [`BULK_STALL`].
    fn bulk_echo<H: virtio_drivers::Hal, T: virtio_drivers::transport::Transport>(
        device: &mut VsockDevice<'_, H, T>,
        socket: SocketHandle,
        total: u64,
        waiter: &mut Waiter,
    ) -> Result<(), Error> {
        let started = now();
        let mut last_progress = started;
        let (mut sent, mut received) = (0u64, 0u64);
        let mut chunk = [0u8; BULK_CHUNK];
        while received < total {
            waiter.poll(device);
            let mut moved = false;
            if sent < total {
                let n = (total - sent).min(BULK_CHUNK as u64) as usize;
                for (i, byte) in chunk[..n].iter_mut().enumerate() {
                    *byte = bulk_byte(sent + i as u64);
                }
                match device.send(socket, &chunk[..n]) {
                    Ok(taken) => {
                        sent += taken as u64;
                        moved |= taken > 0;
                    }
                    Err(Error::WouldBlock) => {}
                    Err(e) => {
                        error!(
                            "client: bulk send failed after {sent} bytes sent, {received} received"
                        );
                        return Err(e);
                    }
                }
            }
            match device.recv(socket, &mut chunk) {
                Ok(0) => {
                    error!("client: the peer closed after echoing {received} of {total} bytes");
                    return Err(Error::ConnectionReset);
                }
                Ok(n) => {
                    for (i, &byte) in chunk[..n].iter().enumerate() {
                        let at = received + i as u64;
                        if byte != bulk_byte(at) {
                            error!(
                                "client: bulk byte {at} differs: got {byte:#04x}, expected {:#04x}",
                                bulk_byte(at)
                            );
                            return Err(Error::InvalidArgument);
                        }
                    }
                    received += n as u64;
                    moved = true;
                }
                Err(Error::WouldBlock) => {}
                Err(e) => {
                    error!("client: bulk recv failed after {sent} bytes sent, {received} received");
                    return Err(e);
                }
            }
            let at = now();
            if moved {
                last_progress = at;
            } else if at - last_progress > BULK_STALL {
                error!("client: bulk stalled: {sent} of {total} bytes sent, {received} received");
                return Err(Error::TimedOut);
            }
            waiter.idle(device, moved, Some(last_progress + BULK_STALL));
        }
        let micros = (now() - started).as_micros().max(1);
        info!(
            "client: bulk {total} bytes each way byte-exact in {} ms, {} KB/s each way",
            micros / 1000,
            u128::from(total) * 1000 / micros
        );
        Ok(())
    }
}

#[cfg(target_os = "none")]
fn main(info: &boot::BootInfo) -> ! {
    client::run(info)
}

#[cfg(not(target_os = "none"))]
fn main() {
    println!(
        "client is a bare-metal guest for x86_64-unknown-none or aarch64-unknown-none; run it with `cargo xtask test`"
    );
}
