//! The secret file: where a node's cluster keys live.
//!
//! One base64 key per line (as `constellationd keygen` prints them), the
//! first one primary; blank lines and `#` comments are ignored. The file
//! must not be readable or writable by other users: a node refuses to start
//! otherwise, naming the file and the fix. Keyring edits made through the
//! control API (`keys install|use|remove`) are written back atomically (a
//! new file with mode 0600, then renamed over the old one), so a restart
//! keeps the rotation.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use proto::secure::Keyring;

/// Reads and checks a secret file.
pub fn load(path: &Path) -> Result<Keyring, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown} is not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(format!(
            "{shown} is accessible to other users (mode {mode:04o}); run: chmod 600 {shown}"
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    Keyring::parse(&text).map_err(|e| format!("{shown}: {e}"))
}

/// Writes `ring` to `path` atomically with mode 0600.
pub fn save(path: &Path, ring: &Keyring) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "secret".into());
    let tmp = match dir {
        Some(d) => d.join(format!(".{name}.{}.tmp", std::process::id())),
        None => format!(".{name}.{}.tmp", std::process::id()).into(),
    };
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(ring.to_file().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _cleanup = std::fs::remove_file(&tmp); // may not exist
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::secure::Key;

    fn dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "cstl-secret-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_files_others_can_read_and_round_trips_the_rest() {
        let d = dir();
        let path = d.join("secret");
        let ring = Keyring::new(vec![Key::generate(), Key::generate()]).unwrap();
        save(&path, &ring).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load(&path).unwrap(), ring);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.contains("chmod 600") && err.contains("0644"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load(&path).is_ok(), "group-readable is allowed");
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(load(&path).unwrap_err().contains("32 bytes"));
        assert!(load(&d.join("missing"))
            .unwrap_err()
            .contains("cannot read"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
