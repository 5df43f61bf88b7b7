//! Crash tests: a child process (this test binary, re-invoked) writes into a store and is killed
//! with SIGKILL mid-write; the parent reopens the store and checks that the old or the new version
//! is visible, complete, and that the leftovers are gone.
//!
//! SIGKILL loses no page-cache data, so these check the ordering of renames and the cleanup,
//! not that every fsync is in place (that would need power-cut testing).

use super::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Set in the child: the store root.
const CHILD_ROOT_ENV: &str = "LORAHOST_STORE_CRASH_ROOT";
/// Set in the child: `<Phase>:<n>` (stop at the n-th time that phase is reached) or `loop`
/// (keep replacing the adapter until killed).
const CHILD_MODE_ENV: &str = "LORAHOST_STORE_CRASH_MODE";
const REACHED: &str = "CRASH-CHILD-REACHED";
const COMMITTED: &str = "CRASH-CHILD-COMMITTED";
const FINISHED: &str = "CRASH-CHILD-FINISHED";
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

static STOP_AT: OnceLock<(Phase, usize)> = OnceLock::new();
static REACHED_COUNT: AtomicUsize = AtomicUsize::new(0);

/// Called by the store at each `Phase`; in the crash child, parks the writer at the chosen one.
pub(super) fn checkpoint(phase: Phase) {
    let Some(&(target, nth)) = STOP_AT.get() else { return };
    if phase == target && REACHED_COUNT.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        println!("{REACHED}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

fn key() -> AdapterKey {
    AdapterKey::new("acme", "support-bot").unwrap()
}

fn other_key() -> AdapterKey {
    AdapterKey::new("acme", "other").unwrap()
}

/// An adapter whose bytes encode `tag`, so the parent can tell which write it sees.
fn content(tag: u64, weight_bytes: usize) -> (Vec<u8>, Vec<u8>) {
    let config = format!(r#"{{"r":8,"target_modules":["q_proj"],"tag":{tag}}}"#).into_bytes();
    let weights = (0..weight_bytes).map(|i| (i as u64).wrapping_mul(31).wrapping_add(tag) as u8).collect();
    (config, weights)
}

fn tag_of(files: &AdapterFiles) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(&files.config).unwrap();
    let tag = v["tag"].as_u64().unwrap();
    assert_eq!(files.weights, content(tag, files.weights.len()).1, "weights of tag {tag}");
    tag
}

/// The writer side; a no-op unless the parent set the environment.
#[test]
fn crash_child() {
    let (Ok(root), Ok(mode)) = (std::env::var(CHILD_ROOT_ENV), std::env::var(CHILD_MODE_ENV)) else {
        return;
    };
    let store = FsStore::open(&root).unwrap();
    if mode == "loop" {
        loop {
            let generation = store.get(&key()).map_or(0, |a| a.generation) + 1;
            let (config, weights) = content(generation, 8 << 20);
            store.put(&key(), &config, &weights).unwrap();
            println!("{COMMITTED}");
        }
    }
    let (phase, nth) = mode.split_once(':').unwrap();
    let phase = match phase {
        "ObjectChunkWritten" => Phase::ObjectChunkWritten,
        "ObjectStaged" => Phase::ObjectStaged,
        "ObjectPublished" => Phase::ObjectPublished,
        "RecordStaged" => Phase::RecordStaged,
        "RecordPublished" => Phase::RecordPublished,
        other => panic!("unknown phase {other}"),
    };
    STOP_AT.set((phase, nth.parse().unwrap())).unwrap();
    let (config, weights) = content(2, 50 << 20);
    store.put(&key(), &config, &weights).unwrap();
    println!("{FINISHED}");
}

struct ChildWriter {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ChildWriter {
    fn spawn(root: &Path, mode: &str) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "store::tests::crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ROOT_ENV, root)
            .env(CHILD_MODE_ENV, mode)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    fn wait_for(&self, marker: &str) {
        let deadline = Instant::now() + CHILD_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return,
                Ok(line) => assert!(!line.contains(FINISHED), "the writer finished without stopping"),
                Err(e) => panic!("waiting for {marker} from the writer: {e}"),
            }
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

fn entries(dir: &Path) -> Vec<String> {
    list_dir(dir).unwrap().into_iter().map(|(name, _)| name).collect()
}

/// After a reopen: only referenced objects remain and the scratch area is empty.
fn assert_clean(store: &FsStore) {
    let root = store.root();
    assert!(entries(&root.join(TMP_DIR)).is_empty(), "tmp/ not emptied: {:?}", entries(&root.join(TMP_DIR)));
    let mut live: Vec<String> = store.list(None).iter().map(|a| a.id.to_hex()).collect();
    live.sort();
    live.dedup();
    assert_eq!(entries(&root.join(OBJECTS_DIR)), live, "objects/ holds exactly the referenced objects");
}

#[test]
fn a_writer_killed_at_any_step_leaves_the_old_or_the_new_version() {
    // (where the writer stops, whether the new version is committed there)
    let cases = [
        ("ObjectChunkWritten:10", false),
        ("ObjectStaged:1", false),
        ("ObjectPublished:1", false),
        ("RecordStaged:1", false),
        ("RecordPublished:1", true),
    ];
    for (mode, committed) in cases {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FsStore::open(dir.path()).unwrap();
            let (config, weights) = content(1, 1 << 20);
            store.put(&key(), &config, &weights).unwrap();
            let (config, weights) = content(100, 1000);
            store.put(&other_key(), &config, &weights).unwrap();
        }
        let writer = ChildWriter::spawn(dir.path(), mode);
        writer.wait_for(REACHED);
        let tmp = entries(&dir.path().join(TMP_DIR));
        let objects = entries(&dir.path().join(OBJECTS_DIR));
        if committed {
            assert_eq!(objects.len(), 3, "{mode}: the replaced object is still there when killed");
        } else {
            assert!(!tmp.is_empty() || objects.len() == 3, "{mode}: the kill lands mid-write");
        }
        writer.kill();

        let store = FsStore::open(dir.path()).unwrap();
        let seen = store.get(&key()).unwrap();
        let expected = if committed { 2 } else { 1 };
        assert_eq!(seen.generation, expected, "{mode}");
        assert_eq!(tag_of(&store.read(seen.id).unwrap()), expected, "{mode}");
        assert_eq!(tag_of(&store.read(store.get(&other_key()).unwrap().id).unwrap()), 100, "{mode}");
        assert_clean(&store);
        let (config, weights) = content(7, 10);
        let (next, replaced) = store.put(&key(), &config, &weights).unwrap();
        assert_eq!(next.generation, expected + 1, "{mode}: generations continue after the crash");
        assert_eq!(replaced.unwrap().generation, expected);
    }
}

#[test]
fn a_writer_killed_at_random_times_never_leaves_a_half_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    let mut last_generation = 0;
    for round in 0..4u64 {
        let writer = ChildWriter::spawn(dir.path(), "loop");
        writer.wait_for(COMMITTED);
        let delay_ms = 20 + (seed.wrapping_mul(round + 7).wrapping_add(round * 131)) % 300;
        std::thread::sleep(Duration::from_millis(delay_ms));
        writer.kill();

        let store = FsStore::open(dir.path()).unwrap();
        let seen = store.get(&key()).expect("the writer committed before it was killed");
        assert!(seen.generation > last_generation, "round {round}: each round commits a new generation");
        assert_eq!(tag_of(&store.read(seen.id).unwrap()), seen.generation, "round {round}");
        last_generation = seen.generation;
        assert_clean(&store);
    }
}
