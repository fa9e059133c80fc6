//! A live driver fed arbitrary device-written packets, used-ring entries, events and CID
//! changes, interleaved with socket calls and a scripted host. See `src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vsock_guest_fuzz::rx_packets(data));
