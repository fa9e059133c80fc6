//! The driver's [`Config`] from the kernel command line, one parser for every example
//! guest:
//!
//! | word | `Config` field |
//! | --- | --- |
//! | `queue=<n>` | `queue_size` (descriptors per virtqueue) |
//! | `rx=<bytes>` | `rx_buffer_size` (per receive buffer, the 44-byte header included) |
//! | `tx=<bytes>` | `tx_packet_size` (largest packet sent, the header included) |
//! | `tx_memory=<bytes>` | `tx_memory` |
//! | `send_buffer=<bytes>` | `send_buffer` |
//! | `sibling=<bytes>` | `sibling_packet_size` (largest packet sent to another guest) |
//! | `preset=throughput` | start from `Config::throughput()` instead of `Config::default()` |
//!
//! A word that is missing, or whose value is not a number, leaves the default. To talk to
//! a Linux guest through vhost-device-vsock 0.3.0, which truncates a packet that does not
//! fit the receiving guest's buffer, use `rx=65580` (README, "Linux siblings"); the
//! default `sibling_packet_size` already fits Linux's buffers.

use log::info;
use vsock_guest::Config;

use super::BootInfo;

/// `Config::default()` (or `Config::throughput()` with `preset=throughput`) with the
/// fields the command line names changed.
pub fn from_cmdline(info: &BootInfo) -> Config {
    let number = |key: &str| {
        info.cmdline_value(key)
            .and_then(|value| value.parse::<usize>().ok())
    };
    let default = match info.cmdline_value("preset") {
        Some("throughput") => Config::throughput(),
        _ => Config::default(),
    };
    Config {
        queue_size: number("queue")
            .and_then(|n| u16::try_from(n).ok())
            .unwrap_or(default.queue_size),
        rx_buffer_size: number("rx").unwrap_or(default.rx_buffer_size),
        tx_packet_size: number("tx").unwrap_or(default.tx_packet_size),
        tx_memory: number("tx_memory").unwrap_or(default.tx_memory),
        send_buffer: number("send_buffer").unwrap_or(default.send_buffer),
        sibling_packet_size: number("sibling").unwrap_or(default.sibling_packet_size),
        ..default
    }
}

/// Logs `config` as `<who>: Config ...` when it differs from the default.
pub fn log_if_changed(who: &str, config: &Config) {
    if *config != Config::default() {
        info!(
            "{who}: Config from the command line: {}-entry queues, {} B RX buffers, TX packets up to {} B ({} B to other guests) in {} KiB, {} KiB send buffer",
            config.queue_size,
            config.rx_buffer_size,
            config.tx_packet_size,
            config.sibling_packet_size,
            config.tx_memory / 1024,
            config.send_buffer / 1024
        );
    }
}
