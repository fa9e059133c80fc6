//! Vsock addresses: a context ID (CID) and a port, as in `struct sockaddr_vm`.

use core::fmt;

/// Wildcard CID: in `bind`, "any of our CIDs"; in `connect`, "the host".
pub const VMADDR_CID_ANY: u32 = 0xFFFF_FFFF;
/// The CID of the hypervisor.
pub const VMADDR_CID_HYPERVISOR: u32 = 0;
/// The local (loopback) CID.
pub const VMADDR_CID_LOCAL: u32 = 1;
/// The CID of the host.
pub const VMADDR_CID_HOST: u32 = 2;
/// Wildcard port: in `bind`, "pick a free ephemeral port".
pub const VMADDR_PORT_ANY: u32 = 0xFFFF_FFFF;

/// A vsock socket address: context ID and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VsockAddr {
    /// The context ID: which VM (or the host) the socket lives on.
    pub cid: u32,
    /// The port within that context.
    pub port: u32,
}

impl VsockAddr {
    /// Creates an address from a CID and a port.
    pub const fn new(cid: u32, port: u32) -> Self {
        Self { cid, port }
    }
}

impl fmt::Display for VsockAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.cid, self.port)
    }
}

/// Whether `cid` is one a device may assign to a guest (B2): not the hypervisor, loopback,
/// host or wildcard CID.
pub(crate) const fn is_valid_guest_cid(cid: u64) -> bool {
    cid > VMADDR_CID_HOST as u64 && cid < VMADDR_CID_ANY as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_cids_are_not_guest_cids() {
        for cid in [0u64, 1, 2, 0xFFFF_FFFF, 0x1_0000_0003] {
            assert!(!is_valid_guest_cid(cid), "{cid:#x}");
        }
        assert!(is_valid_guest_cid(3));
        assert!(is_valid_guest_cid(0xFFFF_FFFE));
    }

    #[test]
    fn displays_cid_and_port() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(VsockAddr::new(3, 1234).to_string(), "3:1234");
    }
}
