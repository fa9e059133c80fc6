//! Async echo guest: the echo service of `examples/echo.rs` (port 1234, every byte sent
//! back until the peer closes) written as one async task per connection over
//! `vsock_guest::io::AsyncStream` (feature `async`), on the small executor of
//! `boot::executor`. Needs `--features async`.
//!
//! The main loop accepts connections and spawns their tasks, runs the tasks that are
//! ready, and otherwise waits as `boot::wait` does: it halts until the device interrupts
//! or a deadline (`wait=irq`, the default) or spins (`wait=poll`). Each `poll` of the
//! driver wakes exactly the tasks whose socket became ready (`register_recv_waker`,
//! `register_send_waker`), so a halt ends with the tasks that have work marked ready.
//!
//! Command line: `port=<n>`, `wait=irq|poll`, `spin=<µs>`, `spin_max=<µs>`,
//! `spin_sending=<µs>`, `log=<level>` and the driver's `Config` words (`boot::config`).
//! No source service, no idle timeout.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod boot;

#[cfg(target_os = "none")]
boot::entry!(main);

#[cfg(target_os = "none")]
mod server {
    /// Port the echo service listens on unless `port=` says otherwise.
    const DEFAULT_PORT: u32 = 1234;
    /// Tasks (connections served at once); more wait in the listen backlog.
    const TASKS: usize = 64;
    /// Socket slots: the listener, the tasks' connections and room for closing ones.
    const SOCKETS: usize = 80;
    /// Receive buffer per socket.
    const RX_PER_SOCKET: usize = 64 * 1024;
    /// Connections waiting to be accepted.
    const BACKLOG: usize = 32;
    /// Bytes each task reads at a time (in the task's future, so on the stack of the
    /// main loop, 64 times).
    const CHUNK: usize = 1024;

    use crate::boot;
    use crate::boot::executor::Executor;
    use crate::boot::wait::Waiter;
    use core::pin::pin;
    use embedded_io_async::{Read, Write};
    use log::{debug, error, info, warn};
    use spin::Mutex;
    use vsock_guest::io::AsyncStream;
    use vsock_guest::{Error, SocketHandle, SocketSlot, VsockAddr, VsockDevice, VMADDR_CID_ANY};

    type Device =
        VsockDevice<'static, boot::hal::BootHal, virtio_drivers::transport::SomeTransport<'static>>;

    static SLOTS: Mutex<[SocketSlot; SOCKETS]> = Mutex::new([SocketSlot::EMPTY; SOCKETS]);
    static RX_MEMORY: Mutex<[u8; SOCKETS * RX_PER_SOCKET]> =
        Mutex::new([0; SOCKETS * RX_PER_SOCKET]);

    /// One connection: echo until end of stream or an error, then close.
    async fn serve(device: &Mutex<Device>, handle: SocketHandle, peer: VsockAddr) {
        let mut stream = AsyncStream::new(device, handle);
        let mut buffer = [0u8; CHUNK];
        let mut echoed = 0u64;
        let result = loop {
            match stream.read(&mut buffer).await {
                Ok(0) => break Ok(()),
                Ok(n) => match stream.write_all(&buffer[..n]).await {
                    Ok(()) => echoed += n as u64,
                    Err(e) => break Err(e),
                },
                Err(e) => break Err(e),
            }
        };
        match result {
            Ok(()) => debug!(
                "async_echo: {}:{} closed after {echoed} bytes",
                peer.cid, peer.port
            ),
            Err(e) => warn!(
                "async_echo: {}:{} ended after {echoed} bytes: {e}",
                peer.cid, peer.port
            ),
        }
        if let Err(e) = device.lock().close(handle) {
            warn!("async_echo: close failed: {e}");
        }
    }

    pub fn run(info: &boot::BootInfo) -> ! {
        let port = info
            .cmdline_value("port")
            .and_then(|p| p.parse().ok())
            .unwrap_or(DEFAULT_PORT);
        let Some(transport) = boot::virtio::find_vsock() else {
            error!("async_echo: no virtio socket device");
            boot::exit_failure();
        };
        let mut config = boot::config::from_cmdline(info);
        boot::config::log_if_changed("async_echo", &config);
        let mut waiter = Waiter::new("async_echo", info, &mut config);
        let slots = spin::MutexGuard::leak(SLOTS.lock());
        let rx_memory = spin::MutexGuard::leak(RX_MEMORY.lock());
        let device: Device = match VsockDevice::new(transport, config, slots, rx_memory) {
            Ok(device) => device,
            Err(e) => {
                error!("async_echo: device bring-up failed: {e}");
                boot::exit_failure();
            }
        };
        let device = Mutex::new(device);
        let listener = {
            let mut device = device.lock();
            let listener = device.stream_socket().and_then(|listener| {
                device.bind(listener, VsockAddr::new(VMADDR_CID_ANY, port))?;
                device.listen(listener, BACKLOG)?;
                Ok(listener)
            });
            match listener {
                Ok(listener) => listener,
                Err(e) => {
                    error!("async_echo: cannot listen on port {port}: {e}");
                    boot::exit_failure();
                }
            }
        };
        info!("async_echo: guest cid {}", device.lock().local_cid());
        info!("async_echo: {TASKS} tasks, one per connection");
        info!("async_echo: listening on port {port}");

        let mut executor = pin!(Executor::<_, TASKS>::new());
        loop {
            waiter.poll(&mut device.lock());
            let mut moved = false;
            while executor.has_room() {
                let accepted = device.lock().accept(listener);
                match accepted {
                    Ok((handle, peer)) => {
                        debug!("async_echo: connection from {}:{}", peer.cid, peer.port);
                        if executor
                            .as_mut()
                            .spawn(serve(&device, handle, peer))
                            .is_err()
                        {
                            warn!("async_echo: no task slot");
                        }
                        moved = true;
                    }
                    Err(Error::WouldBlock) => break,
                    Err(e) => {
                        warn!("async_echo: accept failed: {e}");
                        break;
                    }
                }
            }
            while executor.any_ready() {
                moved |= executor.as_mut().run_ready() > 0;
            }
            waiter.idle(&mut device.lock(), moved, None);
        }
    }
}

#[cfg(target_os = "none")]
fn main(info: &boot::BootInfo) -> ! {
    server::run(info)
}

#[cfg(not(target_os = "none"))]
fn main() {
    println!("async_echo is a bare-metal guest for x86_64-unknown-none (feature async); run it with `cargo xtask test --vm-only --only async`");
}
