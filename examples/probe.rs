//! Boot smoke test for the bare-metal example support in `examples/boot/`.
//!
//! Boots, finds the virtio socket device (PCI on q35, virtio-mmio on microvm), prints the
//! guest CID from its config space, times a `delay_micros`, and exits QEMU with status
//! 33. Command-line options: `delay_us=<n>` (default 100000) and `log=<level>`.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod boot;

#[cfg(target_os = "none")]
boot::entry!(main);

#[cfg(target_os = "none")]
fn main(info: &boot::BootInfo) -> ! {
    use boot::time::{delay_micros, now_micros};
    use log::{error, info};
    use virtio_drivers::transport::{SomeTransport, Transport};

    info!("probe: booted, cmdline={}", info.cmdline);

    let Some(transport) = boot::virtio::find_vsock() else {
        error!("probe: no virtio-vsock device");
        boot::exit_failure();
    };
    let kind = match transport {
        SomeTransport::Mmio(_) => "mmio",
        SomeTransport::Pci(_) => "pci",
        // Other transports exist on some architectures only.
        #[allow(unreachable_patterns)]
        _ => "other",
    };
    // virtio-vsock config space: le64 guest_cid at offset 0.
    let cid = match (
        transport.read_config_space::<u32>(0),
        transport.read_config_space::<u32>(4),
    ) {
        (Ok(low), Ok(high)) => (u64::from(high) << 32) | u64::from(low),
        (Err(e), _) | (_, Err(e)) => {
            error!("probe: cannot read the config space: {e}");
            boot::exit_failure();
        }
    };
    info!("probe: guest cid {cid} via {kind}");

    let delay = info
        .cmdline_value("delay_us")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let before = now_micros();
    delay_micros(delay);
    let elapsed = now_micros() - before;
    info!("probe: delay_micros({delay}) took {elapsed} us");

    boot::exit_success()
}

#[cfg(not(target_os = "none"))]
fn main() {
    println!("probe is a bare-metal guest for x86_64-unknown-none or aarch64-unknown-none; run it with `cargo xtask demo`");
}
