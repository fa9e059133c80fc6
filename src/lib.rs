//! A `no_std`, heap-free driver for the virtio socket device (vsock), with the stream
//! socket semantics of `AF_VSOCK` (`vsock(4)`) as a polling API.
//!
//! One [`VsockDevice`] owns the device's queues and a fixed table of sockets, addressed by
//! copyable [`SocketHandle`]s. Every call returns at once; all progress happens in
//! [`VsockDevice::poll`], with time passed in by the caller. Memory is what the caller
//! hands over: one [`SocketSlot`] per socket and a receive area split evenly between them,
//! plus the virtqueues and their buffers from [`Hal::dma_alloc`](virtio_drivers::Hal).
//!
//! # Example: bring-up to echo
//!
//! A server that echoes every connection on port 1234. `transport` is the device's
//! `virtio_drivers` transport (PCI or MMIO) and `H` the kernel's [`Hal`](virtio_drivers::Hal);
//! `clock` returns the time since boot. Bytes that `send` cannot take yet stay in the
//! connection's buffer, and the connection is not read again until they are gone, so the
//! peer's credit, not memory, limits what is in flight.
//!
//! ```
//! use virtio_drivers::{transport::Transport, Hal};
//! use vsock_guest::{
//!     Config, Error, Instant, SocketHandle, SocketSlot, VsockAddr, VsockDevice, VMADDR_CID_ANY,
//! };
//!
//! const CONNECTIONS: usize = 4;
//!
//! /// A served connection: `buf[start..end]` still has to be sent back.
//! struct Echo {
//!     handle: SocketHandle,
//!     buf: [u8; 1024],
//!     start: usize,
//!     end: usize,
//! }
//!
//! /// Echoes connections to port 1234 while `keep_going()` says so.
//! fn echo_server<H: Hal, T: Transport>(
//!     transport: T,
//!     clock: impl Fn() -> Instant,
//!     mut keep_going: impl FnMut() -> bool,
//! ) -> Result<(), Error> {
//!     // The listener, the connections, and room for connections finishing their close.
//!     let mut slots = [const { SocketSlot::EMPTY }; CONNECTIONS + 4];
//!     let mut rx_memory = [0u8; (CONNECTIONS + 4) * 16 * 1024]; // 16 KiB per socket
//!     let mut vsock =
//!         VsockDevice::<H, T>::new(transport, Config::default(), &mut slots, &mut rx_memory)?;
//!     let listener = vsock.stream_socket()?;
//!     vsock.bind(listener, VsockAddr::new(VMADDR_CID_ANY, 1234))?;
//!     vsock.listen(listener, 8)?;
//!     log::info!("vsock: cid {} listening on port 1234", vsock.local_cid());
//!
//!     let mut echoes: [Option<Echo>; CONNECTIONS] = [const { None }; CONNECTIONS];
//!     while keep_going() {
//!         vsock.poll(clock());
//!         for slot in echoes.iter_mut().filter(|e| e.is_none()) {
//!             match vsock.accept(listener) {
//!                 Ok((handle, _peer)) => {
//!                     *slot = Some(Echo { handle, buf: [0; 1024], start: 0, end: 0 })
//!                 }
//!                 Err(_) => break, // WouldBlock: nobody waits
//!             }
//!         }
//!         for slot in echoes.iter_mut() {
//!             let Some(echo) = slot else { continue };
//!             let open = loop {
//!                 if echo.start < echo.end {
//!                     match vsock.send(echo.handle, &echo.buf[echo.start..echo.end]) {
//!                         Ok(n) => echo.start += n,
//!                         Err(Error::WouldBlock) => break true,
//!                         Err(_) => break false,
//!                     }
//!                 } else {
//!                     match vsock.recv(echo.handle, &mut echo.buf) {
//!                         Ok(0) => break false, // the peer closed
//!                         Ok(n) => (echo.start, echo.end) = (0, n),
//!                         Err(Error::WouldBlock) => break true,
//!                         Err(_) => break false,
//!                     }
//!                 }
//!             };
//!             if !open {
//!                 vsock.close(echo.handle)?;
//!                 *slot = None;
//!             }
//!         }
//!     }
//!     Ok(())
//! }
//! # // Run it against the host-side device model (feature `testing`): the "host"
//! # // connects, sends "hello", and gets "hello" back.
//! # #[cfg(feature = "testing")]
//! # {
//! # use std::cell::{Cell, RefCell};
//! # use vsock_guest::testing::{DeviceModel, FakeHal, FakeTransport};
//! # use vsock_guest::wire::{Header, Op, SocketType};
//! # let transport = FakeTransport::new(3, (1 << 32) | 1);
//! # let model = RefCell::new(DeviceModel::new(&transport));
//! # let host = |op: Op, len: u32| Header {
//! #     src_cid: 2, dst_cid: 3, src_port: 5000, dst_port: 1234, len,
//! #     socket_type: SocketType::Stream as u16, op: op as u16, flags: 0,
//! #     buf_alloc: 65536, fwd_cnt: 0,
//! # };
//! # let step = Cell::new(0u64);
//! # let sent = RefCell::new(Vec::new());
//! # echo_server::<FakeHal, _>(
//! #     transport.clone(),
//! #     || Instant::from_millis(step.get()),
//! #     || {
//! #         step.set(step.get() + 1);
//! #         match step.get() {
//! #             1 => model.borrow_mut().deliver(&host(Op::Request, 0), &[]).unwrap(),
//! #             3 => model.borrow_mut().deliver(&host(Op::Rw, 5), b"hello").unwrap(),
//! #             // Take what the driver sent before it is dropped (which resets the device).
//! #             9 => *sent.borrow_mut() = model.borrow_mut().drain_tx(),
//! #             _ => {}
//! #         }
//! #         step.get() < 10
//! #     },
//! # )
//! # .unwrap();
//! # let sent = sent.into_inner();
//! # assert_eq!(sent.len(), 2, "{sent:?}");
//! # assert_eq!(sent[0].header.op, Op::Response as u16);
//! # assert_eq!(sent[1].header.op, Op::Rw as u16);
//! # assert_eq!(sent[1].payload, b"hello");
//! # }
//! ```
//!
//! The bare-metal examples in the repository (`examples/echo.rs`) run this kind of loop
//! in a guest under QEMU; `cargo xtask demo` boots one and talks to it from the host.
//!
//! # Layers
//!
//! [`wire`] parses and emits packet headers, [`queue`] is the split virtqueue in DMA
//! memory, [`device`] brings the device up and moves packets, [`credit`] keeps the flow
//! control counters, [`conn`] is one connection's state machine, [`send_queue`] holds a
//! connection's data that waits for the peer's credit, and [`socket`] the socket table and
//! the API. Errors carry the `errno` of `vsock(4)` ([`Error::errno`]). [`io`] has
//! `embedded-io` streams on top; with the feature `async`, `waker` holds the tasks that
//! wait on a socket, and `io::AsyncStream` is the `embedded-io-async` stream.
//!
//! # Sleeping
//!
//! A kernel need not spin on [`VsockDevice::poll`]: with [`Config::interrupts`] set,
//! [`VsockDevice::arm_interrupts`] asks the device for an interrupt before the kernel
//! sleeps, [`VsockDevice::poll_at`] says when to wake at the latest, and
//! [`VsockDevice::ack_interrupt`] takes the interrupt (README, "Sleeping until there is
//! work").
#![no_std]
#![deny(
    missing_docs,
    unsafe_op_in_unsafe_fn,
    clippy::undocumented_unsafe_blocks
)]

// The host-side device model uses the host allocator and locks.
#[cfg(any(test, feature = "testing"))]
extern crate std;

pub mod addr;
pub mod conn;
pub mod credit;
pub mod device;
pub mod error;
pub mod io;
pub mod queue;
pub mod send_queue;
pub mod socket;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
#[cfg(feature = "async")]
pub mod waker;
pub mod wire;

pub use addr::{
    VsockAddr, VMADDR_CID_ANY, VMADDR_CID_HOST, VMADDR_CID_HYPERVISOR, VMADDR_CID_LOCAL,
    VMADDR_PORT_ANY,
};
pub use device::Stats;
pub use error::{Error, Result};
pub use socket::{Config, Readiness, Shutdown, SocketHandle, SocketSlot, VsockDevice};
pub use time::Instant;
