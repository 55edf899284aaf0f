//! Encoding frames into buffers and decoding them out of buffers, with no IO.
//!
//! The header is checked in full (version, size limit, type, exact body length)
//! before the body is waited for, so a hostile length never makes the caller buffer
//! or allocate more than [`MAX_BODY_LEN`] bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::frame::Frame;
use crate::types::ReasonCode;

/// The protocol version this crate speaks, carried in every frame header.
pub const VERSION: u8 = 1;
/// Bytes in the frame header: `length: u16`, `type: u8`, `version: u8`.
pub const HEADER_LEN: usize = 4;
/// The largest body any frame may announce; larger is [`DecodeError::FrameTooLarge`].
pub const MAX_BODY_LEN: usize = 512;
/// The largest whole frame, header included.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_BODY_LEN;

/// Why bytes from the peer are not a valid frame. Every variant is the peer's fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The header's version byte is not [`VERSION`].
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The header announces a body over [`MAX_BODY_LEN`].
    #[error("frame body of {0} bytes exceeds the maximum of {MAX_BODY_LEN}")]
    FrameTooLarge(usize),
    /// The type byte is not a frame of this version.
    #[error("unknown frame type {0:#04x}")]
    UnknownFrameType(u8),
    /// The announced body length is not the fixed length of the frame type.
    #[error("frame type {frame_type:#04x} has a {expected}-byte body, header says {actual}")]
    BodyLength {
        /// The frame type byte.
        frame_type: u8,
        /// The type's fixed body length.
        expected: usize,
        /// What the header announced.
        actual: usize,
    },
    /// A field holds a value outside its defined set.
    #[error("field `{field}` has invalid value {value}")]
    InvalidField {
        /// The field's name as in PROTOCOL.md.
        field: &'static str,
        /// The value received.
        value: u64,
    },
    /// A body ended before its last field. The length checks make this unreachable
    /// from the public decoders; it exists so field readers never need to panic.
    #[error("frame body truncated")]
    Truncated,
}

impl DecodeError {
    /// The reason code to send the peer for this error.
    pub const fn reason(&self) -> ReasonCode {
        match self {
            DecodeError::UnsupportedVersion(_) => ReasonCode::UnsupportedVersion,
            DecodeError::FrameTooLarge(_) => ReasonCode::FrameTooLarge,
            DecodeError::UnknownFrameType(_) => ReasonCode::UnknownFrameType,
            DecodeError::BodyLength { .. }
            | DecodeError::InvalidField { .. }
            | DecodeError::Truncated => ReasonCode::MalformedFrame,
        }
    }
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The frame type byte.
    pub frame_type: u8,
    /// Body length in bytes; known to be the frame type's fixed length.
    pub body_len: usize,
}

impl Header {
    /// Whole frame length, header included.
    pub const fn frame_len(&self) -> usize {
        HEADER_LEN + self.body_len
    }
}

/// Reads and validates the header at the front of `src`.
///
/// `Ok(None)` means fewer than [`HEADER_LEN`] bytes are there yet. A valid header
/// says how many more bytes to wait for; an invalid one is rejected at once.
pub fn decode_header(src: &[u8]) -> Result<Option<Header>, DecodeError> {
    let Some(&[len_lo, len_hi, frame_type, version]) = src.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let body_len = usize::from(u16::from_le_bytes([len_lo, len_hi]));
    if body_len > MAX_BODY_LEN {
        return Err(DecodeError::FrameTooLarge(body_len));
    }
    let expected =
        Frame::body_len_of_type(frame_type).ok_or(DecodeError::UnknownFrameType(frame_type))?;
    if body_len != expected {
        return Err(DecodeError::BodyLength {
            frame_type,
            expected,
            actual: body_len,
        });
    }
    Ok(Some(Header {
        frame_type,
        body_len,
    }))
}

/// Decodes one frame from the front of `src` without consuming anything.
///
/// Returns the frame and the number of bytes it occupied, `Ok(None)` when `src`
/// holds only part of a frame, or the error that makes the bytes invalid. It reads
/// no byte past the frame and allocates nothing.
pub fn decode(src: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some(header) = decode_header(src)? else {
        return Ok(None);
    };
    let Some(body) = src.get(HEADER_LEN..header.frame_len()) else {
        return Ok(None);
    };
    let frame = Frame::take_body(header.frame_type, body)?;
    Ok(Some((frame, header.frame_len())))
}

/// Decodes one frame from the front of `buf` and advances past it.
///
/// On `Ok(None)` or an error, `buf` is left untouched.
pub fn decode_buf(buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
    let decoded = decode(buf)?;
    Ok(decoded.map(|(frame, used)| {
        buf.advance(used);
        frame
    }))
}

impl Frame {
    /// Whole encoded length, header included.
    pub const fn encoded_len(&self) -> usize {
        HEADER_LEN + self.body_len()
    }

    /// Appends the encoded frame (header and body) to `dst`.
    pub fn encode(&self, dst: &mut impl BufMut) {
        let body_len = u16::try_from(self.body_len()).unwrap_or(u16::MAX);
        dst.put_u16_le(body_len);
        dst.put_u8(self.frame_type());
        dst.put_u8(VERSION);
        self.put_body(dst);
    }

    /// The encoded frame as one immutable buffer, ready to be sent and retained.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        buf.freeze()
    }
}

/// Bytes of encoding room a [`FrameEncoder`] allocates at a time (about 60 frames).
pub const ENCODE_CHUNK: usize = 4_096;

/// Encodes frames one after another into shared chunks of [`ENCODE_CHUNK`] bytes and
/// hands each out as its own immutable `Bytes`: one allocation serves many frames,
/// where [`Frame::to_bytes`] makes one per frame. A chunk is freed once every frame
/// split off it is dropped, so keep a frame that must live long (weeks in a resend
/// buffer) in a buffer of its own.
#[derive(Debug, Default)]
pub struct FrameEncoder {
    chunk: BytesMut,
}

impl FrameEncoder {
    /// The encoded frame, split off the current chunk (a new one when it is full).
    pub fn encode(&mut self, frame: &Frame) -> Bytes {
        let len = frame.encoded_len();
        if self.chunk.capacity() < len {
            self.chunk.reserve(ENCODE_CHUNK.max(len));
        }
        frame.encode(&mut self.chunk);
        self.chunk.split().freeze()
    }

    /// Lets go of the spare room of the current chunk (an idle owner keeps none).
    pub fn release(&mut self) {
        self.chunk = BytesMut::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoder_hands_out_each_frame_alone_and_decodable_from_shared_chunks() {
        let mut encoder = FrameEncoder::default();
        let frames: Vec<Frame> = (1..=200)
            .map(|server_seq| Frame::from(crate::Ack { server_seq }))
            .collect();
        let encoded: Vec<Bytes> = frames.iter().map(|f| encoder.encode(f)).collect();
        for (frame, bytes) in frames.iter().zip(&encoded) {
            assert_eq!(bytes, &frame.to_bytes());
            assert_eq!(decode(bytes), Ok(Some((*frame, bytes.len()))));
        }
        encoder.release();
        let big_enough = encoder.encode(&frames[0]);
        assert_eq!(big_enough, frames[0].to_bytes());
    }
    use crate::frame::{Ack, Cancel, FRAME_TYPES};

    #[test]
    fn every_body_fits_the_maximum() {
        for spec in FRAME_TYPES {
            assert!(
                spec.body_len <= MAX_BODY_LEN,
                "{} exceeds the maximum",
                spec.name
            );
        }
    }

    #[test]
    fn needs_more_bytes_until_the_frame_is_whole() {
        let bytes = Frame::from(Cancel {
            client_seq: 3,
            client_order_id: 9,
        })
        .to_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(matches!(decode(&bytes), Ok(Some((Frame::Cancel(_), 20)))));
    }

    #[test]
    fn rejects_oversized_length_before_the_body_arrives() {
        let header = [0xff, 0xff, Ack::TYPE, VERSION];
        assert_eq!(decode(&header), Err(DecodeError::FrameTooLarge(0xffff)));
    }

    #[test]
    fn rejects_wrong_version_unknown_type_and_wrong_length() {
        assert_eq!(
            decode(&[8, 0, Ack::TYPE, 2]),
            Err(DecodeError::UnsupportedVersion(2))
        );
        assert_eq!(
            decode(&[0, 0, 0x7f, VERSION]),
            Err(DecodeError::UnknownFrameType(0x7f))
        );
        assert_eq!(
            decode(&[7, 0, Ack::TYPE, VERSION]),
            Err(DecodeError::BodyLength {
                frame_type: Ack::TYPE,
                expected: 8,
                actual: 7
            })
        );
    }

    #[test]
    fn rejects_out_of_range_enum_values() {
        let mut bytes = BytesMut::new();
        Frame::from(crate::frame::Close {
            reason: ReasonCode::TakenOver,
        })
        .encode(&mut bytes);
        bytes[4] = 0xee;
        bytes[5] = 0xee;
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::InvalidField {
                field: "reason",
                value: 0xeeee
            })
        );
    }

    #[test]
    fn decode_buf_consumes_exactly_one_frame() {
        let mut buf = BytesMut::new();
        Frame::from(Ack { server_seq: 1 }).encode(&mut buf);
        Frame::from(Ack { server_seq: 2 }).encode(&mut buf);
        buf.extend_from_slice(&[12, 0]);
        assert_eq!(
            decode_buf(&mut buf),
            Ok(Some(Frame::Ack(Ack { server_seq: 1 })))
        );
        assert_eq!(
            decode_buf(&mut buf),
            Ok(Some(Frame::Ack(Ack { server_seq: 2 })))
        );
        assert_eq!(decode_buf(&mut buf), Ok(None));
        assert_eq!(buf.len(), 2);
    }
}
