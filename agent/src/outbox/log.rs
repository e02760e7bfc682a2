//! The outbox's storage: a checksummed, segmented, append-only log under
//! `--data-dir/outbox/`, written by one thread with group commit.
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
//! **Group commit** ([`spawn`]): appenders hand their records to the
//! writer thread and wait; the thread takes everything queued (up to
//! [`MAX_GROUP_BYTES`]), writes it with one `write`, and, when any of it
//! asked to be durable, one `fdatasync`, then answers all. Concurrent
//! publishers share one fsync. A failed write is undone (the file is cut
//! back to where the group began), so the log never holds half a group
//! before good records.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc, Arc,
    },
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
/// What one group commit writes at most (more waits for the next).
pub const MAX_GROUP_BYTES: usize = 8 << 20;

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
    file: File,
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
    /// Group commits written since start.
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
            file,
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
        self.file = file;
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

    /// Writes `buf` (encoded records) at the end, then syncs when `sync`.
    /// A failed write is cut back off.
    fn write(&mut self, buf: &[u8], records: u64, sync: bool) -> Result<(), LogError> {
        let current = self.segments.last().map_or(HEADER, |s| s.len);
        if current > HEADER && current + buf.len() as u64 > self.options.segment_bytes {
            // The closed segment is durable before the next begins.
            self.file
                .sync_data()
                .map_err(io_error(&self.segments[self.segments.len() - 1].path))?;
            let (file, segment) = Self::create_segment(&self.dir, self.next_index)?;
            self.next_index += 1;
            self.file = file;
            self.stats.used_bytes.fetch_add(HEADER, Relaxed);
            self.segments.push(segment);
        }
        let segment = self.segments.last_mut().ok_or(LogError::Closed)?;
        let written =
            self.file.write_all(buf).and_then(
                |()| {
                    if sync {
                        self.file.sync_data()
                    } else {
                        Ok(())
                    }
                },
            );
        if let Err(e) = written {
            // Leave no half group behind: cut back to where it began.
            let undone = self
                .file
                .set_len(segment.len)
                .and_then(|()| self.file.seek(SeekFrom::Start(segment.len)).map(drop));
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
        if sync {
            self.stats.syncs.fetch_add(1, Relaxed);
        }
        Ok(())
    }
}

/// The whole state, taken by the writer thread when it gets to a
/// checkpoint ([`Appender::checkpoint`]).
type Snapshot = Box<dyn FnOnce() -> Vec<Bytes> + Send>;

/// One appender's records, waiting for the writer.
struct Job {
    payloads: Vec<Bytes>,
    durable: bool,
    /// A compaction ([`Log::checkpoint`]); `payloads` is empty.
    checkpoint: Option<Snapshot>,
    reply: oneshot::Sender<Result<(), LogError>>,
}

/// Hands records to the writer thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Appender {
    jobs: mpsc::Sender<Job>,
    stats: Arc<LogStats>,
}

impl Appender {
    /// Appends `payloads` (in order, together); with `durable`, answers
    /// only once they are fsync'd, and refuses them when the log is over
    /// its quota. Without, they are written with the next group and may
    /// be lost in a crash (markers of what the agent did, which at worst
    /// it does again).
    pub async fn append(&self, payloads: Vec<Bytes>, durable: bool) -> Result<(), LogError> {
        check_sizes(&payloads)?;
        self.send(payloads, durable, None).await
    }

    /// Compaction: writes the whole state, as `snapshot` returns it
    /// (starting with a checkpoint record), to a fresh segment, fsyncs
    /// it, then deletes every older segment. `snapshot` runs on the
    /// writer thread in its turn, so every record queued before is
    /// reflected in what it returns (its change entered the state before
    /// it was queued) and every record queued after is written after the
    /// checkpoint. A crash in between leaves the older segments, which the
    /// checkpoint supersedes when the log is read back.
    pub async fn checkpoint(
        &self,
        snapshot: impl FnOnce() -> Vec<Bytes> + Send + 'static,
    ) -> Result<(), LogError> {
        self.send(Vec::new(), true, Some(Box::new(snapshot))).await
    }

    async fn send(
        &self,
        payloads: Vec<Bytes>,
        durable: bool,
        checkpoint: Option<Snapshot>,
    ) -> Result<(), LogError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                payloads,
                durable,
                checkpoint,
                reply,
            })
            .map_err(|_| LogError::Closed)?;
        answer.await.map_err(|_| LogError::Closed)?
    }

    pub fn stats(&self) -> &Arc<LogStats> {
        &self.stats
    }
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

/// Starts the writer thread for `log`; it ends when every [`Appender`]
/// is dropped.
pub fn spawn(log: Log) -> io::Result<(Appender, std::thread::JoinHandle<()>)> {
    let (jobs, queue) = mpsc::channel::<Job>();
    let stats = log.stats();
    let thread = std::thread::Builder::new()
        .name("weir-outbox".into())
        .spawn(move || write_groups(log, queue))?;
    Ok((Appender { jobs, stats }, thread))
}

fn write_groups(mut log: Log, queue: mpsc::Receiver<Job>) {
    let mut buf = Vec::with_capacity(64 << 10);
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        if let Some(snapshot) = first.checkpoint {
            let payloads = snapshot();
            buf.clear();
            for p in &payloads {
                encode(&mut buf, p);
            }
            let result =
                check_sizes(&payloads).and_then(|()| log.checkpoint(&buf, payloads.len() as u64));
            let closed = matches!(result, Err(LogError::Closed));
            let _ = first.reply.send(result);
            if closed {
                return;
            }
            continue;
        }
        let mut group = vec![first];
        let mut bytes: usize = group[0]
            .payloads
            .iter()
            .map(|p| p.len() + RECORD_HEAD)
            .sum();
        while bytes < MAX_GROUP_BYTES {
            match queue.try_recv() {
                Ok(job) if job.checkpoint.is_some() => {
                    // On its own, after this group.
                    carried = Some(job);
                    break;
                }
                Ok(job) => {
                    bytes += job
                        .payloads
                        .iter()
                        .map(|p| p.len() + RECORD_HEAD)
                        .sum::<usize>();
                    group.push(job);
                }
                Err(_) => break,
            }
        }
        if carried.is_none() && bytes > MAX_GROUP_BYTES && group.len() > 1 {
            carried = group.pop();
        }
        // The quota: durable jobs that would pass it are refused, one by
        // one, in order; markers always go.
        let max = log.options.max_bytes;
        let mut used = log.used();
        let mut refused = Vec::new();
        let mut taken = Vec::with_capacity(group.len());
        for job in group {
            let size: u64 = job
                .payloads
                .iter()
                .map(|p| (p.len() + RECORD_HEAD) as u64)
                .sum();
            if job.durable && used + size > max {
                refused.push(job);
            } else {
                used += size;
                taken.push(job);
            }
        }
        for job in refused {
            let _ = job.reply.send(Err(LogError::Full {
                used: log.used(),
                max,
            }));
        }
        if taken.is_empty() {
            continue;
        }
        buf.clear();
        let mut records = 0u64;
        for job in &taken {
            for p in &job.payloads {
                encode(&mut buf, p);
                records += 1;
            }
        }
        let sync = taken.iter().any(|j| j.durable);
        let result = log.write(&buf, records, sync);
        let closed = matches!(result, Err(LogError::Closed));
        for job in taken {
            let answer = match &result {
                Ok(()) => Ok(()),
                Err(LogError::Io { path, source }) => Err(LogError::Io {
                    path: path.clone(),
                    source: io::Error::new(source.kind(), source.to_string()),
                }),
                Err(_) => Err(LogError::Closed),
            };
            let _ = job.reply.send(answer);
        }
        if closed {
            // Answer whoever is still queued, then stop.
            while let Ok(job) = queue.try_recv() {
                let _ = job.reply.send(Err(LogError::Closed));
            }
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

    #[tokio::test]
    async fn concurrent_durable_appends_share_fsyncs() {
        let dir = tempfile::tempdir().expect("tmp");
        let (appender, _, thread) = open(dir.path(), Options::default());
        let tasks: Vec<_> = (0..256)
            .map(|n| {
                let a = appender.clone();
                tokio::spawn(async move { a.append(vec![payload(n)], true).await })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("appended");
        }
        let syncs = appender.stats().syncs.load(Relaxed);
        assert_eq!(appender.stats().records.load(Relaxed), 256);
        assert!(syncs < 256, "one fsync per append: {syncs}");
        close(appender, thread);
        let (_, recovered, _) = open(dir.path(), Options::default());
        assert_eq!(recovered.records.len(), 256);
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
