//! The file-system steps that crash safety rests on, shared by every store of lorahost (the
//! adapter store, the fine-tuning jobs store, the trainer's outputs): write-and-fsync, directory
//! fsync, and rename into place, so a file appears whole or not at all and stays after a crash.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes are split into chunks of this size so a test can stop the writer between two of them.
const WRITE_CHUNK: usize = 1 << 20;

/// A failed file-system step, with the operation and the path it was on.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", .path.display())]
pub struct DurableError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl DurableError {
    /// Whether the step failed for want of space (see [`is_out_of_space`]).
    pub fn is_out_of_space(&self) -> bool {
        is_out_of_space(&self.source)
    }
}

/// Whether an I/O error says the disk is full, a quota is used up or a file-size limit is
/// reached: the server has no room for the bytes, nothing the client sent is malformed.
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    )
}

/// Attaches the operation and path to an I/O error.
pub fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DurableError + 'a {
    move |source| DurableError { op, path: path.to_path_buf(), source }
}

/// Creates `path` (which must not exist), writes `bytes` and fsyncs it, calling `after_chunk`
/// after every chunk written. On failure the partial file is removed (the caller created it, so
/// nobody else refers to it): a full disk leaves no debris behind.
pub fn write_synced(path: &Path, bytes: &[u8], mut after_chunk: impl FnMut()) -> Result<(), DurableError> {
    let mut file =
        OpenOptions::new().write(true).create_new(true).open(path).map_err(io_err("create", path))?;
    let written = (|| {
        for chunk in bytes.chunks(WRITE_CHUNK) {
            file.write_all(chunk).map_err(io_err("write", path))?;
            after_chunk();
        }
        file.sync_all().map_err(io_err("fsync", path))
    })();
    if written.is_err() {
        drop(file);
        let _ = std::fs::remove_file(path);
    }
    written
}

/// Makes the entries of a directory (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> Result<(), DurableError> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The directory holding `path`: `.` for a bare name (whose `parent()` is the empty path,
/// which cannot be opened to fsync).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Renames `from` onto `to` (atomic on POSIX file systems) and fsyncs the directory of `to`.
pub fn rename_synced(from: &Path, to: &Path) -> Result<(), DurableError> {
    std::fs::rename(from, to).map_err(io_err("rename into place", to))?;
    sync_dir(parent_dir(to))
}

/// Puts the directory `staged` (complete and synced) at `dir`, so that `dir` is at every moment
/// absent, or the old directory whole, or the new one whole; once a `dir` exists it never goes
/// missing: on Linux the two are swapped in one step (`renameat2` with `RENAME_EXCHANGE`) and the
/// old one, now at `staged`, is removed. Only where the file system cannot swap is the old one
/// moved aside first, leaving a moment without `dir`. The parent directory is fsynced.
pub fn replace_dir(staged: &Path, dir: &Path) -> Result<(), DurableError> {
    let parent = parent_dir(dir);
    if std::fs::symlink_metadata(dir).is_err() {
        return rename_synced(staged, dir);
    }
    if !exchange(staged, dir)? {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let aside = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(dir, &aside).map_err(io_err("move aside", dir))?;
        std::fs::rename(staged, dir).map_err(io_err("rename into place", dir))?;
        std::fs::rename(&aside, staged).map_err(io_err("rename", &aside))?;
    }
    sync_dir(parent)?;
    // The old directory, now at `staged`; a crash before this leaves only a stale scratch entry.
    std::fs::remove_dir_all(staged).map_err(io_err("remove the replaced", staged))
}

/// Swaps two existing paths atomically; `false` where the system or file system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool, DurableError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| io_err("exchange", p)(io::Error::new(io::ErrorKind::InvalidInput, e)))
    };
    let (ca, cb) = (c_path(a)?, c_path(b)?);
    // SAFETY: two NUL-terminated paths that outlive the call; AT_FDCWD resolves them as given.
    let rc = unsafe {
        libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE)
    };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
        _ => Err(io_err("exchange", b)(e)),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> Result<bool, DurableError> {
    Ok(false)
}

/// Replaces `path` with `bytes` so that it holds the old or the new contents, never a part:
/// written to a scratch file beside it (`.<name>.tmp`, a stale one from a crash removed first),
/// fsynced, renamed into place, the directory fsynced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let scratch = path.with_file_name(format!(".{name}.tmp"));
    match std::fs::remove_file(&scratch) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove stale", &scratch)(e)),
        _ => {}
    }
    write_synced(&scratch, bytes, || {})?;
    rename_synced(&scratch, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomically_replaces_whole_files_and_ignores_stale_scratch() {
        let dir = std::env::temp_dir().join(format!("lorahost-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("log.json");
        std::fs::write(dir.join(".log.json.tmp"), b"half a file").expect("stale scratch");
        write_atomically(&path, b"first").expect("write");
        write_atomically(&path, b"second").expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"second");
        let names: Vec<_> =
            std::fs::read_dir(&dir).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("log.json")], "no scratch left behind");
        assert_eq!(parent_dir(Path::new("log.json")), Path::new("."));
        assert_eq!(parent_dir(&path), dir);
        let err = write_atomically(&dir.join("missing").join("x"), b"x").expect_err("no such directory");
        assert_eq!(err.op, "create");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn replace_dir_swaps_a_whole_directory_in_and_removes_the_old_one() {
        let root = tempfile::tempdir().expect("temp dir");
        let (dir, staged) = (root.path().join("adapter"), root.path().join(".adapter.tmp"));
        let stage = |contents: &[u8]| {
            std::fs::create_dir(&staged).expect("staged dir");
            std::fs::write(staged.join("weights"), contents).expect("staged file");
        };
        stage(b"first");
        replace_dir(&staged, &dir).expect("first publish");
        stage(b"second");
        std::fs::write(staged.join("extra"), b"only new").expect("second file");
        replace_dir(&staged, &dir).expect("replace");
        assert_eq!(std::fs::read(dir.join("weights")).expect("read"), b"second");
        assert_eq!(std::fs::read(dir.join("extra")).expect("read"), b"only new");
        let names: Vec<_> =
            std::fs::read_dir(root.path()).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("adapter")], "the old directory is gone");
    }
}
