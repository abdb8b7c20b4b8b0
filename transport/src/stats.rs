//! Transport-wide counters, shared with the control API.

use std::sync::atomic::AtomicU64;

use proto::stats::Tally;

/// Transport counters, shared with the control API. The link loops add to
/// them once per read or write (a batch of frames), not once per frame.
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames read on established links.
    pub frames_in: AtomicU64,
    /// Frames written on established links.
    pub frames_out: AtomicU64,
    /// Links established (both directions, duplicates excluded).
    pub links_established: AtomicU64,
    /// Dials started.
    pub dials: AtomicU64,
    /// Dials that ended without a link.
    pub dial_failures: AtomicU64,
    /// Dropped connections and frames by reason.
    pub drops: Tally,
}
