//! The durable adapter store behind `--adapters-dir`: the source of truth for which adapters
//! exist, under which tenant-scoped names, and their bytes.
//!
//! It owns the directory layout, atomic publication, generations, and the garbage collection of
//! objects no name refers to. It does not validate adapters (the caller does, against the
//! resident base, before `put`), load or cache them (`crate::cache`), or authorise tenants.
//!
//! # Layout
//! ```text
//! <root>/LOCK                                   held (flock) by the one process using the store
//! <root>/objects/<id hex>/adapter_config.json   content-addressed by `AdapterId`, immutable
//! <root>/objects/<id hex>/adapter_model.safetensors
//! <root>/names/<tenant>/<name>.json             {"format", "generation", "id", "created_unix_ms", "bytes"}
//! <root>/tmp/                                   scratch for writes in progress; emptied by `open`
//! ```
//! A name record whose `id` is `null` is a tombstone: the name was deleted, and its generation is
//! kept so that a later upload under the same name continues the sequence.
//!
//! # Crash safety
//! Nothing becomes visible except by a `rename` of something complete and fsynced:
//! 1. the object is written under `tmp/`, both files fsynced, the directory fsynced, then renamed
//!    to `objects/<id>` and `objects/` fsynced: an object directory is complete or absent;
//! 2. only then the name record is written to `tmp/`, fsynced, renamed over
//!    `names/<tenant>/<name>.json` and that directory fsynced, so a durable record never points
//!    at a missing object and readers see the old record or the new one, never a mix;
//! 3. only after that may the previous object be removed, and it is first renamed into `tmp/`,
//!    so a half-removed object is never visible under `objects/`.
//!
//! A crash therefore leaves the old version or the new one, plus scratch in `tmp/` and perhaps an
//! object nothing refers to. `open` removes both, and verifies every referenced object against
//! its content hash, so the records and the objects agree when the store is served.
//!
//! # Concurrency
//! One process owns a store directory (`open` takes an exclusive lock on `LOCK`). Within it the
//! store is shared between threads (`FsStore` is a cheap `Clone`). Lookups (`get`, `list`, `pin`)
//! read an in-memory index and never wait for a disk. Writing an object's bytes runs unlocked;
//! publishing it, the name-record update and object removal run under one writer lock, so
//! concurrent puts of one name get distinct generations and the last to commit wins.
//!
//! An object is removed once no name refers to it and no [`ObjectPin`] holds it: a reader that
//! resolved a name just before it was replaced or deleted can still read the old bytes.

mod fsutil;
mod key;
#[cfg(test)]
mod tests;

pub use key::{AdapterKey, DEFAULT_TENANT, MAX_NAME_LEN};

use crate::AdapterId;
use fsutil::{ensure_dir, exists, io_err, list_dir, remove_any, rename_synced, scratch_name, sync_dir};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// The adapter's PEFT config, as uploaded.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's PEFT weights, as uploaded.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

const OBJECTS_DIR: &str = "objects";
const NAMES_DIR: &str = "names";
const TMP_DIR: &str = "tmp";
const LOCK_FILE: &str = "LOCK";
const RECORD_SUFFIX: &str = ".json";
/// Version of the name-record format; `open` refuses records of another version.
const RECORD_FORMAT: u32 = 1;

/// Why a store operation failed. Every variant names the key, path or object involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid adapter {what} {value:?}: {reason}")]
    InvalidKey { what: &'static str, value: String, reason: String },
    #[error("adapter store {} is in use by another process (it holds {LOCK_FILE})", .root.display())]
    Locked { root: PathBuf },
    #[error("adapter store: {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("adapter store: {}: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("adapter object {id} is no longer in the store")]
    ObjectMissing { id: AdapterId },
}

impl StoreError {
    /// Whether the store ran out of disk space (or quota, or file-size limit): a condition of
    /// the server, not of what was being stored.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if crate::durable::is_out_of_space(source))
    }
}

/// One stored version of a named adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAdapter {
    pub key: AdapterKey,
    /// Content hash of the two files.
    pub id: AdapterId,
    /// 1 for the first upload under this name, then one more for every replacement, also
    /// across a delete.
    pub generation: u64,
    /// When this generation was stored.
    pub created_unix_ms: u64,
    /// Size of the config plus the weights.
    pub bytes: u64,
    /// The object directory holding [`CONFIG_FILE`] and [`WEIGHTS_FILE`].
    pub dir: PathBuf,
}

impl StoredAdapter {
    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }
}

/// The two files of an adapter, read into memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterFiles {
    pub config: Vec<u8>,
    pub weights: Vec<u8>,
}

/// The durable store. See the module docs for the layout and the guarantees.
#[derive(Debug, Clone)]
pub struct FsStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    objects: PathBuf,
    names: PathBuf,
    tmp: PathBuf,
    state: Mutex<State>,
    writer: Mutex<()>,
    /// Holds the exclusive lock for as long as the store is open.
    _lock: File,
}

/// The in-memory index, rebuilt from disk by `open` and kept in step with it by every write
/// (this process is the only writer).
#[derive(Debug, Default)]
struct State {
    names: HashMap<AdapterKey, NameState>,
    /// How many live names refer to each object.
    refs: HashMap<AdapterId, usize>,
    /// How many `ObjectPin`s hold each object.
    pins: HashMap<AdapterId, usize>,
}

impl State {
    /// Referenced by a live name or pinned: such an object is on disk and stays there.
    fn is_used(&self, id: AdapterId) -> bool {
        self.refs.contains_key(&id) || self.pins.contains_key(&id)
    }

    /// Drops one name's reference to `id`.
    fn release_ref(&mut self, id: AdapterId) {
        if let Some(count) = self.refs.get_mut(&id) {
            *count -= 1;
            if *count == 0 {
                self.refs.remove(&id);
            }
        }
    }
}

#[derive(Debug)]
struct NameState {
    /// The latest generation, live or deleted.
    generation: u64,
    live: Option<StoredAdapter>,
}

/// `names/<tenant>/<name>.json`.
#[derive(Debug, Serialize, Deserialize)]
struct NameRecord {
    format: u32,
    generation: u64,
    /// Hex `AdapterId`; `None` marks a deleted name.
    id: Option<String>,
    created_unix_ms: u64,
    bytes: u64,
}

/// An object `open` hashed: its id and size.
#[derive(Debug, Clone, Copy)]
struct Verified {
    id: AdapterId,
    bytes: u64,
}

/// Points in a write where the crash tests stop the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ObjectChunkWritten,
    ObjectStaged,
    ObjectPublished,
    RecordStaged,
    RecordPublished,
}

fn checkpoint(phase: Phase) {
    #[cfg(test)]
    tests::checkpoint(phase);
    #[cfg(not(test))]
    let _ = phase;
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl FsStore {
    /// Opens the store at `root`, creating the layout if needed: takes the lock, empties `tmp/`,
    /// loads every name record, verifies each referenced object against its content hash, and
    /// removes objects no name refers to.
    ///
    /// A record that cannot be read or points at a missing or altered object is an error naming
    /// the file: the store refuses to serve rather than silently drop an adapter.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, StoreError> {
        let root = root.as_ref().to_path_buf();
        fs::create_dir_all(&root).map_err(io_err("create directory", &root))?;
        let lock_path = root.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(StoreError::Locked { root }),
            Err(TryLockError::Error(e)) => return Err(io_err("lock", &lock_path)(e)),
        }
        let (objects, names, tmp) = (root.join(OBJECTS_DIR), root.join(NAMES_DIR), root.join(TMP_DIR));
        for dir in [&objects, &names, &tmp] {
            ensure_dir(&root, dir)?;
        }
        for (_, path) in list_dir(&tmp)? {
            remove_any(&path).map_err(io_err("remove leftover", &path))?;
        }
        let inner = Inner {
            root,
            objects,
            names,
            tmp,
            state: Mutex::new(State::default()),
            writer: Mutex::new(()),
            _lock: lock,
        };
        let state = inner.load()?;
        *inner.state() = state;
        inner.collect_unreferenced_objects()?;
        Ok(Self { inner: Arc::new(inner) })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Stores an adapter under `key`, replacing the current version if there is one; returns
    /// the new version and the one it replaced. The new version is durable and visible when
    /// this returns; the replaced one stays readable while an [`ObjectPin`] holds it.
    ///
    /// The caller validates the adapter first; the store only stores bytes.
    pub fn put(
        &self,
        key: &AdapterKey,
        config: &[u8],
        weights: &[u8],
    ) -> Result<(StoredAdapter, Option<StoredAdapter>), StoreError> {
        self.put_if(key, config, weights, |_| Ok::<(), StoreError>(()))
    }

    /// [`Self::put`], if `admit` accepts it given the adapters the key's tenant holds at that
    /// moment: the check runs under the writer lock, so no other write can come between it and
    /// this one (a quota checked before the call could be passed by several writers at once).
    /// When `admit` refuses, nothing is stored.
    pub fn put_if<E: From<StoreError>>(
        &self,
        key: &AdapterKey,
        config: &[u8],
        weights: &[u8],
        admit: impl FnOnce(&[StoredAdapter]) -> Result<(), E>,
    ) -> Result<(StoredAdapter, Option<StoredAdapter>), E> {
        let inner = &self.inner;
        let id = AdapterId::of_files(config, weights);
        let object = inner.objects.join(id.to_hex());
        let mut staged = if exists(&object)? { None } else { Some(inner.stage_object(config, weights)?) };
        let writer = inner.writer();
        if let Err(refused) = admit(&self.list(Some(key.tenant()))) {
            drop(writer);
            if let Some(staged) = staged {
                let _ = remove_any(&staged);
            }
            return Err(refused);
        }
        if staged.is_none() && !exists(&object)? {
            // Collected between the check above and taking the lock.
            staged = Some(inner.stage_object(config, weights)?);
        }
        if let Some(staged) = staged {
            inner.publish_object(&staged, &object)?;
        }
        let generation = inner.state().names.get(key).map_or(0, |n| n.generation) + 1;
        let stored = StoredAdapter {
            key: key.clone(),
            id,
            generation,
            created_unix_ms: unix_ms(),
            bytes: (config.len() + weights.len()) as u64,
            dir: object,
        };
        // On failure the object stays: the rename may have happened before the error, so the
        // record on disk may refer to it. If nothing does, the next `open` collects it.
        inner.write_record(key, &NameRecord::live(&stored))?;
        let replaced = {
            let mut state = inner.state();
            *state.refs.entry(id).or_default() += 1;
            let replaced =
                state.names.insert(key.clone(), NameState { generation, live: Some(stored.clone()) });
            let replaced = replaced.and_then(|n| n.live);
            if let Some(old) = &replaced {
                state.release_ref(old.id);
            }
            replaced
        };
        let trash = replaced.as_ref().and_then(|old| inner.collect_if_unused(&writer, old.id));
        drop(writer);
        remove_trash(trash);
        Ok((stored, replaced))
    }

    /// The current version stored under `key`.
    pub fn get(&self, key: &AdapterKey) -> Option<StoredAdapter> {
        self.inner.state().names.get(key).and_then(|n| n.live.clone())
    }

    /// The current version under `key` and a pin that keeps its files on disk even if the name
    /// is replaced or deleted meanwhile (resolving and pinning are one atomic step).
    pub fn get_pinned(&self, key: &AdapterKey) -> Option<(StoredAdapter, ObjectPin)> {
        let mut state = self.inner.state();
        let stored = state.names.get(key).and_then(|n| n.live.clone())?;
        *state.pins.entry(stored.id).or_default() += 1;
        Some((stored.clone(), ObjectPin { inner: self.inner.clone(), id: stored.id, dir: stored.dir }))
    }

    /// Live adapters, sorted by tenant then name: one tenant's, or every tenant's with `None`
    /// (for admins).
    pub fn list(&self, tenant: Option<&str>) -> Vec<StoredAdapter> {
        let state = self.inner.state();
        let mut out: Vec<StoredAdapter> = state
            .names
            .iter()
            .filter(|(key, _)| tenant.is_none_or(|t| key.tenant() == t))
            .filter_map(|(_, n)| n.live.clone())
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Deletes the name (durably, before returning); `false` if it did not exist. The object
    /// goes once no other name refers to it and no pin holds it.
    pub fn delete(&self, key: &AdapterKey) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let writer = inner.writer();
        let Some((generation, id)) =
            inner.state().names.get(key).and_then(|n| n.live.as_ref().map(|live| (n.generation, live.id)))
        else {
            return Ok(false);
        };
        inner.write_record(key, &NameRecord::tombstone(generation))?;
        {
            let mut state = inner.state();
            state.names.insert(key.clone(), NameState { generation, live: None });
            state.release_ref(id);
        }
        let trash = inner.collect_if_unused(&writer, id);
        drop(writer);
        remove_trash(trash);
        Ok(true)
    }

    /// Whether any live name, in any tenant, refers to the object `id`.
    pub fn is_referenced(&self, id: AdapterId) -> bool {
        self.inner.state().refs.contains_key(&id)
    }

    /// Keeps the object `id` on disk until the pin drops; `None` if it is already gone.
    pub fn pin(&self, id: AdapterId) -> Option<ObjectPin> {
        let mut state = self.inner.state();
        if !state.is_used(id) {
            return None;
        }
        *state.pins.entry(id).or_default() += 1;
        Some(ObjectPin { inner: self.inner.clone(), id, dir: self.inner.objects.join(id.to_hex()) })
    }

    /// Reads both files of the object `id` (holding a pin while reading).
    pub fn read(&self, id: AdapterId) -> Result<AdapterFiles, StoreError> {
        let pin = self.pin(id).ok_or(StoreError::ObjectMissing { id })?;
        pin.read()
    }

    /// The paths of an adapter's config and weights.
    pub fn files(&self, adapter: &StoredAdapter) -> (PathBuf, PathBuf) {
        (adapter.config_path(), adapter.weights_path())
    }
}

/// Keeps an object's files on disk while alive, even after every name referring to it was
/// replaced or deleted. Removing an unreferenced object is left to the last pin's drop.
#[derive(Debug)]
pub struct ObjectPin {
    inner: Arc<Inner>,
    id: AdapterId,
    dir: PathBuf,
}

impl ObjectPin {
    pub fn id(&self) -> AdapterId {
        self.id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }

    /// Reads both files.
    pub fn read(&self) -> Result<AdapterFiles, StoreError> {
        read_object(&self.dir)
    }
}

impl Clone for ObjectPin {
    fn clone(&self) -> Self {
        *self.inner.state().pins.entry(self.id).or_default() += 1;
        Self { inner: self.inner.clone(), id: self.id, dir: self.dir.clone() }
    }
}

impl Drop for ObjectPin {
    fn drop(&mut self) {
        let unused = {
            let mut state = self.inner.state();
            if let Some(count) = state.pins.get_mut(&self.id) {
                *count -= 1;
                if *count == 0 {
                    state.pins.remove(&self.id);
                }
            }
            !state.is_used(self.id)
        };
        if unused {
            let writer = self.inner.writer();
            let trash = self.inner.collect_if_unused(&writer, self.id);
            drop(writer);
            remove_trash(trash);
        }
    }
}

impl NameRecord {
    fn live(stored: &StoredAdapter) -> Self {
        Self {
            format: RECORD_FORMAT,
            generation: stored.generation,
            id: Some(stored.id.to_hex()),
            created_unix_ms: stored.created_unix_ms,
            bytes: stored.bytes,
        }
    }

    fn tombstone(generation: u64) -> Self {
        Self { format: RECORD_FORMAT, generation, id: None, created_unix_ms: unix_ms(), bytes: 0 }
    }
}

/// Removes what `collect_if_unused` moved aside. Best effort: the object is already invisible,
/// and whatever stays in `tmp/` is removed by the next `open`.
fn remove_trash(trash: Option<PathBuf>) {
    if let Some(path) = trash {
        let _ = remove_any(&path);
    }
}

impl Inner {
    /// The index. Held briefly and never across I/O, so lookups never wait for a disk.
    fn state(&self) -> MutexGuard<'_, State> {
        // Every critical section does its I/O before touching the index, so the index is
        // consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serialises everything that changes the disk: publishing objects, name records, removing
    /// objects. Taken before `state`.
    fn writer(&self) -> MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record_path(&self, key: &AdapterKey) -> PathBuf {
        self.names.join(key.tenant()).join(format!("{}{RECORD_SUFFIX}", key.name()))
    }

    /// Writes the object's files into a fresh scratch directory, fsynced; returns its path.
    fn stage_object(&self, config: &[u8], weights: &[u8]) -> Result<PathBuf, StoreError> {
        let dir = self.tmp.join(scratch_name("object"));
        fs::create_dir(&dir).map_err(io_err("create directory", &dir))?;
        let staged = (|| {
            fsutil::write_synced(&dir.join(CONFIG_FILE), config, || {})?;
            fsutil::write_synced(&dir.join(WEIGHTS_FILE), weights, || checkpoint(Phase::ObjectChunkWritten))?;
            sync_dir(&dir)
        })();
        match staged {
            Ok(()) => {
                checkpoint(Phase::ObjectStaged);
                Ok(dir)
            }
            Err(e) => {
                let _ = remove_any(&dir);
                Err(e)
            }
        }
    }

    /// Renames a staged object into `objects/`, or drops it if an identical object got there
    /// first. Called with the writer lock held.
    fn publish_object(&self, staged: &Path, object: &Path) -> Result<(), StoreError> {
        if exists(object)? {
            let _ = remove_any(staged);
            return Ok(());
        }
        rename_synced(staged, object)?;
        checkpoint(Phase::ObjectPublished);
        Ok(())
    }

    /// Atomically replaces the name's record. Called with the writer lock held.
    fn write_record(&self, key: &AdapterKey, record: &NameRecord) -> Result<(), StoreError> {
        let tenant_dir = self.names.join(key.tenant());
        ensure_dir(&self.names, &tenant_dir)?;
        let staged = self.tmp.join(scratch_name("record"));
        let json = serde_json::to_vec_pretty(record).map_err(|e| StoreError::Corrupt {
            path: staged.clone(),
            reason: format!("cannot encode the name record: {e}"),
        })?;
        fsutil::write_synced(&staged, &json, || {})?;
        checkpoint(Phase::RecordStaged);
        rename_synced(&staged, &self.record_path(key))?;
        checkpoint(Phase::RecordPublished);
        Ok(())
    }

    /// If nothing refers to or pins `id`, moves its object out of `objects/` into `tmp/` (one
    /// atomic rename, so no half-removed object is ever visible) and returns where it went; the
    /// caller removes it after releasing the writer lock. Failing to move it only delays its
    /// removal to the next `open`.
    ///
    /// Needs the writer lock (the `_writer` argument proves it is held): names gain references
    /// only under it, and an object neither referenced nor pinned cannot be pinned again, so
    /// the check stays true until the move.
    fn collect_if_unused(&self, _writer: &MutexGuard<'_, ()>, id: AdapterId) -> Option<PathBuf> {
        if self.state().is_used(id) {
            return None;
        }
        self.move_to_trash(&self.objects.join(id.to_hex())).ok()
    }

    fn move_to_trash(&self, object: &Path) -> Result<PathBuf, StoreError> {
        let trash = self.tmp.join(scratch_name("garbage"));
        fs::rename(object, &trash).map_err(io_err("move aside", object))?;
        sync_dir(&self.objects)?;
        Ok(trash)
    }

    /// Reads every name record and verifies the objects they refer to.
    fn load(&self) -> Result<State, StoreError> {
        let mut records = Vec::new();
        for (tenant, tenant_dir) in list_dir(&self.names)? {
            if key::validate_part("tenant", &tenant).is_err() || !tenant_dir.is_dir() {
                continue;
            }
            for (file, path) in list_dir(&tenant_dir)? {
                let Some(name) = file.strip_suffix(RECORD_SUFFIX) else { continue };
                let Ok(key) = AdapterKey::new(tenant.clone(), name) else { continue };
                let corrupt = |reason: String| StoreError::Corrupt { path: path.clone(), reason };
                let bytes = fs::read(&path).map_err(io_err("read", &path))?;
                let record: NameRecord =
                    serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not a name record: {e}")))?;
                if record.format != RECORD_FORMAT {
                    return Err(corrupt(format!(
                        "record format {} (this build reads {RECORD_FORMAT})",
                        record.format
                    )));
                }
                records.push((key, path, record));
            }
        }
        let mut hexes: Vec<String> = records.iter().filter_map(|(_, _, r)| r.id.clone()).collect();
        hexes.sort();
        hexes.dedup();
        let ids = self.verify_objects(&hexes)?;
        let mut state = State::default();
        for (key, path, record) in records {
            let live = match &record.id {
                None => None,
                Some(hex) => {
                    let Verified { id, bytes: size } = ids[hex];
                    if size != record.bytes {
                        return Err(StoreError::Corrupt {
                            path,
                            reason: format!("records {} bytes, object {hex} holds {size}", record.bytes),
                        });
                    }
                    *state.refs.entry(id).or_default() += 1;
                    Some(StoredAdapter {
                        key: key.clone(),
                        id,
                        generation: record.generation,
                        created_unix_ms: record.created_unix_ms,
                        bytes: record.bytes,
                        dir: self.objects.join(hex),
                    })
                }
            };
            state.names.insert(key, NameState { generation: record.generation, live });
        }
        Ok(state)
    }

    /// Hashes the referenced objects (on all cores) and checks each against its name: the
    /// only way to get an `AdapterId`, and a check that records and objects agree.
    fn verify_objects(&self, hexes: &[String]) -> Result<HashMap<String, Verified>, StoreError> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(hexes.len().max(1));
        let per_thread = hexes.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = hexes
                .chunks(per_thread)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk.iter().map(|hex| Ok((hex.clone(), self.verify_object(hex)?))).collect::<Result<
                            Vec<_>,
                            StoreError,
                        >>(
                        )
                    })
                })
                .collect();
            let mut verified = HashMap::new();
            for handle in handles {
                let chunk = handle.join().map_err(|_| StoreError::Corrupt {
                    path: self.objects.clone(),
                    reason: "verifying the objects panicked".into(),
                })??;
                verified.extend(chunk);
            }
            Ok(verified)
        })
    }

    fn verify_object(&self, hex: &str) -> Result<Verified, StoreError> {
        let dir = self.objects.join(hex);
        let files = read_object(&dir).map_err(|e| match e {
            StoreError::Io { source, path, .. } if source.kind() == std::io::ErrorKind::NotFound => {
                StoreError::Corrupt { path, reason: "referenced by a name record but missing".into() }
            }
            other => other,
        })?;
        let id = AdapterId::of_files(&files.config, &files.weights);
        if id.to_hex() != hex {
            return Err(StoreError::Corrupt {
                path: dir,
                reason: format!("content hashes to {}, not to its name", id.to_hex()),
            });
        }
        Ok(Verified { id, bytes: (files.config.len() + files.weights.len()) as u64 })
    }

    /// Removes objects no name refers to (leftovers of interrupted puts, deletes and pins).
    /// Entries whose names are not object ids are not the store's and are left alone.
    fn collect_unreferenced_objects(&self) -> Result<(), StoreError> {
        let referenced: std::collections::HashSet<String> =
            self.state().refs.keys().map(AdapterId::to_hex).collect();
        for (name, path) in list_dir(&self.objects)? {
            let is_object = name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if is_object && !referenced.contains(&name) {
                let trash = self.move_to_trash(&path)?;
                remove_any(&trash).map_err(io_err("remove", &trash))?;
            }
        }
        Ok(())
    }
}

fn read_object(dir: &Path) -> Result<AdapterFiles, StoreError> {
    let (config, weights) = (dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE));
    Ok(AdapterFiles {
        config: fs::read(&config).map_err(io_err("read", &config))?,
        weights: fs::read(&weights).map_err(io_err("read", &weights))?,
    })
}
