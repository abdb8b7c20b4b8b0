//! Remembered peers (`--state-dir`): where the cluster was, for the next
//! start.
//!
//! The addresses of the confirmed live peers are written to
//! `DIR/peers.json` whenever they change, at most once per
//! [`MIN_INTERVAL`], atomically (a temporary file in the same directory,
//! mode 0600, synced, then renamed over the old one), and tried as seeds
//! on the next start. So a whole cluster restarted where multicast does not
//! work finds itself again with no seed flag at all (Serf's snapshot).
//!
//! A missing file is an empty memory; a corrupt or truncated one is reported
//! by the caller and ignored, never fatal.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The file's name inside the state directory.
pub const FILE: &str = "peers.json";

/// Writes are at most this frequent.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Most addresses remembered (the file stays small).
pub const MAX_REMEMBERED: usize = 1024;

#[derive(Debug, Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    peers: Vec<SocketAddr>,
}

/// Why the remembered peers could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file exists but cannot be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// The file is not what this version writes (corrupt, truncated, other).
    #[error("{path} is not a peers file ({error}); ignoring it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        error: String,
    },
}

/// The remembered addresses in `dir` (none when there is no file yet).
pub fn load(dir: &Path) -> Result<Vec<SocketAddr>, LoadError> {
    let path = dir.join(FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(LoadError::Read { path, error }),
    };
    let on_disk: OnDisk = serde_json::from_slice(&text).map_err(|e| LoadError::Corrupt {
        path: path.clone(),
        error: e.to_string(),
    })?;
    if on_disk.version != 1 {
        return Err(LoadError::Corrupt {
            path,
            error: format!("version {} is not 1", on_disk.version),
        });
    }
    Ok(on_disk.peers.into_iter().take(MAX_REMEMBERED).collect())
}

/// Writes `peers` to `dir` atomically, readable by the owner only.
pub fn save(dir: &Path, peers: &BTreeSet<SocketAddr>) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let body = serde_json::to_vec_pretty(&OnDisk {
        version: 1,
        peers: peers.iter().copied().take(MAX_REMEMBERED).collect(),
    })
    .map_err(std::io::Error::other)?;
    let tmp = dir.join(format!(".{FILE}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(FILE))
    })();
    if result.is_err() {
        // The temporary file is ours; the error that matters is returned.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// When to write (sans-IO): the set changed, and the last write is at least
/// [`MIN_INTERVAL`] old.
#[derive(Debug, Default)]
pub struct Throttle {
    saved: BTreeSet<SocketAddr>,
    wanted: Option<BTreeSet<SocketAddr>>,
    last_write: Option<Instant>,
}

impl Throttle {
    /// Starts from what is on disk, so an unchanged set is not rewritten.
    pub fn new(on_disk: impl IntoIterator<Item = SocketAddr>) -> Throttle {
        Throttle {
            saved: on_disk.into_iter().collect(),
            ..Throttle::default()
        }
    }

    /// The current set of addresses to remember. An empty set never
    /// overwrites a remembered one: a node that lost every peer (or has
    /// not found them yet) keeps its memory for the next start.
    pub fn update(&mut self, peers: BTreeSet<SocketAddr>) {
        self.wanted = (!peers.is_empty() && peers != self.saved).then_some(peers);
    }

    /// When a write is due, if one is wanted.
    pub fn next_write(&self, now: Instant) -> Option<Instant> {
        self.wanted.as_ref()?;
        Some(self.last_write.map_or(now, |t| (t + MIN_INTERVAL).max(now)))
    }

    /// The set to write at `now`, if due; the caller writes it, then calls
    /// [`Throttle::written`].
    pub fn due(&mut self, now: Instant) -> Option<BTreeSet<SocketAddr>> {
        let ready = self.last_write.is_none_or(|t| now >= t + MIN_INTERVAL);
        if !ready {
            return None;
        }
        self.wanted.clone()
    }

    /// `set` is on disk as of `now`.
    pub fn written(&mut self, now: Instant, set: BTreeSet<SocketAddr>) {
        self.last_write = Some(now);
        if self.wanted.as_ref() == Some(&set) {
            self.wanted = None;
        }
        self.saved = set;
    }
}

/// The writer task: follows the set of confirmed live peers' addresses and
/// writes it to `dir` as [`Throttle`] allows, off the runtime's thread (the
/// file is synced). A failed write is logged once per kind and retried at
/// the next change.
pub async fn run(
    dir: PathBuf,
    on_disk: Vec<SocketAddr>,
    mut peers: tokio::sync::watch::Receiver<BTreeSet<SocketAddr>>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut throttle = Throttle::new(on_disk);
    let mut failing = false;
    loop {
        let now = tokio::time::Instant::now();
        let due = throttle
            .next_write(now.into_std())
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            changed = peers.changed() => {
                if changed.is_err() {
                    break; // the membership task is gone: the node is stopping
                }
                throttle.update(peers.borrow_and_update().clone());
                continue;
            }
            () = sleep_or_never(due) => {}
        }
        let now = tokio::time::Instant::now().into_std();
        let Some(set) = throttle.due(now) else {
            continue;
        };
        let (d, s) = (dir.clone(), set.clone());
        let written = tokio::task::spawn_blocking(move || save(&d, &s)).await;
        match written {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!(dir = %dir.display(), "remembered peers written again");
                }
                failing = false;
                throttle.written(now, set);
            }
            Ok(Err(error)) => {
                if !failing {
                    tracing::warn!(dir = %dir.display(), %error, "cannot remember peers");
                }
                failing = true;
                throttle.written(now, BTreeSet::new()); // retry after the interval
            }
            Err(error) => tracing::warn!(%error, "remembered-peers writer failed"),
        }
    }
}

async fn sleep_or_never(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ports: &[u16]) -> BTreeSet<SocketAddr> {
        ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect()
    }

    #[test]
    fn saved_atomically_owner_only_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cst-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(load(&dir).unwrap().is_empty(), "no file: no memory");
        save(&dir, &set(&[1, 2])).unwrap();
        let mode = std::fs::metadata(dir.join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load(&dir).unwrap(),
            set(&[1, 2]).into_iter().collect::<Vec<_>>()
        );
        // Truncated and garbage files are reported, not fatal.
        let full = std::fs::read(dir.join(FILE)).unwrap();
        std::fs::write(dir.join(FILE), &full[..full.len() / 2]).unwrap();
        assert!(matches!(load(&dir), Err(LoadError::Corrupt { .. })));
        std::fs::write(dir.join(FILE), b"\x00\xffnot json").unwrap();
        let err = load(&dir).unwrap_err();
        assert!(err.to_string().contains("ignoring"), "{err}");
        assert!(
            std::fs::read_dir(&dir).unwrap().count() == 1,
            "no temporary file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_follow_changes_at_most_once_a_second() {
        let t0 = Instant::now();
        let mut th = Throttle::new(set(&[1]));
        th.update(set(&[1]));
        assert_eq!(th.next_write(t0), None, "unchanged: nothing to write");
        th.update(set(&[]));
        assert_eq!(th.next_write(t0), None, "an empty set keeps the memory");
        th.update(set(&[1, 2]));
        assert_eq!(th.next_write(t0), Some(t0));
        let s = th.due(t0).unwrap();
        th.written(t0, s);
        assert_eq!(th.next_write(t0), None);
        th.update(set(&[1, 2, 3]));
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(th.next_write(t1), Some(t0 + MIN_INTERVAL));
        assert!(th.due(t1).is_none());
        assert_eq!(th.due(t0 + MIN_INTERVAL), Some(set(&[1, 2, 3])));
    }
}
