//! Runs a [`proto::link::Handshake`] over a fresh TCP stream: writes what
//! it transmits, feeds it what arrives, and stops at its deadline. Every
//! decision is the machine's; this module only moves bytes and maps IO
//! errors.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use proto::frame::FrameCodec;
use proto::link::{Handshake, HandshakeError};
use proto::membership::DialFailure;
use proto::Hello;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at};

use crate::config::now;

/// Read buffer of a handshake; the established link keeps it.
const HANDSHAKE_BUF: usize = 4 << 10;

/// A connection whose handshake completed: the stream, the bytes already
/// read beyond the handshake, and the codecs of the link.
pub(crate) struct Linked {
    pub remote: Hello,
    pub stream: TcpStream,
    pub buf: BytesMut,
    pub decoder: FrameCodec,
    pub encoder: FrameCodec,
}

/// Why a connection did not become a link.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// The machine said no.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The TCP connect failed.
    #[error("connect: {0}")]
    Connect(io::Error),
    /// The TCP connect did not complete in time.
    #[error("connect timed out")]
    ConnectTimeout,
    /// Reading or writing the stream failed.
    #[error("{0}")]
    Io(io::Error),
}

impl Failure {
    /// The drop-counter label when the failure is the peer's fault.
    pub fn drop_reason(&self) -> Option<&'static str> {
        match self {
            Failure::Handshake(e) => e.drop_reason(),
            Failure::Connect(_) | Failure::ConnectTimeout | Failure::Io(_) => None,
        }
    }

    /// What a dial that failed this way tells the peer table.
    pub fn dial_failure(&self) -> DialFailure {
        match self {
            Failure::Handshake(e) => e.dial_failure(),
            Failure::Connect(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused => DialFailure::Refused,
                io::ErrorKind::ConnectionReset => DialFailure::Reset,
                _ => DialFailure::Other,
            },
            Failure::ConnectTimeout => DialFailure::Other,
            // A reset before any answer is most likely a dying process
            // whose listener still held our connection in its queue.
            Failure::Io(e) => match e.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::UnexpectedEof => DialFailure::Reset,
                _ => DialFailure::Other,
            },
        }
    }
}

/// Connects to `addr` within `limit`.
pub(crate) async fn connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, Failure> {
    match timeout(limit, TcpStream::connect(addr)).await {
        Err(_) => Err(Failure::ConnectTimeout),
        Ok(Err(e)) => Err(Failure::Connect(e)),
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// Small control frames dominate: do not let Nagle delay them.
pub(crate) fn nodelay(stream: &TcpStream) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
}

/// Drives `hs` over `stream` until it has an outcome. Writes are bounded by
/// the handshake's deadline like reads are, so a peer that does not read
/// cannot hold a handshake open.
pub(crate) async fn run(mut stream: TcpStream, mut hs: Handshake) -> Result<Linked, Failure> {
    let deadline = tokio::time::Instant::from_std(hs.next_deadline().unwrap_or_else(now));
    let mut buf = BytesMut::with_capacity(HANDSHAKE_BUF);
    loop {
        while let Some(bytes) = hs.poll_transmit() {
            match timeout_at(deadline, stream.write_all(&bytes)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Failure::Io(e)),
                // A half-written welcome must never become a link.
                Err(_) => return Err(HandshakeError::Timeout.into()),
            }
        }
        if let Some(outcome) = hs.poll_outcome() {
            let est = outcome?;
            return Ok(Linked {
                remote: est.remote,
                stream,
                buf,
                decoder: est.decoder,
                encoder: est.encoder,
            });
        }
        // `read_buf` is cancel-safe: a timeout loses no bytes.
        let read = timeout_at(deadline, stream.read_buf(&mut buf)).await;
        let now = now();
        match read {
            Ok(Ok(0)) => hs.on_eof(now),
            Ok(Ok(_)) => hs.on_bytes(now, &mut buf),
            Ok(Err(e)) => return Err(Failure::Io(e)),
            Err(_) => hs.on_timeout(now),
        }
    }
}
