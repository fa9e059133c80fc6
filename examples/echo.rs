//! Echo server guest: listens on vsock port 1234 and sends every byte it receives back on
//! the same connection, until the peer closes it. It serves many connections at once and
//! one after another, until QEMU is stopped.
//!
//! A second service on port 1235 (the "source") is for flow-control tests: the peer
//! writes a decimal byte count and a newline, and the guest sends that many bytes of a
//! fixed pattern (byte `i` is `source_byte(i)`), then closes. When it is done it logs how
//! many times `send` had to wait for the peer (`send blocked K times`).
//!
//! Boot it with `cargo xtask demo`, or by hand as the README shows. Command-line options:
//! `port=<n>` (default 1234; the source is on the next port), `idle=<seconds>` (abort a
//! connection that moved no byte either way for that long; default 0, never),
//! `log=<level>`, `wait=irq|poll`, `spin=<µs>`, `spin_max=<µs>` and `spin_sending=<µs>`
//! (how it waits for work: halted until the device interrupts or a deadline, the
//! default, or spinning; `boot::wait`), and the driver's `Config` words of
//! `boot::config` (`rx=`, `tx=`, ...; e.g. `rx=65580` to serve a Linux sibling: README,
//! "Linux siblings").
//!
//! The idle timeout is for peers that can vanish without a word: vhost-device-vsock
//! 0.3.0 never tells the guest when a host client closes with unread data (its read
//! fails with ECONNRESET, and it drops the connection from its event loop), so such a
//! connection would hold its place here for good.
//!
//! Each connection's start and end are logged at `debug` (`log=debug` shows them; an
//! error ending a connection is a warning at every level): at `info`, two lines per
//! connection capped the connections a second at about 50 under Cloud Hypervisor, where
//! every byte to the serial port is an exit to the VMM.
//!
//! Memory (all static, no heap): `SOCKETS` socket slots with `RX_PER_SOCKET` bytes of
//! receive buffer each, and one `CONNECTION_BUFFER`-byte buffer per connection for bytes
//! read but not yet sent back. When the peer stops reading, the guest keeps those bytes
//! and stops reading from that connection until they are sent (backpressure), so no byte
//! is dropped and the peer's credit stops it from sending more.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod boot;

#[cfg(target_os = "none")]
boot::entry!(main);

#[cfg(target_os = "none")]
mod server {
    /// Port the echo service listens on unless `port=` says otherwise.
    const DEFAULT_PORT: u32 = 1234;
    /// Socket slots: two listeners, [`MAX_CONNECTIONS`] connections, and room for
    /// connections that finish closing in the background.
    const SOCKETS: usize = 80;
    /// Connections served at the same time; more wait in the listen backlog.
    const MAX_CONNECTIONS: usize = 64;
    /// Receive buffer per socket (what each connection advertises as `buf_alloc`).
    const RX_PER_SOCKET: usize = 64 * 1024;
    /// Bytes each connection may hold between receiving them and sending them back.
    const CONNECTION_BUFFER: usize = 16 * 1024;
    /// Connections waiting to be accepted, per listener.
    const BACKLOG: usize = 32;
    /// Longest byte-count line the source accepts.
    const MAX_REQUEST: usize = 24;

    use crate::boot;
    use core::time::Duration;
    use log::{debug, error, info, warn};
    use spin::Mutex;
    use vsock_guest::{
        Error, Instant, SocketHandle, SocketSlot, VsockAddr, VsockDevice, VMADDR_CID_ANY,
    };

    type Device =
        VsockDevice<'static, boot::hal::BootHal, virtio_drivers::transport::SomeTransport<'static>>;

    static SLOTS: Mutex<[SocketSlot; SOCKETS]> = Mutex::new([SocketSlot::EMPTY; SOCKETS]);
    static RX_MEMORY: Mutex<[u8; SOCKETS * RX_PER_SOCKET]> =
        Mutex::new([0; SOCKETS * RX_PER_SOCKET]);
    static BUFFERS: Mutex<[[u8; CONNECTION_BUFFER]; MAX_CONNECTIONS]> =
        Mutex::new([[0; CONNECTION_BUFFER]; MAX_CONNECTIONS]);

    /// Byte `offset` of what the source sends: position-dependent, so a lost, repeated or
    /// reordered chunk shows.
    pub fn source_byte(offset: u64) -> u8 {
        (offset as u8)
            ^ ((offset >> 8) as u8).wrapping_mul(31)
            ^ ((offset >> 16) as u8).wrapping_mul(7)
    }

    /// What a connection is doing.
    #[derive(Clone, Copy)]
    enum Service {
        /// Sending back what arrives.
        Echo,
        /// Reading the byte count, `buffer[..len]` so far.
        SourceRequest,
        /// Sending `total` pattern bytes; `blocked` counts the times `send` had to wait.
        Source {
            total: u64,
            blocked: u32,
            stalled: bool,
        },
    }

    /// One served connection: bytes `buffer[start..start + len]` still have to be sent
    /// (for `SourceRequest`, `buffer[..len]` is the request so far).
    #[derive(Clone, Copy)]
    struct Connection {
        handle: SocketHandle,
        peer: VsockAddr,
        service: Service,
        start: usize,
        len: usize,
        /// Bytes sent so far.
        sent: u64,
        /// Bytes received so far.
        received: u64,
        /// When a byte last moved either way.
        last_progress: Instant,
    }

    fn now() -> Instant {
        Instant::from_micros(boot::time::now_micros())
    }

    fn listen(device: &mut Device, port: u32) -> SocketHandle {
        let listener = device.stream_socket().and_then(|listener| {
            device.bind(listener, VsockAddr::new(VMADDR_CID_ANY, port))?;
            device.listen(listener, BACKLOG)?;
            Ok(listener)
        });
        match listener {
            Ok(listener) => listener,
            Err(e) => {
                error!("echo: cannot listen on port {port}: {e}");
                boot::exit_failure();
            }
        }
    }

    pub fn run(info: &boot::BootInfo) -> ! {
        let port = info
            .cmdline_value("port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_PORT);
        let idle_limit = info
            .cmdline_value("idle")
            .and_then(|s| s.parse().ok())
            .filter(|&seconds| seconds > 0)
            .map(Duration::from_secs);
        let Some(transport) = boot::virtio::find_vsock() else {
            error!("echo: no virtio socket device");
            boot::exit_failure();
        };
        let slots = spin::MutexGuard::leak(SLOTS.lock());
        let rx_memory = spin::MutexGuard::leak(RX_MEMORY.lock());
        let buffers = spin::MutexGuard::leak(BUFFERS.lock());
        let mut config = boot::config::from_cmdline(info);
        boot::config::log_if_changed("echo", &config);
        let mut waiter = boot::wait::Waiter::new("echo", info, &mut config);
        let mut device: Device = match VsockDevice::new(transport, config, slots, rx_memory) {
            Ok(device) => device,
            Err(e) => {
                error!("echo: device bring-up failed: {e}");
                boot::exit_failure();
            }
        };
        let source_port = port.wrapping_add(1);
        let echo_listener = listen(&mut device, port);
        let source_listener = listen(&mut device, source_port);
        info!("echo: guest cid {}", device.local_cid());
        info!("echo: source on port {source_port}");
        info!("echo: listening on port {port}");

        let mut connections: [Option<Connection>; MAX_CONNECTIONS] = [None; MAX_CONNECTIONS];
        loop {
            waiter.poll(&mut device);
            let mut moved = accept_all(&mut device, echo_listener, Service::Echo, &mut connections);
            moved |= accept_all(
                &mut device,
                source_listener,
                Service::SourceRequest,
                &mut connections,
            );
            let now = now();
            // The earliest idle timeout of a connection, when the loop must look again.
            let mut deadline: Option<Instant> = None;
            for (slot, buffer) in connections.iter_mut().zip(buffers.iter_mut()) {
                if let Some(connection) = slot {
                    let moved_before = (connection.sent, connection.received);
                    let mut open = match connection.service {
                        Service::Echo => serve_echo(&mut device, connection, buffer),
                        _ => serve_source(&mut device, connection, buffer),
                    };
                    if moved_before != (connection.sent, connection.received) {
                        connection.last_progress = now;
                        moved = true;
                    } else if open
                        && idle_limit.is_some_and(|limit| now >= connection.last_progress + limit)
                    {
                        warn!(
                            "echo: {}:{} moved nothing for {} s; aborting it",
                            connection.peer.cid,
                            connection.peer.port,
                            idle_limit.map_or(0, |l| l.as_secs())
                        );
                        if let Err(e) = device.abort(connection.handle) {
                            warn!("echo: abort failed: {e}");
                        }
                        open = false;
                    }
                    if !open {
                        *slot = None;
                        moved = true;
                    } else if let Some(limit) = idle_limit {
                        let at = connection.last_progress + limit;
                        deadline = Some(deadline.map_or(at, |d| d.min(at)));
                    }
                }
            }
            waiter.idle(&mut device, moved, deadline);
        }
    }

    /// Takes every waiting connection of `listener` while there is room to serve it;
    /// whether it took one.
    fn accept_all(
        device: &mut Device,
        listener: SocketHandle,
        service: Service,
        connections: &mut [Option<Connection>],
    ) -> bool {
        let mut took = false;
        while let Some(free) = connections.iter_mut().find(|c| c.is_none()) {
            match device.accept(listener) {
                Ok((handle, peer)) => {
                    debug!("echo: connection from {}:{}", peer.cid, peer.port);
                    *free = Some(Connection {
                        handle,
                        peer,
                        service,
                        start: 0,
                        len: 0,
                        sent: 0,
                        received: 0,
                        last_progress: now(),
                    });
                    took = true;
                }
                Err(Error::WouldBlock) => return took,
                Err(e) => {
                    warn!("echo: accept failed: {e}");
                    return took;
                }
            }
        }
        took
    }

    /// Sends what `buffer[start..start + len]` holds; `Ok(true)` when all of it went,
    /// `Ok(false)` when the peer has no room for more yet.
    fn flush(
        device: &mut Device,
        connection: &mut Connection,
        buffer: &[u8; CONNECTION_BUFFER],
    ) -> Result<bool, Error> {
        while connection.len > 0 {
            let pending = &buffer[connection.start..connection.start + connection.len];
            match device.send(connection.handle, pending) {
                Ok(sent) => {
                    connection.start += sent;
                    connection.len -= sent;
                    connection.sent += sent as u64;
                }
                Err(Error::WouldBlock) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Moves one echo connection forward; returns `false` once it is closed.
    fn serve_echo(
        device: &mut Device,
        connection: &mut Connection,
        buffer: &mut [u8; CONNECTION_BUFFER],
    ) -> bool {
        loop {
            // Send back what we hold before reading more (backpressure).
            match flush(device, connection, buffer) {
                Ok(true) => {}
                Ok(false) => return true,
                Err(e) => return finish(device, connection, Some(e)),
            }
            match device.recv(connection.handle, buffer) {
                Ok(0) => return finish(device, connection, None),
                Ok(received) => {
                    connection.start = 0;
                    connection.len = received;
                    connection.received += received as u64;
                }
                Err(Error::WouldBlock) => return true,
                Err(e) => return finish(device, connection, Some(e)),
            }
        }
    }

    /// Moves one source connection forward; returns `false` once it is closed.
    fn serve_source(
        device: &mut Device,
        connection: &mut Connection,
        buffer: &mut [u8; CONNECTION_BUFFER],
    ) -> bool {
        if let Service::SourceRequest = connection.service {
            match read_request(device, connection, buffer) {
                Ok(Some(total)) => {
                    connection.service = Service::Source {
                        total,
                        blocked: 0,
                        stalled: false,
                    };
                    connection.start = 0;
                    connection.len = 0;
                }
                Ok(None) => return true,
                Err(e) => return finish(device, connection, Some(e)),
            }
        }
        let Service::Source {
            total,
            mut blocked,
            mut stalled,
        } = connection.service
        else {
            return true;
        };
        let result = loop {
            match flush(device, connection, buffer) {
                Ok(true) => stalled = false,
                Ok(false) => {
                    if !stalled {
                        blocked += 1;
                        stalled = true;
                    }
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
            if connection.sent == total {
                break Ok(());
            }
            let chunk = (total - connection.sent).min(CONNECTION_BUFFER as u64) as usize;
            for (i, byte) in buffer[..chunk].iter_mut().enumerate() {
                *byte = source_byte(connection.sent + i as u64);
            }
            connection.start = 0;
            connection.len = chunk;
        };
        connection.service = Service::Source {
            total,
            blocked,
            stalled,
        };
        match result {
            Err(e) => finish(device, connection, Some(e)),
            Ok(()) if connection.sent == total => {
                info!(
                    "echo: source sent {total} bytes to {}:{}, send blocked {blocked} times",
                    connection.peer.cid, connection.peer.port
                );
                finish(device, connection, None)
            }
            Ok(()) => true,
        }
    }

    /// Reads the source's request line into `buffer[..len]`; the byte count once the line
    /// is complete.
    fn read_request(
        device: &mut Device,
        connection: &mut Connection,
        buffer: &mut [u8; CONNECTION_BUFFER],
    ) -> Result<Option<u64>, Error> {
        loop {
            let Some(next) = buffer.get_mut(connection.len..connection.len + 1) else {
                return Err(Error::InvalidArgument);
            };
            match device.recv(connection.handle, next) {
                Ok(0) => return Err(Error::ConnectionReset),
                Ok(_) if buffer[connection.len] == b'\n' => break,
                Ok(_) if connection.len + 1 >= MAX_REQUEST => return Err(Error::InvalidArgument),
                Ok(_) => connection.len += 1,
                Err(Error::WouldBlock) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        core::str::from_utf8(&buffer[..connection.len])
            .ok()
            .and_then(|line| line.trim().parse().ok())
            .map(Some)
            .ok_or(Error::InvalidArgument)
    }

    fn finish(device: &mut Device, connection: &Connection, error: Option<Error>) -> bool {
        match error {
            None => debug!(
                "echo: {}:{} closed after {} bytes",
                connection.peer.cid, connection.peer.port, connection.sent
            ),
            Some(e) => warn!(
                "echo: {}:{} ended after {} bytes: {e}",
                connection.peer.cid, connection.peer.port, connection.sent
            ),
        }
        if let Err(e) = device.close(connection.handle) {
            warn!("echo: close failed: {e}");
        }
        false
    }
}

#[cfg(target_os = "none")]
fn main(info: &boot::BootInfo) -> ! {
    server::run(info)
}

#[cfg(not(target_os = "none"))]
fn main() {
    println!("echo is a bare-metal guest for x86_64-unknown-none or aarch64-unknown-none; run it with `cargo xtask demo`");
}
