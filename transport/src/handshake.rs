//! The link handshake over a fresh TCP stream: `Hello` from the dialer,
//! `Welcome` or `Reject` from the acceptor. The decision itself is the
//! sans-IO [`proto::frame::check_hello`]; this module does the IO and
//! bounds it in time.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use proto::frame::check_hello;
use proto::membership::DialFailure;
use proto::{FrameCodec, Hello, Message};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::codec::{FramedRead, FramedWrite};

pub(crate) type Halves = (
    FramedRead<OwnedReadHalf, FrameCodec>,
    FramedWrite<OwnedWriteHalf, FrameCodec>,
);

/// Why a handshake did not produce a link.
#[derive(Debug, thiserror::Error)]
#[error("{detail}")]
pub(crate) struct HandshakeError {
    pub why: DialFailure,
    /// Drop-counter reason, when the failure is the *peer's* fault.
    pub drop_reason: Option<&'static str>,
    pub detail: String,
}

impl HandshakeError {
    fn other(detail: impl Into<String>) -> Self {
        HandshakeError {
            why: DialFailure::Other,
            drop_reason: None,
            detail: detail.into(),
        }
    }
}

fn split(stream: TcpStream, max_frame: usize) -> Halves {
    // Small control frames dominate: do not let Nagle delay them.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    let (rd, wr) = stream.into_split(); // owned halves, no lock between them
    (
        FramedRead::new(rd, FrameCodec::new(max_frame)),
        FramedWrite::new(wr, FrameCodec::new(max_frame)),
    )
}

/// Connects to `addr` and runs the dialer side of the handshake.
pub(crate) async fn dial(
    addr: SocketAddr,
    local: &Hello,
    max_frame: usize,
    connect_timeout: Duration,
    handshake_timeout: Duration,
) -> Result<(Hello, Halves), HandshakeError> {
    let stream = match timeout(connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(HandshakeError::other(format!(
                "connect to {addr} timed out"
            )))
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            return Err(HandshakeError {
                why: DialFailure::Refused,
                drop_reason: None,
                detail: format!("connect to {addr} refused"),
            })
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
            return Err(HandshakeError {
                why: DialFailure::Reset,
                drop_reason: None,
                detail: format!("connect to {addr}: {e}"),
            })
        }
        Ok(Err(e)) => return Err(HandshakeError::other(format!("connect to {addr}: {e}"))),
        Ok(Ok(s)) => s,
    };
    let (mut rd, mut wr) = split(stream, max_frame);
    let exchange = async {
        wr.send(Message::Hello(local.clone())).await?;
        rd.next().await.transpose()
    };
    let answer = match timeout(handshake_timeout, exchange).await {
        Err(_) => {
            return Err(HandshakeError::other(format!(
                "handshake with {addr} timed out"
            )))
        }
        Ok(Err(proto::FrameError::Io(e))) => {
            // Reset before any answer: most likely a dying process whose
            // listener still held our connection in its queue.
            let why = match e.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => DialFailure::Reset,
                _ => DialFailure::Other,
            };
            return Err(HandshakeError {
                why,
                drop_reason: None,
                detail: format!("handshake with {addr}: {e}"),
            });
        }
        Ok(Err(e)) => {
            return Err(HandshakeError {
                why: DialFailure::Other,
                drop_reason: Some(e.reason()),
                detail: format!("handshake with {addr}: {e}"),
            })
        }
        Ok(Ok(None)) => {
            return Err(HandshakeError {
                why: DialFailure::Reset,
                drop_reason: None,
                detail: format!("{addr} closed during handshake"),
            })
        }
        Ok(Ok(Some(m))) => m,
    };
    match answer {
        Message::Welcome(remote) => {
            // The acceptor checked us; we check it too (it may be of another
            // cluster or version, or be ourselves through a stale address).
            if let Err(reject) = check_hello(local, &remote) {
                let reason = reject.code.clone();
                // Tell the other side why before hanging up; best effort.
                let _best_effort =
                    timeout(handshake_timeout, wr.send(Message::Reject(reject.clone()))).await;
                return Err(HandshakeError {
                    why: DialFailure::Other,
                    drop_reason: Some(drop_label(&reason)),
                    detail: format!("{addr}: {}", reject.detail),
                });
            }
            Ok((remote, (rd, wr)))
        }
        Message::Reject(r) if r.code == "duplicate" => Err(HandshakeError {
            why: DialFailure::Duplicate,
            drop_reason: None,
            detail: format!("{addr}: link already established"),
        }),
        Message::Reject(r) => Err(HandshakeError {
            why: DialFailure::Other,
            drop_reason: None,
            detail: format!("{addr} rejected the link ({}): {}", r.code, r.detail),
        }),
        other => Err(HandshakeError {
            why: DialFailure::Other,
            drop_reason: Some("handshake"),
            detail: format!("{addr} answered the handshake with {}", other.name()),
        }),
    }
}

/// Runs the acceptor side on an inbound stream. On success the `Welcome` is
/// already sent.
pub(crate) async fn accept(
    stream: TcpStream,
    local: &Hello,
    max_frame: usize,
    handshake_timeout: Duration,
) -> Result<(Hello, Halves), HandshakeError> {
    let (mut rd, mut wr) = split(stream, max_frame);
    let first = match timeout(handshake_timeout, rd.next()).await {
        Err(_) => {
            return Err(HandshakeError {
                why: DialFailure::Other,
                drop_reason: Some("handshake_timeout"),
                detail: "no hello within the handshake timeout".into(),
            })
        }
        Ok(None) => return Err(HandshakeError::other("closed before hello")),
        Ok(Some(Err(e))) => {
            return Err(HandshakeError {
                why: DialFailure::Other,
                drop_reason: Some(e.reason()),
                detail: format!("bad first frame: {e}"),
            })
        }
        Ok(Some(Ok(m))) => m,
    };
    let Message::Hello(remote) = first else {
        return Err(HandshakeError {
            why: DialFailure::Other,
            drop_reason: Some("handshake"),
            detail: format!("first frame was {}, not hello", first.name()),
        });
    };
    let reply = match check_hello(local, &remote) {
        Ok(()) => Message::Welcome(local.clone()),
        Err(reject) => {
            let code = reject.code.clone();
            let detail = reject.detail.clone();
            let _best_effort = timeout(handshake_timeout, wr.send(Message::Reject(reject))).await;
            return Err(HandshakeError {
                why: DialFailure::Other,
                drop_reason: Some(drop_label(&code)),
                detail: format!("rejected {} ({}): {detail}", remote.name, code),
            });
        }
    };
    match timeout(handshake_timeout, wr.send(reply)).await {
        Ok(Ok(())) => Ok((remote, (rd, wr))),
        Ok(Err(e)) => Err(HandshakeError::other(format!("sending welcome: {e}"))),
        Err(_) => Err(HandshakeError::other("sending welcome timed out")),
    }
}

/// Counter label of a reject code.
fn drop_label(code: &str) -> &'static str {
    match code {
        "cluster" => "cluster",
        "version" => "version",
        "self" => "self",
        _ => "rejected",
    }
}
