//! A device model for host tests (feature `testing`), for this crate's tests and for yours:
//! run the code you build on [`VsockDevice`](crate::VsockDevice) on your development
//! machine, against a host that does exactly what your test says, including everything a
//! real host or a broken device might do.
//!
//! - [`FakeHal`]: a [`Hal`](virtio_drivers::Hal) whose DMA memory is ordinary host memory;
//! - [`FakeTransport`]: a [`Transport`](virtio_drivers::transport::Transport) whose
//!   registers and config space (the guest CID) the test can read and change;
//! - [`DeviceModel`]: the device side of the rx, tx and event virtqueues, stepped by the
//!   test (no threads, so runs are deterministic): take what the driver sent, deliver
//!   packets (well-formed or not), return any used-ring entry, fire events;
//! - [`HostPeer`]: the host on top of the model. It listens and connects, exchanges data
//!   with correct credit, shuts down and resets like a Linux host, checks every packet the
//!   driver sends ([`Violation`]), and can be told to misbehave: withhold credit, overrun
//!   the guest's credit, send RST or SHUTDOWN at any moment, answer a REQUEST twice or
//!   send an unsolicited RESPONSE, corrupt headers ([`Corruption`]), return bogus
//!   used-ring entries, fire `TRANSPORT_RESET`, stop consuming the tx ring or delay
//!   delivery.
//!
//! Simulated physical addresses map back to memory through a table, never through
//! integer-to-pointer casts, so Miri's strict provenance checks accept the model.
//!
//! # Example: testing your own service
//!
//! The function under test is a guest service that answers each line it receives with
//! the line reversed. The test brings the driver up on the fake transport, lets the host
//! connect and talk to it, and checks both what the host received and what the driver
//! did on the wire. Then it checks that a host which ignores the guest's credit is cut
//! off with an RST instead of being buffered.
//!
//! ```
//! use virtio_drivers::{transport::Transport, Hal};
//! use vsock_guest::testing::{ConnState, FakeHal, FakeTransport, HostPeer, DEVICE_FEATURES};
//! use vsock_guest::wire::Op;
//! use vsock_guest::{
//!     Config, Error, Instant, SocketHandle, SocketSlot, VsockAddr, VsockDevice, VMADDR_CID_ANY,
//! };
//!
//! /// The code under test: reads what is waiting on `socket` and answers every complete
//! /// line with the line reversed. Returns `false` once the peer has closed.
//! fn serve_lines<H: Hal, T: Transport>(
//!     vsock: &mut VsockDevice<'_, H, T>,
//!     socket: SocketHandle,
//!     line: &mut Vec<u8>,
//! ) -> Result<bool, Error> {
//!     let mut buf = [0u8; 256];
//!     loop {
//!         match vsock.recv(socket, &mut buf) {
//!             Ok(0) => return Ok(false),
//!             Ok(n) => {
//!                 for &byte in &buf[..n] {
//!                     if byte != b'\n' {
//!                         line.push(byte);
//!                         continue;
//!                     }
//!                     line.reverse();
//!                     line.push(b'\n');
//!                     // A short line always fits the host's credit in this test.
//!                     assert_eq!(vsock.send(socket, line)?, line.len());
//!                     line.clear();
//!                 }
//!             }
//!             Err(Error::WouldBlock) => return Ok(true),
//!             Err(e) => return Err(e),
//!         }
//!     }
//! }
//!
//! // A socket device with guest CID 3, and the host behind it.
//! let transport = FakeTransport::new(3, DEVICE_FEATURES);
//! let mut host = HostPeer::new(&transport);
//! let mut slots = [const { SocketSlot::EMPTY }; 4];
//! let mut rx_memory = vec![0u8; 4 * 16 * 1024];
//! let mut vsock = VsockDevice::<FakeHal, _>::new(
//!     transport.clone(),
//!     Config::default(),
//!     &mut slots,
//!     &mut rx_memory,
//! )?;
//! let listener = vsock.stream_socket()?;
//! vsock.bind(listener, VsockAddr::new(VMADDR_CID_ANY, 1234))?;
//! vsock.listen(listener, 4)?;
//! let mut now = Instant::from_millis(0);
//! let mut tick = || {
//!     now = Instant::from_micros(now.as_micros() + 1000);
//!     now
//! };
//!
//! // The host connects: REQUEST, and the driver answers RESPONSE at once.
//! let conn = host.connect(1234);
//! let sent = host.settle(&mut vsock, tick());
//! assert_eq!(sent.len(), 1);
//! assert_eq!(sent[0].header.op, Op::Response as u16);
//! assert_eq!(host.conn(conn).state(), ConnState::Connected);
//! let (socket, peer) = vsock.accept(listener)?;
//! assert_eq!(peer, VsockAddr::new(2, host.conn(conn).host_port()));
//!
//! // Two lines, the second split across packets.
//! assert_eq!(host.send(conn, b"hello\nwor"), 9);
//! host.settle(&mut vsock, tick());
//! let mut line = Vec::new();
//! assert!(serve_lines(&mut vsock, socket, &mut line)?);
//! host.send(conn, b"ld\n");
//! host.settle(&mut vsock, tick());
//! assert!(serve_lines(&mut vsock, socket, &mut line)?);
//! host.settle(&mut vsock, tick());
//! assert_eq!(host.recv_all(conn), b"olleh\ndlrow\n");
//!
//! // The host closes its side: the service sees the end of the stream.
//! host.shutdown(conn, vsock_guest::wire::ShutdownFlags::SEND);
//! host.settle(&mut vsock, tick());
//! assert!(!serve_lines(&mut vsock, socket, &mut line)?);
//! vsock.close(socket)?;
//! host.settle(&mut vsock, tick());
//! assert_eq!(host.conn(conn).state(), ConnState::ResetByHost);
//!
//! // A host that ignores the guest's credit (here: the 16 KiB receive buffer) is reset,
//! // and the guest keeps only what it had room for.
//! let rude = host.connect(1234);
//! host.settle(&mut vsock, tick());
//! let (socket, _) = vsock.accept(listener)?;
//! host.send_unchecked(rude, &[b'x'; 20 * 1024]);
//! let sent = host.settle(&mut vsock, tick());
//! assert!(sent.iter().any(|p| p.header.op == Op::Rst as u16));
//! assert_eq!(host.conn(rude).state(), ConnState::ResetByGuest);
//! assert!(vsock.recv_queue(socket)? <= vsock.rx_buffer_per_socket());
//!
//! // Nothing the driver sent broke a rule the host checks.
//! assert_eq!(host.violations(), []);
//! # Ok::<(), Error>(())
//! ```

mod hal;
mod host;
mod model;
mod transport;

pub use hal::FakeHal;
pub use host::{
    AcceptMode, ConnId, ConnState, Corruption, HostConn, HostPeer, Violation,
    DEFAULT_HOST_BUF_ALLOC, FIRST_HOST_PORT, HOST_CID, SETTLE_LIMIT,
};
pub use model::{DeviceModel, ModelError, Packet};
pub use transport::{FakeTransport, QueueRegs, TransportState};

/// Features a typical device offers: `VIRTIO_F_VERSION_1`, `VIRTIO_F_RING_EVENT_IDX` and
/// `VIRTIO_VSOCK_F_STREAM`.
pub const DEVICE_FEATURES: u64 = (1 << 32) | (1 << 29) | 1;
