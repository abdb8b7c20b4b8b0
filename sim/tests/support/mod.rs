//! What the scenario test files share: starting a world and naming its
//! nodes.

use std::time::Duration;

use sim::{Op, World};

pub const MS: Duration = Duration::from_millis(1);

/// Starts every node (1 ms apart at most) and runs until all are live and
/// `done` holds, failing after `within` with `what` and the pairs still
/// missing; returns how long it took.
pub fn start_all_until(
    w: &mut World,
    within: Duration,
    what: &str,
    done: impl Fn(&World) -> bool,
) -> Duration {
    let t0 = w.now();
    let n = w.config().nodes as u64;
    w.apply(&Op::StartAll { spread: MS });
    let at = w.run_until(t0 + within, |w| w.observer().live() == n && done(w));
    let Some(t) = at else {
        panic!(
            "{what} not reached within {within:?}: {} pairs missing",
            w.observer().missing_pairs()
        );
    };
    t - t0
}

/// The ids of every node but the one in slot `but`.
pub fn others(w: &World, but: u32) -> Vec<proto::NodeId> {
    (0..w.config().nodes as u32)
        .filter(|s| *s != but)
        .filter_map(|s| w.observer().id(s))
        .collect()
}
