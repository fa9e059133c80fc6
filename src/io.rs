//! [`embedded_io`] adapters over a connected socket, for code that wants `read_exact` and
//! `write_all` instead of polling: [`BlockingStream`], and with the feature `async`
//! `AsyncStream` for `embedded-io-async`.
//!
//! A [`BlockingStream`] shares the device with the rest of the program through a
//! [`spin::Mutex`] and drives [`VsockDevice::poll`] itself while it waits, taking the lock
//! only for one poll and one call at a time, so other users of the device (other streams,
//! a server loop on another core) keep making progress in between.

use crate::error::Error;
use crate::socket::{Readiness, SocketHandle, VsockDevice};
use crate::time::Instant;
use core::time::Duration;
use spin::Mutex;
use virtio_drivers::transport::Transport;
use virtio_drivers::Hal;

/// A connected stream socket seen as a blocking byte stream.
///
/// `read` waits until at least one byte arrives (`Ok(0)` at end of stream), `write` until
/// at least one byte is taken (into the send buffer), `flush` until all of them went out;
/// all fail with the socket's error, or with
/// [`Error::TimedOut`] once the optional timeout passes without progress. `clock` is the
/// same time source the program passes to `poll`.
///
/// ```
/// # use vsock_guest::{io::BlockingStream, Error, Instant, SocketHandle, VsockDevice};
/// # use virtio_drivers::{transport::Transport, Hal};
/// use embedded_io::{Read, Write};
///
/// fn hello<H: Hal, T: Transport>(
///     device: &spin::Mutex<VsockDevice<'_, H, T>>,
///     connected: SocketHandle,
///     clock: impl Fn() -> Instant,
/// ) -> Result<[u8; 5], Error> {
///     let mut stream = BlockingStream::new(device, connected, clock)
///         .with_timeout(core::time::Duration::from_secs(5));
///     stream.write_all(b"hello")?;
///     let mut reply = [0u8; 5];
///     stream.read_exact(&mut reply).map_err(|e| match e {
///         embedded_io::ReadExactError::UnexpectedEof => Error::ConnectionReset,
///         embedded_io::ReadExactError::Other(e) => e,
///     })?;
///     Ok(reply)
/// }
/// ```
pub struct BlockingStream<'d, 'a, H: Hal, T: Transport, C: Fn() -> Instant> {
    device: &'d Mutex<VsockDevice<'a, H, T>>,
    handle: SocketHandle,
    clock: C,
    timeout: Option<Duration>,
}

impl<'d, 'a, H: Hal, T: Transport, C: Fn() -> Instant> BlockingStream<'d, 'a, H, T, C> {
    /// A blocking view of the connected socket `handle` of `device`, waiting without limit.
    pub fn new(device: &'d Mutex<VsockDevice<'a, H, T>>, handle: SocketHandle, clock: C) -> Self {
        BlockingStream {
            device,
            handle,
            clock,
            timeout: None,
        }
    }

    /// Makes `read` and `write` fail with [`Error::TimedOut`] after waiting `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The socket this stream reads and writes.
    pub fn handle(&self) -> SocketHandle {
        self.handle
    }

    /// Polls and tries `attempt` until it returns something other than `WouldBlock`.
    fn wait_for<R>(
        &mut self,
        mut attempt: impl FnMut(&mut VsockDevice<'a, H, T>, SocketHandle) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let deadline = self.timeout.map(|timeout| (self.clock)() + timeout);
        loop {
            let now = (self.clock)();
            {
                let mut device = self.device.lock();
                device.poll(now);
                match attempt(&mut device, self.handle) {
                    Err(Error::WouldBlock) => {}
                    result => return result,
                }
            }
            if deadline.is_some_and(|deadline| now >= deadline) {
                return Err(Error::TimedOut);
            }
            core::hint::spin_loop();
        }
    }

    /// Polls once and returns the socket's readiness.
    fn readiness(&mut self) -> Result<Readiness, Error> {
        let mut device = self.device.lock();
        device.poll((self.clock)());
        device.readiness(self.handle)
    }
}

impl<H: Hal, T: Transport, C: Fn() -> Instant> embedded_io::ErrorType
    for BlockingStream<'_, '_, H, T, C>
{
    type Error = Error;
}

impl<H: Hal, T: Transport, C: Fn() -> Instant> embedded_io::Read
    for BlockingStream<'_, '_, H, T, C>
{
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.wait_for(|device, handle| device.recv(handle, buf))
    }
}

impl<H: Hal, T: Transport, C: Fn() -> Instant> embedded_io::Write
    for BlockingStream<'_, '_, H, T, C>
{
    fn write(&mut self, buf: &[u8]) -> Result<usize, Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.wait_for(|device, handle| device.send(handle, buf))
    }

    /// Waits until every byte written has gone to the device (bytes the send buffer held
    /// for the peer's credit included), or was dropped because the connection ended (the
    /// next `read` or `write` says why).
    fn flush(&mut self) -> Result<(), Error> {
        self.wait_for(|device, handle| match device.send_queue(handle)? {
            0 => Ok(()),
            _ => Err(Error::WouldBlock),
        })
    }
}

impl<H: Hal, T: Transport, C: Fn() -> Instant> embedded_io::ReadReady
    for BlockingStream<'_, '_, H, T, C>
{
    /// Whether `read` would return without waiting: data, end of stream, or an error.
    fn read_ready(&mut self) -> Result<bool, Error> {
        Ok(self
            .readiness()?
            .intersects(Readiness::READABLE | Readiness::HANG_UP | Readiness::ERROR))
    }
}

impl<H: Hal, T: Transport, C: Fn() -> Instant> embedded_io::WriteReady
    for BlockingStream<'_, '_, H, T, C>
{
    /// Whether `write` would return without waiting: credit and queue space, or an error.
    fn write_ready(&mut self) -> Result<bool, Error> {
        Ok(self
            .readiness()?
            .intersects(Readiness::WRITABLE | Readiness::ERROR))
    }
}

/// A connected stream socket as an [`embedded_io_async`] byte stream (feature `async`).
///
/// `read` resolves once at least one byte arrived (`Ok(0)` at end of stream), `write`
/// once at least one byte was taken (into the send buffer), `flush` once all of them went
/// to the device; each fails with the socket's error. Until then the task waits on the
/// socket's waker ([`VsockDevice::register_recv_waker`]): something else must drive the
/// device, a task or the kernel's main loop that calls [`VsockDevice::poll`] whenever the
/// device interrupts or [`VsockDevice::poll_at`] comes, and wakes exactly the tasks whose
/// socket became ready. The device is shared through a [`spin::Mutex`], held only for
/// one call at a time.
///
/// ```
/// # use vsock_guest::{io::AsyncStream, Error, SocketHandle, VsockDevice};
/// # use virtio_drivers::{transport::Transport, Hal};
/// use embedded_io_async::{Read, Write};
///
/// async fn hello<H: Hal, T: Transport>(
///     device: &spin::Mutex<VsockDevice<'_, H, T>>,
///     connected: SocketHandle,
/// ) -> Result<[u8; 5], Error> {
///     let mut stream = AsyncStream::new(device, connected);
///     stream.write_all(b"hello").await?;
///     let mut reply = [0u8; 5];
///     stream.read_exact(&mut reply).await.map_err(|e| match e {
///         embedded_io::ReadExactError::UnexpectedEof => Error::ConnectionReset,
///         embedded_io::ReadExactError::Other(e) => e,
///     })?;
///     Ok(reply)
/// }
/// ```
#[cfg(feature = "async")]
pub struct AsyncStream<'d, 'a, H: Hal, T: Transport> {
    device: &'d Mutex<VsockDevice<'a, H, T>>,
    handle: SocketHandle,
}

#[cfg(feature = "async")]
impl<'d, 'a, H: Hal, T: Transport> AsyncStream<'d, 'a, H, T> {
    /// An async view of the connected socket `handle` of `device`.
    pub fn new(device: &'d Mutex<VsockDevice<'a, H, T>>, handle: SocketHandle) -> Self {
        AsyncStream { device, handle }
    }

    /// The socket this stream reads and writes.
    pub fn handle(&self) -> SocketHandle {
        self.handle
    }
}

/// `Pending` once the task's waker is registered, or the error that kept it from being.
#[cfg(feature = "async")]
fn pending_on<R>(registered: Result<(), Error>) -> core::task::Poll<Result<R, Error>> {
    match registered {
        Ok(()) => core::task::Poll::Pending,
        Err(e) => core::task::Poll::Ready(Err(e)),
    }
}

#[cfg(feature = "async")]
impl<H: Hal, T: Transport> embedded_io::ErrorType for AsyncStream<'_, '_, H, T> {
    type Error = Error;
}

#[cfg(feature = "async")]
impl<H: Hal, T: Transport> embedded_io_async::Read for AsyncStream<'_, '_, H, T> {
    async fn read(&mut self, buf: &mut [u8]) -> Result<usize, Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        core::future::poll_fn(|cx| {
            let mut device = self.device.lock();
            match device.recv(self.handle, buf) {
                Err(Error::WouldBlock) => {
                    pending_on(device.register_recv_waker(self.handle, cx.waker()))
                }
                result => core::task::Poll::Ready(result),
            }
        })
        .await
    }
}

#[cfg(feature = "async")]
impl<H: Hal, T: Transport> embedded_io_async::Write for AsyncStream<'_, '_, H, T> {
    async fn write(&mut self, buf: &[u8]) -> Result<usize, Error> {
        if buf.is_empty() {
            return Ok(0);
        }
        core::future::poll_fn(|cx| {
            let mut device = self.device.lock();
            match device.send(self.handle, buf) {
                Err(Error::WouldBlock) => {
                    pending_on(device.register_send_waker(self.handle, cx.waker()))
                }
                result => core::task::Poll::Ready(result),
            }
        })
        .await
    }

    /// Resolves once every byte written has gone to the device (bytes the send buffer
    /// held for the peer's credit included), or was dropped because the connection ended
    /// (the next `read` or `write` says why). It looks again after each poll that finds
    /// the socket writable.
    async fn flush(&mut self) -> Result<(), Error> {
        core::future::poll_fn(|cx| {
            let mut device = self.device.lock();
            match device.send_queue(self.handle) {
                Ok(0) => core::task::Poll::Ready(Ok(())),
                Ok(_) => pending_on(device.register_send_waker(self.handle, cx.waker())),
                Err(e) => core::task::Poll::Ready(Err(e)),
            }
        })
        .await
    }
}
