//! The durable store through its public API: put/get/list/delete, replacement and generations,
//! pins keeping replaced objects readable, restart, tenant isolation, bad keys, concurrency.
//! The crash tests live next to the store (`src/store/tests.rs`), where they can stop a writer
//! at a chosen step.

use adapters::store::{AdapterKey, FsStore, StoreError, DEFAULT_TENANT};
use adapters::AdapterId;
use std::path::Path;

fn key(tenant: &str, name: &str) -> AdapterKey {
    AdapterKey::new(tenant, name).unwrap()
}

fn files(tag: u8) -> (Vec<u8>, Vec<u8>) {
    (
        format!(r#"{{"r":8,"target_modules":["q_proj"],"tag":{tag}}}"#).into_bytes(),
        vec![tag; 4096 + tag as usize],
    )
}

fn put(store: &FsStore, k: &AdapterKey, tag: u8) -> adapters::store::StoredAdapter {
    let (config, weights) = files(tag);
    store.put(k, &config, &weights).unwrap().0
}

fn object_count(root: &Path) -> usize {
    std::fs::read_dir(root.join("objects")).unwrap().count()
}

#[test]
fn put_get_list_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    let k = key(DEFAULT_TENANT, "math");
    assert!(store.get(&k).is_none());

    let (config, weights) = files(1);
    let (stored, replaced) = store.put(&k, &config, &weights).unwrap();
    assert!(replaced.is_none());
    assert_eq!(stored.key, k);
    assert_eq!(stored.id, AdapterId::of_files(&config, &weights));
    assert_eq!(stored.generation, 1);
    assert_eq!(stored.bytes, (config.len() + weights.len()) as u64);
    assert!(stored.created_unix_ms > 0);
    assert_eq!(store.get(&k).unwrap(), stored);
    let (config_path, weights_path) = store.files(&stored);
    assert_eq!(std::fs::read(config_path).unwrap(), config);
    assert_eq!(std::fs::read(weights_path).unwrap(), weights);
    let read = store.read(stored.id).unwrap();
    assert_eq!((read.config, read.weights), (config, weights));

    let second = put(&store, &key(DEFAULT_TENANT, "code"), 2);
    let names: Vec<_> = store.list(None).into_iter().map(|a| a.key.name().to_string()).collect();
    assert_eq!(names, ["code", "math"], "sorted by name");

    assert!(store.delete(&k).unwrap());
    assert!(!store.delete(&k).unwrap(), "deleting twice");
    assert!(store.get(&k).is_none());
    assert!(matches!(store.read(stored.id), Err(StoreError::ObjectMissing { .. })));
    assert!(!stored.dir.exists(), "an unreferenced, unpinned object is removed");
    assert_eq!(store.list(None), vec![second]);
    assert!(std::fs::read_dir(dir.path().join("tmp")).unwrap().next().is_none());
}

#[test]
fn replacing_bumps_the_generation_and_pins_keep_the_old_object() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    let k = key("acme", "bot");
    let v1 = put(&store, &k, 1);
    let (_, pin) = store.get_pinned(&k).unwrap();
    assert_eq!(pin.id(), v1.id);

    let (config, weights) = files(2);
    let (v2, replaced) = store.put(&k, &config, &weights).unwrap();
    assert_eq!(v2.generation, 2);
    assert_eq!(replaced.unwrap(), v1);
    assert_eq!(store.get(&k).unwrap(), v2);
    assert!(!store.is_referenced(v1.id));
    assert_eq!(pin.read().unwrap().config, files(1).0, "the pinned old version stays readable");
    assert_eq!(store.read(v1.id).unwrap().weights, files(1).1);
    let second_pin = pin.clone();
    drop(pin);
    assert!(v1.dir.exists(), "a clone of the pin still holds it");
    drop(second_pin);
    assert!(!v1.dir.exists(), "released with the last pin");
    assert!(store.pin(v1.id).is_none());

    // Same bytes again: a new generation of the same object.
    let (v3, _) = store.put(&k, &config, &weights).unwrap();
    assert_eq!((v3.generation, v3.id), (3, v2.id));
    assert!(v3.dir.exists());
    // Delete then re-upload: generations continue.
    assert!(store.delete(&k).unwrap());
    assert_eq!(put(&store, &k, 4).generation, 4);
    assert_eq!(object_count(dir.path()), 1);
}

#[test]
fn a_shared_object_stays_while_any_name_refers_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    let (a, b) = (key("t1", "same"), key("t2", "same-too"));
    let sa = put(&store, &a, 9);
    let sb = put(&store, &b, 9);
    assert_eq!(sa.id, sb.id);
    assert_eq!(object_count(dir.path()), 1, "content-addressed: stored once");
    assert!(store.delete(&a).unwrap());
    assert!(store.is_referenced(sb.id));
    assert_eq!(store.read(sb.id).unwrap().config, files(9).0);
    put(&store, &b, 10);
    assert!(!sb.dir.exists());
}

#[test]
fn reopening_sees_everything_and_generations_continue() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (key("t1", "a"), key("t2", "b"), key("t1", "c"));
    let before = {
        let store = FsStore::open(dir.path()).unwrap();
        put(&store, &a, 1);
        put(&store, &a, 2);
        put(&store, &b, 3);
        put(&store, &c, 4);
        store.delete(&c).unwrap();
        put(&store, &b, 5);
        store.list(None)
    };
    // What a crash between publishing an object and writing its record leaves behind.
    let orphan = dir.path().join("objects").join(AdapterId::of_files(b"{}", b"orphan").to_hex());
    std::fs::create_dir(&orphan).unwrap();
    std::fs::write(orphan.join("adapter_config.json"), b"{}").unwrap();
    std::fs::write(dir.path().join("objects/not-an-object.txt"), b"left alone").unwrap();
    std::fs::create_dir(dir.path().join("tmp/object-leftover")).unwrap();

    let store = FsStore::open(dir.path()).unwrap();
    assert_eq!(store.list(None), before);
    assert_eq!(store.get(&a).unwrap().generation, 2);
    assert_eq!(store.read(store.get(&b).unwrap().id).unwrap().config, files(5).0);
    assert!(store.get(&c).is_none());
    assert!(!orphan.exists(), "the unreferenced object is collected on open");
    assert_eq!(object_count(dir.path()), 3, "a:2, b:5 and the stray file");
    assert!(std::fs::read_dir(dir.path().join("tmp")).unwrap().next().is_none());
    assert_eq!(put(&store, &c, 6).generation, 2, "the deleted name's generation survived the restart");
}

#[test]
fn tenants_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    let (mine, theirs) = (key("alice", "bot"), key("bob", "bot"));
    put(&store, &mine, 1);
    assert!(store.get(&theirs).is_none());
    put(&store, &theirs, 2);
    assert_ne!(store.get(&mine).unwrap().id, store.get(&theirs).unwrap().id);
    assert_eq!(store.list(Some("alice")).len(), 1);
    assert_eq!(store.list(Some("alice"))[0].key, mine);
    assert_eq!(store.list(Some("carol")), vec![]);
    assert_eq!(store.list(None).len(), 2);
    assert!(store.delete(&theirs).unwrap());
    assert_eq!(store.get(&mine).unwrap().generation, 1);
}

#[test]
fn keys_that_could_escape_the_root_are_refused() {
    for (tenant, name) in [("t", "../x"), ("..", "x"), ("t", "a/b"), ("t", ".x"), ("", "x"), ("t", "")] {
        assert!(
            matches!(AdapterKey::new(tenant, name), Err(StoreError::InvalidKey { .. })),
            "{tenant}/{name}"
        );
    }
}

#[test]
fn one_process_owns_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    let err = FsStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    drop(store);
    FsStore::open(dir.path()).unwrap();
}

#[test]
fn a_damaged_object_is_reported_by_open() {
    let dir = tempfile::tempdir().unwrap();
    let stored = {
        let store = FsStore::open(dir.path()).unwrap();
        put(&store, &key("t", "n"), 1)
    };
    std::fs::write(stored.weights_path(), b"truncated").unwrap();
    let err = FsStore::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains(&stored.id.to_hex()), "{err}");
}

#[test]
fn concurrent_puts_of_one_name_get_distinct_generations() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    let k = key("t", "busy");
    let threads = 8u8;
    let per_thread = 5u8;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (store, k) = (store.clone(), k.clone());
            s.spawn(move || {
                (0..per_thread).map(|i| put(&store, &k, t * per_thread + i).generation).collect::<Vec<_>>()
            });
        }
    });
    let last = store.get(&k).unwrap();
    assert_eq!(last.generation, (threads * per_thread) as u64);
    assert_eq!(object_count(dir.path()), 1, "every replaced object was collected");
    let read = store.read(last.id).unwrap();
    assert_eq!(AdapterId::of_files(&read.config, &read.weights), last.id);
    drop(store);
    let reopened = FsStore::open(dir.path()).unwrap();
    assert_eq!(reopened.get(&k).unwrap(), last);
}
