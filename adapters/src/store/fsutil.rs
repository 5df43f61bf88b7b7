//! The file-system steps the store's crash safety rests on: write-and-fsync, directory fsync,
//! rename-into-place, and collision-free scratch names.

use super::StoreError;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes are split into chunks of this size so a test can stop the writer between two of them.
pub const WRITE_CHUNK: usize = 1 << 20;

/// Attaches the operation and path to an I/O error.
pub fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.to_path_buf(), source }
}

/// A name no other scratch entry of this process has: scratch entries live in the store's
/// `tmp/`, which only the process holding the store's lock writes, and which `open` empties.
pub fn scratch_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Creates `path` (which must not exist), writes `bytes` and fsyncs it, calling `after_chunk`
/// after every chunk written.
pub fn write_synced(path: &Path, bytes: &[u8], mut after_chunk: impl FnMut()) -> Result<(), StoreError> {
    let mut file =
        OpenOptions::new().write(true).create_new(true).open(path).map_err(io_err("create", path))?;
    for chunk in bytes.chunks(WRITE_CHUNK) {
        file.write_all(chunk).map_err(io_err("write", path))?;
        after_chunk();
    }
    file.sync_all().map_err(io_err("fsync", path))
}

/// Makes the entries of a directory (creations, renames, removals) durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("fsync directory", dir))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Creates `dir` if it is missing and makes its entry in `parent` durable.
pub fn ensure_dir(parent: &Path, dir: &Path) -> Result<(), StoreError> {
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(parent),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io_err("create directory", dir)(e)),
    }
}

/// Renames `from` onto `to` (atomic on POSIX file systems) and fsyncs the directory of `to`.
pub fn rename_synced(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs::rename(from, to).map_err(io_err("rename into place", to))?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// Whether `path` exists; errors other than "not found" are errors, not "no".
pub fn exists(path: &Path) -> Result<bool, StoreError> {
    path.try_exists().map_err(io_err("stat", path))
}

/// Removes a file or a directory tree.
pub fn remove_any(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// The entries of a directory, as (file name, path); names that are not UTF-8 are skipped
/// (the store never creates one).
pub fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}
