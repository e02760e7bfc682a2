//! The outbox's storage next to redb, in one run with interleaved rounds.
//!
//! ```text
//! cargo bench -p weir-agent --bench outbox
//! ```
//!
//! Both stores get the same group commit: `P` publishers (tokio tasks)
//! each append 1 KiB records one after another and wait for each to be
//! durable; one writer thread takes everything queued, writes it in one
//! commit with one fsync (the log: one `write` and one `fdatasync`;
//! redb: one write transaction committed with `Durability::Immediate`),
//! and answers all. Figures: records per second and commits per second at
//! 1, 16 and 128 publishers, median and min–max over the rounds, which
//! alternate which store goes first. Files live under `WEIR_BENCH_DIR`
//! (default: a temporary directory under the current one, so on the same
//! disk as the checkout rather than a tmpfs).
//!
//! Then a damage check: a redb file and a log with the same records get
//! the same 64 bytes flipped in three places, and each is read back.
//!
//! Knobs: `WEIR_BENCH_ROUNDS` (default 5), `WEIR_BENCH_RECORDS` per
//! measurement (default 8,000).

use std::{
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
    time::Instant,
};

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, TableDefinition};
use tokio::sync::oneshot;
use weir_agent::outbox::log::{self, Log, Options};

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const RECORD: usize = 1024;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type Reply = oneshot::Sender<()>;

/// redb behind the same group commit as the log's writer.
#[derive(Clone)]
struct RedbStore {
    jobs: mpsc::Sender<(Bytes, Reply)>,
    commits: Arc<std::sync::atomic::AtomicU64>,
}

impl RedbStore {
    fn start(path: &Path) -> Self {
        let db = Database::create(path).expect("redb file");
        let (jobs, queue) = mpsc::channel::<(Bytes, Reply)>();
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = commits.clone();
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while let Ok(first) = queue.recv() {
                let mut group = vec![first];
                while let Ok(job) = queue.try_recv() {
                    group.push(job);
                }
                let mut tx = db.begin_write().expect("write transaction");
                tx.set_durability(Durability::Immediate)
                    .expect("durability");
                {
                    let mut table = tx.open_table(EVENTS).expect("table");
                    for (record, _) in &group {
                        table.insert(seq, record.as_ref()).expect("insert");
                        seq += 1;
                    }
                }
                tx.commit().expect("commit");
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                for (_, reply) in group {
                    let _ = reply.send(());
                }
            }
        });
        Self { jobs, commits }
    }

    async fn append(&self, record: Bytes) {
        let (reply, done) = oneshot::channel();
        self.jobs.send((record, reply)).expect("writer alive");
        done.await.expect("answered");
    }
}

enum Store {
    Log(log::Appender),
    Redb(RedbStore),
}

impl Store {
    async fn append(&self, record: Bytes) {
        match self {
            Store::Log(a) => a.append(vec![record], true).await.expect("appended"),
            Store::Redb(r) => r.append(record).await,
        }
    }

    fn commits(&self) -> u64 {
        match self {
            Store::Log(a) => a.stats().syncs.load(std::sync::atomic::Ordering::Relaxed),
            Store::Redb(r) => r.commits.load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// `records` durable appends from `publishers` concurrent publishers:
/// (records/s, commits/s).
async fn measure(store: Arc<Store>, publishers: usize, records: usize) -> (f64, f64) {
    let record = Bytes::from(vec![0xabu8; RECORD]);
    let before = store.commits();
    let start = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|_| {
            let store = store.clone();
            let record = record.clone();
            tokio::spawn(async move {
                for _ in 0..records / publishers {
                    store.append(record.clone()).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("publisher");
    }
    let secs = start.elapsed().as_secs_f64();
    let done = (records / publishers * publishers) as f64;
    (done / secs, (store.commits() - before) as f64 / secs)
}

fn open_log(dir: &Path) -> Store {
    let (log, _) = Log::open(dir, Options::default()).expect("log");
    let (appender, _thread) = log::spawn(log).expect("writer");
    Store::Log(appender)
}

fn median_spread(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    format!(
        "{median:>9.0} ({:.0}–{:.0})",
        v[0],
        v[v.len().saturating_sub(1)]
    )
}

/// Flips 64 bytes at three places of `path`.
fn damage(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read");
    let len = bytes.len();
    for at in [len / 3, len / 2, 2 * len / 3] {
        for b in &mut bytes[at..(at + 64).min(len)] {
            *b ^= 0x5a;
        }
    }
    std::fs::write(path, bytes).expect("write");
}

async fn damage_check(root: &Path) {
    let record = vec![0x11u8; 500];
    let redb_path = root.join("damage.redb");
    {
        let db = Database::create(&redb_path).expect("redb");
        let tx = db.begin_write().expect("tx");
        {
            let mut t = tx.open_table(EVENTS).expect("table");
            for n in 0..2000u64 {
                t.insert(n, record.as_slice()).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    damage(&redb_path);
    let redb_says = match Database::create(&redb_path) {
        Err(e) => format!("refused to open: {e}"),
        Ok(db) => {
            let tx = db.begin_read().expect("read tx");
            let table = tx.open_table(EVENTS).expect("table");
            let (mut good, mut changed, mut errors) = (0, 0, 0);
            for entry in table.range(0u64..).expect("range") {
                match entry {
                    Ok((_, v)) if v.value() == record.as_slice() => good += 1,
                    Ok(_) => changed += 1,
                    Err(_) => errors += 1,
                }
            }
            format!("opened; read {good} records intact, {changed} with changed bytes and no error, {errors} errors")
        }
    };
    let log_dir = root.join("damage-log");
    {
        let (log, _) = Log::open(&log_dir, Options::default()).expect("log");
        let (appender, writer) = log::spawn(log).expect("writer");
        for _ in 0..2000 {
            appender
                .append(vec![Bytes::from(record.clone())], false)
                .await
                .expect("append");
        }
        appender
            .append(vec![Bytes::from(record.clone())], true)
            .await
            .expect("append");
        // The writer thread is done with the file once it has ended.
        drop(appender);
        writer.join().expect("the writer ends");
    }
    let segment = std::fs::read_dir(&log_dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .expect("a segment");
    damage(&segment);
    let log_says = match Log::open(&log_dir, Options::default()) {
        Err(e) => format!("refused to open: {e}"),
        Ok((_, r)) => format!("opened with {} records", r.records.len()),
    };
    println!("\nDamage check (64 bytes flipped at a third, half and two thirds of the file):");
    println!("- redb 4.6: {redb_says}");
    println!("- Weir's log: {log_says}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test` runs benches as tests: nothing to check here.
        return;
    }
    let rounds = env_num("WEIR_BENCH_ROUNDS", 5).max(1);
    let records = env_num("WEIR_BENCH_RECORDS", 8000);
    let base: PathBuf = std::env::var("WEIR_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::current_dir().expect("cwd"));
    let root = tempfile::Builder::new()
        .prefix("weir-outbox-bench")
        .tempdir_in(base)
        .expect("bench dir");
    println!(
        "outbox storage: {records} durable 1 KiB appends per figure, {rounds} rounds, files in {}",
        root.path().display()
    );
    let publishers = [1usize, 16, 128];
    // (store, publishers) -> per round (records/s, commits/s)
    let mut figures: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 2 * publishers.len()];
    for round in 0..rounds {
        for k in 0..2 {
            let which = (k + round) % 2;
            for (i, &p) in publishers.iter().enumerate() {
                let dir = root.path().join(format!("r{round}-{which}-{p}"));
                std::fs::create_dir_all(&dir).expect("dir");
                let store = Arc::new(if which == 0 {
                    open_log(&dir)
                } else {
                    Store::Redb(RedbStore::start(&dir.join("outbox.redb")))
                });
                let (rate, commits) = measure(store, p, records).await;
                println!(
                    "  round {round} {:10} {p:>3} publishers: {rate:>9.0} records/s, {commits:>7.0} commits/s",
                    if which == 0 { "weir log" } else { "redb" }
                );
                figures[which * publishers.len() + i].push((rate, commits));
                std::fs::remove_dir_all(&dir).expect("clean up");
            }
        }
    }
    println!("\n| publishers | Weir's log, records/s | redb, records/s | log commits/s | redb commits/s |");
    println!("|---:|---:|---:|---:|---:|");
    for (i, p) in publishers.iter().enumerate() {
        let log = &figures[i];
        let redb = &figures[publishers.len() + i];
        println!(
            "| {p} | {} | {} | {} | {} |",
            median_spread(log.iter().map(|f| f.0).collect()),
            median_spread(redb.iter().map(|f| f.0).collect()),
            median_spread(log.iter().map(|f| f.1).collect()),
            median_spread(redb.iter().map(|f| f.1).collect()),
        );
    }
    damage_check(root.path()).await;
}
