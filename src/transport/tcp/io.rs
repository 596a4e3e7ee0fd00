//! The byte stream under and above TLS on a TCP session, shaped for fewer system calls and
//! fewer, fuller TLS records: reads from the socket in large pieces, and QMux's writes
//! gathered until it flushes.
//!
//! Measured in docs/performance.md ("Results: fewer system calls"): rustls fills
//! its record buffer 4 KiB per read, so a 16 KiB record cost four `recvfrom`; and QMux's
//! 8 KiB write buffer passes each full record's 2-byte size prefix to TLS on its own, so
//! every 16 KiB of stream data became two TLS records (one of 2 bytes), two seals, two
//! opens on the peer and two `sendmsg`.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes read from the socket at once: four full TLS records.
pub(super) const READ_AHEAD: usize = 64 * 1024;

/// Most bytes gathered before they are handed to TLS without a flush: four TLS records of
/// 16 KiB, which rustls seals and writes with one `writev`.
pub(super) const WRITE_BATCH: usize = 64 * 1024;

/// A socket read in pieces of up to [`READ_AHEAD`] bytes, served to TLS in the pieces it asks
/// for. The buffer exists only while it holds bytes, so an idle session keeps no 64 KiB.
/// Writes pass straight through.
pub(super) struct ReadAhead<T> {
    inner: T,
    /// Bytes read from the socket and not yet taken; empty (no allocation) when drained.
    buffered: BytesMut,
}

impl<T> ReadAhead<T> {
    /// Reads `inner` through the read-ahead buffer.
    pub(super) fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            buffered: BytesMut::new(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.buffered.is_empty() {
            if buf.remaining() >= READ_AHEAD {
                // A reader asking for as much as the buffer holds gets it directly.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut fill = BytesMut::with_capacity(READ_AHEAD);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.inner),
                cx,
                &mut fill
            ))?;
            if n == 0 {
                // End of stream: nothing to hand over, and nothing kept.
                return Poll::Ready(Ok(()));
            }
            this.buffered = fill;
        }
        let n = buf.remaining().min(this.buffered.len());
        buf.put_slice(&this.buffered[..n]);
        this.buffered.advance(n);
        if this.buffered.is_empty() {
            this.buffered = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Writes gathered into one buffer of up to [`WRITE_BATCH`] bytes and handed to `inner` (the
/// TLS stream) when the writer flushes or the buffer is full. QMux flushes after every burst
/// of frames, so nothing waits longer than it did; what changes is that a record's size
/// prefix and its payload reach TLS together, as one TLS record. The buffer exists only while
/// it holds bytes. Reads pass straight through.
pub(super) struct WriteBatch<T> {
    inner: T,
    /// Bytes written and not yet handed to `inner`.
    pending: BytesMut,
}

impl<T> WriteBatch<T> {
    /// Gathers the writes to `inner`.
    pub(super) fn new(inner: T) -> Self {
        WriteBatch {
            inner,
            pending: BytesMut::new(),
        }
    }
}

impl<T: AsyncWrite + Unpin> WriteBatch<T> {
    /// Hands every pending byte to `inner`. `Pending` keeps the rest for the next call.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.advance(n);
        }
        self.pending = BytesMut::new();
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteBatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteBatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.len() + buf.len() > WRITE_BATCH {
            ready!(this.poll_drain(cx))?;
        }
        if buf.len() >= WRITE_BATCH {
            // Nothing pending (drained above): a write this large needs no gathering.
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if this.pending.capacity() == 0 {
            this.pending.reserve(WRITE_BATCH);
        }
        this.pending.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stream that records the size of every write that reaches it and every read asked
    /// of it.
    #[derive(Default, Clone)]
    struct Recorder {
        writes: Arc<Mutex<Vec<usize>>>,
        reads: Arc<Mutex<usize>>,
        data: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.lock().unwrap().push(buf.len());
            self.data.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            *self.reads.lock().unwrap() += 1;
            let mut data = self.data.lock().unwrap();
            let n = buf.remaining().min(data.len());
            buf.put_slice(&data[..n]);
            data.drain(..n);
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_record_prefix_and_its_payload_reach_tls_as_one_write() {
        let below = Recorder::default();
        let mut batch = WriteBatch::new(below.clone());
        // QMux's writer: a 2-byte size prefix, then the record, three times, then a flush.
        for i in 0..3u8 {
            batch.write_all(&[0x7f, 0xfe]).await.unwrap();
            batch.write_all(&vec![i; 16_382]).await.unwrap();
        }
        assert!(
            below.writes.lock().unwrap().is_empty(),
            "nothing before flush"
        );
        batch.flush().await.unwrap();
        assert_eq!(*below.writes.lock().unwrap(), vec![3 * 16_384]);
        let data = below.data.lock().unwrap().clone();
        assert_eq!(&data[..3], &[0x7f, 0xfe, 0]);
        assert_eq!(&data[16_384..16_387], &[0x7f, 0xfe, 1]);
        assert_eq!(data.len(), 3 * 16_384);
        // A full batch goes before the next write is taken; shutdown drains what is left.
        below.writes.lock().unwrap().clear();
        batch.write_all(&vec![9; WRITE_BATCH - 10]).await.unwrap();
        batch.write_all(&[1; 20]).await.unwrap();
        assert_eq!(*below.writes.lock().unwrap(), vec![WRITE_BATCH - 10]);
        batch.shutdown().await.unwrap();
        assert_eq!(*below.writes.lock().unwrap(), vec![WRITE_BATCH - 10, 20]);
        assert_eq!(batch.pending.capacity(), 0, "an idle batch holds no buffer");
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read() {
        let below = Recorder::default();
        let sent: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        below.data.lock().unwrap().extend_from_slice(&sent);
        let mut ahead = ReadAhead::new(below.clone());
        let mut got = Vec::new();
        let mut piece = [0u8; 4096];
        loop {
            let n = ahead.read(&mut piece).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
        }
        assert_eq!(got, sent);
        // 100,000 bytes in 4 KiB pieces: two reads of the stream (64 KiB, then the rest) and
        // the one that saw its end, not 26.
        assert_eq!(*below.reads.lock().unwrap(), 3);
        assert_eq!(ahead.buffered.capacity(), 0, "a drained buffer is let go");
    }
}
