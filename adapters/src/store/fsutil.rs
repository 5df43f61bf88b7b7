//! The store's file-system steps: the durable ones of [`crate::durable`] with the store's error,
//! and directory creation, listing, removal and collision-free scratch names.

use super::StoreError;
use crate::durable::{self, DurableError};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

impl From<DurableError> for StoreError {
    fn from(e: DurableError) -> Self {
        StoreError::Io { op: e.op, path: e.path, source: e.source }
    }
}

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

/// [`durable::write_synced`] with the store's error.
pub fn write_synced(path: &Path, bytes: &[u8], after_chunk: impl FnMut()) -> Result<(), StoreError> {
    Ok(durable::write_synced(path, bytes, after_chunk)?)
}

/// [`durable::sync_dir`] with the store's error.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    Ok(durable::sync_dir(dir)?)
}

/// Creates `dir` if it is missing and makes its entry in `parent` durable.
pub fn ensure_dir(parent: &Path, dir: &Path) -> Result<(), StoreError> {
    match fs::create_dir(dir) {
        Ok(()) => sync_dir(parent),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(io_err("create directory", dir)(e)),
    }
}

/// [`durable::rename_synced`] with the store's error.
pub fn rename_synced(from: &Path, to: &Path) -> Result<(), StoreError> {
    Ok(durable::rename_synced(from, to)?)
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
