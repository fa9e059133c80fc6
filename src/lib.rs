//! vsock-guest: a `no_std` driver for the virtio socket device.
#![no_std]
