//! The outbox's storage: a checksummed, segmented, append-only log under
//! `--data-dir/outbox/`, written in batches with group commit.
//!
//! **Why a log and not redb.** Measured here (`docs/outbox.md`): with
//! one fsync per commit, appending 1 KiB records in groups of 1 / 16 / 128
//! took redb 4.6 0.28 / 0.47 / 1.11 ms a commit (3.5k / 34k / 116k
//! records/s) and a plain append + `fdatasync` 0.19 / 0.25 / 0.32 ms (5.4k
//! / 65k / 401k records/s). And redb opened a file with 192 bytes flipped
//! in its values and returned the flipped values without an error; every
//! record here carries a CRC-32, so damage is found, named, and never
//! handed on.
//!
//! **Layout.** Segments `{n:020}.log`, each starting with a 12-byte header
//! (`WEIROBX\0` and the format, a little-endian u32, [`FORMAT`]); then
//! records: payload length (u32 LE), CRC-32 of the payload (u32 LE), the
//! payload (1 byte to [`MAX_RECORD`]). A segment is closed once it passes
//! [`Options::segment_bytes`] and a new one begins.
//!
//! **Recovery** ([`Log::open`]) reads every segment in order. A crash can
//! only leave a torn tail: the last record of the last segment cut short
//! or unwritten, or zeros where it was to go. That tail was never
//! acknowledged (acknowledgements follow the fsync), so it is cut off and
//! counted. Anything else that does not check out (a CRC mismatch with
//! records after it, a bad header, a damaged earlier segment) is
//! [`LogError::Corrupted`]: the files are left exactly as they are, for a
//! person to look at; nothing is replaced or emptied.
//!
//! **Batches written by the appenders' runtime, fsyncs shared** ([`spawn`]).
//! An append joins its thread's open batch, or opens one and spawns the
//! task that writes it; that task first yields, so every append of the
//! same turn of the runtime (the requests that arrived together, a
//! scheduler window's markers) joins it, then writes the batch with one
//! `write` under the log's lock. No thread hand-over, no wake-up, for
//! what need not be fsync'd. A batch with a durable append then goes to
//! the sync thread, which runs one `fdatasync` for every batch written
//! before it started (group commit) and answers them. A failed write is
//! undone (the file is cut back to where the batch began), so the log
//! never holds half a batch before good records; a failed fsync stops
//! the log (after one, the kernel may have dropped unsynced pages:
//! nothing written since can be vouched for).
//!
//! Measured against the earlier design (a writer thread taking every
//! append over a channel) under `wrk -c16` on a fast topic: 0.16 `write`
//! calls per event instead of 1.07, 0.24 futex calls instead of 1.4,
//! half the context switches (`docs/benchmarks.md` §5).
//!
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Condvar, Mutex, PoisonError,
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::oneshot;

/// The segment header's magic.
pub const MAGIC: [u8; 8] = *b"WEIROBX\0";
/// The layout this build reads and writes.
pub const FORMAT: u32 = 1;
const HEADER: u64 = 12;
const RECORD_HEAD: usize = 8;
/// The largest payload of one record.
pub const MAX_RECORD: usize = 16 << 20;
/// With no durable append waiting, the sync thread still flushes what
/// markers wrote this often, so little is left to a rollover's fsync.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// Why the log could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("outbox {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("outbox segment {} is corrupted at byte {offset}: {why}; the files are left as they are", path.display())]
    Corrupted {
        path: PathBuf,
        offset: u64,
        why: &'static str,
    },
    #[error("outbox segment {} is not format {FORMAT} of Weir's outbox (header {found})", path.display())]
    UnknownFormat { path: PathBuf, found: String },
    #[error("the outbox is full: {used} of {max} bytes used")]
    Full { used: u64, max: u64 },
    #[error("a record of {0} bytes is larger than the outbox takes ({MAX_RECORD})")]
    TooLarge(usize),
    #[error("the outbox writer has stopped after an earlier error")]
    Closed,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Limits of a log.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// A segment is closed once it is this long.
    pub segment_bytes: u64,
    /// Durable appends past this many bytes in all segments are refused
    /// ([`LogError::Full`]); markers (non-durable appends) are not, so the
    /// outbox can always record that it drained.
    pub max_bytes: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            max_bytes: 1 << 30,
        }
    }
}

/// What [`Log::open`] found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Every record, in the order written.
    pub records: Vec<Bytes>,
    /// Bytes of a torn tail cut off (a crash mid-write), if any.
    pub truncated: u64,
    pub segments: usize,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    len: u64,
}

/// The log, as its one writer holds it.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    options: Options,
    segments: Vec<Segment>,
    /// The newest segment, shared with the sync thread.
    file: Arc<File>,
    next_index: u64,
    stats: Arc<LogStats>,
}

/// Counters a log keeps, readable from anywhere.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Bytes in all segments.
    pub used_bytes: AtomicU64,
    /// Records appended since start.
    pub records: AtomicU64,
    /// Writes (one per batch) since start.
    pub groups: AtomicU64,
    /// fsyncs since start.
    pub syncs: AtomicU64,
    /// Compactions since start.
    pub checkpoints: AtomicU64,
}

fn segment_name(index: u64) -> String {
    format!("{index:020}.log")
}

fn header() -> [u8; HEADER as usize] {
    let mut h = [0u8; HEADER as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..].copy_from_slice(&FORMAT.to_le_bytes());
    h
}

/// Appends one record (length, CRC, payload) to `buf`.
pub fn encode(buf: &mut Vec<u8>, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(dir))
}

/// How one segment's bytes read.
enum Scan {
    /// Every record checks out.
    Whole,
    /// The records end with a torn tail at this offset.
    Torn(u64),
}

/// Reads the records of `bytes` (a whole segment) into `out`; `last`: it
/// is the newest segment, the only one a crash may have left torn.
fn scan(path: &Path, bytes: &[u8], last: bool, out: &mut Vec<Bytes>) -> Result<Scan, LogError> {
    let corrupted = |offset: usize, why| LogError::Corrupted {
        path: path.to_owned(),
        offset: offset as u64,
        why,
    };
    if bytes.len() < HEADER as usize {
        // Cut short while the segment was being created.
        return if last {
            Ok(Scan::Torn(0))
        } else {
            Err(corrupted(0, "shorter than its header"))
        };
    }
    if bytes[..8] != MAGIC || bytes[8..12] != FORMAT.to_le_bytes() {
        return Err(LogError::UnknownFormat {
            path: path.to_owned(),
            found: bytes[..12].iter().map(|b| format!("{b:02x}")).collect(),
        });
    }
    let all = Bytes::copy_from_slice(bytes);
    let mut at = HEADER as usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let torn_or = |why| {
            if last {
                Ok(Scan::Torn(at as u64))
            } else {
                Err(corrupted(at, why))
            }
        };
        if rest.len() < RECORD_HEAD {
            return torn_or("a record head cut short");
        }
        if rest.iter().all(|b| *b == 0) {
            // Space the file system gave the tail, never written.
            return torn_or("zeros where records should be");
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        if len == 0 || len > MAX_RECORD {
            return Err(corrupted(at, "a record length out of bounds"));
        }
        let end = RECORD_HEAD + len;
        if rest.len() < end {
            return torn_or("a record cut short");
        }
        let payload = &rest[RECORD_HEAD..end];
        if crc32fast::hash(payload) != crc {
            // Only the very last record can have been torn mid-write.
            return if last && rest.len() == end {
                Ok(Scan::Torn(at as u64))
            } else {
                Err(corrupted(at, "a record whose checksum does not match"))
            };
        }
        out.push(all.slice(at + RECORD_HEAD..at + end));
        at += end;
    }
    Ok(Scan::Whole)
}

impl Log {
    /// Opens (or creates) the log in `dir` and reads back every record;
    /// see the module docs for what is cut off and what is refused.
    pub fn open(dir: &Path, options: Options) -> Result<(Self, Recovered), LogError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error(dir))? {
            let path = entry.map_err(io_error(dir))?.path();
            let index = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(index) = index {
                names.push((index, path));
            }
        }
        names.sort();
        let mut recovered = Recovered {
            segments: names.len(),
            ..Recovered::default()
        };
        let mut segments = Vec::with_capacity(names.len());
        for (n, (_, path)) in names.iter().enumerate() {
            let last = n + 1 == names.len();
            let mut bytes = Vec::new();
            File::open(path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .map_err(io_error(path))?;
            let len = match scan(path, &bytes, last, &mut recovered.records)? {
                Scan::Whole => bytes.len() as u64,
                Scan::Torn(at) => {
                    recovered.truncated = bytes.len() as u64 - at;
                    let file = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(io_error(path))?;
                    if at < HEADER {
                        file.set_len(0).map_err(io_error(path))?;
                        (&file).write_all(&header()).map_err(io_error(path))?;
                    } else {
                        file.set_len(at).map_err(io_error(path))?;
                    }
                    file.sync_all().map_err(io_error(path))?;
                    at.max(HEADER)
                }
            };
            segments.push(Segment {
                path: path.clone(),
                len,
            });
        }
        let next_index = names.last().map_or(1, |(i, _)| i + 1);
        let stats = Arc::new(LogStats::default());
        let (file, segments, next_index) = match segments.last() {
            Some(s) => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .open(&s.path)
                    .map_err(io_error(&s.path))?;
                file.seek(SeekFrom::Start(s.len))
                    .map_err(io_error(&s.path))?;
                (file, segments, next_index)
            }
            None => {
                let (file, segment) = Self::create_segment(dir, 1)?;
                (file, vec![segment], 2)
            }
        };
        let used = segments.iter().map(|s| s.len).sum();
        stats.used_bytes.store(used, Relaxed);
        let log = Self {
            dir: dir.to_owned(),
            options,
            segments,
            file: Arc::new(file),
            next_index,
            stats,
        };
        Ok((log, recovered))
    }

    fn create_segment(dir: &Path, index: u64) -> Result<(File, Segment), LogError> {
        let path = dir.join(segment_name(index));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error(&path))?;
        file.write_all(&header()).map_err(io_error(&path))?;
        file.sync_all().map_err(io_error(&path))?;
        sync_dir(dir)?;
        Ok((file, Segment { path, len: HEADER }))
    }

    /// The counters, shared.
    pub fn stats(&self) -> Arc<LogStats> {
        self.stats.clone()
    }

    /// Bytes in all segments.
    pub fn used(&self) -> u64 {
        self.stats.used_bytes.load(Relaxed)
    }

    /// Writes `buf` (encoded records: the whole state) to a fresh segment,
    /// fsyncs it, then deletes every older segment.
    fn checkpoint(&mut self, buf: &[u8], records: u64) -> Result<(), LogError> {
        if let Some(last) = self.segments.last() {
            self.file.sync_data().map_err(io_error(&last.path))?;
        }
        let (mut file, mut segment) = Self::create_segment(&self.dir, self.next_index)?;
        self.next_index += 1;
        file.write_all(buf)
            .and_then(|()| file.sync_data())
            .map_err(io_error(&segment.path))?;
        segment.len += buf.len() as u64;
        let older = std::mem::take(&mut self.segments);
        self.file = Arc::new(file);
        self.segments.push(segment);
        for old in older {
            if let Err(e) = fs::remove_file(&old.path) {
                // Superseded all the same: the checkpoint is on disk.
                tracing::warn!(segment = %old.path.display(), error = %e, "cannot delete a compacted segment");
            }
        }
        sync_dir(&self.dir)?;
        self.stats
            .used_bytes
            .store(self.segments.iter().map(|s| s.len).sum(), Relaxed);
        self.stats.records.fetch_add(records, Relaxed);
        self.stats.syncs.fetch_add(1, Relaxed);
        self.stats.checkpoints.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Writes `buf` (encoded records) at the end; the sync thread makes
    /// it durable. A failed write is cut back off.
    fn write(&mut self, buf: &[u8], records: u64) -> Result<(), LogError> {
        let current = self.segments.last().map_or(HEADER, |s| s.len);
        if current > HEADER && current + buf.len() as u64 > self.options.segment_bytes {
            // The closed segment is durable before the next begins.
            self.file
                .sync_data()
                .map_err(io_error(&self.segments[self.segments.len() - 1].path))?;
            let (file, segment) = Self::create_segment(&self.dir, self.next_index)?;
            self.next_index += 1;
            self.file = Arc::new(file);
            self.stats.used_bytes.fetch_add(HEADER, Relaxed);
            self.segments.push(segment);
        }
        let segment = self.segments.last_mut().ok_or(LogError::Closed)?;
        let mut file = &*self.file;
        if let Err(e) = file.write_all(buf) {
            // Leave no half append behind: cut back to where it began.
            let undone = file
                .set_len(segment.len)
                .and_then(|()| file.seek(SeekFrom::Start(segment.len)).map(drop));
            if let Err(undo) = undone {
                tracing::error!(segment = %segment.path.display(), error = %undo,
                    "cannot cut a failed write back off; the outbox stops taking writes");
                return Err(LogError::Closed);
            }
            return Err(io_error(&segment.path)(e));
        }
        segment.len += buf.len() as u64;
        self.stats.used_bytes.fetch_add(buf.len() as u64, Relaxed);
        self.stats.records.fetch_add(records, Relaxed);
        self.stats.groups.fetch_add(1, Relaxed);
        Ok(())
    }
}

/// What appenders share with the sync thread.
#[derive(Debug)]
struct Shared {
    /// The log and how many bytes were written to it since start.
    /// An async lock: appenders wait for a checkpoint without blocking
    /// their thread.
    writer: tokio::sync::Mutex<Writer>,
    queue: Mutex<SyncQueue>,
    wake: Condvar,
    stats: Arc<LogStats>,
    /// The quota for durable appends ([`Options::max_bytes`]).
    max_bytes: u64,
    /// Set after a failure that leaves the log unusable (see [`spawn`]).
    broken: AtomicBool,
}

#[derive(Debug)]
struct Writer {
    log: Log,
    /// Scratch for encoding a checkpoint.
    buf: Vec<u8>,
    /// Bytes written since start (a position, across segments).
    written: u64,
}

/// Run when an append's batch is written (fsync'd, when durable), with
/// whether it was; whether or not its appender still waits.
pub type Done = Box<dyn FnOnce(bool) + Send>;

/// Whom to tell when an append's batch is written.
struct Reply {
    answer: oneshot::Sender<Result<(), LogError>>,
    done: Option<Done>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply").finish_non_exhaustive()
    }
}

impl Reply {
    fn finish(self, result: &Result<(), LogError>) {
        if let Some(done) = self.done {
            done(result.is_ok());
        }
        let _ = self.answer.send(match result {
            Ok(()) => Ok(()),
            Err(e) => Err(copy_error(e)),
        });
    }
}

#[derive(Debug, Default)]
struct SyncQueue {
    /// Batches with durable appends waiting: where each ends (in
    /// [`Writer::written`]) and whom to answer.
    waiters: Vec<(u64, Vec<Reply>)>,
    /// Every [`Appender`] is gone.
    stop: bool,
    /// The sync thread waits for work (so it needs waking).
    idle: bool,
}

/// Appends that came in one turn of a runtime, written together.
#[derive(Debug, Default)]
struct Batch {
    buf: Vec<u8>,
    records: u64,
    durable: bool,
    replies: Vec<Reply>,
    /// Its leader took it to write: later appends open another.
    taken: bool,
}

thread_local! {
    /// Each log's open batch on this thread. The `Weak` names the log
    /// (and keeps its address from being reused while named here).
    static OPEN: std::cell::RefCell<Vec<OpenBatch>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Buffers of written batches, for the next ones: a batch's buffer
    /// grown from empty each time (a realloc and a copy per doubling,
    /// malloc searching its bins for the larger sizes) cost about a tenth
    /// of a delivering worker's CPU.
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Spare buffers kept per thread, and the largest kept.
const SPARES: usize = 8;
const SPARE_MAX_BYTES: usize = 4 << 20;

/// An empty buffer for a batch, with room from an earlier one if any.
fn batch_buffer() -> Vec<u8> {
    SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default()
}

/// Keeps a written batch's buffer for a later batch on this thread.
fn recycle(mut buf: Vec<u8>) {
    if buf.capacity() > SPARE_MAX_BYTES {
        return;
    }
    buf.clear();
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARES {
            s.push(buf);
        }
    });
}

type OpenBatch = (std::sync::Weak<Shared>, Arc<Mutex<Batch>>);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, SyncQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self) -> Result<(), LogError> {
        if self.broken.load(Relaxed) {
            Err(LogError::Closed)
        } else {
            Ok(())
        }
    }

    /// Notes a failure: `Closed` means the log cannot go on.
    fn failed(&self, e: LogError) -> LogError {
        if matches!(e, LogError::Closed) {
            self.broken.store(true, Relaxed);
        }
        e
    }
}

/// Dropped with the last [`Appender`]: the sync thread then ends.
#[derive(Debug)]
struct Alive(Arc<Shared>);

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.queue().stop = true;
        self.0.wake.notify_one();
    }
}

/// Appends records to the log. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Appender {
    shared: Arc<Shared>,
    _alive: Arc<Alive>,
}

fn check_sizes(payloads: &[Bytes]) -> Result<(), LogError> {
    match payloads
        .iter()
        .find(|p| p.is_empty() || p.len() > MAX_RECORD)
    {
        Some(p) => Err(LogError::TooLarge(p.len())),
        None => Ok(()),
    }
}

/// An error for each of several waiters (`io::Error` is not `Clone`).
fn copy_error(e: &LogError) -> LogError {
    match e {
        LogError::Io { path, source } => LogError::Io {
            path: path.clone(),
            source: io::Error::new(source.kind(), source.to_string()),
        },
        _ => LogError::Closed,
    }
}

impl Appender {
    /// Appends `payloads` (in order, together); with `durable`, answers
    /// only once they are fsync'd, and refuses them when the log is over
    /// its quota. Without, they are written (in the page cache: they
    /// survive the agent's crash, not the machine's) and not waited on:
    /// markers of what the agent did, which at worst it does again.
    pub async fn append(&self, payloads: Vec<Bytes>, durable: bool) -> Result<(), LogError> {
        self.append_then(payloads, durable, None).await
    }

    /// [`append`](Self::append), and `done` runs once the records are
    /// written (or could not be), even if this future is dropped first.
    /// It does not run when the append is refused before being written
    /// (the error returned says so).
    pub async fn append_then(
        &self,
        payloads: Vec<Bytes>,
        durable: bool,
        done: Option<Done>,
    ) -> Result<(), LogError> {
        check_sizes(&payloads)?;
        self.shared.check()?;
        let size: u64 = payloads
            .iter()
            .map(|p| (p.len() + RECORD_HEAD) as u64)
            .sum();
        let max = self.shared.max_bytes;
        let used = self.shared.stats.used_bytes.load(Relaxed);
        if durable && used + size > max {
            return Err(LogError::Full { used, max });
        }
        let (reply, answer) = oneshot::channel();
        let (batch, opened) = self.join(
            &payloads,
            durable,
            Reply {
                answer: reply,
                done,
            },
        );
        if opened {
            // Its own task, so that no appender's cancellation leaves it
            // unwritten; it lets the appends of this turn of the runtime
            // join first.
            let appender = self.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                appender.write_batch(&batch).await;
            });
        }
        answer.await.map_err(|_| LogError::Closed)?
    }

    /// Adds `payloads` to this thread's open batch, or opens one (`true`:
    /// the caller starts its writer).
    fn join(&self, payloads: &[Bytes], durable: bool, reply: Reply) -> (Arc<Mutex<Batch>>, bool) {
        let key = Arc::downgrade(&self.shared);
        let add = |b: &mut Batch| {
            b.buf
                .reserve(payloads.iter().map(|p| RECORD_HEAD + p.len()).sum());
            for p in payloads {
                encode(&mut b.buf, p);
            }
            b.records += payloads.len() as u64;
            b.durable |= durable;
            b.replies.push(reply);
        };
        OPEN.with(|open| {
            let mut open = open.borrow_mut();
            if let Some((_, batch)) = open.iter().find(|(k, _)| k.ptr_eq(&key)) {
                let mut b = lock(batch);
                if !b.taken {
                    add(&mut b);
                    return (batch.clone(), false);
                }
            }
            let mut b = Batch {
                buf: batch_buffer(),
                ..Batch::default()
            };
            add(&mut b);
            let batch = Arc::new(Mutex::new(b));
            // Gone logs' entries go too.
            open.retain(|(k, _)| !k.ptr_eq(&key) && k.strong_count() > 0);
            open.push((key, batch.clone()));
            (batch, true)
        })
    }

    /// Writes a batch with one `write`, then answers it, or hands it to
    /// the sync thread when any of it is durable.
    async fn write_batch(&self, batch: &Mutex<Batch>) {
        let Batch {
            buf,
            records,
            durable,
            replies,
            ..
        } = {
            let mut b = lock(batch);
            let taken = std::mem::take(&mut *b);
            b.taken = true;
            taken
        };
        let written = {
            let mut guard = self.shared.writer.lock().await;
            let writer = &mut *guard;
            match writer.log.write(&buf, records) {
                Ok(()) => {
                    writer.written += buf.len() as u64;
                    Ok(writer.written)
                }
                Err(e) => Err(self.shared.failed(e)),
            }
        };
        recycle(buf);
        match written {
            Ok(end) if durable => {
                let idle = {
                    let mut queue = self.shared.queue();
                    queue.waiters.push((end, replies));
                    queue.idle
                };
                if idle {
                    self.shared.wake.notify_one();
                }
            }
            Ok(_) => {
                for reply in replies {
                    reply.finish(&Ok(()));
                }
            }
            Err(e) => {
                let e = Err(e);
                for reply in replies {
                    reply.finish(&e);
                }
            }
        }
    }

    /// Compaction: writes the whole state, as `snapshot` gives it (a
    /// checkpoint record first), to a fresh segment, fsyncs it, then
    /// deletes every older segment. `snapshot` runs under the log's lock,
    /// so every record written before it is reflected in what it returns
    /// and every record written after lands in the new segment. A crash
    /// in between leaves the older segments, which the checkpoint
    /// supersedes when the log is read back.
    pub async fn checkpoint(
        &self,
        snapshot: impl FnOnce() -> Vec<Bytes> + Send + 'static,
    ) -> Result<(), LogError> {
        self.shared.check()?;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = shared.writer.blocking_lock();
            let payloads = snapshot();
            check_sizes(&payloads)?;
            let Writer { log, buf, written } = &mut *guard;
            buf.clear();
            for p in &payloads {
                encode(buf, p);
            }
            log.checkpoint(buf, payloads.len() as u64)
                .map_err(|e| shared.failed(e))?;
            *written += buf.len() as u64;
            Ok(())
        })
        .await
        .map_err(|_| LogError::Closed)?
    }

    pub fn stats(&self) -> &Arc<LogStats> {
        &self.shared.stats
    }
}

/// Starts the sync thread for `log`; it ends (after a last fsync) when
/// every [`Appender`] is dropped.
pub fn spawn(log: Log) -> io::Result<(Appender, std::thread::JoinHandle<()>)> {
    let stats = log.stats();
    let max_bytes = log.options.max_bytes;
    let shared = Arc::new(Shared {
        writer: tokio::sync::Mutex::new(Writer {
            log,
            buf: Vec::with_capacity(64 << 10),
            written: 0,
        }),
        queue: Mutex::new(SyncQueue::default()),
        wake: Condvar::new(),
        stats,
        max_bytes,
        broken: AtomicBool::new(false),
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("weir-outbox".into())
            .spawn(move || sync_loop(&shared))?
    };
    let alive = Arc::new(Alive(shared.clone()));
    Ok((
        Appender {
            shared,
            _alive: alive,
        },
        thread,
    ))
}

/// One `fdatasync` for every durable append written before it began,
/// then their answers; a flush every [`FLUSH_EVERY`] when none waits.
fn sync_loop(shared: &Shared) {
    let mut synced = 0u64;
    loop {
        let stop = {
            let mut queue = shared.queue();
            if queue.waiters.is_empty() && !queue.stop {
                queue.idle = true;
                queue = shared
                    .wake
                    .wait_timeout_while(queue, FLUSH_EVERY, |q| q.waiters.is_empty() && !q.stop)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                queue.idle = false;
            }
            queue.stop && queue.waiters.is_empty()
        };
        // What is written now, in the newest segment (a rollover syncs
        // the segment it closes before the next begins).
        let (file, path, target) = {
            let writer = shared.writer.blocking_lock();
            let path = writer.log.segments.last().map(|s| s.path.clone());
            (writer.log.file.clone(), path, writer.written)
        };
        let result = if target > synced && !shared.broken.load(Relaxed) {
            match file.sync_data() {
                Ok(()) => {
                    shared.stats.syncs.fetch_add(1, Relaxed);
                    synced = target;
                    Ok(())
                }
                Err(e) => {
                    tracing::error!(segment = ?path, error = %e,
                        "the outbox cannot fsync; it stops taking writes");
                    shared.broken.store(true, Relaxed);
                    Err(io_error(path.as_deref().unwrap_or(Path::new("outbox")))(e))
                }
            }
        } else if shared.broken.load(Relaxed) {
            Err(LogError::Closed)
        } else {
            Ok(())
        };
        let ready: Vec<(u64, Vec<Reply>)> = {
            let mut queue = shared.queue();
            if result.is_err() {
                std::mem::take(&mut queue.waiters)
            } else {
                let (ready, later) = std::mem::take(&mut queue.waiters)
                    .into_iter()
                    .partition(|(end, _)| *end <= target);
                queue.waiters = later;
                ready
            }
        };
        for reply in ready.into_iter().flat_map(|(_, r)| r) {
            reply.finish(&result);
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: usize) -> Bytes {
        Bytes::from(format!("event-{n}-{}", "x".repeat(n % 300)))
    }

    fn small() -> Options {
        Options {
            segment_bytes: 1024,
            max_bytes: 1 << 20,
        }
    }

    fn open(dir: &Path, options: Options) -> (Appender, Recovered, std::thread::JoinHandle<()>) {
        let (log, recovered) = Log::open(dir, options).expect("opens");
        let (appender, thread) = spawn(log).expect("writer");
        (appender, recovered, thread)
    }

    fn close(appender: Appender, thread: std::thread::JoinHandle<()>) {
        drop(appender);
        thread.join().expect("writer ends");
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut s: Vec<PathBuf> = fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").path())
            .collect();
        s.sort();
        s
    }

    #[tokio::test]
    async fn records_come_back_in_order_across_segments() {
        let dir = tempfile::tempdir().expect("tmp");
        let (appender, recovered, thread) = open(dir.path(), small());
        assert!(recovered.records.is_empty());
        for n in 0..100 {
            appender
                .append(vec![payload(n)], n % 3 == 0)
                .await
                .expect("appended");
        }
        close(appender, thread);
        assert!(segments(dir.path()).len() > 3, "rolled over");
        let (appender, recovered, thread) = open(dir.path(), small());
        let expected: Vec<Bytes> = (0..100).map(payload).collect();
        assert_eq!(recovered.records, expected);
        assert_eq!(recovered.truncated, 0);
        // It carries on after what it read.
        appender
            .append(vec![payload(100)], true)
            .await
            .expect("appended");
        close(appender, thread);
        let (_, recovered, _) = open(dir.path(), small());
        assert_eq!(recovered.records.len(), 101);
    }

    /// `n` appends of `payload(0..n)`, each from its own task, spawned
    /// together.
    async fn append_together(appender: &Appender, n: usize, durable: bool) {
        let tasks: Vec<_> = (0..n)
            .map(|n| {
                let a = appender.clone();
                tokio::spawn(async move { a.append(vec![payload(n)], durable).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("appended");
        }
    }

    #[tokio::test]
    async fn concurrent_durable_appends_share_fsyncs() {
        let dir = tempfile::tempdir().expect("tmp");
        let (appender, _, thread) = open(dir.path(), Options::default());
        append_together(&appender, 256, true).await;
        let syncs = appender.stats().syncs.load(Relaxed);
        assert_eq!(appender.stats().records.load(Relaxed), 256);
        assert!(syncs < 256, "one fsync per append: {syncs}");
        close(appender, thread);
        let (_, recovered, _) = open(dir.path(), Options::default());
        assert_eq!(recovered.records.len(), 256);
    }

    #[tokio::test]
    async fn appends_of_one_turn_share_one_write() {
        let dir = tempfile::tempdir().expect("tmp");
        let (appender, _, thread) = open(dir.path(), Options::default());
        // Spawned together: they run in one turn of this runtime.
        append_together(&appender, 100, false).await;
        let writes = appender.stats().groups.load(Relaxed);
        assert_eq!(appender.stats().records.load(Relaxed), 100);
        assert!(writes < 10, "{writes} writes for 100 appends");
        close(appender, thread);
        let (_, recovered, _) = open(dir.path(), Options::default());
        assert_eq!(recovered.records, (0..100).map(payload).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn an_appender_that_gives_up_strands_no_other() {
        let dir = tempfile::tempdir().expect("tmp");
        let (appender, _, thread) = open(dir.path(), Options::default());
        // The first opens the batch, then is dropped before it is written.
        let mut first = Box::pin(appender.append(vec![payload(1)], true));
        let polled = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(first.as_mut(), cx))
        })
        .await;
        assert!(polled.is_pending(), "it waits for the fsync");
        drop(first);
        appender
            .append(vec![payload(2)], true)
            .await
            .expect("the batch is written all the same");
        close(appender, thread);
        let (_, recovered, _) = open(dir.path(), Options::default());
        assert_eq!(recovered.records, [payload(1), payload(2)]);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_counted() {
        let dir = tempfile::tempdir().expect("tmp");
        let (appender, _, thread) = open(dir.path(), Options::default());
        for n in 0..10 {
            appender.append(vec![payload(n)], true).await.expect("ok");
        }
        close(appender, thread);
        let path = segments(dir.path()).pop().expect("a segment");
        let good = fs::metadata(&path).expect("meta").len();
        // A crash mid-write: half a record, then (another time) zeros.
        let mut half = Vec::new();
        encode(&mut half, b"never acknowledged");
        half.truncate(half.len() / 2);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&half).expect("write");
        drop(f);
        let (appender, recovered, thread) = open(dir.path(), Options::default());
        assert_eq!(recovered.records.len(), 10);
        assert_eq!(recovered.truncated, half.len() as u64);
        assert_eq!(fs::metadata(&path).expect("meta").len(), good);
        close(appender, thread);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&[0u8; 300]).expect("write");
        drop(f);
        let (_, recovered, _) = open(dir.path(), Options::default());
        assert_eq!(recovered.records.len(), 10);
        assert_eq!(recovered.truncated, 300);
    }

    #[tokio::test]
    async fn damage_before_the_tail_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tmp");
        let (appender, _, thread) = open(dir.path(), Options::default());
        for n in 0..10 {
            appender.append(vec![payload(n)], true).await.expect("ok");
        }
        close(appender, thread);
        let path = segments(dir.path()).pop().expect("a segment");
        let mut bytes = fs::read(&path).expect("read");
        bytes[HEADER as usize + RECORD_HEAD + 2] ^= 0x5a;
        fs::write(&path, &bytes).expect("write");
        match Log::open(dir.path(), Options::default()) {
            Err(LogError::Corrupted { offset, .. }) => assert_eq!(offset, HEADER),
            other => panic!("expected Corrupted, got {other:?}"),
        }
        assert_eq!(fs::read(&path).expect("read"), bytes, "untouched");
        // Not this format: named, not read.
        fs::write(&path, b"SQLite format 3\0 and more").expect("write");
        assert!(matches!(
            Log::open(dir.path(), Options::default()),
            Err(LogError::UnknownFormat { .. })
        ));
    }

    #[tokio::test]
    async fn only_the_newest_segment_may_have_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tmp");
        let (appender, _, thread) = open(dir.path(), small());
        for n in 0..60 {
            appender.append(vec![payload(n)], true).await.expect("ok");
        }
        close(appender, thread);
        let first = segments(dir.path()).remove(0);
        let mut bytes = fs::read(&first).expect("read");
        let cut = bytes.len() - 3;
        bytes.truncate(cut);
        fs::write(&first, &bytes).expect("write");
        match Log::open(dir.path(), small()) {
            Err(LogError::Corrupted { path, .. }) => assert_eq!(path, first),
            other => panic!("expected Corrupted, got {other:?}"),
        }
        assert_eq!(fs::read(&first).expect("read").len(), cut, "untouched");
    }

    #[tokio::test]
    async fn durable_appends_past_the_quota_are_refused_and_markers_still_go() {
        let dir = tempfile::tempdir().expect("tmp");
        let options = Options {
            segment_bytes: 1 << 20,
            max_bytes: 2048,
        };
        let (appender, _, thread) = open(dir.path(), options);
        let record = Bytes::from(vec![1u8; 500]);
        let mut accepted = 0;
        let full = loop {
            match appender.append(vec![record.clone()], true).await {
                Ok(()) => accepted += 1,
                Err(e) => break e,
            }
            assert!(accepted < 10, "the quota never bit");
        };
        assert!(matches!(full, LogError::Full { max: 2048, .. }), "{full}");
        appender
            .append(vec![Bytes::from_static(b"delivered 1")], false)
            .await
            .expect("a marker goes past the quota");
        assert!(matches!(
            appender.append(vec![Bytes::new()], false).await,
            Err(LogError::TooLarge(0))
        ));
        close(appender, thread);
        let (_, recovered, _) = open(dir.path(), options);
        assert_eq!(
            recovered.records.len(),
            accepted + 1,
            "nothing accepted is lost"
        );
    }
}
