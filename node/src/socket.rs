//! The control socket's path: defaults, the OS length limit, stale files,
//! a second daemon on the same path, and the file mode.

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
fn uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The default path: `/run/constellationd.sock` for root, else
/// `$XDG_RUNTIME_DIR/constellationd.sock`, else `/tmp/constellationd-UID.sock`.
pub fn default_path() -> PathBuf {
    let uid = uid();
    if uid == Some(0) {
        return PathBuf::from("/run/constellationd.sock");
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
    Ok(())
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
    // Created with the process umask (sockets need write permission to
    // connect, so the usual 022 keeps others out), then narrowed or widened.
    let listener = tokio::net::UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_path_names_the_limit() {
        let p = PathBuf::from(format!("/tmp/{}", "x".repeat(120)));
        let e = check_len(&p).unwrap_err().to_string();
        assert!(e.contains("107"), "{e}");
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
        let plain = dir.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert!(matches!(
            bind(&plain, 0o600),
            Err(SocketError::NotASocket(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
