//! The link handshake over a fresh TCP stream: `Hello` from the dialer,
//! `Welcome` or `Reject` from the acceptor. The decision itself is the
//! sans-IO [`proto::frame::check_hello`]; this module does the IO and
//! bounds it in time.
//!
//! With a cluster secret the same two messages travel as the payloads of a
//! Noise `NNpsk0` handshake (see `proto::secure` and PROTOCOL.md), each in a
//! tagged frame; the dialer then confirms the link keys with a first sealed
//! frame before the acceptor counts the link as up, so a replayed first
//! message never yields a link. A node with a secret never sends or accepts
//! a plaintext frame: a plaintext hello is closed unanswered and counted as
//! a security mismatch.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use proto::frame::{check_hello, Ping, Reject, FLAG_TAGGED, FRAME_HEADER, VERSION};
use proto::membership::DialFailure;
use proto::secure::MAX_NOISE_MSG;
use proto::secure::{Initiator, LinkCiphers, LinkSecurityError, Responder, SharedKeyring};
use proto::{FrameCodec, FrameError, Hello, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::actor::Config;

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

    fn dropped(reason: &'static str, detail: impl Into<String>) -> Self {
        HandshakeError {
            why: DialFailure::Other,
            drop_reason: Some(reason),
            detail: detail.into(),
        }
    }

    /// An IO error while waiting for the answer to our hello. A reset before
    /// any answer is most likely a dying process whose listener still held
    /// our connection in its queue.
    fn answer_io(addr: SocketAddr, e: &io::Error) -> Self {
        let why = match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::UnexpectedEof => DialFailure::Reset,
            _ => DialFailure::Other,
        };
        HandshakeError {
            why,
            drop_reason: None,
            detail: format!("handshake with {addr}: {e}"),
        }
    }

    fn security(e: &LinkSecurityError, detail: impl Into<String>) -> Self {
        Self::dropped(e.reason(), format!("{}: {e}", detail.into()))
    }
}

fn nodelay(stream: &TcpStream) {
    // Small control frames dominate: do not let Nagle delay them.
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
}

fn split(stream: TcpStream, max_frame: usize) -> Halves {
    let (rd, wr) = stream.into_split(); // owned halves, no lock between them
    (
        FramedRead::new(rd, FrameCodec::new(max_frame)),
        FramedWrite::new(wr, FrameCodec::new(max_frame)),
    )
}

fn split_secured(stream: TcpStream, max_frame: usize, ciphers: LinkCiphers) -> Halves {
    let (rd, wr) = stream.into_split();
    (
        FramedRead::new(rd, FrameCodec::secured(max_frame, ciphers.recv)),
        FramedWrite::new(wr, FrameCodec::secured(max_frame, ciphers.send)),
    )
}

async fn connect(addr: SocketAddr, connect_timeout: Duration) -> Result<TcpStream, HandshakeError> {
    match timeout(connect_timeout, TcpStream::connect(addr)).await {
        Err(_) => Err(HandshakeError::other(format!(
            "connect to {addr} timed out"
        ))),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(HandshakeError {
            why: DialFailure::Refused,
            drop_reason: None,
            detail: format!("connect to {addr} refused"),
        }),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => Err(HandshakeError {
            why: DialFailure::Reset,
            drop_reason: None,
            detail: format!("connect to {addr}: {e}"),
        }),
        Ok(Err(e)) => Err(HandshakeError::other(format!("connect to {addr}: {e}"))),
        Ok(Ok(s)) => {
            nodelay(&s);
            Ok(s)
        }
    }
}

/// Connects to `addr` and runs the dialer side of the handshake.
pub(crate) async fn dial(
    addr: SocketAddr,
    cfg: &Config,
) -> Result<(Hello, Halves), HandshakeError> {
    let stream = connect(addr, cfg.connect_timeout).await?;
    match &cfg.keyring {
        None => dial_plain(stream, addr, cfg).await,
        Some(ring) => dial_secured(stream, addr, cfg, ring).await,
    }
}

async fn dial_plain(
    stream: TcpStream,
    addr: SocketAddr,
    cfg: &Config,
) -> Result<(Hello, Halves), HandshakeError> {
    let (mut rd, mut wr) = split(stream, cfg.max_frame);
    let exchange = async {
        wr.send(Message::Hello(cfg.local.clone())).await?;
        rd.next().await.transpose()
    };
    let answer = match timeout(cfg.handshake_timeout, exchange).await {
        Err(_) => {
            return Err(HandshakeError::other(format!(
                "handshake with {addr} timed out"
            )))
        }
        Ok(Err(FrameError::Io(e))) => return Err(HandshakeError::answer_io(addr, &e)),
        Ok(Err(e)) => {
            return Err(HandshakeError::dropped(
                e.reason(),
                format!("handshake with {addr}: {e}"),
            ))
        }
        Ok(Ok(None)) => return Err(closed(addr)),
        Ok(Ok(Some(m))) => m,
    };
    finish_dial(addr, cfg, answer, (rd, wr)).await
}

fn closed(addr: SocketAddr) -> HandshakeError {
    HandshakeError {
        why: DialFailure::Reset,
        drop_reason: None,
        detail: format!("{addr} closed during handshake"),
    }
}

async fn dial_secured(
    mut stream: TcpStream,
    addr: SocketAddr,
    cfg: &Config,
    ring: &SharedKeyring,
) -> Result<(Hello, Halves), HandshakeError> {
    let key = ring
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .primary()
        .clone();
    let hello = Message::Hello(cfg.local.clone());
    let kind = hello.kind();
    let hello = hello
        .to_payload()
        .map_err(|e| HandshakeError::other(format!("cannot encode our hello: {e}")))?;
    let (init, first) =
        Initiator::start(&key, &hello).map_err(|e| HandshakeError::other(format!("noise: {e}")))?;
    let exchange = async {
        write_raw(&mut stream, kind, &first).await?;
        read_raw(&mut stream).await
    };
    let (flags, _kind, body) = match timeout(cfg.handshake_timeout, exchange).await {
        Err(_) => {
            return Err(HandshakeError::other(format!(
                "handshake with {addr} timed out"
            )))
        }
        Ok(Err(RawError::Io(e))) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(closed(addr))
        }
        Ok(Err(RawError::Io(e))) => return Err(HandshakeError::answer_io(addr, &e)),
        Ok(Err(RawError::Frame(e))) => {
            return Err(HandshakeError::dropped(
                e.reason(),
                format!("handshake with {addr}: {e}"),
            ))
        }
        Ok(Ok(raw)) => raw,
    };
    if flags & FLAG_TAGGED == 0 {
        return Err(HandshakeError::dropped(
            "security_mismatch",
            format!("{addr} answered in plaintext: it has no cluster secret (security mismatch)"),
        ));
    }
    let (payload, ciphers) = init
        .finish(&body)
        .map_err(|e| HandshakeError::security(&e, format!("{addr}")))?;
    let answer = Message::from_payload(&payload)
        .map_err(|e| HandshakeError::dropped(e.reason(), format!("{addr}: {e}")))?;
    let halves = split_secured(stream, cfg.max_frame, ciphers);
    let (remote, mut halves) = finish_dial(addr, cfg, answer, halves).await?;
    // Key confirmation: the acceptor counts the link as up only after this
    // first sealed frame, which a replay of our first message cannot forge.
    let confirm = Message::Ping(Ping::default());
    match timeout(cfg.handshake_timeout, halves.1.send(confirm)).await {
        Ok(Ok(())) => Ok((remote, halves)),
        Ok(Err(e)) => Err(HandshakeError::other(format!(
            "confirming keys with {addr}: {e}"
        ))),
        Err(_) => Err(HandshakeError::other(format!(
            "confirming keys with {addr} timed out"
        ))),
    }
}

/// Judges the acceptor's answer (the same for both modes).
async fn finish_dial(
    addr: SocketAddr,
    cfg: &Config,
    answer: Message,
    (rd, mut wr): Halves,
) -> Result<(Hello, Halves), HandshakeError> {
    match answer {
        Message::Welcome(remote) => {
            // The acceptor checked us; we check it too (it may be of another
            // cluster or version, or be ourselves through a stale address).
            if let Err(reject) = check_hello(&cfg.local, &remote) {
                let reason = reject.code.clone();
                // Tell the other side why before hanging up; best effort.
                let _best_effort = timeout(
                    cfg.handshake_timeout,
                    wr.send(Message::Reject(reject.clone())),
                )
                .await;
                return Err(HandshakeError::dropped(
                    reason.drop_reason(),
                    format!("{addr}: {}", reject.detail),
                ));
            }
            Ok((remote, (rd, wr)))
        }
        Message::Reject(r) if r.code == "duplicate" => Err(HandshakeError {
            why: DialFailure::Duplicate,
            drop_reason: None,
            detail: format!("{addr}: link already established"),
        }),
        Message::Reject(r) => Err(HandshakeError::other(format!(
            "{addr} rejected the link ({}): {}",
            r.code, r.detail
        ))),
        other => Err(HandshakeError::dropped(
            "handshake",
            format!("{addr} answered the handshake with {}", other.name()),
        )),
    }
}

/// Runs the acceptor side on an inbound stream. On success the `Welcome` is
/// already sent.
pub(crate) async fn accept(
    stream: TcpStream,
    cfg: &Config,
) -> Result<(Hello, Halves), HandshakeError> {
    nodelay(&stream);
    match &cfg.keyring {
        None => accept_plain(stream, cfg).await,
        Some(ring) => accept_secured(stream, cfg, ring).await,
    }
}

async fn accept_plain(stream: TcpStream, cfg: &Config) -> Result<(Hello, Halves), HandshakeError> {
    let (mut rd, mut wr) = split(stream, cfg.max_frame);
    let first = match timeout(cfg.handshake_timeout, rd.next()).await {
        Err(_) => return Err(no_hello()),
        Ok(None) => return Err(HandshakeError::other("closed before hello")),
        Ok(Some(Err(e))) => {
            return Err(HandshakeError::dropped(
                e.reason(),
                format!("bad first frame: {e}"),
            ))
        }
        Ok(Some(Ok(m))) => m,
    };
    let remote = expect_hello(first)?;
    let reply = judge_hello(cfg, &remote);
    match timeout(cfg.handshake_timeout, wr.send(reply.clone())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(HandshakeError::other(format!("sending welcome: {e}"))),
        Err(_) => return Err(HandshakeError::other("sending welcome timed out")),
    }
    rejected(&remote, reply)?;
    Ok((remote, (rd, wr)))
}

async fn accept_secured(
    mut stream: TcpStream,
    cfg: &Config,
    ring: &SharedKeyring,
) -> Result<(Hello, Halves), HandshakeError> {
    let (flags, _kind, body) = match timeout(cfg.handshake_timeout, read_raw(&mut stream)).await {
        Err(_) => return Err(no_hello()),
        Ok(Err(RawError::Io(e))) => {
            return Err(HandshakeError::other(format!("before hello: {e}")))
        }
        Ok(Err(RawError::Frame(e))) => {
            return Err(HandshakeError::dropped(
                e.reason(),
                format!("bad first frame: {e}"),
            ))
        }
        Ok(Ok(raw)) => raw,
    };
    if flags & FLAG_TAGGED == 0 {
        // Closed unanswered: a node with a secret never sends plaintext.
        return Err(HandshakeError::dropped(
            "security_mismatch",
            "plaintext hello: the dialer has no cluster secret (security mismatch)",
        ));
    }
    let read = Responder::read(&ring.read().unwrap_or_else(|e| e.into_inner()), &body);
    let (responder, payload) = read.map_err(|e| HandshakeError::security(&e, "inbound link"))?;
    let first = Message::from_payload(&payload)
        .map_err(|e| HandshakeError::dropped(e.reason(), format!("bad hello: {e}")))?;
    let remote = expect_hello(first)?;
    let reply = judge_hello(cfg, &remote);
    let answer = reply
        .to_payload()
        .map_err(|e| HandshakeError::other(format!("cannot encode our welcome: {e}")))?;
    let (second, ciphers) = responder
        .finish(&answer)
        .map_err(|e| HandshakeError::other(format!("noise: {e}")))?;
    match timeout(
        cfg.handshake_timeout,
        write_raw(&mut stream, reply.kind(), &second),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(HandshakeError::other(format!("sending welcome: {e}"))),
        Err(_) => return Err(HandshakeError::other("sending welcome timed out")),
    }
    rejected(&remote, reply)?;
    let (mut rd, wr) = split_secured(stream, cfg.max_frame, ciphers);
    match timeout(cfg.handshake_timeout, rd.next()).await {
        Ok(Some(Ok(Message::Ping(_)))) => Ok((remote, (rd, wr))),
        Ok(Some(Err(e))) => Err(HandshakeError::dropped(
            e.reason(),
            format!("key confirmation from {}: {e}", remote.name),
        )),
        Ok(Some(Ok(other))) => Err(HandshakeError::dropped(
            "handshake",
            format!(
                "{} confirmed keys with {}, not ping",
                remote.name,
                other.name()
            ),
        )),
        Ok(None) | Err(_) => Err(HandshakeError::other(format!(
            "{} did not confirm the link keys (a replayed handshake, or it went away)",
            remote.name
        ))),
    }
}

fn no_hello() -> HandshakeError {
    HandshakeError::dropped("handshake_timeout", "no hello within the handshake timeout")
}

fn expect_hello(first: Message) -> Result<Hello, HandshakeError> {
    match first {
        Message::Hello(remote) => Ok(remote),
        other => Err(HandshakeError::dropped(
            "handshake",
            format!("first frame was {}, not hello", other.name()),
        )),
    }
}

/// `Welcome` with our identity, or the `Reject` for `remote`.
fn judge_hello(cfg: &Config, remote: &Hello) -> Message {
    match check_hello(&cfg.local, remote) {
        Ok(()) => Message::Welcome(cfg.local.clone()),
        Err(reject) => Message::Reject(reject),
    }
}

/// The error for a reply that was a `Reject` (already sent).
fn rejected(remote: &Hello, reply: Message) -> Result<(), HandshakeError> {
    match reply {
        Message::Reject(Reject { code, detail }) => Err(HandshakeError::dropped(
            code.drop_reason(),
            format!("rejected {} ({code}): {detail}", remote.name),
        )),
        _ => Ok(()),
    }
}

enum RawError {
    Io(io::Error),
    Frame(FrameError),
}

impl From<io::Error> for RawError {
    fn from(e: io::Error) -> Self {
        RawError::Io(e)
    }
}

/// Writes one handshake frame: `length | version | tagged | kind | noise`.
async fn write_raw(stream: &mut TcpStream, kind: u8, noise: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4 + FRAME_HEADER + noise.len());
    // Cannot truncate: a Noise message is at most 65535 bytes.
    buf.extend_from_slice(&((FRAME_HEADER + noise.len()) as u32).to_be_bytes());
    buf.extend_from_slice(&[VERSION, FLAG_TAGGED, kind]);
    buf.extend_from_slice(noise);
    stream.write_all(&buf).await
}

/// Reads exactly one handshake frame (never more: what follows belongs to
/// the link's codec), bounded by the Noise message limit.
async fn read_raw(stream: &mut TcpStream) -> Result<(u8, u8, Vec<u8>), RawError> {
    let len = stream.read_u32().await? as usize;
    if len > FRAME_HEADER + MAX_NOISE_MSG {
        return Err(RawError::Frame(FrameError::TooLarge {
            max: FRAME_HEADER + MAX_NOISE_MSG,
        }));
    }
    if len < FRAME_HEADER {
        return Err(RawError::Frame(FrameError::Truncated));
    }
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    let (version, flags, kind) = (buf[0], buf[1], buf[2]);
    if version != VERSION {
        return Err(RawError::Frame(FrameError::UnsupportedVersion(version)));
    }
    buf.drain(..FRAME_HEADER);
    Ok((flags, kind, buf))
}
