//! The jobs directory on disk: file and job records and uploaded file contents, each written
//! atomically (scratch file, fsync, rename, directory fsync), so a crash leaves the old record
//! or the new one. It knows nothing of training or tenants' rights.
//!
//! # Layout
//! ```text
//! <dir>/LOCK                  held (flock) by the one process using the directory
//! <dir>/files/<id>.json       FileRecord
//! <dir>/files/<id>.data       the file's bytes
//! <dir>/jobs/<id>.json        JobRecord, events included
//! <dir>/tmp/                  scratch; emptied by `open`
//! <dir>/work/<job id>/        a running job's output; emptied by `open`
//! ```

use super::records::{FileRecord, JobRecord};
use super::{JobsError, Reserved};
use adapters::durable;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

const RECORD_SUFFIX: &str = ".json";
const DATA_SUFFIX: &str = ".data";

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JobsError + 'a {
    move |e| JobsError::Io(format!("cannot {op} {}: {e}", path.display()))
}

/// The records in memory and the directory they persist to.
#[derive(Debug)]
pub struct DiskStore {
    root: PathBuf,
    pub files: BTreeMap<String, FileRecord>,
    pub jobs: BTreeMap<String, JobRecord>,
    _lock: File,
}

impl DiskStore {
    /// What `tenant`'s queued and running jobs reserve.
    pub fn reserved(&self, tenant: &str) -> Reserved {
        let unfinished = self.jobs.values().filter(|j| j.tenant == tenant && !j.status.is_terminal());
        unfinished.fold(Reserved::default(), |r, j| Reserved {
            places: r.places + 1,
            bytes: r.bytes.saturating_add(j.adapter_bytes),
        })
    }

    /// Opens (creating) `root`, takes its lock, empties `tmp/` and `work/`, and reads every
    /// record. A record that cannot be read is an error naming it: jobs are not silently lost.
    pub fn open(root: &Path) -> Result<Self, JobsError> {
        fs::create_dir_all(root).map_err(io("create", root))?;
        let lock_path = root.join("LOCK");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(JobsError::Io(format!("{} is in use by another process", root.display())))
            }
            Err(TryLockError::Error(e)) => return Err(io("lock", &lock_path)(e)),
        }
        for sub in ["tmp", "work"] {
            let dir = root.join(sub);
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(io("empty", &dir))?;
            }
        }
        for sub in ["files", "jobs", "tmp", "work"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        }
        sync_dir(root)?;
        let mut store =
            Self { root: root.to_path_buf(), files: BTreeMap::new(), jobs: BTreeMap::new(), _lock: lock };
        for (path, bytes) in read_records(&root.join("files"))? {
            let record: FileRecord = serde_json::from_slice(&bytes)
                .map_err(|e| JobsError::Io(format!("{} is not a file record: {e}", path.display())))?;
            store.files.insert(record.id.clone(), record);
        }
        for (path, bytes) in read_records(&root.join("jobs"))? {
            let record: JobRecord = serde_json::from_slice(&bytes)
                .map_err(|e| JobsError::Io(format!("{} is not a job record: {e}", path.display())))?;
            store.jobs.insert(record.id.clone(), record);
        }
        store.remove_unreferenced_data()?;
        Ok(store)
    }

    /// Data whose record is gone (a crash during a delete, or before an upload's record was
    /// written).
    fn remove_unreferenced_data(&self) -> Result<(), JobsError> {
        let dir = self.root.join("files");
        for entry in fs::read_dir(&dir).map_err(io("list", &dir))? {
            let path = entry.map_err(io("list", &dir))?.path();
            let id = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(DATA_SUFFIX));
            if id.is_some_and(|id| !self.files.contains_key(id)) {
                fs::remove_file(&path).map_err(io("remove", &path))?;
            }
        }
        Ok(())
    }

    pub fn data_path(&self, file_id: &str) -> PathBuf {
        self.root.join("files").join(format!("{file_id}{DATA_SUFFIX}"))
    }

    /// A scratch path under `tmp/` that no other writer uses.
    pub fn scratch(&self, what: &str) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        self.root.join("tmp").join(format!("{what}-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
    }

    /// Where a job's trainer writes its adapter.
    pub fn work_dir(&self, job_id: &str) -> PathBuf {
        self.root.join("work").join(job_id)
    }

    /// Moves a complete scratch file to be the data of `file_id`, durably.
    pub fn commit_data(&self, scratch: &Path, file_id: &str) -> Result<(), JobsError> {
        rename_synced(scratch, &self.data_path(file_id))
    }

    pub fn put_file(&mut self, record: FileRecord) -> Result<(), JobsError> {
        self.write_record("files", &record.id, &record)?;
        self.files.insert(record.id.clone(), record);
        Ok(())
    }

    /// Removes the record first, then the data: a crash in between leaves only unreferenced
    /// bytes, never a record without its data.
    pub fn delete_file(&mut self, id: &str) -> Result<(), JobsError> {
        let record = self.root.join("files").join(format!("{id}{RECORD_SUFFIX}"));
        fs::remove_file(&record).map_err(io("remove", &record))?;
        sync_dir(&self.root.join("files"))?;
        self.files.remove(id);
        let data = self.data_path(id);
        if let Err(e) = fs::remove_file(&data) {
            tracing::warn!(path = %data.display(), "cannot remove a deleted file's data: {e}");
        }
        Ok(())
    }

    /// Persists `job` and makes it the in-memory version.
    pub fn put_job(&mut self, job: JobRecord) -> Result<(), JobsError> {
        self.write_record("jobs", &job.id, &job)?;
        self.jobs.insert(job.id.clone(), job);
        Ok(())
    }

    /// Persists the in-memory version of job `id`.
    pub fn save_job(&self, id: &str) -> Result<(), JobsError> {
        match self.jobs.get(id) {
            Some(job) => self.write_record("jobs", id, job),
            None => Ok(()),
        }
    }

    fn write_record<T: serde::Serialize>(&self, kind: &str, id: &str, record: &T) -> Result<(), JobsError> {
        let bytes = serde_json::to_vec(record).map_err(|e| JobsError::Io(e.to_string()))?;
        let scratch = self.scratch(kind);
        write_synced(&scratch, &bytes)?;
        rename_synced(&scratch, &self.root.join(kind).join(format!("{id}{RECORD_SUFFIX}")))
    }
}

/// Creates `path` (which must not exist), writes `bytes` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), JobsError> {
    Ok(durable::write_synced(path, bytes, || {})?)
}

/// `(path, bytes)` of every `*.json` in `dir`, in name order.
fn read_records(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>, JobsError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io("list", dir))? {
        let path = entry.map_err(io("list", dir))?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let bytes = fs::read(&path).map_err(io("read", &path))?;
            out.push((path, bytes));
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), JobsError> {
    Ok(durable::sync_dir(dir)?)
}

fn rename_synced(from: &Path, to: &Path) -> Result<(), JobsError> {
    Ok(durable::rename_synced(from, to)?)
}
