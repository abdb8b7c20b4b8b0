//! `/metrics`: the node's counters in the Prometheus text format (0.0.4),
//! written by `prometheus-client`.
//!
//! The values already live in atomics spread over discovery, transport and
//! the node (and the link list is behind the transport actor), so nothing
//! here keeps metrics of its own: each scrape takes a [`Snapshot`] (the one
//! `.await`, for the links), and a [`Collector`] over it describes each
//! family to the crate's encoder, which owns naming (the `constellation_`
//! prefix, `_seconds`, `_total`), label escaping and the layout.
//!
//! The names, labels and help texts are an interface (dashboards, alerts,
//! tests grep for them): change them only on purpose. Families keyed by a
//! reason or event list only the keys seen so far; `constellation_peers`
//! always has all four states.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeMetric, MetricEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use proto::control::PEER_STATES;
use proto::membership::LinkState;
use tracing::warn;

use crate::state::NodeState;

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Every value one scrape shows, read at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    peers: BTreeMap<&'static str, u64>,
    links_up: u64,
    keys: u64,
    peers_pending: u64,
    beacons_sent: u64,
    beacon_replies_sent: u64,
    beacons_received: u64,
    frames_in: u64,
    frames_out: u64,
    links_established: u64,
    dials: u64,
    dial_failures: u64,
    messages_in: u64,
    messages_out: u64,
    peers_admitted: u64,
    pending_refused: u64,
    stalls: u64,
    overlay_neighbours: u64,
    refutations: u64,
    uptime_seconds: u64,
    payload_bytes_in: u64,
    payload_bytes_out: u64,
    transitions: BTreeMap<&'static str, u64>,
    beacons_dropped: BTreeMap<&'static str, u64>,
    links_refused: BTreeMap<&'static str, u64>,
    handlers: proto::control::HandlerCounters,
    queries: proto::control::QueryCounts,
    relay: proto::control::RelayCounts,
}

impl Snapshot {
    /// Reads every counter of `s` (asking the transport for its links).
    pub async fn take(s: &NodeState) -> Self {
        let d = &s.discovery;
        let t = s.transport.stats();
        let mut peers: BTreeMap<&'static str, u64> = PEER_STATES.map(|k| (k, 0)).into();
        let mut links_up = 0;
        for p in s.peers.iter() {
            *peers.entry(p.state.as_str()).or_default() += 1;
            links_up += u64::from(p.link == LinkState::Up);
        }
        let keys = s.keyring.as_ref().map_or(0, |r| {
            r.read().unwrap_or_else(|e| e.into_inner()).keys().len() as u64
        });
        let (payload_bytes_in, payload_bytes_out) =
            super::link_counters(s)
                .await
                .values()
                .fold((0, 0), |(i, o), c| {
                    (
                        i + c.bytes_in.load(Ordering::Relaxed),
                        o + c.bytes_out.load(Ordering::Relaxed),
                    )
                });
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            peers,
            links_up,
            keys,
            peers_pending: n(&s.table.pending),
            beacons_sent: n(&d.beacons_sent),
            beacon_replies_sent: n(&d.replies_sent),
            beacons_received: n(&d.beacons_received),
            frames_in: n(&t.frames_in),
            frames_out: n(&t.frames_out),
            links_established: n(&t.links_established),
            dials: n(&t.dials),
            dial_failures: n(&t.dial_failures),
            messages_in: n(&s.messages_in),
            messages_out: n(&s.messages_out),
            peers_admitted: n(&s.table.admitted),
            pending_refused: n(&s.table.refused),
            stalls: n(&s.table.stalls),
            overlay_neighbours: n(&s.overlay.neighbours),
            refutations: n(&s.overlay.refutations),
            uptime_seconds: s.started.elapsed().as_secs(),
            payload_bytes_in,
            payload_bytes_out,
            transitions: s.transitions.snapshot(),
            beacons_dropped: d.drops.snapshot(),
            links_refused: t.drops.snapshot(),
            handlers: s.handlers.snapshot(),
            queries: s.queries.counters.snapshot(),
            relay: s.relay.counters.snapshot(),
        }
    }
}

/// The text exposition of `snapshot`.
pub fn encode(snapshot: Snapshot) -> String {
    let mut registry = Registry::with_prefix("constellation");
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    // Only the writer can fail, and a String never does.
    if let Err(error) = prometheus_text::encode(&mut out, &registry) {
        warn!(%error, "metrics not encoded");
    }
    out
}

/// One metric family as the collector describes it.
#[derive(Debug)]
struct Family {
    metric_type: MetricType,
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    samples: Samples,
}

/// The samples of a [`Family`].
#[derive(Debug)]
enum Samples {
    /// One, without labels.
    One(u64),
    /// One per label value: the label's name, then each value and its sample.
    By(&'static str, Vec<(&'static str, u64)>),
}

impl Family {
    fn gauge(name: &'static str, help: &'static str) -> Self {
        Family {
            metric_type: MetricType::Gauge,
            name,
            help,
            unit: None,
            // No samples until `value` or `by` says (HELP and TYPE only).
            samples: Samples::By("", Vec::new()),
        }
    }

    fn counter(name: &'static str, help: &'static str) -> Self {
        Family {
            metric_type: MetricType::Counter,
            ..Family::gauge(name, help)
        }
    }

    fn unit(self, unit: Unit) -> Self {
        Family {
            unit: Some(unit),
            ..self
        }
    }

    /// The family's one sample.
    fn value(self, v: u64) -> Self {
        Family {
            samples: Samples::One(v),
            ..self
        }
    }

    /// One sample per key of `values`, labelled `label="key"`.
    fn by(self, label: &'static str, values: &BTreeMap<&'static str, u64>) -> Self {
        Family {
            samples: Samples::By(label, values.iter().map(|(k, v)| (*k, *v)).collect()),
            ..self
        }
    }

    fn encode(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let mut family =
            enc.encode_descriptor(self.name, self.help, self.unit.as_ref(), self.metric_type)?;
        match &self.samples {
            Samples::One(v) => self.sample(*v, family),
            Samples::By(label, values) => values
                .iter()
                .try_for_each(|&(key, v)| self.sample(v, family.encode_family(&[(*label, key)])?)),
        }
    }

    fn sample(&self, v: u64, enc: MetricEncoder) -> std::fmt::Result {
        match self.metric_type {
            MetricType::Counter => ConstCounter::new(v).encode(enc),
            _ => ConstGauge::new(v).encode(enc),
        }
    }
}

impl Snapshot {
    /// The families, in the order they are shown; each one's name and help.
    fn families(&self) -> Vec<Family> {
        let payload = BTreeMap::from([
            ("in", self.payload_bytes_in),
            ("out", self.payload_bytes_out),
        ]);
        let h = &self.handlers;
        let runs = BTreeMap::from([
            ("succeeded", h.succeeded),
            ("failed", h.failed),
            ("timed_out", h.timed_out),
            ("dropped", h.dropped),
        ]);
        let q = &self.queries;
        let discarded = BTreeMap::from([
            ("duplicate", q.duplicates),
            ("oversize", q.oversize),
            ("late", q.late),
            ("queue_full", q.dropped),
        ]);
        let r = &self.relay;
        let relayed = BTreeMap::from([
            ("originated", r.originated),
            ("forwarded", r.forwarded),
            ("delivered", r.delivered),
            ("duplicate", r.duplicates),
            ("skipped", r.skipped),
            ("queue_full", r.dropped),
        ]);
        vec![
            Family::gauge("peers", "Peers by state.").by("state", &self.peers),
            Family::gauge("links_up", "Data links up.").value(self.links_up),
            Family::gauge("keys", "Installed cluster keys (0: no secret, plaintext).")
                .value(self.keys),
            Family::gauge(
                "peers_pending",
                "Peers heard by beacon or report, not yet confirmed by a link.",
            )
            .value(self.peers_pending),
            Family::counter("beacons_sent", "Multicast beacons sent.").value(self.beacons_sent),
            Family::counter("beacon_replies_sent", "Unicast replies sent.")
                .value(self.beacon_replies_sent),
            Family::counter("beacons_received", "Valid beacons received.")
                .value(self.beacons_received),
            Family::counter("frames_in", "Frames read on links.").value(self.frames_in),
            Family::counter("frames_out", "Frames written on links.").value(self.frames_out),
            Family::counter("links_established", "Links established.")
                .value(self.links_established),
            Family::counter("dials", "Dials started (connects and reconnects).").value(self.dials),
            Family::counter("dial_failures", "Dials that failed.").value(self.dial_failures),
            Family::counter("messages_in", "Application messages received.")
                .value(self.messages_in),
            Family::counter("messages_out", "Application messages sent.").value(self.messages_out),
            Family::counter(
                "peers_admitted",
                "Pending entries created (new ids heard by beacon or report).",
            )
            .value(self.peers_admitted),
            Family::counter(
                "pending_refused",
                "New ids refused because too many entries were pending.",
            )
            .value(self.pending_refused),
            Family::counter(
                "stalls",
                "Times the node noticed its own lateness and held its verdicts.",
            )
            .value(self.stalls),
            Family::gauge(
                "overlay_neighbours",
                "Members this node wants links with (--max-links; 0 in a full mesh).",
            )
            .value(self.overlay_neighbours),
            Family::counter(
                "refutations",
                "Times this node refuted a report of its own failure.",
            )
            .value(self.refutations),
            Family::counter("uptime", "Seconds since start.")
                .unit(Unit::Seconds)
                .value(self.uptime_seconds),
            Family::gauge(
                "payload_bytes",
                "Application payload bytes on current links.",
            )
            .by("direction", &payload),
            Family::counter("transitions", "Peer state changes, by event.")
                .by("event", &self.transitions),
            Family::counter("beacons_dropped", "Datagrams dropped, by reason.")
                .by("reason", &self.beacons_dropped),
            Family::counter("links_refused", "Connections or frames refused, by reason.")
                .by("reason", &self.links_refused),
            Family::gauge("handlers", "Event handlers configured.").value(h.configured),
            Family::counter("handler_started", "Handler programs started.").value(h.started),
            Family::counter(
                "handler_runs",
                "Handler runs by outcome (dropped: the backlog was full).",
            )
            .by("outcome", &runs),
            Family::gauge("handler_running", "Handler programs running.").value(h.running),
            Family::gauge("handler_queued", "Handler runs waiting for a slot.").value(h.queued),
            Family::counter("queries_asked", "Queries asked by this node.").value(q.asked),
            Family::counter(
                "queries_delivered",
                "Queries received that this node matched.",
            )
            .value(q.delivered),
            Family::counter("queries_answered", "Answers this node gave.").value(q.answered),
            Family::counter(
                "queries_discarded",
                "Query frames, answers or progress items discarded, by reason.",
            )
            .by("reason", &discarded),
            Family::counter(
                "relayed",
                "Application messages over the bounded overlay, by outcome (skipped: a gap in a sender's order given up).",
            )
            .by("outcome", &relayed),
        ]
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        self.families()
            .iter()
            .try_for_each(|family| family.encode(&mut enc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the hand-written exposition printed for these values before
    /// this module (copied from a running node, labels added), then the
    /// handler and query families.
    const BEFORE: &str = r#"# HELP constellation_peers Peers by state.
# TYPE constellation_peers gauge
constellation_peers{state="alive"} 1
constellation_peers{state="failed"} 0
constellation_peers{state="left"} 0
constellation_peers{state="suspect"} 0
# HELP constellation_links_up Data links up.
# TYPE constellation_links_up gauge
constellation_links_up 1
# HELP constellation_keys Installed cluster keys (0: no secret, plaintext).
# TYPE constellation_keys gauge
constellation_keys 1
# HELP constellation_peers_pending Peers heard by beacon or report, not yet confirmed by a link.
# TYPE constellation_peers_pending gauge
constellation_peers_pending 0
# HELP constellation_beacons_sent_total Multicast beacons sent.
# TYPE constellation_beacons_sent_total counter
constellation_beacons_sent_total 2
# HELP constellation_beacon_replies_sent_total Unicast replies sent.
# TYPE constellation_beacon_replies_sent_total counter
constellation_beacon_replies_sent_total 1
# HELP constellation_beacons_received_total Valid beacons received.
# TYPE constellation_beacons_received_total counter
constellation_beacons_received_total 3
# HELP constellation_frames_in_total Frames read on links.
# TYPE constellation_frames_in_total counter
constellation_frames_in_total 9
# HELP constellation_frames_out_total Frames written on links.
# TYPE constellation_frames_out_total counter
constellation_frames_out_total 11
# HELP constellation_links_established_total Links established.
# TYPE constellation_links_established_total counter
constellation_links_established_total 1
# HELP constellation_dials_total Dials started (connects and reconnects).
# TYPE constellation_dials_total counter
constellation_dials_total 1
# HELP constellation_dial_failures_total Dials that failed.
# TYPE constellation_dial_failures_total counter
constellation_dial_failures_total 0
# HELP constellation_messages_in_total Application messages received.
# TYPE constellation_messages_in_total counter
constellation_messages_in_total 0
# HELP constellation_messages_out_total Application messages sent.
# TYPE constellation_messages_out_total counter
constellation_messages_out_total 2
# HELP constellation_peers_admitted_total Pending entries created (new ids heard by beacon or report).
# TYPE constellation_peers_admitted_total counter
constellation_peers_admitted_total 1
# HELP constellation_pending_refused_total New ids refused because too many entries were pending.
# TYPE constellation_pending_refused_total counter
constellation_pending_refused_total 0
# HELP constellation_stalls_total Times the node noticed its own lateness and held its verdicts.
# TYPE constellation_stalls_total counter
constellation_stalls_total 0
# HELP constellation_overlay_neighbours Members this node wants links with (--max-links; 0 in a full mesh).
# TYPE constellation_overlay_neighbours gauge
constellation_overlay_neighbours 0
# HELP constellation_refutations_total Times this node refuted a report of its own failure.
# TYPE constellation_refutations_total counter
constellation_refutations_total 0
# HELP constellation_uptime_seconds_total Seconds since start.
# TYPE constellation_uptime_seconds_total counter
constellation_uptime_seconds_total 1
# HELP constellation_payload_bytes Application payload bytes on current links.
# TYPE constellation_payload_bytes gauge
constellation_payload_bytes{direction="in"} 0
constellation_payload_bytes{direction="out"} 4
# HELP constellation_transitions_total Peer state changes, by event.
# TYPE constellation_transitions_total counter
constellation_transitions_total{event="link_up"} 1
constellation_transitions_total{event="peer_joined"} 1
# HELP constellation_beacons_dropped_total Datagrams dropped, by reason.
# TYPE constellation_beacons_dropped_total counter
constellation_beacons_dropped_total{reason="address"} 2
constellation_beacons_dropped_total{reason="bad_magic"} 5
# HELP constellation_links_refused_total Connections or frames refused, by reason.
# TYPE constellation_links_refused_total counter
# HELP constellation_handlers Event handlers configured.
# TYPE constellation_handlers gauge
constellation_handlers 1
# HELP constellation_handler_started_total Handler programs started.
# TYPE constellation_handler_started_total counter
constellation_handler_started_total 5
# HELP constellation_handler_runs_total Handler runs by outcome (dropped: the backlog was full).
# TYPE constellation_handler_runs_total counter
constellation_handler_runs_total{outcome="dropped"} 7
constellation_handler_runs_total{outcome="failed"} 1
constellation_handler_runs_total{outcome="succeeded"} 3
constellation_handler_runs_total{outcome="timed_out"} 1
# HELP constellation_handler_running Handler programs running.
# TYPE constellation_handler_running gauge
constellation_handler_running 0
# HELP constellation_handler_queued Handler runs waiting for a slot.
# TYPE constellation_handler_queued gauge
constellation_handler_queued 0
# HELP constellation_queries_asked_total Queries asked by this node.
# TYPE constellation_queries_asked_total counter
constellation_queries_asked_total 2
# HELP constellation_queries_delivered_total Queries received that this node matched.
# TYPE constellation_queries_delivered_total counter
constellation_queries_delivered_total 3
# HELP constellation_queries_answered_total Answers this node gave.
# TYPE constellation_queries_answered_total counter
constellation_queries_answered_total 1
# HELP constellation_queries_discarded_total Query frames, answers or progress items discarded, by reason.
# TYPE constellation_queries_discarded_total counter
constellation_queries_discarded_total{reason="duplicate"} 4
constellation_queries_discarded_total{reason="late"} 0
constellation_queries_discarded_total{reason="oversize"} 0
constellation_queries_discarded_total{reason="queue_full"} 0
# HELP constellation_relayed_total Application messages over the bounded overlay, by outcome (skipped: a gap in a sender's order given up).
# TYPE constellation_relayed_total counter
constellation_relayed_total{outcome="delivered"} 0
constellation_relayed_total{outcome="duplicate"} 0
constellation_relayed_total{outcome="forwarded"} 0
constellation_relayed_total{outcome="originated"} 0
constellation_relayed_total{outcome="queue_full"} 0
constellation_relayed_total{outcome="skipped"} 0
"#;

    #[test]
    fn the_exposition_keeps_every_name_label_and_help_text() {
        let mut peers: BTreeMap<_, _> = PEER_STATES.map(|k| (k, 0)).into();
        peers.insert("alive", 1);
        let snapshot = Snapshot {
            peers,
            links_up: 1,
            keys: 1,
            beacons_sent: 2,
            beacon_replies_sent: 1,
            beacons_received: 3,
            frames_in: 9,
            frames_out: 11,
            links_established: 1,
            dials: 1,
            messages_out: 2,
            peers_admitted: 1,
            uptime_seconds: 1,
            payload_bytes_out: 4,
            transitions: [("link_up", 1), ("peer_joined", 1)].into(),
            beacons_dropped: [("address", 2), ("bad_magic", 5)].into(),
            handlers: proto::control::HandlerCounters {
                configured: 1,
                started: 5,
                succeeded: 3,
                failed: 1,
                timed_out: 1,
                dropped: 7,
                ..Default::default()
            },
            queries: proto::control::QueryCounts {
                asked: 2,
                delivered: 3,
                answered: 1,
                duplicates: 4,
                ..Default::default()
            },
            ..Snapshot::default()
        };
        let out = encode(snapshot);
        for (line, (got, want)) in out.lines().zip(BEFORE.lines()).enumerate() {
            assert_eq!(got, want, "line {}", line + 1);
        }
        assert_eq!(out, BEFORE);
        assert!(CONTENT_TYPE.starts_with("text/plain; version=0.0.4"));
    }
}
