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

/// Renames `from` onto `to` (atomic on POSIX file systems) and fsyncs the directory of `to`.
pub fn rename_synced(from: &Path, to: &Path) -> Result<(), DurableError> {
    std::fs::rename(from, to).map_err(io_err("rename into place", to))?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
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
        let err = write_atomically(&dir.join("missing").join("x"), b"x").expect_err("no such directory");
        assert_eq!(err.op, "create");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
