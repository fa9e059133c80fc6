//! `cargo xtask demo`: boot the echo guest, talk to it from the host, show what happened.

use crate::cargo_tasks::build_example;
use crate::host;
use crate::qemu_tests::{EchoGuest, EchoVm, CONNECT_TIMEOUT, ECHO_PORT, GUEST_CID, PROCESS_LIMIT};
use crate::setup::Tools;
use crate::vm::{Accel, Machine};
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const MESSAGES: &[&str] = &[
    "hello from the host",
    "vsock-guest echoes every byte back",
    "over our own virtqueues, with credit-based flow control",
];
/// Size of the binary blob the demo sends after the messages.
const BLOB_BYTES: usize = 64 * 1024;

/// Runs the demo on `machine`; `Ok` when every message came back intact.
pub fn run(tools: &Tools, machine: Machine, accel: Accel) -> Result<()> {
    let kernel = build_example("echo", machine.arch())?;
    println!("demo: booting {} on {machine}", kernel.display());
    let started = Instant::now();
    let mut echo = EchoVm::boot(
        tools,
        machine,
        accel,
        &kernel,
        "demo",
        false,
        "",
        PROCESS_LIMIT,
    )?;
    println!(
        "demo: guest cid {GUEST_CID} listens on port {ECHO_PORT} after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let result = talk(&echo);
    // Give the guest a moment to log the closed connection before showing its log.
    std::thread::sleep(Duration::from_millis(300));
    echo.stop();
    println!(
        "\n--- guest serial log ---\n{}--- end of serial log ---",
        echo.guest.serial_log()
    );
    result?;
    println!("demo: all messages came back byte-exact");
    Ok(())
}

fn talk(echo: &EchoVm) -> Result<()> {
    let mut stream = host::connect_accepted(echo.uds(), ECHO_PORT, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    println!("demo: connected to {GUEST_CID}:{ECHO_PORT}");
    for message in MESSAGES {
        let reply = round_trip(&mut stream, message.as_bytes())?;
        println!(
            "demo: sent {message:?}, got back {:?}",
            String::from_utf8_lossy(&reply)
        );
        if reply != message.as_bytes() {
            bail!("the echo of {message:?} differs");
        }
    }
    let mut blob = vec![0u8; BLOB_BYTES];
    host::fill_pattern(7, 0, &mut blob);
    let started = Instant::now();
    let reply = round_trip(&mut stream, &blob)?;
    if reply != blob {
        bail!("the echo of the {BLOB_BYTES}-byte blob differs");
    }
    println!(
        "demo: sent a {} KiB patterned blob, got it back byte-exact in {:.0} ms",
        BLOB_BYTES / 1024,
        started.elapsed().as_secs_f64() * 1000.0
    );
    host::finish_and_expect_close(&mut stream)?;
    println!("demo: closed; the guest closed its side too");
    Ok(())
}

/// Writes `data` and reads back exactly as many bytes.
fn round_trip(stream: &mut std::os::unix::net::UnixStream, data: &[u8]) -> Result<Vec<u8>> {
    stream.write_all(data)?;
    let mut reply = vec![0u8; data.len()];
    stream.read_exact(&mut reply).context("reading the echo")?;
    Ok(reply)
}
