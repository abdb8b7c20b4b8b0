//! The link handshake, byte by byte, for both roles and both modes.
//!
//! Plaintext: the dialer sends a `hello` frame; the acceptor answers
//! `welcome` (its own hello) or `reject`; the dialer checks the welcome the
//! same way and, if it disagrees, sends `reject` itself.
//!
//! With a cluster secret the same messages are the payloads of a Noise
//! `NNpsk0` handshake ([`crate::secure`]), each in a tagged frame
//! (`length | version | TAGGED | kind | noise message`), and the dialer then
//! confirms the link keys with a first sealed record holding one `ping`.
//! The acceptor counts the link as established only once that record
//! opens, so a replayed first message never yields a link. A secured node
//! never sends or accepts a plaintext frame.
//!
//! The bytes are exactly those `PROTOCOL.md` documents ("Link handshake",
//! "Secured link"). The machine consumes from the caller's read buffer only
//! the frames of the handshake: whatever follows stays there for the
//! established link, whose codecs [`Established`] carries.

use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{check_hello, FrameCodec, FrameError, Hello, Message, Ping, Reject};
use crate::frame::{FLAG_TAGGED, FRAME_HEADER, VERSION};
use crate::link::codes::RejectCode;
use crate::link::liveness::Role;
use crate::membership::DialFailure;
use crate::secure::{Initiator, Keyring, LinkSecurityError, Responder, MAX_NOISE_MSG};

/// What a handshake needs to know about this node.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// Our identity, sent as `hello` or `welcome`.
    pub local: Hello,
    /// The cluster keys (a snapshot: the primary seals a dial, any opens an
    /// inbound handshake); `None` for a plaintext node.
    pub keyring: Option<Keyring>,
    /// Largest frame of the link, in bytes after the length prefix.
    pub max_frame: usize,
    /// Bound on the whole handshake, from its start.
    pub timeout: Duration,
}

/// A completed handshake: who the peer is, and the codecs of the link (the
/// secured ones carry its session keys and the state of the records already
/// read or written).
#[derive(Debug)]
pub struct Established {
    /// The peer's hello (or welcome).
    pub remote: Hello,
    /// Decodes what the peer sends.
    pub decoder: FrameCodec,
    /// Encodes what this end sends.
    pub encoder: FrameCodec,
}

/// Why a handshake produced no link. Nothing of the link survives any of
/// these; [`HandshakeError::drop_reason`] says which are counted as the
/// peer's fault, [`HandshakeError::dial_failure`] what a failed dial tells
/// the peer table.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The peer answered our hello with `reject`.
    #[error("the peer refused the link ({code}): {detail}")]
    Rejected {
        /// The peer's code.
        code: RejectCode,
        /// The peer's explanation.
        detail: String,
    },
    /// We refused the peer's hello or welcome; the `reject` telling it why
    /// is the handshake's last transmit.
    #[error("refused {name} ({code}): {detail}")]
    Refused {
        /// The peer's name, from its hello.
        name: String,
        /// Our code.
        code: RejectCode,
        /// Our explanation.
        detail: String,
    },
    /// A handshake frame did not decode.
    #[error(transparent)]
    Frame(FrameError),
    /// The peer spoke plaintext to a node with a cluster secret (it has
    /// none): closed unanswered.
    #[error("plaintext handshake: the peer has no cluster secret (security mismatch)")]
    Plaintext,
    /// The Noise handshake failed: no installed key opens it, or it is
    /// malformed.
    #[error(transparent)]
    Security(LinkSecurityError),
    /// A well-formed message of the wrong kind for this step.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What this step needs.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The peer closed the connection before the handshake completed.
    #[error("the peer closed the connection during the handshake")]
    Closed,
    /// No hello arrived within the timeout.
    #[error("no hello within the handshake timeout")]
    NoHello,
    /// The handshake did not complete within the timeout.
    #[error("the handshake timed out")]
    Timeout,
    /// The dialer did not confirm the link keys: a replayed handshake, or
    /// it went away.
    #[error("the dialer did not confirm the link keys (a replayed handshake, or it went away)")]
    NotConfirmed,
    /// Our own message could not be encoded (an oversized hello).
    #[error("cannot encode our handshake: {0}")]
    Encode(FrameError),
}

impl HandshakeError {
    /// The drop-counter label when the failure is the peer's fault (what
    /// `status` shows under `links_refused`), `None` otherwise.
    pub fn drop_reason(&self) -> Option<&'static str> {
        match self {
            HandshakeError::Refused { code, .. } => Some(code.drop_reason()),
            HandshakeError::Frame(e) => Some(e.reason()),
            HandshakeError::Plaintext => Some("security_mismatch"),
            HandshakeError::Security(e) => Some(e.reason()),
            HandshakeError::Unexpected { .. } => Some("handshake"),
            HandshakeError::NoHello => Some("handshake_timeout"),
            HandshakeError::Rejected { .. }
            | HandshakeError::Closed
            | HandshakeError::Timeout
            | HandshakeError::NotConfirmed
            | HandshakeError::Encode(_) => None,
        }
    }

    /// What a dial that failed this way tells the peer table.
    pub fn dial_failure(&self) -> DialFailure {
        match self {
            HandshakeError::Rejected {
                code: RejectCode::Duplicate,
                ..
            } => DialFailure::Duplicate,
            // Closed before any answer: most likely a dying process whose
            // listener still held our connection in its queue.
            HandshakeError::Closed => DialFailure::Reset,
            _ => DialFailure::Other,
        }
    }
}

#[derive(Debug)]
enum State {
    /// Dialer, plaintext: hello sent, waiting for welcome or reject.
    AwaitWelcome,
    /// Dialer, secured: Noise message 1 sent, waiting for message 2.
    AwaitNoiseAnswer(Box<Initiator>),
    /// Acceptor: waiting for the dialer's hello (a plaintext frame, or Noise
    /// message 1).
    AwaitHello,
    /// Acceptor, secured: welcome sent, waiting for the key confirmation.
    AwaitConfirm(Box<Established>),
    /// Finished; the outcome waits to be polled.
    Done,
}

/// The handshake machine of one connection.
///
/// Inputs: [`Handshake::on_bytes`] with the connection's read buffer,
/// [`Handshake::on_eof`], [`Handshake::on_timeout`] once
/// [`Handshake::next_deadline`] has passed. Outputs: bytes to write
/// ([`Handshake::poll_transmit`]), then the outcome
/// ([`Handshake::poll_outcome`], which waits until every transmit was
/// taken, so that a `welcome` or `reject` is always written before the
/// driver acts on the outcome).
#[derive(Debug)]
pub struct Handshake {
    role: Role,
    state: State,
    local: Hello,
    keyring: Option<Keyring>,
    max_frame: usize,
    deadline: Instant,
    /// Frames of a plaintext handshake, and then of the plaintext link.
    plain: FrameCodec,
    transmit: BytesMut,
    outcome: Option<Result<Established, HandshakeError>>,
}

impl Handshake {
    /// The dialer's side, started at `now` on a fresh connection: its first
    /// message is ready in [`Handshake::poll_transmit`].
    pub fn dial(now: Instant, cfg: HandshakeConfig) -> Handshake {
        let mut hs = Handshake::new(now, Role::Dialer, cfg);
        let hello = Message::Hello(hs.local.clone());
        let started = match &hs.keyring {
            None => hs
                .plain
                .encode(hello, &mut hs.transmit)
                .map(|()| State::AwaitWelcome)
                .map_err(HandshakeError::Encode),
            Some(ring) => hello
                .to_payload()
                .map_err(HandshakeError::Encode)
                .and_then(|payload| {
                    Initiator::start(ring.primary(), &payload).map_err(HandshakeError::Security)
                })
                .map(|(init, first)| {
                    put_noise(&mut hs.transmit, hello.kind(), &first);
                    State::AwaitNoiseAnswer(Box::new(init))
                }),
        };
        match started {
            Ok(state) => hs.state = state,
            Err(e) => hs.finish(Err(e)),
        }
        hs
    }

    /// The acceptor's side, started at `now` on an inbound connection.
    pub fn accept(now: Instant, cfg: HandshakeConfig) -> Handshake {
        let mut hs = Handshake::new(now, Role::Acceptor, cfg);
        hs.state = State::AwaitHello;
        hs
    }

    fn new(now: Instant, role: Role, cfg: HandshakeConfig) -> Handshake {
        Handshake {
            role,
            state: State::Done,
            local: cfg.local,
            keyring: cfg.keyring,
            max_frame: cfg.max_frame,
            deadline: now + cfg.timeout,
            plain: FrameCodec::new(cfg.max_frame),
            transmit: BytesMut::new(),
            outcome: None,
        }
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Bytes arrived: consumes from `buf` the handshake frames it holds
    /// (whole ones only; a partial frame stays until the rest arrives), and
    /// leaves the bytes after the handshake in place.
    pub fn on_bytes(&mut self, _now: Instant, buf: &mut BytesMut) {
        loop {
            let before = std::mem::discriminant(&self.state);
            let step = match std::mem::replace(&mut self.state, State::Done) {
                State::Done => return,
                State::AwaitWelcome => match self.plain.decode(buf) {
                    Ok(None) => Ok(State::AwaitWelcome),
                    Ok(Some(answer)) => {
                        let (decoder, encoder) = (self.plain_decoder(), self.plain_encoder());
                        self.judge_welcome(answer, decoder, encoder)
                    }
                    Err(e) => Err(HandshakeError::Frame(e)),
                },
                State::AwaitNoiseAnswer(init) => match take_noise(buf) {
                    Ok(None) => Ok(State::AwaitNoiseAnswer(init)),
                    Ok(Some(frame)) => self.on_noise_answer(*init, frame),
                    Err(e) => Err(HandshakeError::Frame(e)),
                },
                State::AwaitHello if self.keyring.is_none() => match self.plain.decode(buf) {
                    Ok(None) => Ok(State::AwaitHello),
                    Ok(Some(first)) => self.on_plain_hello(first),
                    Err(e) => Err(HandshakeError::Frame(e)),
                },
                State::AwaitHello => match take_noise(buf) {
                    Ok(None) => Ok(State::AwaitHello),
                    Ok(Some(frame)) => self.on_noise_hello(frame),
                    Err(e) => Err(HandshakeError::Frame(e)),
                },
                State::AwaitConfirm(mut est) => match est.decoder.decode(buf) {
                    Ok(None) => Ok(State::AwaitConfirm(est)),
                    Ok(Some(Message::Ping(_))) => {
                        self.finish(Ok(*est));
                        Ok(State::Done)
                    }
                    // The dialer disagreed with our welcome and says why.
                    Ok(Some(Message::Reject(r))) => Err(HandshakeError::Rejected {
                        code: r.code,
                        detail: r.detail,
                    }),
                    Ok(Some(other)) => Err(HandshakeError::Unexpected {
                        expected: "ping",
                        got: other.name(),
                    }),
                    Err(e) => Err(HandshakeError::Frame(e)),
                },
            };
            match step {
                // Finished: `finish` has set the state and the outcome.
                Ok(State::Done) => return,
                Ok(next) => {
                    // A new step may find its input already buffered; the
                    // same step again means it needs more bytes.
                    let moved = std::mem::discriminant(&next) != before;
                    self.state = next;
                    if !moved {
                        return;
                    }
                }
                Err(e) => {
                    self.finish(Err(e));
                    return;
                }
            }
        }
    }

    /// The peer closed the connection.
    pub fn on_eof(&mut self, _now: Instant) {
        let error = match self.state {
            State::Done => return,
            State::AwaitConfirm(_) => HandshakeError::NotConfirmed,
            _ => HandshakeError::Closed,
        };
        self.finish(Err(error));
    }

    /// Time passed: fails the handshake once its deadline has.
    pub fn on_timeout(&mut self, now: Instant) {
        if now < self.deadline {
            return;
        }
        let error = match self.state {
            State::Done => return,
            State::AwaitHello => HandshakeError::NoHello,
            State::AwaitConfirm(_) => HandshakeError::NotConfirmed,
            _ => HandshakeError::Timeout,
        };
        self.finish(Err(error));
    }

    /// When [`Handshake::on_timeout`] is due; `None` once finished.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Done => None,
            _ => Some(self.deadline),
        }
    }

    /// The bytes to write next, in order.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.transmit.is_empty()).then(|| self.transmit.split().freeze())
    }

    /// The outcome, once the handshake is over and every transmit was
    /// taken. Returned once.
    pub fn poll_outcome(&mut self) -> Option<Result<Established, HandshakeError>> {
        if self.transmit.is_empty() {
            self.outcome.take()
        } else {
            None
        }
    }

    fn finish(&mut self, outcome: Result<Established, HandshakeError>) {
        self.state = State::Done;
        self.outcome = Some(outcome);
    }

    fn plain_decoder(&mut self) -> FrameCodec {
        // The codec that read the handshake goes on reading the link.
        std::mem::replace(&mut self.plain, FrameCodec::new(self.max_frame))
    }

    fn plain_encoder(&self) -> FrameCodec {
        FrameCodec::new(self.max_frame)
    }

    /// `Welcome` with our identity, or the `Reject` for `remote`.
    fn judge(&self, remote: &Hello) -> Result<(), Reject> {
        check_hello(&self.local, remote)
    }

    /// Dialer: the acceptor's answer, the same in both modes.
    fn judge_welcome(
        &mut self,
        answer: Message,
        decoder: FrameCodec,
        mut encoder: FrameCodec,
    ) -> Result<State, HandshakeError> {
        let remote = match answer {
            Message::Welcome(remote) => remote,
            Message::Reject(r) => {
                return Err(HandshakeError::Rejected {
                    code: r.code,
                    detail: r.detail,
                })
            }
            other => {
                return Err(HandshakeError::Unexpected {
                    expected: "welcome",
                    got: other.name(),
                })
            }
        };
        // The acceptor checked us; we check it too (it may be of another
        // cluster or version, or be ourselves through a stale address).
        if let Err(reject) = self.judge(&remote) {
            let refused = HandshakeError::Refused {
                name: remote.name,
                code: reject.code.clone(),
                detail: reject.detail.clone(),
            };
            // Tell the other side why before hanging up.
            encoder
                .encode(Message::Reject(reject), &mut self.transmit)
                .map_err(HandshakeError::Encode)?;
            return Err(refused);
        }
        if self.keyring.is_some() {
            // Key confirmation: one sealed record holding one ping.
            encoder
                .encode(Message::Ping(Ping::default()), &mut self.transmit)
                .map_err(HandshakeError::Encode)?;
        }
        self.finish(Ok(Established {
            remote,
            decoder,
            encoder,
        }));
        Ok(State::Done)
    }

    /// Secured dialer: Noise message 2.
    fn on_noise_answer(
        &mut self,
        init: Initiator,
        frame: NoiseFrame,
    ) -> Result<State, HandshakeError> {
        if !frame.tagged {
            return Err(HandshakeError::Plaintext);
        }
        let (payload, ciphers) = init.finish(&frame.body).map_err(HandshakeError::Security)?;
        let answer = Message::from_payload(&payload).map_err(HandshakeError::Frame)?;
        let decoder = FrameCodec::secured(self.max_frame, ciphers.recv);
        let encoder = FrameCodec::secured(self.max_frame, ciphers.send);
        self.judge_welcome(answer, decoder, encoder)
    }

    /// Plaintext acceptor: the first frame.
    fn on_plain_hello(&mut self, first: Message) -> Result<State, HandshakeError> {
        let remote = expect_hello(first)?;
        let reply = self.reply(&remote);
        self.plain
            .encode(reply.clone(), &mut self.transmit)
            .map_err(HandshakeError::Encode)?;
        refused(&remote, reply)?;
        let (decoder, encoder) = (self.plain_decoder(), self.plain_encoder());
        self.finish(Ok(Established {
            remote,
            decoder,
            encoder,
        }));
        Ok(State::Done)
    }

    /// Secured acceptor: Noise message 1.
    fn on_noise_hello(&mut self, frame: NoiseFrame) -> Result<State, HandshakeError> {
        if !frame.tagged {
            // Closed unanswered: a node with a secret never sends plaintext.
            return Err(HandshakeError::Plaintext);
        }
        let ring = self
            .keyring
            .as_ref()
            .expect("secured acceptor has a keyring");
        let (responder, payload) =
            Responder::read(ring, &frame.body).map_err(HandshakeError::Security)?;
        let first = Message::from_payload(&payload).map_err(HandshakeError::Frame)?;
        let remote = expect_hello(first)?;
        let reply = self.reply(&remote);
        let answer = reply.to_payload().map_err(HandshakeError::Encode)?;
        let (second, ciphers) = responder
            .finish(&answer)
            .map_err(HandshakeError::Security)?;
        put_noise(&mut self.transmit, reply.kind(), &second);
        refused(&remote, reply)?;
        Ok(State::AwaitConfirm(Box::new(Established {
            remote,
            decoder: FrameCodec::secured(self.max_frame, ciphers.recv),
            encoder: FrameCodec::secured(self.max_frame, ciphers.send),
        })))
    }

    fn reply(&self, remote: &Hello) -> Message {
        match self.judge(remote) {
            Ok(()) => Message::Welcome(self.local.clone()),
            Err(reject) => Message::Reject(reject),
        }
    }
}

fn expect_hello(first: Message) -> Result<Hello, HandshakeError> {
    match first {
        Message::Hello(remote) => Ok(remote),
        other => Err(HandshakeError::Unexpected {
            expected: "hello",
            got: other.name(),
        }),
    }
}

/// The error for a reply that is a `Reject` (already queued).
fn refused(remote: &Hello, reply: Message) -> Result<(), HandshakeError> {
    match reply {
        Message::Reject(Reject { code, detail }) => Err(HandshakeError::Refused {
            name: remote.name.clone(),
            code,
            detail,
        }),
        _ => Ok(()),
    }
}

/// One handshake frame of the secured mode, header checked.
struct NoiseFrame {
    tagged: bool,
    body: BytesMut,
}

/// Appends one handshake frame: `length | version | TAGGED | kind | noise`.
fn put_noise(dst: &mut BytesMut, kind: u8, noise: &[u8]) {
    dst.reserve(4 + FRAME_HEADER + noise.len());
    // Cannot truncate: a Noise message is at most 65535 bytes.
    dst.put_u32((FRAME_HEADER + noise.len()) as u32);
    dst.put_slice(&[VERSION, FLAG_TAGGED, kind]);
    dst.put_slice(noise);
}

/// Takes exactly one handshake frame from `buf` (never more: what follows
/// belongs to the link's codec), bounded by the Noise message limit, which
/// is checked from the length prefix before anything is buffered.
fn take_noise(buf: &mut BytesMut) -> Result<Option<NoiseFrame>, FrameError> {
    const MAX: usize = FRAME_HEADER + MAX_NOISE_MSG;
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
    if len > MAX {
        return Err(FrameError::TooLarge { max: MAX });
    }
    if len < FRAME_HEADER {
        return Err(FrameError::Truncated);
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let mut body = buf.split_to(len);
    let (version, flags) = (body[0], body[1]);
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    body.advance(FRAME_HEADER);
    Ok(Some(NoiseFrame {
        tagged: flags & FLAG_TAGGED != 0,
        body,
    }))
}
