//! Client guest: connects to a vsock peer, sends `hello from <our cid>\n`, reads one line
//! back, prints it, and exits QEMU with status 33 (`boot::exit_success`); any error or
//! timeout exits with 35.
//!
//! The peer is the host (CID 2) port 4321 unless the kernel command line says otherwise:
//! `-append "cid=3 port=1234"` talks to the echo example in a sibling guest. It uses the
//! blocking `embedded-io` adapter (`vsock_guest::io::BlockingStream`) for the exchange.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod boot;

#[cfg(target_os = "none")]
boot::entry!(main);

#[cfg(target_os = "none")]
mod client {
    use crate::boot;
    use core::fmt::Write as _;
    use core::time::Duration;
    use embedded_io::{Read, Write};
    use log::{error, info};
    use spin::Mutex;
    use vsock_guest::io::BlockingStream;
    use vsock_guest::{
        Config, Error, Instant, Readiness, SocketHandle, SocketSlot, VsockAddr, VsockDevice,
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

    static SLOTS: Mutex<[SocketSlot; SOCKETS]> = Mutex::new([SocketSlot::EMPTY; SOCKETS]);
    static RX_MEMORY: Mutex<[u8; SOCKETS * RX_PER_SOCKET]> =
        Mutex::new([0; SOCKETS * RX_PER_SOCKET]);

    fn now() -> Instant {
        Instant::from_micros(boot::time::now_micros())
    }

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
        match exchange(peer) {
            Ok(()) => boot::exit_success(),
            Err(e) => {
                error!("client: {e}");
                boot::exit_failure()
            }
        }
    }

    /// Connects a new socket to `peer`, polling until the connect finishes or fails (after
    /// at most the connect timeout).
    fn connect<H: virtio_drivers::Hal, T: virtio_drivers::transport::Transport>(
        device: &mut VsockDevice<'_, H, T>,
        peer: VsockAddr,
    ) -> Result<SocketHandle, Error> {
        let socket = device.stream_socket()?;
        match device.connect(socket, peer) {
            Ok(()) | Err(Error::InProgress) => {}
            Err(e) => return Err(e),
        }
        loop {
            device.poll(now());
            if let Some(e) = device.take_error(socket)? {
                device.close(socket)?;
                return Err(e);
            }
            if device.readiness(socket)?.contains(Readiness::WRITABLE) {
                return Ok(socket);
            }
            core::hint::spin_loop();
        }
    }

    fn exchange(peer: VsockAddr) -> Result<(), Error> {
        let transport = boot::virtio::find_vsock().ok_or(Error::NoDevice)?;
        let slots = spin::MutexGuard::leak(SLOTS.lock());
        let rx_memory = spin::MutexGuard::leak(RX_MEMORY.lock());
        let mut device = VsockDevice::<boot::hal::BootHal, _>::new(
            transport,
            Config::default(),
            slots,
            rx_memory,
        )?;
        let cid = device.local_cid();
        // QEMU hands the queues to vhost-user backends without waiting for them to take
        // them; a notification that reaches vhost-device-vsock 0.3.0 before that stops its
        // worker for good (see the README's quirks). Give it a moment before the first
        // packet.
        boot::time::delay_micros(BACKEND_SETTLE_MICROS);
        info!("client: guest cid {cid}, connecting to {peer}");

        let mut attempt = 1;
        let socket = loop {
            match connect(&mut device, peer) {
                Err(Error::TimedOut) if attempt < CONNECT_ATTEMPTS => {
                    info!("client: no answer from {peer}; trying again");
                    attempt += 1;
                }
                result => break result?,
            }
        };
        let local = device.local_addr(socket)?;
        info!("client: connected from port {} to {peer}", local.port);

        let device = Mutex::new(device);
        let mut stream = BlockingStream::new(&device, socket, now).with_timeout(EXCHANGE_TIMEOUT);
        let mut hello: heapless::String<64> = heapless::String::new();
        // 64 bytes hold "hello from " and any u32.
        let _ = writeln!(hello, "hello from {cid}");
        stream.write_all(hello.as_bytes())?;

        let mut line = [0u8; MAX_LINE];
        let mut len = 0;
        loop {
            let Some(free) = line.get_mut(len..len + 1) else {
                error!("client: reply longer than {MAX_LINE} bytes");
                return Err(Error::NoBufferSpace);
            };
            match stream.read(free)? {
                0 => return Err(Error::ConnectionReset),
                _ if line[len] == b'\n' => break,
                _ => len += 1,
            }
        }
        let reply = core::str::from_utf8(&line[..len]).unwrap_or("<not UTF-8>");
        info!("client: got back {reply:?}");

        device.lock().close(socket)?;
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
        "client is a bare-metal guest for x86_64-unknown-none; run it with `cargo xtask test`"
    );
}
