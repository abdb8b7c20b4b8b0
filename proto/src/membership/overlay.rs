//! The peer table in bounded-overlay mode ([`Config::overlay`]): membership
//! that travels over a bounded set of links instead of a full mesh.
//!
//! With a full mesh every member is confirmed by its own link. With at most
//! K links per node most members never get one, so the rules change, and
//! only while `Config::overlay` is set:
//!
//! ## Confirmation through a confirmed neighbour
//! A membership record that arrives in a `peers` frame over the link of a
//! *confirmed, linked* peer confirms the member it names (a new id is
//! listed and `Joined` at once; a pending one heard only by beacon is
//! confirmed). The trust argument: a beacon is a claim because anyone on
//! the LAN can send or replay one; a link is proof because its handshake is
//! a fresh two-way exchange (with a secret, a Noise handshake a replay
//! cannot complete). A record relayed over such a link is the word of an
//! authenticated member of the cluster, which itself accepted it only from
//! another authenticated member, and so on back to the member's own link
//! with its first neighbour. Hearsay from inside the cluster is trusted as
//! far as the cluster's members are; nothing from outside it (beacons,
//! unlinked senders) confirms anything. Records from a peer whose link is
//! not up, or that is itself pending, change nothing.
//!
//! Name rules stay: a member's word never displaces the holder of a name
//! that this node hears on its own link, nor a live holder with the same or
//! a later incarnation (the newcomer stays pending, and a link may still
//! confirm it under the conflict rules of `on_link_up`); otherwise the
//! later start wins (a restart: `Reaped` for the old id, `Restarted` for
//! the new one).
//!
//! ## Remote members
//! A confirmed member that is not a neighbour ([`PeerTable::set_neighbours`])
//! and whose link was not lost without a goodbye is *remote*
//! ([`Peer::remote`]): no link, no silence deadline, no probes, no dials. It
//! stays as it is until the overlay brings a verdict (`failed`, `left`) or
//! a newer incarnation.
//!
//! ## Relay exactly once per link
//! Every change this table accepts as news (a member confirmed, joined,
//! restarted or refuted at a higher incarnation, a newer tags version, a
//! `failed` or `left` verdict, a new observer's silence alert) is queued
//! and sent once over every other link, batched per link when the driver
//! polls actions. What is not news (a record at a lower incarnation, the
//! same fact again, `alive` over a verdict of the same incarnation) changes
//! nothing and is not forwarded. Facts about a member only move forward:
//! the incarnation grows; within one incarnation `alive` < `failed` <
//! `left`, tags versions grow, and the set of alerting observers grows. So
//! each node forwards each fact at most once and nothing loops: a change
//! costs at most one record per link direction of the overlay.
//!
//! ## Verdicts
//! - Hard evidence from one observer is enough: a link lost and a redial
//!   refused (`failed`), a goodbye or a leave beacon (`left`). The verdict
//!   spreads as a record.
//! - A verdict on *silence* is one observer's alert (a `suspect` record
//!   with `by`, the observer), sent when its own `dead_after` passes. The
//!   member is failed where alerts from [`ALERTS_TO_FAIL`] different
//!   observers have arrived: one broken path alone never fails a node.
//!   While the rings are a full mesh (the driver says so with
//!   [`PeerTable::set_full_mesh`]), every member watches every other and
//!   each judges silence on its own, as without the overlay.
//! - A node hearing the member on its own link right now does not take a
//!   `failed` verdict: it passes it to the member instead.
//! - A node that learns that it is reported failed, left or suspect at its
//!   current incarnation refutes (SWIM): it raises its incarnation
//!   ([`PeerTable::local_incarnation`]; the driver uses it in later
//!   handshakes and beacons) and sends its record, which overrides the
//!   report everywhere.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{
    member_record, record, Action, EventKind, LinkState, PeerList, PeerRecord, PeerState, PeerTable,
};
use crate::frame::Hello;
use crate::id::{tags_digest, Incarnation, NodeId};

/// How many different observers' silence alerts fail a member.
pub const ALERTS_TO_FAIL: usize = 2;

/// While the overlay is a full mesh: how long the higher id of two nodes
/// waits for the lower one's dial before dialing itself. Long enough for a
/// handshake on a busy host, short against a cold start.
pub const MUTUAL_DIAL_WAIT: Duration = Duration::from_millis(100);

impl PeerTable {
    /// Overlay mode: the members this node wants links with (its overlay
    /// neighbours, recomputed by the driver when the member set changes),
    /// and which of them want a link with this node too (`mutual`, by the
    /// rings as this node sees them). A neighbour is dialed as soon as it
    /// is live, and judged on silence once its link is up; a member that
    /// is no longer one is not redialed, and once its link is gone it is
    /// remote. Without `Config::overlay` this does nothing.
    ///
    /// Who dials: while the overlay is a full mesh (at most K + 1
    /// members), the lower id of two mutual neighbours at once and the
    /// higher one after [`MUTUAL_DIAL_WAIT`] without a link, so that a
    /// small cluster links as without the overlay. Two dials crossing are
    /// settled by the duplicate rule, and the losing end waits for the
    /// winner's handshake ([`crate::link::Handovers`]), but each crossing
    /// still costs a second handshake and a reject. Once the overlay is
    /// bounded, either end dials at once: views of the member set differ
    /// during a cold start, and one end waiting for the other would hold
    /// links up for the other's view to catch up; fill-ins are one-sided.
    pub fn set_neighbours(
        &mut self,
        now: Instant,
        ids: impl IntoIterator<Item = NodeId>,
        mutual: impl Fn(NodeId) -> bool,
    ) {
        if self.cfg.overlay.is_none() {
            return;
        }
        let local = self.local;
        let new: HashSet<NodeId> = ids.into_iter().filter(|&id| id != local).collect();
        let mut changed: Vec<NodeId> = new.symmetric_difference(&self.wanted).copied().collect();
        changed.sort_unstable();
        self.wanted = new;
        let full_mesh = !self.bounded;
        for id in changed {
            self.touch(id);
            let wanted = self.wanted.contains(&id);
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            p.wanted = wanted;
            if wanted && p.is_live() && p.link == LinkState::Down {
                // `mutual` last: it walks the rings.
                let dial_at = if full_mesh && id < local && mutual(id) {
                    now + MUTUAL_DIAL_WAIT
                } else {
                    now
                };
                if p.next_dial.is_none_or(|t| t > dial_at) {
                    p.next_dial = Some(dial_at);
                }
                p.dial_attempts = 0;
            }
        }
        self.schedule(now);
    }

    /// Overlay mode: whether the overlay is a full mesh now (at most
    /// `max_links + 1` members: every member is everyone's neighbour). Then
    /// each node judges silence on its own, as without the overlay; once
    /// it is bounded, a verdict on silence takes two
    /// observers' alerts. The driver says so whenever it recomputes the
    /// neighbours; a table that is never told keeps the two-observer rule.
    pub fn set_full_mesh(&mut self, full_mesh: bool) {
        self.bounded = !full_mesh;
    }

    /// Overlay mode: who this node is (its handshake), so that it can
    /// refute reports of its own failure.
    pub fn set_local(&mut self, hello: &Hello) {
        self.local_record = Some(PeerRecord {
            id: hello.id,
            incarnation: hello.incarnation,
            name: hello.name.clone(),
            addr: hello.addr,
            state: PeerState::Alive.as_str().into(),
            age_ms: None,
            tags: hello.tags.clone(),
            tags_version: 0,
            by: None,
        });
    }

    /// This node's incarnation as the table knows it ([`PeerTable::set_local`]),
    /// raised by every refutation: the driver must use it in later
    /// handshakes and beacons.
    pub fn local_incarnation(&self) -> Option<Incarnation> {
        self.local_record.as_ref().map(|r| r.incarnation)
    }

    /// How often this node refuted a report of its own failure.
    pub fn refutations(&self) -> u64 {
        self.refutations
    }

    /// Queues the current record of `id` for every link but `except`'s
    /// (overlay mode; a confirmed entry only).
    pub(super) fn relay_state(&mut self, except: Option<NodeId>, id: NodeId) {
        if self.cfg.overlay.is_none() {
            return;
        }
        if let Some(p) = self.peers.get(&id).filter(|p| p.confirmed) {
            let r = member_record(p);
            self.queue_relay(except, r);
        }
    }

    /// Queues `r` for every link but `except`'s, due [`Config::relay_batch`]
    /// after the first queued record of the batch.
    pub(super) fn queue_relay(&mut self, except: Option<NodeId>, r: PeerRecord) {
        if self.relay_due.is_none() {
            let now = self.clock;
            self.relay_due = now.map(|c| c + self.cfg.relay_batch);
        }
        self.outbox.push((except, r));
    }

    /// This node's own silence alert about `id` (overlay mode).
    pub(super) fn alert(&mut self, id: NodeId) {
        let Some(p) = self.peers.get(&id) else {
            return;
        };
        let r = PeerRecord {
            by: Some(self.local),
            ..record(p, PeerState::Suspect.as_str(), None)
        };
        self.queue_relay(None, r);
    }

    /// Turns the queued relays into one `peers` frame per linked peer:
    /// each record to every link but the one it came from, and a member's
    /// own `alive` record never to itself (a verdict or an alert does go to
    /// it: that is how it learns to refute).
    pub(super) fn flush_relays(&mut self) {
        let out = std::mem::take(&mut self.outbox);
        let linked: Vec<NodeId> = self.linked.iter().copied().collect();
        for to in linked {
            let goes = |(except, r): &&(Option<NodeId>, PeerRecord)| {
                *except != Some(to) && !(r.id == to && r.state == PeerState::Alive.as_str())
            };
            // Sized exactly: these lists wait in send queues, one per link,
            // and a collected one would carry up to half its size in slack.
            let mut peers = Vec::with_capacity(out.iter().filter(goes).count());
            peers.extend(out.iter().filter(goes).map(|(_, r)| r.clone()));
            self.send_list(to, peers);
        }
    }

    /// A membership record (no `age_ms`) from the linked peer `from`, in
    /// overlay mode. See the module docs.
    pub(super) fn hear(&mut self, now: Instant, from: NodeId, r: &PeerRecord) {
        let trusted = self
            .peers
            .get(&from)
            .is_some_and(|p| p.confirmed && p.link == LinkState::Up);
        if !trusted {
            return; // only a confirmed, linked member's word counts
        }
        if r.id == self.local {
            self.about_me(r);
            return;
        }
        match (r.state.as_str(), r.by) {
            ("suspect", Some(by)) => self.hear_alert(now, from, r, by),
            ("alive" | "suspect", _) => self.hear_alive(now, from, r),
            ("failed" | "left", _) => self.hear_verdict(now, from, r),
            _ => {}
        }
    }

    /// A record of a live member: confirms it, or brings a newer
    /// incarnation or tags version.
    ///
    /// Most records of a catch-up view are old news: those change nothing
    /// and, so that a view costs the table no more than reading it, mark
    /// nothing for the deadline index either.
    fn hear_alive(&mut self, now: Instant, from: NodeId, r: &PeerRecord) {
        let Some(p) = self.peers.get_mut(&r.id).filter(|p| p.confirmed) else {
            self.confirm_by_word(now, from, r);
            return;
        };
        if r.incarnation > p.incarnation {
            if p.state == PeerState::Left {
                return; // it said goodbye: no later word brings it back
            }
            self.due.get_mut().touch(r.id);
            // A refutation (the same id, a higher incarnation): it is
            // alive, whatever was believed of the older one.
            p.incarnation = r.incarnation;
            p.tags.clone_from(&r.tags);
            p.tags_version = r.tags_version;
            p.digest = tags_digest(&r.tags);
            p.alerts.clear();
            p.alerted = false;
            let kind = match p.state {
                PeerState::Alive => None,
                PeerState::Suspect => Some(EventKind::Recovered),
                PeerState::Failed | PeerState::Left => Some(EventKind::Joined),
            };
            if kind.is_some() {
                p.state = PeerState::Alive;
                p.since = now;
                p.last_seen = p.last_seen.max(now);
                p.next_probe = None;
                p.lost_at = None;
            }
            if let Some(kind) = kind {
                self.emit(r.id, kind);
            }
            self.relay_state(Some(from), r.id);
        } else if r.incarnation == p.incarnation && r.tags_version > p.tags_version && p.is_live() {
            self.due.get_mut().touch(r.id);
            p.tags_version = r.tags_version;
            p.digest = tags_digest(&r.tags);
            if p.tags != r.tags {
                p.tags.clone_from(&r.tags);
                self.emit(r.id, EventKind::Updated);
            }
            self.relay_state(Some(from), r.id);
        }
    }

    /// A new or pending member named by a confirmed neighbour: confirmed,
    /// unless its name belongs to an entry the word may not displace.
    fn confirm_by_word(&mut self, now: Instant, from: NodeId, r: &PeerRecord) {
        let mut replaced = false;
        while let Some(h) = self
            .by_name
            .get(&self.peers, &r.name)
            .filter(|&h| h != r.id)
        {
            let old = &self.peers[&h];
            if old.link == LinkState::Up || (old.is_live() && r.incarnation <= old.incarnation) {
                // Heard on our own link, or the same or a later life: a
                // link may still confirm the newcomer (conflict rules).
                self.learn(now, r);
                return;
            }
            replaced |= r.incarnation > old.incarnation;
            self.remove(h);
        }
        self.touch(r.id);
        if self.peers.contains_key(&r.id) {
            self.pending -= 1;
        } else {
            let mut p = self.new_peer(r.id, &r.name, r.incarnation, r.addr, now);
            p.next_dial = Some(self.first_dial_at(r.id, now));
            self.peers.insert(r.id, p);
        }
        let p = self.peers.get_mut(&r.id).expect("present above");
        p.confirmed = true;
        p.name.clone_from(&r.name);
        p.incarnation = r.incarnation;
        p.addr = r.addr;
        p.tags.clone_from(&r.tags);
        p.tags_version = r.tags_version;
        p.digest = tags_digest(&r.tags);
        p.state = PeerState::Alive;
        p.since = now;
        p.last_seen = p.last_seen.max(now);
        self.by_name.insert(&self.peers, &r.name, r.id);
        self.emit(
            r.id,
            if replaced {
                EventKind::Restarted
            } else {
                EventKind::Joined
            },
        );
        self.relay_state(Some(from), r.id);
    }

    /// Another observer's silence alert about `r.id`.
    fn hear_alert(&mut self, now: Instant, from: NodeId, r: &PeerRecord, by: NodeId) {
        self.touch(r.id);
        let Some(p) = self.peers.get_mut(&r.id) else {
            return;
        };
        if !p.confirmed || !p.is_live() || r.incarnation != p.incarnation || p.alerts.contains(&by)
        {
            return;
        }
        p.alerts.push(by);
        let enough = p.alerts.len() >= ALERTS_TO_FAIL;
        self.queue_relay(Some(from), r.clone());
        if enough {
            self.fail_on_alerts(now, r.id);
        }
    }

    /// Enough observers alerted: failed, unless this node hears the
    /// member on its own link right now (then the alerts, relayed to it,
    /// make it refute).
    fn fail_on_alerts(&mut self, now: Instant, id: NodeId) {
        let fresh = self.cfg.suspect_after;
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let hears = p.link == LinkState::Up
            && p.last_link
                .is_some_and(|l| now.saturating_duration_since(l) < fresh);
        if hears || !p.is_live() {
            return;
        }
        p.state = PeerState::Failed;
        p.since = now;
        p.next_dial = None;
        p.next_probe = None;
        self.emit(id, EventKind::Failed);
        self.relay_state(None, id);
        self.settle();
    }

    /// A `failed` or `left` verdict from the overlay.
    fn hear_verdict(&mut self, now: Instant, from: NodeId, r: &PeerRecord) {
        self.touch(r.id);
        let left = r.state == PeerState::Left.as_str();
        let fresh = self.cfg.suspect_after;
        let Some(p) = self.peers.get_mut(&r.id) else {
            return; // never knew it: nothing to change, nothing to pass on
        };
        if !p.confirmed {
            if left && r.incarnation >= p.incarnation {
                self.remove(r.id); // pending: forgotten without a word
            }
            return;
        }
        if r.incarnation < p.incarnation {
            return;
        }
        if r.incarnation == p.incarnation
            && (p.state == PeerState::Left || (p.state == PeerState::Failed && !left))
        {
            return; // known already
        }
        let hears = p.link == LinkState::Up
            && p.last_link
                .is_some_and(|l| now.saturating_duration_since(l) < fresh);
        if hears && !left && p.is_live() {
            // We hear it ourselves: the verdict is wrong. It goes to the
            // member, which refutes.
            self.actions.push_back(Action::Send {
                to: r.id,
                list: PeerList {
                    peers: vec![r.clone()],
                },
            });
            return;
        }
        if r.incarnation > p.incarnation {
            p.incarnation = r.incarnation;
            p.tags.clear();
            p.tags_version = 0;
            p.alerts.clear();
            p.alerted = false;
        }
        p.state = if left {
            PeerState::Left
        } else {
            PeerState::Failed
        };
        p.since = now;
        p.next_dial = None;
        p.next_probe = None;
        if left {
            p.lost_at = None;
        }
        self.emit(
            r.id,
            if left {
                EventKind::Left
            } else {
                EventKind::Failed
            },
        );
        self.relay_state(Some(from), r.id);
        self.settle();
    }

    /// A record about this node: a report of its failure, departure or
    /// silence at its current incarnation is refuted.
    fn about_me(&mut self, r: &PeerRecord) {
        let Some(me) = self.local_record.as_mut() else {
            return;
        };
        let accused = matches!(r.state.as_str(), "failed" | "left")
            || (r.state == PeerState::Suspect.as_str() && r.by.is_some());
        if !accused || r.incarnation < me.incarnation {
            return;
        }
        me.incarnation = r.incarnation + 1;
        self.refutations += 1;
        let mine = me.clone();
        self.queue_relay(None, mine);
    }
}

#[cfg(test)]
mod tests;
