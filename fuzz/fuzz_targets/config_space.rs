//! Bring-up with arbitrary config space (guest CID), device type, features and queue
//! sizes, then a short conversation and transport resets. See `src/lib.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vsock_guest_fuzz::config_space(data));
