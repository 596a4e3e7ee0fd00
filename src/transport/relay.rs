//! Copies bytes between a TCP connection and a QUIC stream, both ways, keeping half-close and
//! turning errors into resets.
//!
//! A FIN on either side becomes a stream finish (or a TCP `shutdown(Write)`), and the other
//! direction keeps flowing until it ends too. An error or reset on either side aborts both
//! directions: the QUIC stream is reset and stopped, and the TCP peer gets an RST (zero linger),
//! never a clean EOF that could pass a truncated transfer off as complete.

use std::io;

use quinn::{ReadError, RecvStream, SendStream, WriteError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::proto::StreamCode;

/// Bytes read from TCP per write into the stream. Large buffers keep per-chunk overhead low on
/// bulk transfers; one buffer is allocated per relay, never per chunk.
const TCP_READ_BUF: usize = 64 * 1024;

/// Largest chunk taken from the QUIC stream at once (quinn hands out its own buffers, so this
/// only bounds a single write to TCP).
const QUIC_READ_CHUNK: usize = 256 * 1024;

/// Which way bytes moved, from the point of view of the side running the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// TCP → QUIC stream.
    Sent,
    /// QUIC stream → TCP.
    Received,
}

/// Why a relay ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading from the TCP peer failed (usually a reset).
    #[error("TCP read: {0}")]
    TcpRead(io::Error),
    /// Writing to the TCP peer failed.
    #[error("TCP write: {0}")]
    TcpWrite(io::Error),
    /// The QUIC peer stopped reading or the connection was lost.
    #[error("stream write: {0}")]
    StreamWrite(WriteError),
    /// The QUIC peer reset the stream or the connection was lost.
    #[error("stream read: {0}")]
    StreamRead(ReadError),
    /// The relay was told to stop (shutdown grace over).
    #[error("cut off: shutdown grace period over")]
    Cut,
}

/// How a relay ended.
#[derive(Debug)]
pub struct RelayOutcome {
    /// Bytes moved TCP → stream.
    pub sent: u64,
    /// Bytes moved stream → TCP.
    pub received: u64,
    /// `None` if both directions finished cleanly.
    pub error: Option<RelayError>,
}

/// Relays until both directions have finished, one fails, or `cut` completes (which aborts
/// both directions like an error). `meter` is called for every chunk moved, so live byte
/// counters stay current during long transfers.
///
/// Cancel-safe in the sense that dropping it drops the TCP connection and the stream (quinn
/// resets an unfinished stream on drop); use [`relay`]'s return value for orderly endings.
pub async fn relay<M>(
    mut tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    meter: M,
    cut: impl std::future::Future<Output = ()>,
) -> RelayOutcome
where
    M: Fn(Direction, usize),
{
    let _ = tcp.set_nodelay(true);
    let mut sent = 0u64;
    let mut received = 0u64;
    let error = {
        let (mut tcp_read, mut tcp_write) = tcp.split();
        let up = tcp_to_stream(&mut tcp_read, &mut send, &meter, &mut sent);
        let down = stream_to_tcp(&mut recv, &mut tcp_write, &meter, &mut received);
        tokio::pin!(up, down, cut);
        let mut up_done = false;
        let mut down_done = false;
        loop {
            tokio::select! {
                () = &mut cut => break Some(RelayError::Cut),
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(e) => break Some(e),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(e) => break Some(e),
                },
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    if error.is_some() {
        // Abort both directions: the peer of the stream sees a reset, the TCP peer an RST.
        let _ = send.reset(StreamCode::Reset.into());
        let _ = recv.stop(StreamCode::Reset.into());
        let _ = tcp.set_zero_linger();
    }
    drop(tcp);
    RelayOutcome {
        sent,
        received,
        error,
    }
}

async fn tcp_to_stream<M: Fn(Direction, usize)>(
    tcp: &mut ReadHalf<'_>,
    send: &mut SendStream,
    meter: &M,
    total: &mut u64,
) -> Result<(), RelayError> {
    let mut buf = vec![0u8; TCP_READ_BUF];
    loop {
        let n = tcp.read(&mut buf).await.map_err(RelayError::TcpRead)?;
        if n == 0 {
            // TCP FIN → stream finish; the other direction keeps flowing.
            let _ = send.finish();
            return Ok(());
        }
        send.write_all(&buf[..n])
            .await
            .map_err(RelayError::StreamWrite)?;
        *total += n as u64;
        meter(Direction::Sent, n);
    }
}

async fn stream_to_tcp<M: Fn(Direction, usize)>(
    recv: &mut RecvStream,
    tcp: &mut WriteHalf<'_>,
    meter: &M,
    total: &mut u64,
) -> Result<(), RelayError> {
    loop {
        match recv.read_chunk(QUIC_READ_CHUNK, true).await {
            Ok(Some(chunk)) => {
                tcp.write_all(&chunk.bytes)
                    .await
                    .map_err(RelayError::TcpWrite)?;
                *total += chunk.bytes.len() as u64;
                meter(Direction::Received, chunk.bytes.len());
            }
            Ok(None) => {
                // Stream finish → TCP FIN (half-close); the other direction keeps flowing.
                tcp.shutdown().await.map_err(RelayError::TcpWrite)?;
                return Ok(());
            }
            Err(e) => return Err(RelayError::StreamRead(e)),
        }
    }
}
