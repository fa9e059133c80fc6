//! The virtio-vsock packet header (`struct virtio_vsock_hdr`, 44 bytes, little-endian):
//! parsing with validation and emitting into a buffer.
//!
//! The rest of the driver handles [`Header`] values, never byte offsets.

use bitflags::bitflags;

/// Size in bytes of the packet header on the wire.
pub const HEADER_LEN: usize = 44;

/// Largest payload of one packet that this driver sends or accepts (64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Packet operation (`op` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection reset.
    Rst = 3,
    /// Half or full shutdown; see [`ShutdownFlags`].
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// Unsolicited credit information.
    CreditUpdate = 6,
    /// Asks the peer to send its credit information.
    CreditRequest = 7,
}

/// The raw `op` value 0 (`VIRTIO_VSOCK_OP_INVALID`): no operation. A receive buffer whose
/// header reads 0 holds no packet (see [`RxQueue::repost`](crate::queue::RxQueue::repost)).
pub const OP_INVALID: u16 = 0;

impl Op {
    /// The operation for a raw `op` value, or `None` if it is unknown.
    pub const fn from_raw(raw: u16) -> Option<Op> {
        Some(match raw {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }

    /// Whether this operation carries no payload (everything but `Rw`).
    pub const fn is_control(self) -> bool {
        !matches!(self, Op::Rw)
    }
}

/// Socket type (`type` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum SocketType {
    /// Connection-oriented byte stream.
    Stream = 1,
    /// Connection-oriented message stream (not implemented by this driver).
    SeqPacket = 2,
}

bitflags! {
    /// Flags of a `SHUTDOWN` packet. The spec numbers the bits 0 and 1; as masks they are
    /// 1 and 2 (B32).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
    pub struct ShutdownFlags: u32 {
        /// The sender will receive no more data.
        const RECEIVE = 1;
        /// The sender will send no more data.
        const SEND = 2;
    }
}

/// The device-event id of `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// Why bytes could not be taken as a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// Fewer than [`HEADER_LEN`] bytes.
    Truncated,
    /// The header's `len` is larger than the bytes that follow it, or than [`MAX_PAYLOAD`].
    LengthMismatch,
    /// The output buffer is too small for the header.
    BufferTooSmall,
}

/// A packet header as plain values. `socket_type` and `op` stay raw so that unknown
/// values can still be answered (B11) or dropped (B10) by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Raw socket type; see [`SocketType`].
    pub socket_type: u16,
    /// Raw operation; see [`Op`].
    pub op: u16,
    /// Operation-specific flags (for `SHUTDOWN`: [`ShutdownFlags`]).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender's application has consumed on this connection (free-running).
    pub fwd_cnt: u32,
}

// The readers below index a fixed-size header array at constant offsets: no device value
// chooses an index.
fn le_u16(bytes: &[u8; HEADER_LEN], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(&bytes[at..at + 2]);
    u16::from_le_bytes(raw)
}

fn le_u32(bytes: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn le_u64(bytes: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

impl Header {
    /// Reads a header from the first [`HEADER_LEN`] bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Header, WireError> {
        let Some(raw) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(WireError::Truncated);
        };
        Ok(Header {
            src_cid: le_u64(raw, 0),
            dst_cid: le_u64(raw, 8),
            src_port: le_u32(raw, 16),
            dst_port: le_u32(raw, 20),
            len: le_u32(raw, 24),
            socket_type: le_u16(raw, 28),
            op: le_u16(raw, 30),
            flags: le_u32(raw, 32),
            buf_alloc: le_u32(raw, 36),
            fwd_cnt: le_u32(raw, 40),
        })
    }

    /// Parses a packet the device wrote: `written` is the length the device reported and
    /// `bytes` the buffer (at least `written` long). Returns the header and its payload
    /// (B5, B10: the header is copied once; `len` is checked against what was written).
    pub fn parse_packet(bytes: &[u8], written: usize) -> Result<(Header, &[u8]), WireError> {
        let packet = bytes.get(..written).ok_or(WireError::LengthMismatch)?;
        let header = Header::parse(packet)?;
        let len = header.len as usize;
        if len > MAX_PAYLOAD {
            return Err(WireError::LengthMismatch);
        }
        let end = HEADER_LEN
            .checked_add(len)
            .ok_or(WireError::LengthMismatch)?;
        let payload = packet
            .get(HEADER_LEN..end)
            .ok_or(WireError::LengthMismatch)?;
        Ok((header, payload))
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    pub fn emit(&self, out: &mut [u8]) -> Result<(), WireError> {
        let Some(raw) = out.get_mut(..HEADER_LEN) else {
            return Err(WireError::BufferTooSmall);
        };
        raw[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        raw[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        raw[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        raw[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        raw[24..28].copy_from_slice(&self.len.to_le_bytes());
        raw[28..30].copy_from_slice(&self.socket_type.to_le_bytes());
        raw[30..32].copy_from_slice(&self.op.to_le_bytes());
        raw[32..36].copy_from_slice(&self.flags.to_le_bytes());
        raw[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        raw[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        Ok(())
    }

    /// The RST that answers this packet: source and destination swapped, same type, no
    /// payload and no credit fields (B13: an RST for no connection).
    pub const fn rst_reply(&self) -> Header {
        Header {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            socket_type: self.socket_type,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// The operation, if it is a known one.
    pub const fn op(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }

    /// The socket type, if it is a known one.
    pub const fn socket_type(&self) -> Option<SocketType> {
        match self.socket_type {
            1 => Some(SocketType::Stream),
            2 => Some(SocketType::SeqPacket),
            _ => None,
        }
    }

    /// The `SHUTDOWN` flags, unknown bits dropped.
    pub const fn shutdown_flags(&self) -> ShutdownFlags {
        ShutdownFlags::from_bits_truncate(self.flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 3,
            src_port: 0xAABB_CCDD,
            dst_port: 1234,
            len: 5,
            socket_type: SocketType::Stream as u16,
            op: Op::Rw as u16,
            flags: 0x1122_3344,
            buf_alloc: 0x0004_0000,
            fwd_cnt: 0xFFFF_FFF0,
        }
    }

    #[test]
    fn every_field_is_little_endian_at_its_offset() {
        let mut raw = [0u8; HEADER_LEN];
        sample().emit(&mut raw).unwrap();
        assert_eq!(&raw[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&raw[8..16], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&raw[16..20], &[0xDD, 0xCC, 0xBB, 0xAA]);
        assert_eq!(&raw[20..24], &[0xD2, 0x04, 0, 0]);
        assert_eq!(&raw[24..28], &[5, 0, 0, 0]);
        assert_eq!(&raw[28..30], &[1, 0]);
        assert_eq!(&raw[30..32], &[5, 0]);
        assert_eq!(&raw[32..36], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(&raw[36..40], &[0, 0, 4, 0]);
        assert_eq!(&raw[40..44], &[0xF0, 0xFF, 0xFF, 0xFF]);
        assert_eq!(Header::parse(&raw), Ok(sample()));
    }

    #[test]
    fn b13_rst_reply_swaps_addresses_keeps_the_type_and_carries_nothing_else() {
        let packet = Header {
            src_cid: 2,
            dst_cid: 3,
            src_port: 5000,
            dst_port: 1234,
            len: 17,
            socket_type: 9,
            op: Op::Rw as u16,
            flags: 3,
            buf_alloc: 4096,
            fwd_cnt: 77,
        };
        assert_eq!(
            packet.rst_reply(),
            Header {
                src_cid: 3,
                dst_cid: 2,
                src_port: 1234,
                dst_port: 5000,
                len: 0,
                socket_type: 9,
                op: Op::Rst as u16,
                flags: 0,
                buf_alloc: 0,
                fwd_cnt: 0,
            }
        );
    }

    #[test]
    fn every_op_round_trips() {
        for (raw, op) in [
            (1, Op::Request),
            (2, Op::Response),
            (3, Op::Rst),
            (4, Op::Shutdown),
            (5, Op::Rw),
            (6, Op::CreditUpdate),
            (7, Op::CreditRequest),
        ] {
            assert_eq!(Op::from_raw(raw), Some(op));
            assert_eq!(op as u16, raw);
            let header = Header {
                op: raw,
                ..sample()
            };
            let mut out = [0u8; HEADER_LEN];
            header.emit(&mut out).unwrap();
            assert_eq!(Header::parse(&out).unwrap().op(), Some(op));
            assert_eq!(op.is_control(), op != Op::Rw);
        }
        for unknown in [0u16, 8, 0xFFFF] {
            assert_eq!(Op::from_raw(unknown), None);
        }
    }

    #[test]
    fn socket_types_and_unknown_types() {
        assert_eq!(
            Header {
                socket_type: 1,
                ..sample()
            }
            .socket_type(),
            Some(SocketType::Stream)
        );
        assert_eq!(
            Header {
                socket_type: 2,
                ..sample()
            }
            .socket_type(),
            Some(SocketType::SeqPacket)
        );
        assert_eq!(
            Header {
                socket_type: 0,
                ..sample()
            }
            .socket_type(),
            None
        );
        assert_eq!(
            Header {
                socket_type: 3,
                ..sample()
            }
            .socket_type(),
            None
        );
    }

    #[test]
    fn shutdown_flags_are_masks_1_and_2() {
        assert_eq!(ShutdownFlags::RECEIVE.bits(), 1);
        assert_eq!(ShutdownFlags::SEND.bits(), 2);
        let header = Header {
            flags: 0xFFFF_FFFF,
            ..sample()
        };
        assert_eq!(header.shutdown_flags(), ShutdownFlags::all());
    }

    #[test]
    fn short_buffers_are_rejected() {
        assert_eq!(
            Header::parse(&[0u8; HEADER_LEN - 1]),
            Err(WireError::Truncated)
        );
        assert_eq!(Header::parse(&[]), Err(WireError::Truncated));
        let mut out = [0u8; HEADER_LEN - 1];
        assert_eq!(sample().emit(&mut out), Err(WireError::BufferTooSmall));
    }

    #[test]
    fn packet_payload_is_bounded_by_what_the_device_wrote() {
        let mut buf = [0u8; 128];
        sample().emit(&mut buf).unwrap();
        buf[HEADER_LEN..HEADER_LEN + 5].copy_from_slice(b"hello");
        let (header, payload) = Header::parse_packet(&buf, HEADER_LEN + 5).unwrap();
        assert_eq!(header, sample());
        assert_eq!(payload, b"hello");
        // len = 5 but only 4 payload bytes written.
        assert_eq!(
            Header::parse_packet(&buf, HEADER_LEN + 4),
            Err(WireError::LengthMismatch)
        );
        // Written length beyond the buffer.
        assert_eq!(
            Header::parse_packet(&buf, 129),
            Err(WireError::LengthMismatch)
        );
        // Shorter than a header.
        assert_eq!(Header::parse_packet(&buf, 43), Err(WireError::Truncated));
        // A huge len must not overflow.
        let huge = Header {
            len: u32::MAX,
            ..sample()
        };
        huge.emit(&mut buf).unwrap();
        assert_eq!(
            Header::parse_packet(&buf, 128),
            Err(WireError::LengthMismatch)
        );
    }

    #[test]
    fn extra_written_bytes_after_the_payload_are_ignored() {
        let mut buf = [0u8; 64];
        Header { len: 0, ..sample() }.emit(&mut buf).unwrap();
        let (_, payload) = Header::parse_packet(&buf, 64).unwrap();
        assert!(payload.is_empty());
    }
}
