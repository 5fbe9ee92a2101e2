//! The one reader of `from_file` secrets, with smolvm's rules: a regular
//! file (never a symlink, FIFO, device or directory), at most 1 MiB, opened
//! without blocking, its trailing newlines (`\n`, `\r`) trimmed.
//!
//! Used wherever a secret file is looked at: bottle's preflight (is it
//! readable?), the local runtime at each launch, and the smolvm double. A
//! FIFO in a secret's place would otherwise block whoever opens it forever
//! (`plan`, `check`, `status`, and `apply` while holding the project lock).

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// The largest secret file read (smolvm's limit too).
pub const MAX_SECRET_FILE: u64 = 1 << 20;

/// Why a secret file cannot be used. Never carries the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("does not exist")]
    NotFound,
    #[error("is a symbolic link (refused, as smolvm refuses it)")]
    Symlink,
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is larger than 1 MiB")]
    TooLarge,
    #[error("cannot be read: {0}")]
    Io(io::Error),
}

impl SecretFileError {
    /// What to do about it, for a help line.
    pub fn help(&self, path: &str) -> String {
        match self {
            SecretFileError::NotFound | SecretFileError::Io(_) => {
                format!("create {path}, readable by the user bottle runs as")
            }
            SecretFileError::Symlink => {
                format!("point `from_file` at the file itself, not at the symbolic link {path}")
            }
            SecretFileError::NotRegular(_) => {
                format!("put the secret in a regular file at {path} (or point `from_file` at one)")
            }
            SecretFileError::TooLarge => {
                format!("a secret file holds at most 1 MiB; check that {path} is the right file")
            }
        }
    }
}

/// Read a secret file by smolvm's rules; returns the value with trailing
/// `\n` and `\r` trimmed.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, SecretFileError> {
    let file = open(path)?;
    let mut buf = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(SecretFileError::Io)?;
    if buf.len() as u64 > MAX_SECRET_FILE {
        return Err(SecretFileError::TooLarge);
    }
    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        buf.pop();
    }
    Ok(buf)
}

/// Open without following a final symlink and without blocking (a FIFO
/// with no writer opens at once), then refuse anything but a regular file
/// of at most 1 MiB.
fn open(path: &Path) -> Result<File, SecretFileError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => SecretFileError::Symlink,
            Some(libc::ENOENT) => SecretFileError::NotFound,
            Some(libc::ENXIO) => SecretFileError::NotRegular("a socket"),
            _ => SecretFileError::Io(e),
        })?;
    let meta = file.metadata().map_err(SecretFileError::Io)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(SecretFileError::NotRegular(if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a special file"
        }));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(SecretFileError::TooLarge);
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    /// Run `read_secret_file` on another thread: a reader that blocks
    /// (the bug this module exists for) fails the test instead of hanging it.
    fn read(path: &Path) -> Result<Vec<u8>, SecretFileError> {
        let (tx, rx) = mpsc::channel();
        let path = path.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(read_secret_file(&path));
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("reading a secret file never blocks")
    }

    #[test]
    fn trailing_newlines_are_trimmed_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, b" to\nken \r\n\n").unwrap();
        assert_eq!(read(&p).unwrap(), b" to\nken ");
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(
            read(&p),
            Err(SecretFileError::NotRegular("a FIFO"))
        ));
    }

    #[test]
    fn symlinks_directories_devices_and_large_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t");
        std::fs::write(&target, "v").unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(read(&link), Err(SecretFileError::Symlink)));
        assert!(matches!(
            read(dir.path()),
            Err(SecretFileError::NotRegular("a directory"))
        ));
        assert!(matches!(
            read(Path::new("/dev/zero")),
            Err(SecretFileError::NotRegular("a device"))
        ));
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'x'; (MAX_SECRET_FILE + 1) as usize]).unwrap();
        assert!(matches!(read(&big), Err(SecretFileError::TooLarge)));
        let exact = dir.path().join("exact");
        std::fs::write(&exact, vec![b'x'; MAX_SECRET_FILE as usize]).unwrap();
        assert_eq!(read(&exact).unwrap().len(), MAX_SECRET_FILE as usize);
        assert!(matches!(
            read(&dir.path().join("missing")),
            Err(SecretFileError::NotFound)
        ));
    }
}
