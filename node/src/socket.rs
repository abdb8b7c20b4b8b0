//! The control socket's path: defaults, the OS length limit, stale files,
//! a second daemon on the same path, and the file mode.
//!
//! The socket file is never more permissive than `--socket-mode`, whatever
//! the umask: it is bound inside a fresh private directory (mode 0700, next
//! to the final path), given its mode there, and only then linked to the
//! final path. The link fails if the path exists, so a daemon that bound the
//! path in the meantime is never replaced. Changing the umask instead would
//! race with every other thread creating files.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Longest Unix socket path Linux accepts (`sun_path` is 108 bytes with the NUL).
pub const MAX_PATH: usize = 107;

/// Why the control socket cannot be bound.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Over [`MAX_PATH`].
    #[error("control socket path {path} is {len} bytes; Unix sockets allow at most {MAX_PATH} (use a shorter --socket)")]
    TooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The directory is so long that the temporary socket in it would not
    /// fit [`MAX_PATH`] (only with a file name under 9 bytes).
    #[error("control socket path {0}: its directory must be at most {max} bytes (the socket is first bound in a private directory there); use a shorter --socket", max = MAX_PATH - 10)]
    DirTooLong(PathBuf),
    /// A live daemon answers there.
    #[error("another constellationd is serving {0}")]
    InUse(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Any other failure.
    #[error("cannot bind the control socket {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// The effective uid, without unsafe code (from `/proc/self/status`).
/// True when this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    uid() == Some(0)
}

fn uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The socket of the systemd unit (`packaging/constellationd.service`),
/// in its `RuntimeDirectory`.
pub const SERVICE_PATH: &str = "/run/constellationd/constellationd.sock";

/// The default path: `/run/constellationd.sock` for root (or, when that does
/// not exist and the service's [`SERVICE_PATH`] does, that one), else
/// `$XDG_RUNTIME_DIR/constellationd.sock`, else `/tmp/constellationd-UID.sock`.
pub fn default_path() -> PathBuf {
    let uid = uid();
    if uid == Some(0) {
        let plain = Path::new("/run/constellationd.sock");
        if !plain.exists() && Path::new(SERVICE_PATH).exists() {
            return PathBuf::from(SERVICE_PATH);
        }
        return plain.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return Path::new(&dir).join("constellationd.sock");
    }
    PathBuf::from(format!("/tmp/constellationd-{}.sock", uid.unwrap_or(0)))
}

/// The path to use: the flag/env value or the default.
pub fn resolve(flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf).unwrap_or_else(default_path)
}

/// Checks the length (before anything binds).
pub fn check_len(path: &Path) -> Result<(), SocketError> {
    let len = path.as_os_str().len();
    if len > MAX_PATH {
        return Err(SocketError::TooLong {
            path: path.to_path_buf(),
            len,
        });
    }
    // The socket is first bound at `DIR/.csXXXX/s`, which must fit too.
    if private_dir(path, 0).join("s").as_os_str().len() > MAX_PATH {
        return Err(SocketError::DirTooLong(path.to_path_buf()));
    }
    Ok(())
}

/// Name of the private directory a socket is first bound in (short: the
/// temporary socket path must fit [`MAX_PATH`] too).
fn private_dir(path: &Path, attempt: u32) -> PathBuf {
    let tag = (std::process::id() ^ attempt.wrapping_mul(0x9e37_79b9)) & 0xffff;
    path.with_file_name(format!(".cs{tag:04x}"))
}

/// Binds the control socket with `mode`, replacing a stale file left by a
/// dead daemon and refusing when a live one answers.
pub fn bind(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, SocketError> {
    check_len(path)?;
    let io_err = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.to_path_buf()))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(path.to_path_buf())),
            // Nobody answers: a dead daemon's leftover.
            Err(_) => std::fs::remove_file(path).map_err(io_err)?,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let listener = bind_private(path, mode).map_err(|e| match e.kind() {
        // Someone bound the path since we looked: a live daemon.
        io::ErrorKind::AlreadyExists => SocketError::InUse(path.to_path_buf()),
        _ => io_err(e),
    })?;
    Ok(listener)
}

/// Binds at `DIR/.csXXXX/s` (a new 0700 directory), sets `mode` there, then
/// hard-links it to `path` (which must not exist) and removes the directory.
/// A Unix socket is found by its inode, so the link serves connections.
fn bind_private(path: &Path, mode: u32) -> io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let mut attempt = 0;
    let dir = loop {
        let dir = private_dir(path, attempt);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => break dir,
            // Another daemon's, or a crashed one's: try another name.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    let tmp = dir.join("s");
    let bound = (|| {
        // The umask may have narrowed 0700 further; never widened it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let listener = tokio::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
            // A filesystem without hard links: a rename is as safe for the
            // mode, and loses only the no-replace check (done just before).
            Err(_) => std::fs::rename(&tmp, path)?,
        }
        Ok(listener)
    })();
    // Best effort: the directory is private and empty once this works; a
    // leftover one is skipped by the next start (another name).
    if tmp.exists() {
        let _gone = std::fs::remove_file(&tmp);
    }
    let _gone = std::fs::remove_dir(&dir);
    bound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_bound_in_the_private_dir_serves_at_its_final_path() {
        let dir = std::env::temp_dir().join(format!("cst-sockp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("p.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = bind(&path, 0o640).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o640);
            let client = tokio::net::UnixStream::connect(&path);
            let (accepted, connected) = tokio::join!(listener.accept(), client);
            assert!(accepted.is_ok() && connected.is_ok());
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overlong_path_names_the_limit() {
        let p = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        let e = check_len(&p).unwrap_err().to_string();
        assert!(e.contains("107"), "{e}");
        // 107 bytes with a long name fit; with a 1-byte name the private
        // directory's path would not.
        let dir = format!("/tmp/{}", "d".repeat(80));
        assert!(check_len(Path::new(&format!("{dir}/{}", "n".repeat(21)))).is_ok());
        let short = PathBuf::from(format!("/tmp/{}/n", "d".repeat(100)));
        assert!(matches!(check_len(&short), Err(SocketError::DirTooLong(_))));
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_refused_file_kept() {
        let dir = std::env::temp_dir().join(format!("cst-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        // A stale socket file: bound, then the listener dropped.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let live = bind(&path, 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path, 0o600), Err(SocketError::InUse(_))));
        drop(live);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().starts_with(".cs"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let plain = dir.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert!(matches!(
            bind(&plain, 0o600),
            Err(SocketError::NotASocket(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
