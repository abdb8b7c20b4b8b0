//! Transport settings, and the two views of them the link machines take.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::link::{wall_clock_anchor, HandshakeConfig, LinkConfig};
use proto::secure::SharedKeyring;
use proto::Hello;

/// Transport settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our handshake: identity, cluster, advertised address, tags.
    pub local: Hello,
    /// Largest frame accepted or sent, in bytes.
    pub max_frame: usize,
    /// How often the dialing side pings on each link.
    pub ping_interval: Duration,
    /// A link silent this long is closed.
    pub link_timeout: Duration,
    /// Bound on a whole handshake.
    pub handshake_timeout: Duration,
    /// Bound on a TCP connect.
    pub connect_timeout: Duration,
    /// Per-link outbound queue, in messages. The link's writer takes the
    /// whole queue at once, so a link holds at most twice this many
    /// messages not yet written: those queued, and those taken.
    pub queue: usize,
    /// How long an application send waits for queue room before the link is
    /// judged stuck and dropped.
    pub send_timeout: Duration,
    /// Most inbound handshakes in progress at once; more are refused.
    pub max_pending_handshakes: usize,
    /// How long a link the peer closed with `reject{duplicate}` waits for
    /// the peer's preferred link before it is reported down
    /// ([`proto::link::Handovers`]). Keep it well below the node's
    /// suspicion deadline.
    pub handover_wait: Duration,
    /// How long a link closed here with a farewell (`goodbye`, `reject`)
    /// reads on, dropping what it reads, for the peer's close: a socket
    /// closed with unread data resets the connection, and the reset can
    /// overtake the farewell.
    pub farewell_drain: Duration,
    /// How often links that carried frames are reported as
    /// [`TransportEvent::Heard`](crate::TransportEvent::Heard).
    pub liveness_report: Duration,
    /// The cluster secret: when set, every link is a Noise handshake under
    /// one of these keys and every frame is sealed; plaintext is refused.
    pub keyring: Option<SharedKeyring>,
    /// This node's current incarnation, when something other than the
    /// start may raise it (a refutation by the peer table in overlay
    /// mode): every handshake from then on carries the larger of it and
    /// [`Config::local`]'s.
    pub incarnation: Option<Arc<AtomicU64>>,
}

impl Config {
    /// Defaults around `local`.
    pub fn new(local: Hello) -> Self {
        Config {
            local,
            max_frame: proto::frame::DEFAULT_MAX_FRAME,
            ping_interval: Duration::from_millis(200),
            link_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            queue: 1024,
            send_timeout: Duration::from_secs(2),
            max_pending_handshakes: 64,
            handover_wait: proto::link::HANDOVER_WAIT,
            farewell_drain: proto::link::FAREWELL_DRAIN,
            liveness_report: Duration::from_millis(50),
            keyring: None,
            incarnation: None,
        }
    }

    /// What a handshake starting now needs: a snapshot of the keyring, so
    /// that a rotation never changes keys under a handshake in progress.
    pub(crate) fn handshake(&self) -> HandshakeConfig {
        let mut local = self.local.clone();
        if let Some(raised) = &self.incarnation {
            local.incarnation = local.incarnation.max(raised.load(Ordering::Relaxed));
        }
        HandshakeConfig {
            local,
            keyring: self
                .keyring
                .as_ref()
                .map(|ring| ring.read().unwrap_or_else(|e| e.into_inner()).clone()),
            max_frame: self.max_frame,
            timeout: self.handshake_timeout,
        }
    }

    /// The liveness settings of every link, with ping rounds anchored on
    /// the wall clock as of `now` (see [`proto::link::wall_clock_anchor`]).
    pub(crate) fn liveness(&self, now: Instant) -> LinkConfig {
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        LinkConfig {
            ping_interval: self.ping_interval,
            link_timeout: self.link_timeout,
            ping_anchor: wall_clock_anchor(now, since_epoch, self.ping_interval),
        }
    }
}

/// The drivers' clock: tokio's, so that `#[tokio::test(start_paused = true)]`
/// controls every timer and timestamp of the transport.
pub(crate) fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A deadline for `tokio::time::sleep_until`. `None` (no deadline) gives
/// now: callers disable or leave the branch before such a sleep matters.
pub(crate) fn tokio_instant(t: Option<Instant>) -> tokio::time::Instant {
    t.map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_carry_a_raised_incarnation() {
        let mut cfg = Config::new(Hello {
            protocol: proto::frame::VERSION,
            cluster: "test".into(),
            id: proto::NodeId(7),
            incarnation: 10,
            name: "a".into(),
            addr: "127.0.0.1:1".parse().expect("addr"),
            tags: Default::default(),
        });
        assert_eq!(cfg.handshake().local.incarnation, 10);
        let raised = Arc::new(AtomicU64::new(0));
        cfg.incarnation = Some(raised.clone());
        assert_eq!(cfg.handshake().local.incarnation, 10, "never lowered");
        raised.store(11, Ordering::Relaxed);
        assert_eq!(cfg.handshake().local.incarnation, 11, "a refutation shows");
    }
}
