//! The crate's one error type, with the `errno` values of `vsock(4)`.

use core::fmt;

/// Everything a vsock call can fail with.
///
/// The first group are the errors `vsock(4)` lists; [`Error::errno`] gives the classic
/// number (Linux numbering, which is what guest operating systems usually mirror).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// `EACCES`: bind to a privileged port (below 1024) without permission.
    AccessDenied,
    /// `EADDRINUSE`: the port is already bound.
    AddrInUse,
    /// `EADDRNOTAVAIL`: the CID is not ours, or no ephemeral port is free.
    AddrNotAvailable,
    /// `EFAULT`: the CID cannot be connected to.
    InvalidCid,
    /// `EINPROGRESS`: the connection is being established; watch [`crate::Readiness`].
    InProgress,
    /// `EINVAL`: an argument or the socket's state does not fit the call.
    InvalidArgument,
    /// `ENODEV`: the transport is not a virtio socket device.
    NoDevice,
    /// `ENOTCONN`: the socket is not connected.
    NotConnected,
    /// `ETIMEDOUT`: the peer did not answer in time.
    TimedOut,
    /// `EWOULDBLOCK`: no data, no credit or no queue space now; try again after `poll`.
    WouldBlock,
    /// `ECONNREFUSED`: the peer refused the connection (answered with RST).
    ConnectionRefused,
    /// `ECONNRESET`: the connection was reset by the peer or by a transport reset.
    ConnectionReset,
    /// `EPIPE`: sending after a local `shutdown(Write)` or the peer's `shutdown(Read)`.
    BrokenPipe,
    /// `ENOBUFS`: out of fixed buffer memory (DMA allocation failed at bring-up).
    NoBufferSpace,
    /// `EMFILE`: every socket slot is in use.
    TooManySockets,
    /// `EALREADY`: a connect is already in progress.
    Already,
    /// `EISCONN`: the socket is already connected.
    IsConnected,
    /// `EBADF`: the handle does not name a live socket (closed, or never created).
    InvalidHandle,
    /// `EIO`: the device misbehaved in a way that stops bring-up (bad CID, queue in use).
    DeviceError,
}

impl Error {
    /// The `errno` value a POSIX layer would report for this error.
    pub const fn errno(self) -> i32 {
        match self {
            Error::AccessDenied => 13,
            Error::AddrInUse => 98,
            Error::AddrNotAvailable => 99,
            Error::InvalidCid => 14,
            Error::InProgress => 115,
            Error::InvalidArgument => 22,
            Error::NoDevice => 19,
            Error::NotConnected => 107,
            Error::TimedOut => 110,
            Error::WouldBlock => 11,
            Error::ConnectionRefused => 111,
            Error::ConnectionReset => 104,
            Error::BrokenPipe => 32,
            Error::NoBufferSpace => 105,
            Error::TooManySockets => 24,
            Error::Already => 114,
            Error::IsConnected => 106,
            Error::InvalidHandle => 9,
            Error::DeviceError => 5,
        }
    }

    const fn description(self) -> &'static str {
        match self {
            Error::AccessDenied => "permission denied: privileged port",
            Error::AddrInUse => "address already in use",
            Error::AddrNotAvailable => "address not available",
            Error::InvalidCid => "invalid CID for this operation",
            Error::InProgress => "connection in progress",
            Error::InvalidArgument => "invalid argument",
            Error::NoDevice => "no virtio socket device",
            Error::NotConnected => "socket is not connected",
            Error::TimedOut => "connection timed out",
            Error::WouldBlock => "operation would block",
            Error::ConnectionRefused => "connection refused",
            Error::ConnectionReset => "connection reset",
            Error::BrokenPipe => "broken pipe",
            Error::NoBufferSpace => "no buffer space available",
            Error::TooManySockets => "too many sockets",
            Error::Already => "connection already in progress",
            Error::IsConnected => "socket is already connected",
            Error::InvalidHandle => "invalid socket handle",
            Error::DeviceError => "virtio device error",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (errno {})", self.description(), self.errno())
    }
}

impl core::error::Error for Error {}

impl embedded_io::Error for Error {
    fn kind(&self) -> embedded_io::ErrorKind {
        use embedded_io::ErrorKind;
        match self {
            Error::AccessDenied => ErrorKind::PermissionDenied,
            Error::AddrInUse => ErrorKind::AddrInUse,
            Error::AddrNotAvailable => ErrorKind::AddrNotAvailable,
            Error::InvalidCid | Error::InvalidArgument | Error::InvalidHandle => {
                ErrorKind::InvalidInput
            }
            Error::NotConnected => ErrorKind::NotConnected,
            Error::TimedOut => ErrorKind::TimedOut,
            Error::ConnectionRefused => ErrorKind::ConnectionRefused,
            Error::ConnectionReset => ErrorKind::ConnectionReset,
            Error::BrokenPipe => ErrorKind::BrokenPipe,
            Error::NoBufferSpace | Error::TooManySockets => ErrorKind::OutOfMemory,
            Error::InProgress
            | Error::WouldBlock
            | Error::NoDevice
            | Error::Already
            | Error::IsConnected
            | Error::DeviceError => ErrorKind::Other,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = core::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_values_match_linux() {
        assert_eq!(Error::AccessDenied.errno(), 13);
        assert_eq!(Error::InvalidCid.errno(), 14);
        assert_eq!(Error::NoDevice.errno(), 19);
        assert_eq!(Error::WouldBlock.errno(), 11);
        assert_eq!(Error::InProgress.errno(), 115);
        assert_eq!(Error::ConnectionReset.errno(), 104);
    }

    #[test]
    fn display_names_the_errno() {
        extern crate std;
        use std::string::ToString;
        assert_eq!(
            Error::TimedOut.to_string(),
            "connection timed out (errno 110)"
        );
    }

    #[test]
    fn maps_to_embedded_io_kinds() {
        use embedded_io::{Error as _, ErrorKind};
        assert_eq!(Error::ConnectionReset.kind(), ErrorKind::ConnectionReset);
        assert_eq!(Error::BrokenPipe.kind(), ErrorKind::BrokenPipe);
        assert_eq!(Error::AddrInUse.kind(), ErrorKind::AddrInUse);
    }
}
