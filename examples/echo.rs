//! Echo server guest: listens on vsock port 1234 and sends every byte it receives back on
//! the same connection, until the peer closes it. It serves many connections at once and
//! one after another, until QEMU is stopped.
//!
//! Boot it with `cargo xtask demo`, or by hand as the README shows. Command-line options:
//! `port=<n>` (default 1234) and `log=<level>`.
//!
//! Memory (all static, no heap): `SOCKETS` socket slots with `RX_PER_SOCKET` bytes of
//! receive buffer each, and one `ECHO_BUFFER`-byte buffer per connection for bytes read
//! but not yet sent back. When the peer stops reading, the guest keeps those bytes and
//! stops reading from that connection until they are sent (backpressure), so no byte is
//! dropped and the peer's credit stops it from sending more.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod boot;

#[cfg(target_os = "none")]
boot::entry!(main);

#[cfg(target_os = "none")]
mod server {
    /// Port the server listens on unless `port=` says otherwise.
    const DEFAULT_PORT: u32 = 1234;
    /// Socket slots: the listener, [`MAX_CONNECTIONS`] connections, and room for connections
    /// that finish closing in the background.
    const SOCKETS: usize = 80;
    /// Connections served at the same time; more wait in the listen backlog.
    const MAX_CONNECTIONS: usize = 64;
    /// Receive buffer per socket (what each connection advertises as `buf_alloc`).
    const RX_PER_SOCKET: usize = 64 * 1024;
    /// Bytes each connection may hold between receiving them and sending them back.
    const ECHO_BUFFER: usize = 16 * 1024;
    /// Connections waiting to be accepted.
    const BACKLOG: usize = 32;

    use crate::boot;
    use log::{error, info, warn};
    use spin::Mutex;
    use vsock_guest::{
        Config, Error, Instant, SocketHandle, SocketSlot, VsockAddr, VsockDevice, VMADDR_CID_ANY,
    };

    static SLOTS: Mutex<[SocketSlot; SOCKETS]> = Mutex::new([SocketSlot::EMPTY; SOCKETS]);
    static RX_MEMORY: Mutex<[u8; SOCKETS * RX_PER_SOCKET]> =
        Mutex::new([0; SOCKETS * RX_PER_SOCKET]);
    static ECHO_BUFFERS: Mutex<[[u8; ECHO_BUFFER]; MAX_CONNECTIONS]> =
        Mutex::new([[0; ECHO_BUFFER]; MAX_CONNECTIONS]);

    /// One served connection: bytes `buffer[start..start + len]` still have to go back.
    #[derive(Clone, Copy)]
    struct Echo {
        handle: SocketHandle,
        peer: VsockAddr,
        start: usize,
        len: usize,
        echoed: u64,
    }

    fn now() -> Instant {
        Instant::from_micros(boot::time::now_micros())
    }

    pub fn run(info: &boot::BootInfo) -> ! {
        let port = info
            .cmdline_value("port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_PORT);
        let Some(transport) = boot::virtio::find_vsock() else {
            error!("echo: no virtio socket device");
            boot::exit_failure();
        };
        let slots = spin::MutexGuard::leak(SLOTS.lock());
        let rx_memory = spin::MutexGuard::leak(RX_MEMORY.lock());
        let buffers = spin::MutexGuard::leak(ECHO_BUFFERS.lock());
        let mut device = match VsockDevice::<boot::hal::BootHal, _>::new(
            transport,
            Config::default(),
            slots,
            rx_memory,
        ) {
            Ok(device) => device,
            Err(e) => {
                error!("echo: device bring-up failed: {e}");
                boot::exit_failure();
            }
        };
        let listener = match device.stream_socket().and_then(|listener| {
            device.bind(listener, VsockAddr::new(VMADDR_CID_ANY, port))?;
            device.listen(listener, BACKLOG)?;
            Ok(listener)
        }) {
            Ok(listener) => listener,
            Err(e) => {
                error!("echo: cannot listen on port {port}: {e}");
                boot::exit_failure();
            }
        };
        info!("echo: guest cid {}", device.local_cid());
        info!("echo: listening on port {port}");

        let mut echoes: [Option<Echo>; MAX_CONNECTIONS] = [None; MAX_CONNECTIONS];
        loop {
            device.poll(now());
            accept_all(&mut device, listener, &mut echoes);
            for (echo, buffer) in echoes.iter_mut().zip(buffers.iter_mut()) {
                if let Some(state) = echo {
                    if !serve(&mut device, state, buffer) {
                        *echo = None;
                    }
                }
            }
        }
    }

    /// Takes every waiting connection while there is room to serve it.
    fn accept_all<H: virtio_drivers::Hal, T: virtio_drivers::transport::Transport>(
        device: &mut VsockDevice<'_, H, T>,
        listener: SocketHandle,
        echoes: &mut [Option<Echo>],
    ) {
        while let Some(free) = echoes.iter_mut().find(|e| e.is_none()) {
            match device.accept(listener) {
                Ok((handle, peer)) => {
                    info!("echo: connection from {}:{}", peer.cid, peer.port);
                    *free = Some(Echo {
                        handle,
                        peer,
                        start: 0,
                        len: 0,
                        echoed: 0,
                    });
                }
                Err(Error::WouldBlock) => return,
                Err(e) => {
                    warn!("echo: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Moves one connection forward; returns `false` once it is closed.
    fn serve<H: virtio_drivers::Hal, T: virtio_drivers::transport::Transport>(
        device: &mut VsockDevice<'_, H, T>,
        echo: &mut Echo,
        buffer: &mut [u8; ECHO_BUFFER],
    ) -> bool {
        loop {
            // Send back what we hold before reading more (backpressure).
            while echo.len > 0 {
                match device.send(echo.handle, &buffer[echo.start..echo.start + echo.len]) {
                    Ok(sent) => {
                        echo.start += sent;
                        echo.len -= sent;
                        echo.echoed += sent as u64;
                    }
                    Err(Error::WouldBlock) => return true,
                    Err(e) => return finish(device, echo, Some(e)),
                }
            }
            match device.recv(echo.handle, buffer) {
                Ok(0) => return finish(device, echo, None),
                Ok(received) => {
                    echo.start = 0;
                    echo.len = received;
                }
                Err(Error::WouldBlock) => return true,
                Err(e) => return finish(device, echo, Some(e)),
            }
        }
    }

    fn finish<H: virtio_drivers::Hal, T: virtio_drivers::transport::Transport>(
        device: &mut VsockDevice<'_, H, T>,
        echo: &Echo,
        error: Option<Error>,
    ) -> bool {
        match error {
            None => info!(
                "echo: {}:{} closed after {} bytes",
                echo.peer.cid, echo.peer.port, echo.echoed
            ),
            Some(e) => warn!(
                "echo: {}:{} ended after {} bytes: {e}",
                echo.peer.cid, echo.peer.port, echo.echoed
            ),
        }
        if let Err(e) = device.close(echo.handle) {
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
    println!("echo is a bare-metal guest for x86_64-unknown-none; run it with `cargo xtask demo`");
}
