//! Length-prefixed postcard frames: the only place messages are encoded and decoded.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of postcard. The length
//! is checked against a hard cap before anything is allocated, so a peer cannot make us
//! reserve memory by announcing a huge frame.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest frame body either side accepts (64 KiB). Control and header messages are tiny;
/// bulk data never travels in frames.
pub const MAX_FRAME: usize = 64 * 1024;

/// Size of the length prefix.
const PREFIX: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The announced or encoded length exceeds the cap.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The cap in force.
        max: usize,
    },
    /// The bytes are not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] postcard::Error),
    /// A list or string in the message is longer than its bound (see [`bounds`]); the
    /// text names the field, e.g. `capabilities: 65336 entries, at most 32 allowed`.
    ///
    /// [`bounds`]: super::bounds
    #[error("message over its bounds: {0}")]
    OverBound(String),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// Reading or writing the stream failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes one message as a complete frame (prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, CodecError> {
    encode_limited(msg, MAX_FRAME)
}

/// Encodes one message as a complete frame whose body may be up to `max` bytes (for the
/// Kubernetes command channel, whose documents are larger than control frames).
pub fn encode_limited<T: Serialize>(msg: &T, max: usize) -> Result<Bytes, CodecError> {
    let mut buf = BytesMut::new();
    encode_into_limited(msg, &mut buf, max)?;
    Ok(buf.freeze())
}

fn encode_into<T: Serialize>(msg: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
    encode_into_limited(msg, dst, MAX_FRAME)
}

fn encode_into_limited<T: Serialize>(
    msg: &T,
    dst: &mut BytesMut,
    max: usize,
) -> Result<(), CodecError> {
    // Never more than what fits the u32 prefix.
    let max = max.min(u32::MAX as usize);
    let body = postcard::to_stdvec(msg)?;
    if body.len() > max {
        return Err(CodecError::TooLarge {
            len: body.len(),
            max,
        });
    }
    dst.reserve(PREFIX + body.len());
    // The cap above keeps the length well inside u32.
    dst.put_u32(body.len() as u32);
    dst.extend_from_slice(&body);
    Ok(())
}

/// Decodes one frame body (without prefix), refusing trailing bytes.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    decode_body_limited(body, MAX_FRAME)
}

/// Like [`decode_body`] with a cap of `max` bytes, for frames read with [`read_body_limited`]
/// and decoded elsewhere (off the I/O threads, for large ones).
pub fn decode_body_limited<T: DeserializeOwned>(body: &[u8], max: usize) -> Result<T, CodecError> {
    if body.len() > max {
        return Err(CodecError::TooLarge {
            len: body.len(),
            max,
        });
    }
    super::bounds::clear();
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| match (e, super::bounds::take_refusal()) {
            (postcard::Error::SerdeDeCustom, Some(why)) => CodecError::OverBound(why),
            (e, _) => CodecError::Malformed(e),
        })?;
    if !rest.is_empty() {
        return Err(CodecError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(msg)
}

/// Reads exactly one frame. Returns `Ok(None)` if the stream ended cleanly before the first
/// byte of a frame.
///
/// Not cancel-safe: dropping the future mid-frame loses the bytes read so far. Use it only
/// where the whole stream is abandoned on cancellation (a header under a timeout), and
/// [`FrameCodec`] inside `select!` loops.
pub async fn read_frame<T, R>(reader: &mut R) -> Result<Option<T>, CodecError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    read_frame_limited(reader, MAX_FRAME).await
}

/// Like [`read_frame`] with a cap of `max` body bytes instead of [`MAX_FRAME`]; the announced
/// length is checked against `max` before anything is allocated. Not cancel-safe.
pub async fn read_frame_limited<T, R>(reader: &mut R, max: usize) -> Result<Option<T>, CodecError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    match read_body_limited(reader, max).await? {
        Some(body) => decode_body_limited(&body, max).map(Some),
        None => Ok(None),
    }
}

/// Reads the body of one frame of at most `max` bytes without decoding it; `Ok(None)` if
/// the stream ended cleanly before the frame. The announced length is checked before
/// anything is allocated. Not cancel-safe.
pub async fn read_body_limited<R>(reader: &mut R, max: usize) -> Result<Option<Vec<u8>>, CodecError>
where
    R: AsyncRead + Unpin,
{
    let mut prefix = [0u8; PREFIX];
    let mut filled = 0;
    while filled < PREFIX {
        let n = reader.read(&mut prefix[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(CodecError::Truncated)
            };
        }
        filled += n;
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            CodecError::Truncated
        } else {
            CodecError::Io(e)
        }
    })?;
    Ok(Some(body))
}

/// A `tokio_util` codec for a stream of frames of one message type; its `FramedRead` is
/// cancel-safe, so control loops can `select!` on it.
#[derive(Debug)]
pub struct FrameCodec<T> {
    /// Largest frame body accepted when decoding.
    max: usize,
    _msg: PhantomData<fn() -> T>,
}

impl<T> FrameCodec<T> {
    /// A codec with the standard cap [`MAX_FRAME`].
    pub fn new() -> Self {
        Self::with_max(MAX_FRAME)
    }

    /// A codec that refuses frames longer than `max` (at most [`MAX_FRAME`]).
    pub fn with_max(max: usize) -> Self {
        FrameCodec {
            max: max.min(MAX_FRAME),
            _msg: PhantomData,
        }
    }
}

impl CodecError {
    /// Whether the peer announced a frame over the cap (counted as a cap refusal).
    pub fn is_too_large(&self) -> bool {
        matches!(self, CodecError::TooLarge { .. })
    }

    /// Whether the frame fit its cap but a list or string inside it did not (counted as a
    /// cap refusal, `cap="decoded_size"`).
    pub fn is_over_bound(&self) -> bool {
        matches!(self, CodecError::OverBound(_))
    }
}

impl<T> Default for FrameCodec<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: DeserializeOwned> tokio_util::codec::Decoder for FrameCodec<T> {
    type Item = T;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<T>, CodecError> {
        if src.len() < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        prefix.copy_from_slice(&src[..PREFIX]);
        let len = u32::from_be_bytes(prefix) as usize;
        if len > self.max {
            return Err(CodecError::TooLarge { len, max: self.max });
        }
        if src.len() < PREFIX + len {
            src.reserve(PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(PREFIX);
        let body = src.split_to(len);
        decode_body(&body).map(Some)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<T>, CodecError> {
        match self.decode(src)? {
            Some(msg) => Ok(Some(msg)),
            None if src.is_empty() => Ok(None),
            None => Err(CodecError::Truncated),
        }
    }
}

impl<T: Serialize> tokio_util::codec::Encoder<T> for FrameCodec<T> {
    type Error = CodecError;

    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), CodecError> {
        encode_into(&item, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Control, DialFailure, Host, Open, OpenReply};
    use tokio_util::codec::Decoder;

    #[tokio::test]
    async fn frames_round_trip_through_a_stream() {
        let msgs = vec![
            Open {
                host: Host::Domain("jenkins.internal".into()),
                port: 8080,
            },
            Open {
                host: Host::Ip("10.0.0.1".parse().unwrap()),
                port: 1,
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            wire.extend_from_slice(&encode(m).unwrap());
        }
        let mut reader = &wire[..];
        for m in &msgs {
            let got: Open = read_frame(&mut reader).await.unwrap().unwrap();
            assert_eq!(&got, m);
        }
        assert!(read_frame::<Open, _>(&mut reader).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn malformed_inputs_are_refused() {
        // (bytes, expected error kind)
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0, 0], "truncated"),
            (vec![0, 0, 0, 5, 1], "truncated"),
            (huge.to_vec(), "too large"),
            (u32::MAX.to_be_bytes().to_vec(), "too large"),
            (vec![0, 0, 0, 1, 0xff], "malformed"),
            (vec![0, 0, 0, 0], "malformed"),
        ];
        for (bytes, want) in cases {
            let mut reader = &bytes[..];
            let err = read_frame::<OpenReply, _>(&mut reader).await.unwrap_err();
            let kind = match err {
                CodecError::Truncated => "truncated",
                CodecError::TooLarge { .. } => "too large",
                CodecError::Malformed(_) => "malformed",
                CodecError::OverBound(_) => "over bound",
                CodecError::Io(_) => "io",
            };
            assert_eq!(kind, want, "{bytes:?}");
        }
    }

    #[test]
    fn trailing_bytes_inside_a_frame_are_refused() {
        let mut body = postcard::to_stdvec(&Control::Ping { seq: 7 }).unwrap();
        body.push(0);
        assert!(decode_body::<Control>(&body).is_err());
    }

    #[test]
    fn codec_waits_for_whole_frames_and_checks_length_first() {
        let frame = encode(&OpenReply::Failed {
            code: DialFailure::Refused,
            message: "refused".into(),
        })
        .unwrap();
        let mut codec = FrameCodec::<OpenReply>::new();
        let mut buf = BytesMut::new();
        for (i, b) in frame.iter().enumerate() {
            buf.put_u8(*b);
            let got = codec.decode(&mut buf).unwrap();
            assert_eq!(got.is_some(), i == frame.len() - 1);
        }
        let mut big = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(matches!(
            codec.decode(&mut big),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(
            big.capacity() < 1024,
            "must not reserve for a refused frame"
        );
    }

    #[tokio::test]
    async fn a_lower_cap_refuses_before_reading_the_body() {
        let frame = encode(&Control::Ping { seq: 1 }).unwrap();
        let mut reader = &frame[..];
        let ok: Control = read_frame_limited(&mut reader, frame.len() - 4)
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(ok, Control::Ping { seq: 1 }));
        let mut reader = &frame[..];
        let err = read_frame_limited::<Control, _>(&mut reader, frame.len() - 5)
            .await
            .unwrap_err();
        assert!(err.is_too_large(), "{err}");
        let mut codec = FrameCodec::<Control>::with_max(1);
        let mut buf = BytesMut::from(&frame[..]);
        assert!(codec.decode(&mut buf).unwrap_err().is_too_large());
    }

    #[test]
    fn oversized_messages_are_not_encoded() {
        let open = Open {
            host: Host::Domain("a".repeat(MAX_FRAME + 1)),
            port: 1,
        };
        assert!(matches!(encode(&open), Err(CodecError::TooLarge { .. })));
    }
}
