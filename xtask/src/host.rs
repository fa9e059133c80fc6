//! The host side of a vsock connection through `vhost-device-vsock`: a host program
//! connects to the guest's Unix socket and writes `CONNECT <port>\n`; the backend answers
//! `OK <host port>\n` once the guest accepted, or closes the socket when it refused.

use anyhow::{bail, Context, Result};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// The result of asking the backend for a connection to a guest port.
#[derive(Debug)]
pub enum Connect {
    /// The guest accepted; the stream carries the connection.
    Accepted(UnixStream),
    /// The guest answered with RST: the backend closed the socket without `OK`.
    Refused,
}

/// Connects to guest `port` through the backend socket `uds`, waiting up to `timeout` for
/// the answer.
pub fn connect(uds: &Path, port: u32, timeout: Duration) -> Result<Connect> {
    let mut stream =
        UnixStream::connect(uds).with_context(|| format!("connecting to {}", uds.display()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(Connect::Refused),
            Ok(0) => bail!(
                "backend closed after a partial answer {:?}",
                String::from_utf8_lossy(&line)
            ),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                bail!("no answer to CONNECT {port} within {}s", timeout.as_secs())
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(Connect::Refused),
            Err(e) => return Err(e).context("reading the CONNECT answer"),
        }
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        bail!("unexpected answer to CONNECT {port}: {line:?}");
    }
    stream.set_read_timeout(None)?;
    Ok(Connect::Accepted(stream))
}

/// Connects and insists on being accepted.
pub fn connect_accepted(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    match connect(uds, port, timeout)? {
        Connect::Accepted(stream) => Ok(stream),
        Connect::Refused => bail!("the guest refused a connection to port {port}"),
    }
}

/// The pattern of the echo example's source service (`source_byte` there).
pub fn source_byte(offset: u64) -> u8 {
    (offset as u8) ^ ((offset >> 8) as u8).wrapping_mul(31) ^ ((offset >> 16) as u8).wrapping_mul(7)
}

/// Reads what the echo example's source service sends on `stream` until it closes,
/// checking every byte against [`source_byte`]. Before each read `pace` gives the most
/// bytes to read and the pause after the read. Returns the number of bytes read.
pub fn read_source(
    stream: &mut UnixStream,
    mut pace: impl FnMut() -> (usize, Duration),
) -> Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let (most, pause) = pace();
        let n = match stream.read(&mut buf[..most.clamp(1, 64 * 1024)]) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("the source stalled after {got} bytes")
            }
            Err(e) => return Err(e).context("reading from the source"),
        };
        if n == 0 {
            return Ok(got);
        }
        for (i, &byte) in buf[..n].iter().enumerate() {
            let offset = got + i as u64;
            let expected = source_byte(offset);
            if byte != expected {
                bail!("source byte {offset} differs: got {byte:#04x}, expected {expected:#04x}");
            }
        }
        got += n as u64;
        if !pause.is_zero() {
            thread::sleep(pause);
        }
    }
}

/// Closes our sending side of `stream` and waits for the guest to close its side, with
/// no bytes in between (what the echo guest does after the host's EOF).
pub fn finish_and_expect_close(stream: &mut UnixStream) -> Result<()> {
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .context("waiting for the guest to close")?;
    if !rest.is_empty() {
        bail!(
            "the guest sent {} unexpected bytes before closing",
            rest.len()
        );
    }
    Ok(())
}

/// The byte at `offset` of the test pattern for connection `seed`: position-dependent so
/// that a lost, repeated or reordered chunk is detected.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    let x = offset
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(seed.wrapping_mul(0xD1B5_4A32_D192_ED03));
    (x >> 56) as u8 ^ (offset as u8)
}

/// Fills `buf` with the pattern of `seed` starting at `offset`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte = pattern_byte(seed, offset + i as u64);
    }
}

/// Sends `total` bytes of the pattern of `seed` over `stream` and checks that exactly the
/// same bytes come back, then closes the connection and checks the guest closes too.
///
/// At most `window` bytes are outstanding (sent but not echoed). vhost-device-vsock 0.3.0
/// flushes data it could not write to a full host socket only on a write-only epoll
/// event, which never comes while the host also has data waiting to be read; a window
/// below the Unix socket buffer keeps it from ever needing that buffer in an echo.
pub fn echo_exchange(
    stream: UnixStream,
    seed: u64,
    total: u64,
    window: u64,
    timeout: Duration,
) -> Result<()> {
    stream.set_read_timeout(Some(timeout))?;
    let received = Arc::new(AtomicU64::new(0));
    let mut writer = stream.try_clone()?;
    let writer_received = Arc::clone(&received);
    let writer_thread = thread::spawn(move || -> Result<()> {
        let mut sent = 0u64;
        let mut chunk = vec![0u8; 16 * 1024];
        let deadline = Instant::now() + timeout;
        while sent < total {
            let outstanding = sent - writer_received.load(Ordering::Acquire);
            if outstanding >= window {
                if Instant::now() >= deadline {
                    bail!("echo window stayed full; {sent} bytes sent");
                }
                thread::sleep(Duration::from_micros(200));
                continue;
            }
            let n = (total - sent)
                .min(window - outstanding)
                .min(chunk.len() as u64) as usize;
            fill_pattern(seed, sent, &mut chunk[..n]);
            writer.write_all(&chunk[..n])?;
            sent += n as u64;
        }
        Ok(())
    });
    let mut reader = stream;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let result = (|| -> Result<()> {
        while got < total {
            let n = match reader.read(&mut buf) {
                Ok(0) => bail!("guest closed after echoing {got} of {total} bytes"),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    bail!("echo stalled after {got} of {total} bytes")
                }
                Err(e) => return Err(e).context("reading the echo"),
            };
            for (i, &byte) in buf[..n].iter().enumerate() {
                let offset = got + i as u64;
                let expected = pattern_byte(seed, offset);
                if byte != expected {
                    bail!(
                        "echo differs at byte {offset}: got {byte:#04x}, expected {expected:#04x}"
                    );
                }
            }
            got += n as u64;
            received.store(got, Ordering::Release);
        }
        Ok(())
    })();
    // Unblock and collect the writer whatever happened.
    let _ = reader.shutdown(std::net::Shutdown::Write);
    if result.is_err() {
        let _ = reader.shutdown(std::net::Shutdown::Both);
    }
    let writer_result = writer_thread
        .join()
        .map_err(|_| anyhow::anyhow!("echo writer thread panicked"))?;
    result?;
    writer_result?;
    // After our EOF the guest must close its side: read returns 0, with nothing extra.
    match reader.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => bail!("guest sent {n} unexpected bytes after the echo"),
        Err(e) => return Err(e).context("waiting for the guest to close"),
    }
    Ok(())
}
