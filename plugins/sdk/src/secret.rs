//! Secret files: passwords, tokens and keys that a plugin's configuration names by path.
//!
//! Keep secrets out of the TOML (it is world-readable on most sites) and take a `*_file` key
//! instead; read it with [`read_secret_file`], which refuses a file other users could read or
//! change. The gateway's `check-config` applies the same function to every `*_file` key of a
//! plugin's `[sink.config]` / `[source.config]`, so an operator hears of a 0644 secret before
//! the daemon starts, not when the plugin first runs.
//!
//! ```no_run
//! let password = umeme_plugin_sdk::read_secret_file("/etc/umeme-gateway/secrets/uplink".as_ref())
//!     .map_err(|e| format!("password_file: {e}"))?;
//! # Ok::<(), String>(())
//! ```

use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest secret file accepted: a service-account key is about 2.3 KiB, a token 64 bytes.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// Why a secret file was refused. Every message names the file and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("secret file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret file {} is a symbolic link; name the real file", path.display())]
    Symlink { path: PathBuf },
    #[error("secret file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "secret file {} is readable or writable by other users (mode {mode:03o}); chmod 600 it \
         (or 640 with the gateway's group)",
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "secret file {} is larger than {max} bytes; it should hold one secret",
        path.display(),
        max = MAX_SECRET_FILE_BYTES
    )]
    TooLarge { path: PathBuf },
    #[error("secret file {} is not UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("secret file {} is empty", path.display())]
    Empty { path: PathBuf },
}

/// Mode bits a secret file must not have: anything for others, and write for the group (a
/// group-readable 0640 file lets the gateway's group read it, which is how packages share one).
const FORBIDDEN_MODE: u32 = 0o027;

/// Reads a secret file after checking it: a regular file, not a symbolic link (opened with
/// `O_NOFOLLOW`), no access for others and no write for the group, at most
/// [`MAX_SECRET_FILE_BYTES`], UTF-8 and not empty. Trailing line ends (`\n`, `\r\n`) are
/// removed; any other whitespace is part of the secret.
pub fn read_secret_file(path: &Path) -> Result<String, SecretFileError> {
    let io = |source| SecretFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = open_nofollow(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            SecretFileError::Symlink {
                path: path.to_path_buf(),
            }
        } else {
            io(e)
        }
    })?;
    // Checked on the open descriptor, so the file read is the file checked.
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(SecretFileError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = file_mode(&meta);
    if mode & FORBIDDEN_MODE != 0 {
        return Err(SecretFileError::Exposed {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    // Bounded even if the file grows between the check and the read.
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(SecretFileError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let mut text = String::from_utf8(bytes).map_err(|_| SecretFileError::NotUtf8 {
        path: path.to_path_buf(),
    })?;
    let kept = text.trim_end_matches(['\n', '\r']).len();
    text.truncate(kept);
    if text.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

#[cfg(unix)]
fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        // O_NONBLOCK: opening a FIFO named as a secret must not hang; it is refused below.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
}

#[cfg(not(unix))]
fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

#[cfg(unix)]
fn file_mode(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode()
}

#[cfg(not(unix))]
fn file_mode(_: &std::fs::Metadata) -> u32 {
    0o600
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn secret(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn a_private_secret_is_read_without_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = secret(dir.path(), "s", b" pass word \r\n", 0o600);
        assert_eq!(read_secret_file(&p).unwrap(), " pass word ");
        let p = secret(dir.path(), "g", b"tok\n\n", 0o640);
        assert_eq!(
            read_secret_file(&p).unwrap(),
            "tok",
            "group-readable is allowed"
        );
    }

    #[test]
    fn a_secret_others_can_read_or_the_group_can_write_is_refused_with_its_mode_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o604, 0o602, 0o601, 0o620, 0o666] {
            let p = secret(dir.path(), "s", b"tok\n", mode);
            let e = read_secret_file(&p).unwrap_err();
            assert!(
                matches!(e, SecretFileError::Exposed { mode: m, .. } if m == mode),
                "{mode:o}: {e}"
            );
            let text = e.to_string();
            assert!(text.contains(&format!("(mode {mode:o})")), "{text}");
            assert!(text.contains("chmod 600"), "{text}");
            assert!(text.contains(&p.display().to_string()), "{text}");
        }
    }

    #[test]
    fn a_symlink_a_folder_a_fifo_an_oversized_an_empty_and_a_missing_secret_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = secret(dir.path(), "real", b"tok", 0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(matches!(
            read_secret_file(&link),
            Err(SecretFileError::Symlink { .. })
        ));
        assert!(matches!(
            read_secret_file(dir.path()),
            Err(SecretFileError::NotAFile { .. })
        ));
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            read_secret_file(&fifo),
            Err(SecretFileError::NotAFile { .. })
        ));
        let big = secret(
            dir.path(),
            "big",
            &vec![b'x'; MAX_SECRET_FILE_BYTES as usize + 1],
            0o600,
        );
        assert!(matches!(
            read_secret_file(&big),
            Err(SecretFileError::TooLarge { .. })
        ));
        let at_cap = secret(
            dir.path(),
            "cap",
            &vec![b'x'; MAX_SECRET_FILE_BYTES as usize],
            0o600,
        );
        assert_eq!(read_secret_file(&at_cap).unwrap().len(), 64 * 1024);
        let empty = secret(dir.path(), "empty", b"\n", 0o600);
        assert!(matches!(
            read_secret_file(&empty),
            Err(SecretFileError::Empty { .. })
        ));
        let binary = secret(dir.path(), "bin", &[0xff, 0xfe], 0o600);
        assert!(matches!(
            read_secret_file(&binary),
            Err(SecretFileError::NotUtf8 { .. })
        ));
        let e = read_secret_file(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, SecretFileError::Io { .. }), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
