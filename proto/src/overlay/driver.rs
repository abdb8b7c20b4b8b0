//! Neighbour maintenance for the bounded overlay, sans-IO: when to place
//! members on the rings, when to tell the peer table its neighbours, and
//! which links to close because neither end wants them.
//!
//! [`Overlay`] answers "who are my neighbours for this member set";
//! [`PeerTable`] decides who is alive and dials the neighbours it is told.
//! Between the two sits this driver, shared by the daemon and the
//! simulator so that both run the same rules:
//!
//! - **Ring members** are the table's live entries (pending ones included:
//!   a newcomer heard only by beacon must be placed before anyone confirms
//!   it, or nobody would link to it) and this node. They are updated from
//!   the table's membership events ([`Driver::on_event`]) and from beacons
//!   ([`Driver::on_beacon`]), at most every [`OVERLAY_EVERY`]: a cold start
//!   changes the member set with every beacon, and recomputing the rings
//!   for each would cost O(N) per beacon.
//! - **A full recompute** from the whole table, at most every
//!   [`FULL_EVERY`], whenever the table's size changed: a pending entry
//!   that is forgotten raises no event, so events alone would leave it on
//!   the rings.
//! - **Trimming.** A link that this node does not want, that has been up
//!   for [`LINK_SETTLE`], and that the other end does not want either (by
//!   the rings as this node sees them) is queued for closing
//!   ([`Driver::poll_close`]), to be closed with `reject{not-neighbour}`
//!   ([`crate::link::LocalClose::NotNeighbour`]). The settling time is
//!   there because views of the member set differ for a moment after each
//!   change, and a link closed at once would be redialed at once by the
//!   end that still wants it. The links are looked at when that answer can
//!   change: after a recompute or a new link (at most every
//!   [`TRIM_EVERY`]), and when an unwanted link settles (at most every
//!   [`OVERLAY_EVERY`], so that a cold start's extra links close as they
//!   settle rather than in a tail of 250 ms steps). A link that only the
//!   other end wants (common: wanting is not symmetric) costs no look, and
//!   no wake-up, until the rings change.
//!
//! Inputs take `now`; [`Driver::poll`] is called after every input the
//! table took (it is cheap when nothing is due), and
//! [`Driver::next_deadline`] says when to call it again without one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use super::Overlay;
use crate::id::NodeId;
use crate::membership::{Event, EventKind, PeerTable};

/// How often, at most, the neighbours are recomputed after the member set
/// changed.
pub const OVERLAY_EVERY: Duration = Duration::from_millis(20);

/// How often, at most, the ring members are recomputed from the whole
/// table (when its size changed); in between, events update them.
pub const FULL_EVERY: Duration = Duration::from_secs(1);

/// How often, at most, the driver looks for links that neither end wants
/// any more.
pub const TRIM_EVERY: Duration = Duration::from_millis(250);

/// A link is closed as "not a neighbour" only once it has been up this
/// long (see the module docs).
pub const LINK_SETTLE: Duration = Duration::from_secs(1);

/// One node's neighbour maintenance. See the module docs.
#[derive(Debug, Clone)]
pub struct Driver {
    me: NodeId,
    rings: Overlay,
    /// The neighbours last told to the table.
    want: BTreeSet<NodeId>,
    /// Members whose events may have changed their place in the rings.
    changed: BTreeSet<NodeId>,
    /// The table's size changed since the last full recompute.
    full: bool,
    next_full: Option<Instant>,
    next_at: Option<Instant>,
    /// When the links are next looked at (see the module docs); `None`:
    /// not before an input can change the answer.
    next_trim: Option<Instant>,
    last_trim: Option<Instant>,
    table_len: usize,
    /// Current links and since when they are up.
    links: BTreeMap<NodeId, Instant>,
    /// Links to close (not a neighbour of either end), oldest first.
    close: VecDeque<NodeId>,
    recomputes: u64,
}

impl Driver {
    /// The driver of node `me`, keeping about `max_links` links.
    pub fn new(me: NodeId, max_links: usize) -> Driver {
        Driver {
            me,
            rings: Overlay::new(max_links),
            want: BTreeSet::new(),
            changed: BTreeSet::new(),
            full: true,
            next_full: None,
            next_at: None,
            next_trim: None,
            last_trim: None,
            table_len: 0,
            links: BTreeMap::new(),
            close: VecDeque::new(),
            recomputes: 0,
        }
    }

    /// The neighbours this node wants (as last told to the table).
    pub fn neighbours(&self) -> &BTreeSet<NodeId> {
        &self.want
    }

    /// The rings as this node sees them.
    pub fn rings(&self) -> &Overlay {
        &self.rings
    }

    /// How often the neighbours were recomputed (a cost figure).
    pub fn recomputes(&self) -> u64 {
        self.recomputes
    }

    /// A beacon from `id` was given to the table: a newcomer heard by
    /// beacon takes its place in the rings (the table raises no event for
    /// pending entries). A beacon from a member already on the rings
    /// changes nothing, and schedules nothing: every member's beacons reach
    /// every node, and a recompute (and a wake-up) for each was most of an
    /// idle node's timer wake-ups.
    pub fn on_beacon(&mut self, id: NodeId) {
        if !self.rings.contains(id) {
            self.changed.insert(id);
        }
    }

    /// An event the table raised. Only changes of membership matter
    /// (joined, restarted, failed, left, recovered, reaped).
    pub fn on_event(&mut self, ev: &Event) {
        if matches!(
            ev.kind,
            EventKind::Joined
                | EventKind::Restarted
                | EventKind::Failed
                | EventKind::Left
                | EventKind::Recovered
                | EventKind::Reaped
        ) {
            self.changed.insert(ev.id);
        }
    }

    /// A link to `id` came up (or replaced the previous one) at `now`.
    pub fn on_link_up(&mut self, now: Instant, id: NodeId) {
        self.links.insert(id, now);
        self.trim_soon(now);
    }

    /// The link to `id` is gone.
    pub fn on_link_down(&mut self, id: NodeId) {
        self.links.remove(&id);
    }

    /// Does what is due at `now`: updates the ring members, tells `table`
    /// its neighbours if they changed ([`PeerTable::set_neighbours`], which
    /// may queue dials and events: drain the table afterwards), and queues
    /// links to close ([`Driver::poll_close`]).
    pub fn poll(&mut self, now: Instant, table: &mut PeerTable) {
        let len = table.len();
        if len != self.table_len {
            self.full = true;
            self.table_len = len;
        }
        let full_due = self.full && self.next_full.is_none_or(|t| now >= t);
        let recompute =
            (full_due || !self.changed.is_empty()) && self.next_at.is_none_or(|t| now >= t);
        if recompute {
            self.recompute(now, table, full_due);
        }
        if self.next_trim.is_some_and(|t| now >= t) {
            self.trim(now);
        }
    }

    /// Asks for a look at the links as soon as [`TRIM_EVERY`] allows.
    fn trim_soon(&mut self, now: Instant) {
        let allowed = match self.last_trim {
            Some(t) => t + TRIM_EVERY,
            // Never looked: at once, once there is a link to look at.
            None if self.links.is_empty() => return,
            None => now,
        };
        self.next_trim = Some(self.next_trim.map_or(allowed, |t| t.min(allowed)));
    }

    fn recompute(&mut self, now: Instant, table: &mut PeerTable, full_due: bool) {
        self.next_at = Some(now + OVERLAY_EVERY);
        self.recomputes += 1;
        let live = |id: &NodeId| table.get(id).is_some_and(|p| p.is_live());
        for id in std::mem::take(&mut self.changed) {
            if live(&id) {
                self.rings.insert(id);
            } else {
                self.rings.remove(id);
            }
        }
        if full_due {
            let mut members: Vec<NodeId> = table
                .peers()
                .filter(|p| p.is_live())
                .map(|p| p.id)
                .collect();
            members.push(self.me);
            self.rings.set_members(members);
            self.full = false;
            self.next_full = Some(now + FULL_EVERY);
        }
        // Up to max_links + 1 members the rings are a full mesh, and the
        // table judges silence as without the overlay.
        table.set_full_mesh(self.rings.len() <= self.rings.max_links() + 1);
        let want = self.rings.want_links(self.me);
        if want != self.want {
            self.want = want;
            let (rings, me) = (&self.rings, self.me);
            table.set_neighbours(now, self.want.iter().copied(), |id| {
                rings.want_links(id).contains(&me)
            });
        }
        // The rings (and so what either end wants) may have changed.
        self.trim_soon(now);
    }

    /// Queues the links that neither end wants: not ours, and by the rings
    /// as this node sees them, not the other's either. A link to a peer
    /// that is not on the rings (pending, or already judged) is left to
    /// the table.
    fn trim(&mut self, now: Instant) {
        self.last_trim = Some(now);
        // The next look: when the first unwanted link that is still
        // settling settles (not sooner than OVERLAY_EVERY from now).
        let mut settles: Option<Instant> = None;
        for (&id, &since) in &self.links {
            if !self.want.contains(&id)
                && self.rings.contains(id)
                && !self.rings.want_links(id).contains(&self.me)
                && !self.close.contains(&id)
            {
                let settled = since + LINK_SETTLE;
                if settled <= now {
                    self.close.push_back(id);
                } else {
                    settles = Some(settles.map_or(settled, |s| s.min(settled)));
                }
            }
        }
        self.next_trim = settles.map(|s| s.max(now + OVERLAY_EVERY));
    }

    /// The next link to close with `reject{not-neighbour}`. The driver
    /// forgets it at once; the link's end arrives as usual
    /// ([`Driver::on_link_down`]).
    pub fn poll_close(&mut self) -> Option<NodeId> {
        let id = self.close.pop_front()?;
        // Not closed twice if the close takes a while.
        self.links.remove(&id);
        Some(id)
    }

    /// When [`Driver::poll`] has something to do without a new input:
    /// a postponed recompute, or a look at the links (see the module docs).
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut earliest = |t: Option<Instant>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        if !self.changed.is_empty() {
            earliest(self.next_at);
        }
        if self.full {
            // Both limits apply to a full recompute.
            earliest(match (self.next_full, self.next_at) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            });
        }
        earliest(self.next_trim);
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::beacon::{Beacon, BeaconKind};
    use crate::frame::Hello;
    use crate::membership::{Action, Config};
    use std::net::SocketAddr;

    fn id(n: u128) -> NodeId {
        NodeId(n.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835) | 1)
    }

    fn addr(n: u128) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 10_000 + n as u16))
    }

    fn hello(n: u128) -> Hello {
        Hello {
            protocol: crate::frame::VERSION,
            cluster: "t".into(),
            id: id(n),
            incarnation: 1,
            name: format!("n{n}"),
            addr: addr(n),
            tags: Default::default(),
        }
    }

    fn beacon(n: u128) -> Beacon {
        Beacon {
            cluster: "t".into(),
            id: id(n),
            incarnation: 1,
            name: format!("n{n}"),
            addr: addr(n),
            kind: BeaconKind::Announce,
            digest: 0,
        }
    }

    fn table(k: usize) -> PeerTable {
        let cfg = Config {
            overlay: Some(k),
            ..Config::default()
        };
        PeerTable::new(id(0), cfg, 7)
    }

    /// Feeds the table's events to the driver, as a driver loop does.
    fn drain(t: &mut PeerTable, d: &mut Driver) -> Vec<Action> {
        while let Some(ev) = t.poll_event() {
            d.on_event(&ev);
        }
        std::iter::from_fn(|| t.poll_action()).collect()
    }

    fn dials(actions: &[Action]) -> BTreeSet<NodeId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Dial { id, .. } => Some(*id),
                Action::Send { .. } => None,
            })
            .collect()
    }

    #[test]
    fn small_group_is_a_full_mesh() {
        let t0 = Instant::now();
        let (mut t, mut d) = (table(6), Driver::new(id(0), 6));
        for n in 1..=7 {
            t.on_beacon(t0, &beacon(n));
            d.on_beacon(id(n));
        }
        d.poll(t0, &mut t);
        drain(&mut t, &mut d);
        // Seven others and K = 6: everyone is a neighbour (K + 1 others
        // would be too many; K + 2 members is where the rings start).
        assert_eq!(d.neighbours().len(), 6, "8 members, K = 6: rings");
        let (mut t, mut d) = (table(6), Driver::new(id(0), 6));
        for n in 1..=6 {
            t.on_beacon(t0, &beacon(n));
            d.on_beacon(id(n));
        }
        d.poll(t0, &mut t);
        let want: BTreeSet<NodeId> = (1..=6).map(id).collect();
        assert_eq!(d.neighbours(), &want);
    }

    /// Both ends want the link (a small group: everyone is everyone's
    /// neighbour): only the lower id dials at once, the higher one after
    /// `MUTUAL_DIAL_WAIT` without a link, so that no crossing dial closes a
    /// link the other end already took up.
    #[test]
    fn mutual_neighbours_are_dialed_by_the_lower_id_first() {
        let t0 = Instant::now();
        let mut ids: Vec<NodeId> = (1..=7).map(id).collect();
        ids.sort_unstable();
        let me = ids.remove(3);
        let cfg = Config {
            overlay: Some(6),
            ..Config::default()
        };
        let (mut t, mut d) = (PeerTable::new(me, cfg, 7), Driver::new(me, 6));
        for n in (1..=7).filter(|&n| id(n) != me) {
            t.on_beacon(t0, &beacon(n));
            d.on_beacon(id(n));
        }
        d.poll(t0, &mut t);
        assert_eq!(d.neighbours().len(), 6);
        let (lower, higher): (BTreeSet<NodeId>, BTreeSet<NodeId>) =
            ids.iter().partition(|&&p| p < me);
        assert_eq!(
            dials(&drain(&mut t, &mut d)),
            higher,
            "at once: the higher ids"
        );
        let wait = crate::membership::MUTUAL_DIAL_WAIT;
        let early = t0 + wait / 2;
        t.on_tick(early);
        d.poll(early, &mut t);
        assert!(
            dials(&drain(&mut t, &mut d)).is_empty(),
            "the lower ids' turn"
        );
        let later = t0 + wait;
        t.on_tick(later);
        d.poll(later, &mut t);
        assert_eq!(
            dials(&drain(&mut t, &mut d)),
            lower,
            "no link came from the lower ids: dialed after the wait"
        );
    }

    #[test]
    fn bounded_neighbours_are_dialed_and_recomputes_are_paced() {
        let t0 = Instant::now();
        let (mut t, mut d) = (table(4), Driver::new(id(0), 4));
        for n in 1..=40 {
            t.on_beacon(t0, &beacon(n));
            d.on_beacon(id(n));
        }
        d.poll(t0, &mut t);
        let n = d.neighbours().clone();
        assert!(n.len() >= 4 && n.len() <= 4, "{n:?}");
        assert_eq!(d.rings().len(), 41);
        let actions = drain(&mut t, &mut d);
        let dialed = dials(&actions);
        assert_eq!(dialed, n, "every neighbour at once, by either end");
        // A further beacon within OVERLAY_EVERY waits for the deadline.
        t.on_beacon(t0, &beacon(41));
        d.on_beacon(id(41));
        d.poll(t0 + Duration::from_millis(5), &mut t);
        assert_eq!(d.recomputes(), 1);
        let at = d.next_deadline().expect("a recompute is due");
        assert_eq!(at, t0 + OVERLAY_EVERY);
        d.poll(at, &mut t);
        assert_eq!(d.recomputes(), 2);
        assert!(d.rings().contains(id(41)));
    }

    #[test]
    fn unwanted_links_close_after_settling() {
        let t0 = Instant::now();
        let (mut t, mut d) = (table(2), Driver::new(id(0), 2));
        for n in 1..=20 {
            t.on_beacon(t0, &beacon(n));
            d.on_beacon(id(n));
        }
        d.poll(t0, &mut t);
        drain(&mut t, &mut d);
        // A link from a member that neither end wants.
        let mine = d.neighbours().clone();
        let other = (1..=20)
            .map(id)
            .find(|x| !mine.contains(x) && !d.rings().want_links(*x).contains(&id(0)))
            .expect("a non-neighbour");
        t.on_link_up(
            t0,
            &hello((1..=20).find(|&n| id(n) == other).expect("its number")),
        );
        d.on_link_up(t0, other);
        drain(&mut t, &mut d);
        d.poll(t0 + TRIM_EVERY, &mut t);
        assert_eq!(d.poll_close(), None, "not before it settled");
        let at = d.next_deadline().expect("a trim is due");
        assert_eq!(at, t0 + LINK_SETTLE, "when it settles");
        d.poll(t0 + LINK_SETTLE + TRIM_EVERY, &mut t);
        assert_eq!(d.poll_close(), Some(other));
        assert_eq!(d.poll_close(), None, "once");
        d.poll(t0 + LINK_SETTLE + TRIM_EVERY * 3, &mut t);
        assert_eq!(d.poll_close(), None, "forgotten once queued");
        // A wanted link is kept.
        let keep = *mine.iter().next().expect("a neighbour");
        d.on_link_up(t0, keep);
        d.poll(t0 + LINK_SETTLE * 3, &mut t);
        assert_eq!(d.poll_close(), None);
    }

    /// An idle node wakes for nothing: a link that only the other end wants
    /// is looked at once, not every `TRIM_EVERY`, and beacons from members
    /// on the rings schedule no recompute.
    #[test]
    fn an_idle_overlay_has_no_deadline() {
        let t0 = Instant::now();
        // Wanting is not symmetric where the rings' fill-in reaches further
        // for one end than for the other: find such a member (a few
        // sizes, as in a cluster of 16 with K = 8).
        let (mut t, mut d, n, size) = (12..=40)
            .find_map(|size| {
                let (mut t, mut d) = (table(8), Driver::new(id(0), 8));
                for n in 1..=size {
                    t.on_beacon(t0, &beacon(n));
                    d.on_beacon(id(n));
                }
                d.poll(t0, &mut t);
                drain(&mut t, &mut d);
                let mine = d.neighbours().clone();
                (1..=size)
                    .find(|&n| {
                        !mine.contains(&id(n)) && d.rings().want_links(id(n)).contains(&id(0))
                    })
                    .map(|n| (t, d, n, size))
            })
            .expect("a member that wants us and that we do not want");
        t.on_link_up(t0, &hello(n));
        d.on_link_up(t0, id(n));
        // Until the driver has nothing left to do (bounded).
        let mut now = t0;
        for _ in 0..100 {
            drain(&mut t, &mut d);
            d.poll(now, &mut t);
            match d.next_deadline() {
                Some(at) => now = at.max(now),
                None => break,
            }
        }
        assert_eq!(d.next_deadline(), None, "quiet after {:?}", now - t0);
        assert_eq!(d.poll_close(), None, "the other end wants it: kept");
        for n in 1..=size {
            d.on_beacon(id(n));
        }
        assert_eq!(d.next_deadline(), None, "beacons of ring members");
        d.on_beacon(id(size + 1));
        assert!(d.next_deadline().is_some(), "a newcomer's beacon");
    }

    /// Ticks `t` at each deadline up to `until` (bounded).
    fn run_until(t: &mut PeerTable, until: Instant) {
        for _ in 0..1000 {
            match t.next_deadline() {
                Some(at) if at <= until => t.on_tick(at),
                _ => break,
            }
        }
        t.on_tick(until);
    }

    #[test]
    fn a_full_mesh_judges_silence_alone_as_without_the_overlay() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(30);
        // Two nodes, K = 6: the driver says the overlay is a full mesh, and
        // the one observer's silence verdict is enough, as in a full mesh.
        let (mut t, mut d) = (table(6), Driver::new(id(0), 6));
        t.on_link_up(t0, &hello(1));
        d.on_link_up(t0, id(1));
        drain(&mut t, &mut d);
        d.poll(t0, &mut t);
        drain(&mut t, &mut d);
        run_until(&mut t, later);
        let state = t.get(&id(1)).map(|p| p.state);
        assert_eq!(state, Some(crate::membership::PeerState::Failed));
        // Without a driver the table keeps the two-observer rule: one
        // observer's silence is an alert, not a verdict.
        let mut t = table(6);
        t.on_link_up(t0, &hello(1));
        run_until(&mut t, later);
        let state = t.get(&id(1)).map(|p| p.state);
        assert_ne!(state, Some(crate::membership::PeerState::Failed));
    }

    #[test]
    fn failed_member_leaves_the_rings() {
        let t0 = Instant::now();
        let (mut t, mut d) = (table(4), Driver::new(id(0), 4));
        for n in 1..=12 {
            t.on_link_up(t0, &hello(n));
            d.on_link_up(t0, id(n));
        }
        drain(&mut t, &mut d);
        d.poll(t0, &mut t);
        drain(&mut t, &mut d);
        assert_eq!(d.rings().len(), 13);
        let gone = *d.neighbours().iter().next().expect("a neighbour");
        t.on_goodbye(t0, gone);
        t.on_link_down(t0, gone, true);
        d.on_link_down(gone);
        drain(&mut t, &mut d);
        d.poll(t0 + OVERLAY_EVERY, &mut t);
        assert!(!d.rings().contains(gone));
        assert!(!d.neighbours().contains(&gone));
        assert_eq!(d.neighbours().len(), 4, "a replacement was chosen");
    }
}
