//! Per-socket task wakers (feature `async`): `poll` wakes a registered task once its
//! socket becomes ready for what the task waits for, once per registration, and never a
//! task of another socket; `io::AsyncStream` reads and writes through them.

mod common;

use common::{
    accept_from, bring_up, from_host, from_port, listen, ms, new_transport, pattern, serve_host,
    start_connect, storage, stream_header, test_config, GUEST_CID, HOST_BUF_ALLOC, HOST_CID,
    HOST_PORT,
};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use vsock_guest::io::AsyncStream;
use vsock_guest::wire::Op;
use vsock_guest::{Error, VsockAddr};

/// A waker that counts how often it was woken.
#[derive(Default)]
struct Counter(AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn counter() -> (Arc<Counter>, Waker) {
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(Arc::clone(&counter));
    (counter, waker)
}

fn woken(counter: &Counter) -> usize {
    counter.0.load(Ordering::SeqCst)
}

#[test]
fn a_recv_waker_is_woken_once_when_its_socket_becomes_readable_and_no_other_is() {
    let (transport, mut model) = new_transport();
    let mut memory = storage(3, 3 * 16 * 1024);
    let (mut vsock, listener, a) = serve_host(&transport, &mut model, &mut memory, test_config());
    let b = accept_from(
        &mut vsock,
        &mut model,
        listener,
        HOST_PORT + 1,
        HOST_BUF_ALLOC,
        ms(2),
    );
    let (count_a, waker_a) = counter();
    let (count_b, waker_b) = counter();
    let mut buf = [0u8; 16];
    assert_eq!(vsock.recv(a, &mut buf), Err(Error::WouldBlock));
    vsock.register_recv_waker(a, &waker_a).unwrap();
    vsock.register_recv_waker(b, &waker_b).unwrap();
    vsock.poll(ms(3));
    assert_eq!(
        (woken(&count_a), woken(&count_b)),
        (0, 0),
        "nothing ready yet"
    );
    // Data for A only.
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"for a")
        .unwrap();
    vsock.poll(ms(4));
    assert_eq!((woken(&count_a), woken(&count_b)), (1, 0));
    // Woken once: more data and more polls do not wake it again until it registers.
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"more")
        .unwrap();
    vsock.poll(ms(5));
    vsock.poll(ms(6));
    assert_eq!(woken(&count_a), 1);
    assert_eq!(vsock.recv(a, &mut buf), Ok(9));
    // B's task is woken by its own end of stream (HANG_UP), once.
    let shutdown = from_port(
        HOST_PORT + 1,
        vsock_guest::wire::Header {
            flags: 2,
            ..from_host(Op::Shutdown, HOST_BUF_ALLOC, 0)
        },
    );
    model.deliver(&shutdown, &[]).unwrap();
    vsock.poll(ms(7));
    assert_eq!((woken(&count_a), woken(&count_b)), (1, 1));
    assert_eq!(vsock.recv(b, &mut buf), Ok(0));
    // A registration while the socket is already ready is woken at the next poll.
    model
        .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"x")
        .unwrap();
    vsock.poll(ms(8));
    vsock.register_recv_waker(a, &waker_a).unwrap();
    vsock.poll(ms(9));
    assert_eq!(woken(&count_a), 2);
}

#[test]
fn a_send_waker_is_woken_when_credit_comes_or_a_connect_ends() {
    let (transport, mut model) = new_transport();
    let mut memory = storage(3, 3 * 16 * 1024);
    let mut vsock = bring_up(&transport, test_config(), &mut memory);
    let listener = listen(&mut vsock);
    // A connection whose peer has room for 100 bytes.
    let conn = accept_from(&mut vsock, &mut model, listener, HOST_PORT, 100, ms(1));
    assert_eq!(vsock.send(conn, &pattern(200)), Ok(100));
    assert_eq!(vsock.send(conn, b"x"), Err(Error::WouldBlock));
    model.drain_tx();
    let (count, waker) = counter();
    vsock.register_send_waker(conn, &waker).unwrap();
    vsock.poll(ms(2));
    model.drain_tx();
    assert_eq!(woken(&count), 0, "no credit yet");
    model
        .deliver(&from_host(Op::CreditUpdate, 100, 100), &[])
        .unwrap();
    vsock.poll(ms(3));
    assert_eq!(woken(&count), 1);
    vsock.poll(ms(4));
    assert_eq!(woken(&count), 1, "once");
    // A connect: its task is woken when the RESPONSE makes the socket writable.
    let peer = VsockAddr::new(HOST_CID as u32, 7000);
    let client = start_connect(&mut vsock, &mut model, peer, 49152, 16 * 1024);
    let (connected, waker) = counter();
    vsock.register_send_waker(client, &waker).unwrap();
    vsock.poll(ms(5));
    assert_eq!(woken(&connected), 0);
    let response = stream_header(
        (HOST_CID, 7000),
        (GUEST_CID, 49152),
        Op::Response,
        HOST_BUF_ALLOC,
        0,
    );
    model.deliver(&response, &[]).unwrap();
    vsock.poll(ms(6));
    assert_eq!((woken(&connected), woken(&count)), (1, 1));
}

#[test]
fn a_listener_task_is_woken_by_a_waiting_connection_and_a_closed_socket_wakes_its_tasks() {
    let (transport, mut model) = new_transport();
    let mut memory = storage(3, 3 * 16 * 1024);
    let mut vsock = bring_up(&transport, test_config(), &mut memory);
    let listener = listen(&mut vsock);
    let (accepting, waker) = counter();
    assert_eq!(vsock.accept(listener), Err(Error::WouldBlock));
    vsock.register_recv_waker(listener, &waker).unwrap();
    vsock.poll(ms(1));
    assert_eq!(woken(&accepting), 0);
    model
        .deliver(&from_host(Op::Request, HOST_BUF_ALLOC, 0), &[])
        .unwrap();
    vsock.poll(ms(2));
    assert_eq!(woken(&accepting), 1);
    let (conn, _) = vsock.accept(listener).unwrap();
    // Tasks waiting on a socket that is closed under them are woken, to find out.
    let (reader, reader_waker) = counter();
    let (writer, writer_waker) = counter();
    vsock.register_recv_waker(conn, &reader_waker).unwrap();
    vsock.register_send_waker(conn, &writer_waker).unwrap();
    vsock.close(conn).unwrap();
    assert_eq!((woken(&reader), woken(&writer)), (1, 1));
    assert_eq!(
        vsock.register_recv_waker(conn, &reader_waker),
        Err(Error::InvalidHandle)
    );
    // A second task registering for the same socket wakes the first.
    let (first, first_waker) = counter();
    let (second, second_waker) = counter();
    vsock.register_recv_waker(listener, &first_waker).unwrap();
    vsock.register_recv_waker(listener, &second_waker).unwrap();
    assert_eq!((woken(&first), woken(&second)), (1, 0));
}

#[test]
fn an_async_stream_reads_and_writes_through_the_wakers() {
    let (transport, mut model) = new_transport();
    let mut memory = storage(2, 2 * 16 * 1024);
    let (vsock, _, conn) = serve_host(&transport, &mut model, &mut memory, test_config());
    let device = spin::Mutex::new(vsock);
    let mut stream = AsyncStream::new(&device, conn);
    let (count, waker) = counter();
    let mut cx = Context::from_waker(&waker);

    // A read waits for data; the poll that takes it wakes the task.
    let mut buf = [0u8; 16];
    {
        let mut read = pin!(embedded_io_async::Read::read(&mut stream, &mut buf));
        assert!(read.as_mut().poll(&mut cx).is_pending());
        model
            .deliver(&from_host(Op::Rw, HOST_BUF_ALLOC, 0), b"ping")
            .unwrap();
        device.lock().poll(ms(2));
        assert_eq!(woken(&count), 1);
        assert_eq!(read.as_mut().poll(&mut cx), Poll::Ready(Ok(4)));
    }
    assert_eq!(&buf[..4], b"ping");
    // A write goes out at once; flush resolves once the device has it.
    {
        let mut write = pin!(embedded_io_async::Write::write_all(&mut stream, b"pong"));
        assert_eq!(write.as_mut().poll(&mut cx), Poll::Ready(Ok(())));
    }
    {
        let mut flush = pin!(embedded_io_async::Write::flush(&mut stream));
        assert_eq!(flush.as_mut().poll(&mut cx), Poll::Ready(Ok(())));
    }
    let sent = model.drain_tx();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].payload, b"pong");
    // End of stream: Ok(0).
    let shutdown = vsock_guest::wire::Header {
        flags: 2,
        ..from_host(Op::Shutdown, HOST_BUF_ALLOC, 0)
    };
    {
        let mut read = pin!(embedded_io_async::Read::read(&mut stream, &mut buf));
        assert!(read.as_mut().poll(&mut cx).is_pending());
        model.deliver(&shutdown, &[]).unwrap();
        device.lock().poll(ms(3));
        assert_eq!(woken(&count), 2);
        assert_eq!(read.as_mut().poll(&mut cx), Poll::Ready(Ok(0)));
    }
}
