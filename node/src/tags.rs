//! This node's tags, changeable at runtime (`PATCH /v1/self/tags`, and a
//! SIGHUP reload of the config file's `tag` key: [`LocalTags::set_configured`]).
//!
//! The node starts with the configured tags (`--tag`, the config file),
//! with the runtime changes kept in the state directory laid over them
//! (`tags.json`: `{"set": {..}, "delete": [..]}`). Each change bumps a
//! version (per life of the node: the incarnation orders lives), and the
//! node sends its own membership record, with the new tags and version, to
//! every linked peer; a peer linked later gets it right after the link
//! comes up (the handshake still carries the start-time tags). Peers apply
//! a record only over a lower version of the same incarnation, so a late
//! record never undoes a newer change and nothing looks like a restart.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use proto::control::{TagsInfo, TagsRequest};
use proto::frame::PeerRecord;
use proto::{NodeId, Tags};
use serde::{Deserialize, Serialize};

/// Most tags a node may carry after a runtime change.
pub const MAX_TAGS: usize = 64;

/// The file, in the state directory, holding the runtime changes.
pub const TAGS_FILE: &str = "tags.json";

/// Runtime changes over the configured tags, as saved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Overlay {
    #[serde(default)]
    set: Tags,
    #[serde(default)]
    delete: BTreeSet<String>,
}

impl Overlay {
    fn over(&self, configured: &Tags) -> Tags {
        let mut t: Tags = configured
            .iter()
            .filter(|(k, _)| !self.delete.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        t.extend(self.set.clone());
        t
    }
}

#[derive(Debug)]
struct Inner {
    configured: Tags,
    overlay: Overlay,
    tags: Tags,
    version: u64,
}

/// The node's tags and their version (one lock, held briefly, never across
/// an `.await`).
#[derive(Debug)]
pub struct LocalTags {
    inner: Mutex<Inner>,
    /// `tags.json` in the state directory, when there is one.
    file: Option<PathBuf>,
}

/// Why a tags request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagsError {
    /// A key or value breaks the rules of `--tag`.
    #[error("tag {key:?}: {why}")]
    Invalid {
        /// The key.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// The change would leave more than [`MAX_TAGS`] tags.
    #[error("at most {MAX_TAGS} tags")]
    TooMany,
}

impl LocalTags {
    /// The configured tags with the changes saved in `state_dir` laid
    /// over them; a saved file that cannot be read is reported (the
    /// returned warning) and ignored.
    pub fn load(configured: Tags, state_dir: Option<&Path>) -> (LocalTags, Option<String>) {
        let file = state_dir.map(|d| d.join(TAGS_FILE));
        let mut warning = None;
        let overlay = match &file {
            Some(f) => match std::fs::read(f) {
                Ok(bytes) => match serde_json::from_slice::<Overlay>(&bytes) {
                    Ok(o) if valid(&o) => o,
                    Ok(_) => {
                        warning = Some(format!("{}: invalid tags, ignored", f.display()));
                        Overlay::default()
                    }
                    Err(e) => {
                        warning = Some(format!("{}: {e}; ignored", f.display()));
                        Overlay::default()
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Overlay::default(),
                Err(e) => {
                    warning = Some(format!("{}: {e}; ignored", f.display()));
                    Overlay::default()
                }
            },
            None => Overlay::default(),
        };
        let tags = overlay.over(&configured);
        let inner = Inner {
            configured,
            overlay,
            tags,
            version: 0,
        };
        (
            LocalTags {
                inner: Mutex::new(inner),
                file,
            },
            warning,
        )
    }

    /// Tags that never change at runtime (tests, embedding).
    pub fn fixed(tags: Tags) -> LocalTags {
        Self::load(tags, None).0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Plain data, always consistent between statements.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tags now.
    pub fn get(&self) -> Tags {
        self.lock().tags.clone()
    }

    /// The tags now and their version.
    pub fn versioned(&self) -> (Tags, u64) {
        let g = self.lock();
        (g.tags.clone(), g.version)
    }

    /// Where runtime changes are saved.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The answer to `GET /v1/self/tags`.
    pub fn info(&self) -> TagsInfo {
        let (tags, version) = self.versioned();
        TagsInfo {
            tags,
            version,
            changed: None,
            saved_in: self.file.as_ref().map(|f| f.display().to_string()),
            sent_to: None,
            warning: None,
        }
    }

    /// Applies `req` (deletions first); on a change bumps the version and
    /// saves the overlay. Returns the new tags and version, whether they
    /// changed, and a save failure (the change stands in memory).
    pub fn apply(&self, req: &TagsRequest) -> Result<(Tags, u64, bool, Option<String>), TagsError> {
        for (k, v) in &req.set {
            proto::id::check_tag(k, v).map_err(|e| TagsError::Invalid {
                key: k.clone(),
                why: e.to_string(),
            })?;
        }
        let mut g = self.lock();
        let mut overlay = g.overlay.clone();
        for k in &req.delete {
            overlay.set.remove(k);
            if g.configured.contains_key(k) {
                overlay.delete.insert(k.clone());
            }
        }
        for (k, v) in &req.set {
            overlay.delete.remove(k);
            if g.configured.get(k) == Some(v) {
                overlay.set.remove(k);
            } else {
                overlay.set.insert(k.clone(), v.clone());
            }
        }
        let tags = overlay.over(&g.configured);
        if tags.len() > MAX_TAGS {
            return Err(TagsError::TooMany);
        }
        let changed = tags != g.tags;
        let mut warning = None;
        if overlay != g.overlay {
            if let Some(file) = &self.file {
                // Small file, written under the lock so that saves land in
                // the order of the changes.
                if let Err(e) = save(file, &overlay) {
                    warning = Some(format!(
                        "tags changed but not saved to {}: {e}",
                        file.display()
                    ));
                }
            }
            g.overlay = overlay;
        }
        if changed {
            g.tags = tags;
            g.version += 1;
        }
        Ok((g.tags.clone(), g.version, changed, warning))
    }
}

impl LocalTags {
    /// New configured tags (a config reload): the runtime changes stay laid
    /// over them. Returns the tags and version now, and whether they
    /// changed (then the caller sends [`NodeState::send_self_record`] to
    /// the linked peers, as `PATCH /v1/self/tags` does).
    ///
    /// [`NodeState::send_self_record`]: crate::state::NodeState::send_self_record
    pub fn set_configured(&self, configured: Tags) -> (Tags, u64, bool) {
        let mut g = self.lock();
        let tags = g.overlay.over(&configured);
        g.configured = configured;
        let changed = tags != g.tags;
        if changed {
            g.tags = tags;
            g.version += 1;
        }
        (g.tags.clone(), g.version, changed)
    }
}

fn valid(o: &Overlay) -> bool {
    proto::id::check_tags(&o.set).is_ok() && o.set.len() <= MAX_TAGS
}

/// Writes the overlay atomically (temporary file, then rename).
fn save(file: &Path, overlay: &Overlay) -> std::io::Result<()> {
    let tmp = file.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(overlay).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, file)
}

/// This node's own membership record, carrying its tags at `version`.
pub fn self_record(
    id: NodeId,
    incarnation: u64,
    name: &str,
    addr: std::net::SocketAddr,
    tags: Tags,
    version: u64,
) -> PeerRecord {
    PeerRecord {
        id,
        incarnation,
        name: name.to_string(),
        addr,
        state: "alive".into(),
        age_ms: None,
        tags,
        tags_version: version,
        by: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn changes_lay_over_the_configured_tags_and_survive_a_reload() {
        let dir = std::env::temp_dir().join(format!(
            "constellationd-tags-test-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let configured = tags(&[("role", "web"), ("zone", "a")]);
        let (t, w) = LocalTags::load(configured.clone(), Some(&dir));
        assert_eq!(w, None);
        let req = TagsRequest {
            set: tags(&[("role", "db"), ("new", "1")]),
            delete: vec!["zone".into(), "absent".into()],
        };
        let (now, version, changed, warning) = t.apply(&req).unwrap();
        assert_eq!(now, tags(&[("new", "1"), ("role", "db")]));
        assert_eq!((version, changed, warning), (1, true, None));
        // The same request again changes nothing and keeps the version.
        let (_, version, changed, _) = t.apply(&req).unwrap();
        assert_eq!((version, changed), (1, false));
        let (again, _) = LocalTags::load(configured, Some(&dir));
        assert_eq!(again.get(), now);
        assert_eq!(again.versioned().1, 0, "a new life starts at version 0");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn new_configured_tags_keep_the_runtime_changes_on_top() {
        let t = LocalTags::fixed(tags(&[("role", "web")]));
        let req = TagsRequest {
            set: tags(&[("zone", "b")]),
            delete: vec![],
        };
        t.apply(&req).unwrap();
        let (now, version, changed) = t.set_configured(tags(&[("role", "db")]));
        assert_eq!(now, tags(&[("role", "db"), ("zone", "b")]));
        assert_eq!((version, changed), (2, true));
        assert!(!t.set_configured(tags(&[("role", "db")])).2);
    }

    #[test]
    fn bad_tags_are_refused_and_change_nothing() {
        let t = LocalTags::fixed(Tags::new());
        let bad = TagsRequest {
            set: tags(&[("bad key", "x")]),
            delete: vec![],
        };
        assert!(matches!(t.apply(&bad), Err(TagsError::Invalid { .. })));
        let many = TagsRequest {
            set: (0..=MAX_TAGS)
                .map(|i| (format!("k{i}"), "v".into()))
                .collect(),
            delete: vec![],
        };
        assert_eq!(t.apply(&many), Err(TagsError::TooMany));
        assert_eq!(t.versioned(), (Tags::new(), 0));
    }
}
