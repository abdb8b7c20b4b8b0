//! Beacon pacing: how often a node beacons and whom it answers, so that the
//! group's beacon traffic stays bounded as it grows (sans-IO).
//!
//! Every node multicasts an announce once per interval and every member
//! hears every announce, so with a fixed interval the group's rate grows as
//! N and what each node *receives* grows as N too. RTP's control protocol
//! meets the same problem (RFC 3550, section 6.2) by letting each member's
//! report interval grow with the number of members it knows, so that the
//! group's total stays within a budget. We do the same, in the simplest
//! form that keeps small clusters exactly as they were:
//!
//! ```text
//! interval = configured × max(1, members / GROUP_BEACONS)
//! ```
//!
//! `members` counts this node too. The driver takes it from the peer table
//! when it has one (the members links have confirmed: a flood of forged
//! beacons cannot slow the node's beacons down) and otherwise from the
//! identities it heard by beacon. Below [`GROUP_BEACONS`] members nothing
//! changes; above it, the group sends about `GROUP_BEACONS` beacons per
//! configured interval in all (40/s at the default 1 s), whatever N is, and
//! each node hears as many. The wait before each beacon is jittered ±10% as
//! before. The budget is in units of the configured interval rather than
//! per second, so that a cluster run with `--beacon-interval 200ms` (the
//! tests) scales at the same member count as one with the default.
//!
//! A receiver must not take a longer interval for silence: a node sends its
//! current interval with every beacon whose interval is scaled (the `ivl`
//! field, see `PROTOCOL.md`), and [`silence_allowance`] turns what a source
//! said into how long its silence is normal.
//!
//! The second half is the reply to a newcomer's first announce: every
//! member hears it, and if every one answered, a newcomer would draw N
//! unicast replies at once. [`answers`] picks about [`REPLIERS`] of them,
//! by a hash of the two ids: deterministic (no coordination, no waiting),
//! so the newcomer still hears from members within milliseconds, and the
//! members it links to tell it the rest over the link (push-pull of the
//! member list). Below `REPLIERS` + 1 members everyone answers, as before.
//!
//! A third half, of wake-ups rather than traffic: a node wakes on its ping
//! rounds anyway (wall-clock multiples of the ping interval, the same for
//! every node), so its periodic beacons go out on the round nearest to when
//! they are due ([`on_round`]), and every node hears them in the same
//! burst as its pings and pongs instead of at a moment of its own: at N
//! members that is up to [`GROUP_BEACONS`] wake-ups a second saved per
//! node. The mean interval is unchanged (the nearest round is as often
//! before as after), and so are the jitter's randomness across senders
//! (which round) and a newcomer's first announce (at once).
//!
//! Nothing here reads a clock or a socket: the driver passes counts,
//! instants and durations and acts on the answers.

use std::time::{Duration, Instant};

use proto::NodeId;

/// The group's beacon budget: how many beacons the whole group sends per
/// configured interval once it is larger than this many members. Chosen
/// above 32, the largest cluster our tests and published figures use, so
/// that those are unaffected, and low enough that 128 nodes on one host
/// (the largest we run) hear 40 beacons per interval instead of 127.
pub const GROUP_BEACONS: usize = 40;

/// How many members (in expectation) answer a newcomer's first announce
/// with a unicast reply. With the hash spread evenly, the chance that none
/// does is about e^-6 (0.25%); the newcomer then learns of the group from
/// the members that dial it (each lower-id member does so at once on its
/// announce) and from the next periodic announces.
pub const REPLIERS: usize = 6;

/// The longest interval a receiver believes a source announces: five
/// minutes (12 000 members at the default interval). A larger `ivl`
/// (forged, or a bug) would keep the source's state for hours.
pub const MAX_ADVERTISED: Duration = Duration::from_secs(300);

/// How many beacon intervals of silence are normal: one lost beacon, and a
/// jittered one late, never look like a silent source.
pub const SILENT_INTERVALS: u32 = 3;

/// When a beacon due at `due`, `gap` after the one before it, goes out:
/// on the ping round nearest to `due` when `rounds` (the rounds' anchor
/// and period, see [`proto::link::wall_clock_anchor`]) are given and at
/// most half the gap apart, so that rounding never merges two beacons or
/// moves one by more than a quarter of its interval; else at `due`.
pub fn on_round(due: Instant, gap: Duration, rounds: Option<(Instant, Duration)>) -> Instant {
    match rounds {
        Some((anchor, every)) if !every.is_zero() && every.saturating_mul(2) <= gap => {
            proto::link::nearest_round(anchor, every, due)
        }
        _ => due,
    }
}

/// The mean interval between this node's announces when it knows
/// `members` members (itself included): `configured` up to
/// [`GROUP_BEACONS`] members, then growing in proportion.
pub fn interval(configured: Duration, members: usize) -> Duration {
    if members <= GROUP_BEACONS {
        return configured;
    }
    // Exact in integer nanoseconds; saturates rather than overflowing for
    // absurd inputs.
    let nanos = configured.as_nanos().saturating_mul(members as u128) / GROUP_BEACONS as u128;
    let sub = (nanos % 1_000_000_000) as u32; // < 10^9: fits
    u64::try_from(nanos / 1_000_000_000).map_or(Duration::MAX, |secs| Duration::new(secs, sub))
}

/// What a beacon says of its sender's interval: `Some` only while it is
/// scaled, so that an unscaled beacon is byte-for-byte today's.
pub fn advertised(configured: Duration, current: Duration) -> Option<Duration> {
    // Whole milliseconds travel; an interval that rounds to the configured
    // one says nothing new.
    let ms = |d: Duration| d.as_millis();
    (ms(current) != ms(configured)).then_some(current)
}

/// The interval a receiver assumes for a source: what it advertised, within
/// `[default, MAX_ADVERTISED]`, or `default` (the receiver's own configured
/// interval) for a beacon without one. Never shorter than the default: a
/// source cannot make the receiver stricter than it always was.
pub fn assumed(default: Duration, advertised: Option<Duration>) -> Duration {
    advertised.map_or(default, |a| a.clamp(default, MAX_ADVERTISED.max(default)))
}

/// How long a source may be silent before that means something, given the
/// base allowance the receiver uses at its configured interval (`base`) and
/// the interval the source announces at ([`assumed`]): the larger of `base`
/// and [`SILENT_INTERVALS`] intervals.
pub fn silence_allowance(base: Duration, assumed: Duration) -> Duration {
    base.max(assumed.saturating_mul(SILENT_INTERVALS))
}

/// Whether the member `own` answers the first announce of `newcomer` with a
/// unicast reply, when `answerers` members (`own` included, the newcomer
/// not) may answer it.
///
/// True for about [`REPLIERS`] of them, and for every one when there are at
/// most `REPLIERS`.
/// The same pair always gets the same answer, so a newcomer that announces
/// again (a lost reply) is answered by the same members: others help via
/// the links, not via more replies.
pub fn answers(own: NodeId, newcomer: NodeId, answerers: usize) -> bool {
    if answerers <= REPLIERS {
        return true;
    }
    // Uniform in [0, 2^64): compare against REPLIERS / answerers of it.
    let h = mix(own.0 ^ newcomer.0.rotate_left(64));
    let threshold = (u128::from(u64::MAX) * REPLIERS as u128 / answerers as u128) as u64;
    h < threshold
}

/// A 128-to-64-bit mix (splitmix64's finalizer over both halves): ids are
/// random already, but a newcomer's id and ours must not correlate with the
/// answer in any simple way (ids that share bits would all answer or not).
fn mix(x: u128) -> u64 {
    let fold = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    fold(fold(x as u64) ^ (x >> 64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn small_groups_beacon_at_the_configured_interval() {
        for members in 0..=GROUP_BEACONS {
            assert_eq!(interval(SEC, members), SEC, "{members}");
            assert_eq!(
                interval(Duration::from_millis(200), members),
                Duration::from_millis(200)
            );
            assert_eq!(advertised(SEC, interval(SEC, members)), None);
        }
    }

    #[test]
    fn the_group_rate_stays_within_the_budget() {
        for members in [41usize, 64, 128, 1000, 10_000] {
            let ivl = interval(SEC, members);
            assert!(ivl > SEC);
            // members / interval beacons per second, at most the budget.
            let rate = members as f64 / ivl.as_secs_f64();
            assert!(
                (rate - GROUP_BEACONS as f64).abs() < 0.01,
                "{members}: {rate}"
            );
            assert_eq!(advertised(SEC, ivl), Some(ivl));
        }
        assert_eq!(interval(SEC, 64), Duration::from_millis(1600));
        assert_eq!(interval(SEC, 80), Duration::from_secs(2));
        // Never overflows, however absurd the inputs.
        assert!(interval(Duration::MAX, usize::MAX) >= Duration::MAX / 2);
    }

    #[test]
    fn periodic_beacons_ride_on_the_nearest_ping_round() {
        let anchor = Instant::now();
        let ms = Duration::from_millis;
        let rounds = Some((anchor, ms(200)));
        assert_eq!(on_round(anchor + ms(1090), SEC, rounds), anchor + ms(1000));
        assert_eq!(on_round(anchor + ms(1110), SEC, rounds), anchor + ms(1200));
        assert_eq!(on_round(anchor + ms(1200), SEC, rounds), anchor + ms(1200));
        // Rounds too far apart for the interval (a short beacon interval,
        // long pings), or none: the beacon goes when due.
        let due = anchor + ms(1090);
        assert_eq!(on_round(due, ms(300), rounds), due);
        assert_eq!(on_round(due, SEC, None), due);
        assert_eq!(on_round(due, SEC, Some((anchor, Duration::ZERO))), due);
        // Never moved by more than half a round, so the mean interval of a
        // jittered series stays what it was (within rounding).
        let mut at = anchor;
        let (mut ideal, n) = (anchor, 200u32);
        for k in 0..n {
            let gap = SEC.mul_f64(0.9 + 0.2 * f64::from(k) / f64::from(n));
            ideal += gap;
            let sent = on_round(ideal, gap, rounds);
            assert!(sent.max(ideal) - sent.min(ideal) <= ms(100), "{k}");
            at = sent;
        }
        let mean = (at - anchor) / n;
        assert!(mean > ms(990) && mean < ms(1010), "{mean:?}");
    }

    #[test]
    fn receivers_assume_what_was_advertised_within_bounds() {
        assert_eq!(assumed(SEC, None), SEC);
        assert_eq!(assumed(SEC, Some(3 * SEC)), 3 * SEC);
        // Shorter than ours: we stay as lenient as we always were.
        assert_eq!(assumed(SEC, Some(Duration::from_millis(10))), SEC);
        assert_eq!(assumed(SEC, Some(Duration::ZERO)), SEC);
        assert_eq!(assumed(SEC, Some(Duration::MAX)), MAX_ADVERTISED);
        assert_eq!(assumed(SEC, Some(4 * MAX_ADVERTISED)), MAX_ADVERTISED);
        // An unscaled source: the receiver's allowance is as before.
        let base = 3 * SEC;
        assert_eq!(silence_allowance(base, assumed(SEC, None)), base);
        assert_eq!(silence_allowance(base, 2 * SEC), 6 * SEC);
        assert_eq!(
            silence_allowance(Duration::from_secs(60), 2 * SEC),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn everyone_answers_in_a_small_group() {
        for members in 0..=REPLIERS {
            for i in 0..50u128 {
                assert!(answers(NodeId(i), NodeId(1000 + i), members));
            }
        }
    }

    /// About REPLIERS members answer any newcomer, whatever N; the same
    /// pair always gets the same answer.
    #[test]
    fn about_repliers_members_answer_a_newcomer() {
        let ids = |seed: u128, n: usize| -> Vec<NodeId> {
            (0..n as u128)
                .map(|i| NodeId(mix(seed * 7919 + i) as u128 | (u128::from(mix(i + seed)) << 64)))
                .collect()
        };
        for n in [16usize, 64, 256, 2048] {
            let members = ids(n as u128, n);
            let mut total = 0;
            let mut none = 0;
            let newcomers = ids(99, 400);
            for &new in &newcomers {
                let k = members.iter().filter(|&&m| answers(m, new, n)).count();
                total += k;
                none += usize::from(k == 0);
                assert!(k <= 4 * REPLIERS, "{n}: {k} answered");
                assert_eq!(k, members.iter().filter(|&&m| answers(m, new, n)).count());
            }
            let mean = total as f64 / newcomers.len() as f64;
            assert!(
                (mean - REPLIERS as f64).abs() < 1.0,
                "{n}: mean {mean} repliers"
            );
            assert!(none <= 6, "{n}: {none} of 400 newcomers got no reply");
        }
    }
}
