//! Store and forward: a durable, bounded, crash-safe spool for one route client.
//!
//! A segmented append-only log, written by hand (see `docs/delivery.md` for why no crate
//! fits): segment files named by the sequence number of their first record
//! (`00000000000000000001.seg`), records with a CRC32C each ([`record`]), and a cursor file
//! with two slots written in turn (the head: the oldest record not yet released). Whole
//! segments are deleted once every record in them was released and the cursor saying so is
//! on disk.
//!
//! The route client appends the pipeline's output ([`Spool::append`]), hands records to the
//! target session in order ([`Spool::next_to_send`]) and releases each one when the target
//! acknowledged it ([`Spool::release`]). Writing and `fdatasync` run off the route's task, in
//! a [`SyncJob`] on the blocking pool (group commit: one job writes everything appended since
//! the last one); [`Spool::ack_threshold`] says which records may be acknowledged to the
//! source broker.
//!
//! Recovery ([`Spool::open`]) reads the cursor, deletes released segments, and scans only the
//! last segment: a torn tail is truncated, a corrupt record elsewhere is skipped and counted
//! when it is read. Nothing is loaded into memory but a bounded read-ahead.

pub mod fs;
pub mod record;

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::counters::Histogram;
use crate::model::Message;
use fs::{Fs, FsFile};
use record::Decoded;

/// What to do when the spool holds `maxBytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Stop reading the source (the source broker's own limits apply, as without a spool).
    Block,
    /// Delete the oldest segment (whole records, counted as `full`).
    DropOldest,
}

/// When a source message counts as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Acknowledged after the `fdatasync` that covers it: survives a power loss. Syncs run
    /// back to back, each covering everything appended while the previous one ran.
    Always,
    /// Acknowledged once written to the file (the kernel holds it: survives a crash of the
    /// bridge, not of the machine); `fdatasync` every `syncInterval`.
    Interval,
}

/// The settings of one route client's spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolSettings {
    /// The route client's own folder.
    pub dir: PathBuf,
    /// Most bytes of segment files.
    pub max_bytes: u64,
    /// Records older than this are dropped when their turn to be sent comes (`max_age`).
    pub max_age: Option<Duration>,
    /// What happens at `max_bytes`.
    pub when_full: WhenFull,
    /// When a record counts as stored.
    pub sync: SyncMode,
    /// How often `sync: interval` syncs.
    pub sync_interval: Duration,
    /// Most records sent per second (the drain rate); `None`: unlimited.
    pub rate_messages: Option<u32>,
    /// Most payload bytes sent per second; `None`: unlimited.
    pub rate_bytes: Option<u64>,
    /// Below this much free disk the spool takes nothing more (blocks).
    pub min_free_bytes: u64,
}

impl SpoolSettings {
    /// The defaults for a folder.
    pub fn new(dir: PathBuf) -> SpoolSettings {
        SpoolSettings {
            dir,
            max_bytes: DEFAULT_MAX_BYTES,
            max_age: None,
            when_full: WhenFull::Block,
            sync: SyncMode::Always,
            sync_interval: Duration::from_millis(100),
            rate_messages: None,
            rate_bytes: None,
            min_free_bytes: DEFAULT_MIN_FREE,
        }
    }

    /// Size of one segment file: an eighth of `max_bytes`, between 64 KiB and 64 MiB.
    pub fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(64 * 1024, 64 * 1024 * 1024)
    }
}

/// Default `maxBytes`: 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// Default `minFreeBytes`: 64 MiB.
pub const DEFAULT_MIN_FREE: u64 = 64 * 1024 * 1024;
/// Unsent records kept in memory beyond which they are read back from disk.
const MEMORY_CAP: usize = 4 * 1024 * 1024;
/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 256 * 1024;
/// How often the free disk space is read.
const FREE_CHECK: Duration = Duration::from_secs(1);
/// A cursor alone (no data to sync) is written at most this often.
const CURSOR_INTERVAL: Duration = Duration::from_millis(100);
const CURSOR_FILE: &str = "cursor";
const SLOT: usize = 64;

/// Why records left the spool without being sent; the `reason` label of
/// `edgebridge_spool_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolDrop {
    /// `whenFull: drop-oldest` deleted it to make room.
    Full,
    /// Older than `maxAge` when its turn came.
    MaxAge,
    /// Its MQTT 5 message expiry interval passed while it waited.
    Expired,
    /// Its bytes on disk were damaged (CRC mismatch); skipped.
    Corrupt,
}

impl SpoolDrop {
    /// Every reason, in label order.
    pub const ALL: [SpoolDrop; 4] = [
        SpoolDrop::Full,
        SpoolDrop::MaxAge,
        SpoolDrop::Expired,
        SpoolDrop::Corrupt,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            SpoolDrop::Full => "full",
            SpoolDrop::MaxAge => "max_age",
            SpoolDrop::Expired => "expired",
            SpoolDrop::Corrupt => "corrupt",
        }
    }
}

/// Upper bounds of the fsync-time histogram buckets, seconds.
pub const FSYNC_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5, 2.0,
];

/// The live figures of one spool (read by `/metrics` and `/status`).
#[derive(Debug)]
pub struct SpoolCounters {
    /// The folder.
    pub dir: PathBuf,
    /// Bytes of segment files.
    pub bytes: AtomicU64,
    /// Records not yet released.
    pub messages: AtomicU64,
    /// Unix time (µs) of the oldest record not yet released; 0 when empty.
    pub oldest_us: AtomicU64,
    /// Records appended.
    pub appended: AtomicU64,
    /// Records released (the target acknowledged them).
    pub released: AtomicU64,
    /// Records found in the spool when it was last opened.
    pub recovered: AtomicU64,
    dropped: [AtomicU64; SpoolDrop::ALL.len()],
    /// Time of each `fdatasync` (a job's data and cursor together).
    pub fsync: Histogram,
    /// How long the last recovery took, µs.
    pub recovery_us: AtomicU64,
    /// Bytes of a torn tail cut off at recovery (records written, never synced).
    pub truncated_bytes: AtomicU64,
    /// The error that stopped the spool from writing, until it is open again.
    pub failed: Mutex<Option<String>>,
    /// Times the spool failed.
    pub failures: AtomicU64,
    /// The spool blocks: full (`whenFull: block`) or below `minFreeBytes`.
    pub blocked: std::sync::atomic::AtomicBool,
}

impl SpoolCounters {
    /// Counters of the spool in `dir`.
    pub fn new(dir: PathBuf) -> SpoolCounters {
        SpoolCounters {
            dir,
            bytes: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            oldest_us: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            released: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            dropped: Default::default(),
            fsync: Histogram::new(&FSYNC_BUCKETS),
            recovery_us: AtomicU64::new(0),
            truncated_bytes: AtomicU64::new(0),
            failed: Mutex::new(None),
            failures: AtomicU64::new(0),
            blocked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Records dropped for `reason`.
    pub fn dropped(&self, reason: SpoolDrop) -> u64 {
        self.dropped[reason as usize].load(Ordering::Relaxed)
    }

    fn drop_n(&self, reason: SpoolDrop, n: u64) {
        if n > 0 {
            self.dropped[reason as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The error that stops the spool, if any.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect("spool failure lock").clone()
    }
}

/// Errors of the spool; each names the folder or file.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The folder could not be created, listed or opened.
    #[error("spool {}: cannot open the folder", dir.display())]
    Open {
        /// The folder.
        dir: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The disk is full.
    #[error("spool: the disk is full (ENOSPC) writing {}", file.display())]
    DiskFull {
        /// The file.
        file: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A write failed.
    #[error("spool: writing {} failed", file.display())]
    Write {
        /// The file.
        file: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `fdatasync` failed: what was written since the last sync may not be on disk.
    #[error("spool: fdatasync of {} failed; records since the last sync may not be on disk", file.display())]
    Sync {
        /// The file.
        file: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A read failed.
    #[error("spool: reading {} failed", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn write_error(file: &Path, source: io::Error) -> SpoolError {
    if source.raw_os_error() == Some(28) {
        SpoolError::DiskFull {
            file: file.to_path_buf(),
            source,
        }
    } else {
        SpoolError::Write {
            file: file.to_path_buf(),
            source,
        }
    }
}

/// Where a record is: its segment (by first sequence number) and offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    seg: u64,
    off: u64,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    file: Arc<dyn FsFile>,
    /// Bytes appended (written or buffered).
    len: u64,
    /// Bytes written to the file.
    written: u64,
}

/// A record not yet handed to the target.
#[derive(Debug)]
struct Unsent {
    seq: u64,
    loc: Loc,
    size: usize,
    appended_us: u64,
    msg: Message,
}

/// A record handed to the target and not yet released.
#[derive(Debug)]
struct Flight {
    seq: u64,
    loc: Loc,
    appended_us: u64,
    released: bool,
    /// Payload and topic bytes.
    bytes: usize,
}

/// A record to publish on the target session, with its sequence number as the token.
#[derive(Debug)]
pub struct Out {
    /// Sequence number: release it with this.
    pub seq: u64,
    /// The message (message expiry lowered by the time it waited).
    pub msg: Message,
    /// When it was appended (Unix µs).
    pub appended_us: u64,
}

/// Bytes to write at an offset of a segment file.
#[derive(Debug)]
struct PendingWrite {
    file: Arc<dyn FsFile>,
    path: PathBuf,
    off: u64,
    data: Vec<u8>,
    /// The segment's first sequence number.
    seg: u64,
}

/// Writes, syncs, the cursor and deletions of one group commit, run off the route's task.
#[derive(Debug)]
pub struct SyncJob {
    dir: PathBuf,
    fs: Arc<dyn Fs>,
    writes: Vec<PendingWrite>,
    syncs: Vec<(Arc<dyn FsFile>, PathBuf)>,
    sync_dir: bool,
    cursor: Option<(Arc<dyn FsFile>, u64, [u8; SLOT])>,
    unlink: Vec<PathBuf>,
    end_seq: u64,
    fsync: bool,
    seg_written: Vec<(u64, u64)>,
}

/// What a [`SyncJob`] did.
#[derive(Debug)]
pub struct SyncDone {
    end_seq: u64,
    fsync: bool,
    seg_written: Vec<(u64, u64)>,
    took: Duration,
    result: Result<(), SpoolError>,
    spare: Vec<Vec<u8>>,
}

impl SyncJob {
    /// Does it (blocking).
    pub fn run(self) -> SyncDone {
        let started = Instant::now();
        let mut spare = Vec::new();
        let result = (|| {
            for w in self.writes {
                fs::write_all_at(&*w.file, &w.data, w.off).map_err(|e| write_error(&w.path, e))?;
                spare.push(w.data);
            }
            if self.fsync {
                for (file, path) in &self.syncs {
                    file.sync_data().map_err(|source| SpoolError::Sync {
                        file: path.clone(),
                        source,
                    })?;
                }
                if self.sync_dir {
                    self.fs
                        .sync_dir(&self.dir)
                        .map_err(|source| SpoolError::Sync {
                            file: self.dir.clone(),
                            source,
                        })?;
                }
            }
            if let Some((file, off, slot)) = &self.cursor {
                let path = self.dir.join(CURSOR_FILE);
                fs::write_all_at(&**file, slot, *off).map_err(|e| write_error(&path, e))?;
                file.sync_data()
                    .map_err(|source| SpoolError::Sync { file: path, source })?;
                // Only now that the cursor says so may released segments go.
                for p in &self.unlink {
                    self.fs.remove(p).map_err(|e| write_error(p, e))?;
                }
            }
            Ok(())
        })();
        SyncDone {
            end_seq: self.end_seq,
            fsync: self.fsync,
            seg_written: self.seg_written,
            took: started.elapsed(),
            result,
            spare,
        }
    }
}

/// A token bucket for the drain rate.
#[derive(Debug)]
struct Rate {
    per_s: f64,
    tokens: f64,
    last: Instant,
}

impl Rate {
    fn new(per_s: f64, now: Instant) -> Rate {
        Rate {
            per_s,
            // A burst of at most a tenth of a second.
            tokens: (per_s / 10.0).max(1.0),
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_s).min((self.per_s / 10.0).max(1.0));
    }

    /// Tokens may go into debt by one record: the long-run rate is `per_s` whatever the
    /// record sizes.
    fn ready(&self) -> bool {
        self.tokens > 0.0
    }

    /// How long until [`Rate::ready`].
    fn wait(&self) -> Option<Duration> {
        (!self.ready()).then(|| Duration::from_secs_f64((-self.tokens + 1e-9) / self.per_s))
    }
}

/// The spool of one route client (see the module docs).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    fs: Arc<dyn Fs>,
    s: SpoolSettings,
    counters: Arc<SpoolCounters>,
    segments: VecDeque<Segment>,
    total_bytes: u64,
    next_seq: u64,
    /// Encoded records of the last segment not yet handed to a job, from `buf_off`.
    buf: Vec<u8>,
    buf_off: u64,
    /// Buffered bytes of segments closed since the last job.
    rolled: Vec<PendingWrite>,
    /// Files written since their last `fdatasync`.
    unsynced: Vec<(u64, Arc<dyn FsFile>, PathBuf)>,
    dir_dirty: bool,
    written_seq: u64,
    durable_seq: u64,
    job_running: bool,
    last_fsync: Instant,
    last_cursor: Instant,
    spare: Vec<Vec<u8>>,
    queue: VecDeque<Unsent>,
    queue_bytes: usize,
    /// Records from this one on are on disk only: read them back from here.
    disk: Option<(Loc, u64)>,
    send_seq: u64,
    inflight: VecDeque<Flight>,
    /// Entries of `inflight` not released.
    inflight_unreleased: usize,
    /// Their payload and topic bytes.
    inflight_bytes: usize,
    head_seq: u64,
    cursor_file: Arc<dyn FsFile>,
    cursor_gen: u64,
    cursor_written: (u64, Loc),
    unlink: Vec<PathBuf>,
    free_checked: Option<Instant>,
    low_disk: bool,
    rate_messages: Option<Rate>,
    rate_bytes: Option<Rate>,
    failed: bool,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

/// Reads records sequentially from `file` between `off` and `end`.
struct Scan {
    /// Where the next record starts (or where the unreadable bytes start).
    off: u64,
    /// Corrupt regions skipped.
    corrupt: u64,
    /// Stopped inside a record at the end of the data (a torn tail, or not all written).
    incomplete: bool,
    /// Where the last valid record ends (the start, if none was found).
    valid_end: u64,
}

/// Calls `f` with every valid record between `off` and `end` (stops when `f` returns false);
/// skips corrupt bytes to the next valid record.
fn scan(
    file: &dyn FsFile,
    path: &Path,
    mut off: u64,
    end: u64,
    mut f: impl FnMut(record::Record, u64, usize) -> bool,
) -> Result<Scan, SpoolError> {
    let mut corrupt = 0;
    let mut in_corrupt = false;
    let mut valid_end = off;
    let mut chunk = vec![0u8; READ_CHUNK];
    while off < end {
        let want = ((end - off) as usize).min(chunk.len());
        let n =
            fs::read_full_at(file, &mut chunk[..want], off).map_err(|source| SpoolError::Read {
                file: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            break;
        }
        let data = &chunk[..n];
        let mut p = 0;
        while p < data.len() {
            match record::decode(&data[p..]) {
                Decoded::Record(r, size) => {
                    in_corrupt = false;
                    valid_end = off + (p + size) as u64;
                    if !f(*r, off + p as u64, size) {
                        return Ok(Scan {
                            off: valid_end,
                            corrupt,
                            incomplete: false,
                            valid_end,
                        });
                    }
                    p += size;
                }
                Decoded::Incomplete => {
                    let rest = &data[p..];
                    let need = if rest.len() >= 8 {
                        record::HEADER
                            + u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")) as usize
                    } else {
                        record::HEADER
                    };
                    if off + (p + need) as u64 > end {
                        // Past the end of the data: a torn tail (or not written yet).
                        return Ok(Scan {
                            off: off + p as u64,
                            corrupt,
                            incomplete: true,
                            valid_end,
                        });
                    }
                    if need > chunk.len() {
                        chunk.resize(need, 0);
                    }
                    break;
                }
                Decoded::Corrupt => {
                    if !in_corrupt {
                        corrupt += 1;
                        in_corrupt = true;
                    }
                    match record::next_candidate(&data[p..]) {
                        Some(i) => p += i,
                        None => p = data.len(),
                    }
                }
            }
        }
        off += p as u64;
        if p == 0 && n < want {
            break;
        }
    }
    Ok(Scan {
        off,
        corrupt,
        incomplete: false,
        valid_end,
    })
}

fn encode_slot(generation: u64, head_seq: u64, loc: Loc) -> [u8; SLOT] {
    let mut s = [0u8; SLOT];
    s[0..8].copy_from_slice(&generation.to_le_bytes());
    s[8..16].copy_from_slice(&head_seq.to_le_bytes());
    s[16..24].copy_from_slice(&loc.seg.to_le_bytes());
    s[24..32].copy_from_slice(&loc.off.to_le_bytes());
    let crc = crc32c::crc32c(&s[0..32]);
    s[32..36].copy_from_slice(&crc.to_le_bytes());
    s
}

fn decode_slot(s: &[u8]) -> Option<(u64, u64, Loc)> {
    let u = |r: std::ops::Range<usize>| u64::from_le_bytes(s[r].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(s[32..36].try_into().expect("4 bytes"));
    if crc32c::crc32c(&s[0..32]) != crc || u(0..8) == 0 {
        return None;
    }
    Some((
        u(0..8),
        u(8..16),
        Loc {
            seg: u(16..24),
            off: u(24..32),
        },
    ))
}

impl Spool {
    /// Opens (creating or recovering) the spool in `settings.dir`.
    pub fn open(
        settings: SpoolSettings,
        fs: Arc<dyn Fs>,
        counters: Arc<SpoolCounters>,
    ) -> Result<Spool, SpoolError> {
        let started = Instant::now();
        let dir = settings.dir.clone();
        let open_err = |source| SpoolError::Open {
            dir: dir.clone(),
            source,
        };
        fs.create_dir_all(&dir).map_err(open_err)?;
        let mut firsts: Vec<u64> = fs
            .list(&dir)
            .map_err(open_err)?
            .iter()
            .filter_map(|n| n.strip_suffix(".seg")?.parse().ok())
            .collect();
        firsts.sort_unstable();
        let cursor_path = dir.join(CURSOR_FILE);
        let cursor_file = fs.open(&cursor_path, true).map_err(open_err)?;
        let mut slots = [0u8; 2 * SLOT];
        let got =
            fs::read_full_at(&*cursor_file, &mut slots, 0).map_err(|source| SpoolError::Read {
                file: cursor_path.clone(),
                source,
            })?;
        let cursor = [&slots[..SLOT], &slots[SLOT..]]
            .into_iter()
            .filter(|s| got >= SLOT && s.len() == SLOT)
            .filter_map(decode_slot)
            .max_by_key(|c| c.0);
        let (cursor_gen, mut head_seq, mut head_loc) = match cursor {
            Some((g, h, l)) => (g, h, Some(l)),
            None => (0, firsts.first().copied().unwrap_or(1), None),
        };
        // Segments whose every record is before the head were released: delete them.
        // The cursor file may be new: its name is made durable with the first sync.
        let mut dir_dirty = true;
        while firsts.len() > 1 && firsts[1] <= head_seq {
            fs.remove(&dir.join(segment_name(firsts[0])))
                .map_err(|e| write_error(&dir.join(segment_name(firsts[0])), e))?;
            firsts.remove(0);
            dir_dirty = true;
        }
        if firsts.is_empty() {
            firsts.push(head_seq.max(1));
        }
        if firsts[0] > head_seq {
            // The cursor is older than the files (or lost): start at the first record there.
            head_seq = firsts[0];
            head_loc = None;
        }
        let mut segments = VecDeque::new();
        for (i, &first) in firsts.iter().enumerate() {
            let path = dir.join(segment_name(first));
            let last = i + 1 == firsts.len();
            let file = fs.open(&path, last).map_err(open_err)?;
            let len = file.size().map_err(|source| SpoolError::Read {
                file: path.clone(),
                source,
            })?;
            segments.push_back(Segment {
                first_seq: first,
                path,
                file,
                len,
                written: len,
            });
        }
        // The last segment: find where its valid records end; a torn tail is cut off.
        let last = segments.back_mut().expect("at least one segment");
        let mut next_seq = last.first_seq;
        let scanned = scan(&*last.file, &last.path, 0, last.len, |r, _, _| {
            next_seq = next_seq.max(r.seq + 1);
            true
        })?;
        let cut = scanned.valid_end;
        if cut < last.len {
            counters
                .truncated_bytes
                .fetch_add(last.len - cut, Ordering::Relaxed);
            tracing::warn!(
                file = %last.path.display(),
                "Spool recovery: cut a torn tail of {} bytes (records written but not synced before the bridge stopped)",
                last.len - cut
            );
            last.file
                .set_len(cut)
                .map_err(|e| write_error(&last.path, e))?;
            last.file.sync_data().map_err(|source| SpoolError::Sync {
                file: last.path.clone(),
                source,
            })?;
            last.len = cut;
            last.written = cut;
        }
        if scanned.corrupt > 0 {
            tracing::warn!(file = %last.path.display(), "Spool recovery: {} corrupt region(s) in the last segment; their records are skipped and counted when their turn comes", scanned.corrupt);
        }
        head_seq = head_seq.min(next_seq);
        // Check the cursor's position; find the head by scanning its segment otherwise.
        let head_loc = match head_loc {
            Some(l) if Self::record_at(&segments, l).is_some_and(|s| s == head_seq) => l,
            _ => Self::find(&segments, head_seq)?,
        };
        let total_bytes = segments.iter().map(|s| s.len).sum();
        let last = segments.back().expect("at least one segment");
        let buf_off = last.len;
        let mut spool = Spool {
            dir: dir.clone(),
            fs,
            counters,
            segments,
            total_bytes,
            next_seq,
            buf: Vec::new(),
            buf_off,
            rolled: Vec::new(),
            unsynced: Vec::new(),
            dir_dirty,
            written_seq: next_seq,
            durable_seq: next_seq,
            job_running: false,
            last_fsync: Instant::now(),
            last_cursor: Instant::now(),
            spare: Vec::new(),
            queue: VecDeque::new(),
            queue_bytes: 0,
            disk: (head_seq < next_seq).then_some((head_loc, head_seq)),
            send_seq: head_seq,
            inflight: VecDeque::new(),
            inflight_unreleased: 0,
            inflight_bytes: 0,
            head_seq,
            cursor_file,
            cursor_gen,
            cursor_written: (head_seq, head_loc),
            unlink: Vec::new(),
            free_checked: None,
            low_disk: false,
            rate_messages: settings
                .rate_messages
                .map(|r| Rate::new(f64::from(r), Instant::now())),
            rate_bytes: settings
                .rate_bytes
                .map(|r| Rate::new(r as f64, Instant::now())),
            s: settings,
            failed: false,
        };
        spool
            .counters
            .recovered
            .store(next_seq - head_seq, Ordering::Relaxed);
        spool.read_ahead()?;
        spool.publish_gauges();
        spool
            .counters
            .recovery_us
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        *spool.counters.failed.lock().expect("spool failure lock") = None;
        Ok(spool)
    }

    /// The sequence number of the record at `loc`, if one is there.
    fn record_at(segments: &VecDeque<Segment>, loc: Loc) -> Option<u64> {
        let seg = segments.iter().find(|s| s.first_seq == loc.seg)?;
        let mut seq = None;
        scan(&*seg.file, &seg.path, loc.off, seg.len, |r, at, _| {
            if at == loc.off {
                seq = Some(r.seq);
            }
            false
        })
        .ok()?;
        seq
    }

    /// Where the first record with a sequence number of `seq` or more is.
    fn find(segments: &VecDeque<Segment>, seq: u64) -> Result<Loc, SpoolError> {
        let i = segments
            .iter()
            .rposition(|s| s.first_seq <= seq)
            .unwrap_or(0);
        for seg in segments.iter().skip(i) {
            let mut found = None;
            scan(&*seg.file, &seg.path, 0, seg.len, |r, at, _| {
                if r.seq >= seq {
                    found = Some(at);
                    return false;
                }
                true
            })?;
            if let Some(off) = found {
                return Ok(Loc {
                    seg: seg.first_seq,
                    off,
                });
            }
        }
        let last = segments.back().expect("at least one segment");
        Ok(Loc {
            seg: last.first_seq,
            off: last.len,
        })
    }

    /// The counters.
    pub fn counters(&self) -> &Arc<SpoolCounters> {
        &self.counters
    }

    /// The settings.
    pub fn settings(&self) -> &SpoolSettings {
        &self.s
    }

    /// Whether the spool takes more records now (it is not failed, and not full with
    /// `whenFull: block`, and the disk is not below `minFreeBytes`).
    pub fn has_room(&mut self) -> bool {
        if self.failed {
            return false;
        }
        let now = Instant::now();
        if self
            .free_checked
            .is_none_or(|t| now.duration_since(t) >= FREE_CHECK)
        {
            self.free_checked = Some(now);
            let low = self
                .fs
                .free_bytes(&self.dir)
                .is_ok_and(|free| free < self.s.min_free_bytes);
            if low && !self.low_disk {
                tracing::error!(dir = %self.dir.display(), "The spool's disk has less than minFreeBytes ({} bytes) free: the route stops reading its source until there is room", self.s.min_free_bytes);
            }
            self.low_disk = low;
        }
        let full = self.s.when_full == WhenFull::Block && self.total_bytes >= self.s.max_bytes;
        let blocked = full || self.low_disk;
        self.counters.blocked.store(blocked, Ordering::Relaxed);
        !blocked
    }

    /// Appends a record of `msg`; returns its sequence number.
    pub fn append(&mut self, msg: &Message) -> u64 {
        let seq = self.next_seq;
        let appended_us = now_us();
        let seg_bytes = self.s.segment_bytes();
        let start = self.buf.len();
        let size = record::encode(seq, appended_us, msg, &mut self.buf);
        let last = self.segments.back().expect("at least one segment");
        if last.len > 0 && last.len + size as u64 > seg_bytes {
            // Roll: the record goes to a new segment.
            let rec: Vec<u8> = self.buf[start..].to_vec();
            self.buf.truncate(start);
            if let Err(e) = self.roll(seq) {
                self.fail(e);
                return seq;
            }
            self.buf.extend_from_slice(&rec);
        }
        let last = self.segments.back_mut().expect("at least one segment");
        let loc = Loc {
            seg: last.first_seq,
            off: last.len,
        };
        last.len += size as u64;
        self.total_bytes += size as u64;
        self.next_seq += 1;
        self.counters.appended.fetch_add(1, Ordering::Relaxed);
        if self.disk.is_none() && self.queue_bytes < MEMORY_CAP {
            self.queue_bytes += size;
            self.queue.push_back(Unsent {
                seq,
                loc,
                size,
                appended_us,
                msg: msg.clone(),
            });
        } else if self.disk.is_none() {
            self.disk = Some((loc, seq));
        }
        if self.s.when_full == WhenFull::DropOldest {
            while self.total_bytes > self.s.max_bytes && self.segments.len() > 1 {
                self.drop_oldest();
            }
        }
        seq
    }

    fn roll(&mut self, first_seq: u64) -> Result<(), SpoolError> {
        let path = self.dir.join(segment_name(first_seq));
        let file = self
            .fs
            .open(&path, true)
            .map_err(|e| write_error(&path, e))?;
        let old = self.segments.back().expect("at least one segment");
        let data = std::mem::replace(&mut self.buf, self.spare.pop().unwrap_or_default());
        self.rolled.push(PendingWrite {
            file: old.file.clone(),
            path: old.path.clone(),
            off: self.buf_off,
            data,
            seg: old.first_seq,
        });
        self.buf_off = 0;
        self.segments.push_back(Segment {
            first_seq,
            path,
            file,
            len: 0,
            written: 0,
        });
        self.dir_dirty = true;
        Ok(())
    }

    /// Deletes the oldest segment; its records not yet sent are counted as dropped (`full`).
    fn drop_oldest(&mut self) {
        let seg = self.segments.pop_front().expect("more than one segment");
        let end = self.segments.front().expect("a next segment").first_seq;
        let lost = end.saturating_sub(self.send_seq.max(seg.first_seq));
        self.counters.drop_n(SpoolDrop::Full, lost);
        if lost > 0 {
            tracing::warn!(dir = %self.dir.display(), "The spool is full (maxBytes {}): dropped its {lost} oldest records (whenFull: drop-oldest)", self.s.max_bytes);
        }
        self.total_bytes -= seg.len;
        self.send_seq = self.send_seq.max(end);
        while self.queue.front().is_some_and(|u| u.seq < end) {
            let u = self.queue.pop_front().expect("just seen");
            self.queue_bytes -= u.size;
        }
        // Records of it in flight stay with the target session and are released (and
        // counted) when it acknowledges them; the cursor may meanwhile point into the deleted
        // segment, which recovery handles as a cursor older than the files.
        if let Some((loc, seq)) = self.disk
            && loc.seg == seg.first_seq
        {
            self.disk = Some((Loc { seg: end, off: 0 }, seq.max(end)));
        }
        self.rolled.retain(|r| r.seg != seg.first_seq);
        self.unsynced.retain(|u| u.0 != seg.first_seq);
        self.unlink.push(seg.path);
        self.advance_head();
    }

    /// Reads records from disk into the queue, up to the memory cap.
    fn read_ahead(&mut self) -> Result<(), SpoolError> {
        while self.queue_bytes < MEMORY_CAP {
            let Some((loc, expected)) = self.disk else {
                return Ok(());
            };
            let Some(i) = self.segments.iter().position(|s| s.first_seq == loc.seg) else {
                // Its segment was dropped: go on at the first one.
                let first = self.segments.front().expect("at least one segment");
                self.disk = Some((
                    Loc {
                        seg: first.first_seq,
                        off: 0,
                    },
                    expected.max(first.first_seq),
                ));
                continue;
            };
            let seg = &self.segments[i];
            let is_last = i + 1 == self.segments.len();
            if loc.off >= seg.written {
                if is_last || seg.written < seg.len {
                    // The rest is not written yet (or nothing more).
                    if is_last && expected >= self.next_seq {
                        self.disk = None;
                    }
                    return Ok(());
                }
                let next = self.segments[i + 1].first_seq;
                self.count_corrupt_gap(expected, next);
                self.disk = Some((Loc { seg: next, off: 0 }, expected.max(next)));
                continue;
            }
            let (file, path, end) = (seg.file.clone(), seg.path.clone(), seg.written);
            let budget = MEMORY_CAP - self.queue_bytes;
            let mut got = Vec::new();
            let mut taken = 0usize;
            let scanned = scan(&*file, &path, loc.off, end, |r, at, size| {
                taken += size;
                got.push((r, at, size));
                taken < budget.min(READ_CHUNK)
            })?;
            let mut expected = expected;
            for (r, at, size) in got {
                if r.seq < expected {
                    continue;
                }
                self.count_corrupt_gap(expected, r.seq);
                expected = r.seq + 1;
                self.queue_bytes += size;
                self.queue.push_back(Unsent {
                    seq: r.seq,
                    loc: Loc {
                        seg: loc.seg,
                        off: at,
                    },
                    size,
                    appended_us: r.appended_us,
                    msg: r.msg,
                });
            }
            let next_off = scanned.off;
            if scanned.incomplete && (!is_last && seg_fully_written(&self.segments[i])) {
                // A damaged tail inside an older segment: go on with the next.
                let next = self.segments[i + 1].first_seq;
                self.count_corrupt_gap(expected, next);
                self.disk = Some((Loc { seg: next, off: 0 }, expected.max(next)));
                continue;
            }
            if next_off == loc.off && !scanned.incomplete {
                // Nothing readable was left before `end`: all of it was corrupt.
                self.disk = Some((
                    Loc {
                        seg: loc.seg,
                        off: end,
                    },
                    expected,
                ));
                continue;
            }
            self.disk = Some((
                Loc {
                    seg: loc.seg,
                    off: next_off,
                },
                expected,
            ));
            if scanned.incomplete {
                return Ok(());
            }
        }
        Ok(())
    }

    fn count_corrupt_gap(&mut self, expected: u64, next: u64) {
        if next > expected {
            let n = next - expected;
            self.counters.drop_n(SpoolDrop::Corrupt, n);
            tracing::error!(dir = %self.dir.display(), "Spool: {n} record(s) from sequence number {expected} were damaged on disk (CRC mismatch) and are skipped");
            // They count as handed out and released.
            self.send_seq = self.send_seq.max(next);
        }
    }

    /// The next record to publish on the target, if one is there and the drain rate allows.
    pub fn next_to_send(&mut self) -> Result<Option<Out>, SpoolError> {
        let now = Instant::now();
        loop {
            if self.queue.is_empty() && self.disk.is_some() {
                self.read_ahead()?;
            }
            let Some(front) = self.queue.front() else {
                return Ok(None);
            };
            let _ = front;
            for r in [&mut self.rate_messages, &mut self.rate_bytes]
                .into_iter()
                .flatten()
            {
                r.refill(now);
                if !r.ready() {
                    return Ok(None);
                }
            }
            let u = self.queue.pop_front().expect("just seen");
            self.queue_bytes -= u.size;
            self.send_seq = u.seq + 1;
            let mut msg = u.msg;
            let waited_us = now_us().saturating_sub(u.appended_us);
            let drop = if self
                .s
                .max_age
                .is_some_and(|a| waited_us > a.as_micros() as u64)
            {
                Some(SpoolDrop::MaxAge)
            } else if let Some(e) = msg.properties.message_expiry {
                let waited = waited_us / 1_000_000;
                if waited >= u64::from(e) {
                    Some(SpoolDrop::Expired)
                } else {
                    msg.properties.message_expiry = Some(e - waited as u32);
                    None
                }
            } else {
                None
            };
            let bytes = msg.payload.len() + msg.topic.len();
            self.inflight.push_back(Flight {
                seq: u.seq,
                loc: u.loc,
                appended_us: u.appended_us,
                released: drop.is_some(),
                bytes,
            });
            if drop.is_none() {
                self.inflight_unreleased += 1;
                self.inflight_bytes += bytes;
            }
            if let Some(reason) = drop {
                self.counters.drop_n(reason, 1);
                self.advance_head();
                continue;
            }
            if let Some(r) = &mut self.rate_messages {
                r.tokens -= 1.0;
            }
            if let Some(r) = &mut self.rate_bytes {
                r.tokens -= msg.payload.len().max(1) as f64;
            }
            return Ok(Some(Out {
                seq: u.seq,
                msg,
                appended_us: u.appended_us,
            }));
        }
    }

    /// When the drain rate lets the next record go (`None`: now, or nothing waits).
    pub fn next_send_at(&self) -> Option<Instant> {
        self.queue.front()?;
        let m = self.rate_messages.as_ref().and_then(Rate::wait);
        let b = self.rate_bytes.as_ref().and_then(Rate::wait);
        let wait = m.max(b)?;
        Some(Instant::now() + wait.max(Duration::from_millis(1)))
    }

    /// The target acknowledged (or refused) the record `seq`: it leaves the spool. Returns
    /// when it was appended (Unix µs), unless it was released already.
    pub fn release(&mut self, seq: u64) -> Option<u64> {
        let i = self.inflight.binary_search_by_key(&seq, |f| f.seq).ok()?;
        let f = &mut self.inflight[i];
        if f.released {
            return None;
        }
        f.released = true;
        self.inflight_unreleased -= 1;
        self.inflight_bytes -= f.bytes;
        let appended_us = f.appended_us;
        self.counters.released.fetch_add(1, Ordering::Relaxed);
        if i == 0 {
            self.advance_head();
        }
        Some(appended_us)
    }

    /// Nothing waits to be written or synced, and the cursor on disk is current.
    pub fn idle(&self) -> bool {
        self.buf.is_empty()
            && self.rolled.is_empty()
            && self.unsynced.is_empty()
            && self.unlink.is_empty()
            && self.cursor_written.0 == self.head_seq
    }

    fn advance_head(&mut self) {
        while self.inflight.front().is_some_and(|f| f.released) {
            self.inflight.pop_front();
        }
        let head = self
            .inflight
            .front()
            .map(|f| f.seq)
            .unwrap_or(self.send_seq);
        if head <= self.head_seq {
            return;
        }
        self.head_seq = head;
        while self.segments.len() > 1 && self.segments[1].first_seq <= self.head_seq {
            let seg = self.segments.pop_front().expect("more than one");
            self.total_bytes -= seg.len;
            self.rolled.retain(|r| r.seg != seg.first_seq);
            self.unsynced.retain(|u| u.0 != seg.first_seq);
            self.unlink.push(seg.path);
        }
    }

    fn head_loc(&self) -> Loc {
        if let Some(f) = self.inflight.front() {
            return f.loc;
        }
        if let Some(u) = self.queue.front() {
            return u.loc;
        }
        if let Some((loc, _)) = self.disk {
            return loc;
        }
        let last = self.segments.back().expect("at least one segment");
        Loc {
            seg: last.first_seq,
            off: last.len,
        }
    }

    /// Records handed to the target and not yet released.
    pub fn in_flight(&self) -> usize {
        self.inflight_unreleased
    }

    /// Payload and topic bytes of the records in flight.
    pub fn in_flight_bytes(&self) -> usize {
        self.inflight_bytes
    }

    /// Whether every record was released.
    pub fn is_empty(&self) -> bool {
        self.head_seq >= self.next_seq
    }

    /// Records below this sequence number are stored as the sync mode promises: their source
    /// messages may be acknowledged.
    pub fn ack_threshold(&self) -> u64 {
        match self.s.sync {
            SyncMode::Always => self.durable_seq,
            SyncMode::Interval => self.written_seq,
        }
    }

    /// Whether a job is running.
    pub fn job_running(&self) -> bool {
        self.job_running
    }

    /// When a job will be due although nothing asks for one sooner (the sync interval, or the
    /// cursor's); `None`: nothing waits.
    pub fn job_due_at(&self) -> Option<Instant> {
        if self.failed {
            return None;
        }
        let cursor_dirty = self.cursor_written.0 != self.head_seq || !self.unlink.is_empty();
        let mut at: Option<Instant> = None;
        if !self.unsynced.is_empty() && self.s.sync == SyncMode::Interval {
            at = Some(self.last_fsync + self.s.sync_interval);
        }
        if cursor_dirty {
            let c = self.last_cursor + CURSOR_INTERVAL;
            at = Some(at.map_or(c, |a| a.min(c)));
        }
        at
    }

    /// The next group commit, if one is due (and none runs): everything appended since the
    /// last job, `fdatasync` as the sync mode says, and the cursor when it moved.
    pub fn begin_job(&mut self, force_sync: bool) -> Option<SyncJob> {
        if self.job_running || self.failed {
            return None;
        }
        let now = Instant::now();
        let has_writes = !self.buf.is_empty() || !self.rolled.is_empty();
        let cursor_dirty = self.cursor_written.0 != self.head_seq || !self.unlink.is_empty();
        let fsync = match self.s.sync {
            SyncMode::Always => has_writes || (force_sync && !self.unsynced.is_empty()),
            SyncMode::Interval => {
                (has_writes || !self.unsynced.is_empty())
                    && (force_sync || now.duration_since(self.last_fsync) >= self.s.sync_interval)
            }
        };
        let cursor = cursor_dirty
            && (fsync || force_sync || now.duration_since(self.last_cursor) >= CURSOR_INTERVAL);
        if !has_writes && !fsync && !cursor {
            return None;
        }
        let mut writes = Vec::new();
        let mut seg_written = Vec::new();
        for w in self.rolled.drain(..) {
            seg_written.push((w.seg, w.off + w.data.len() as u64));
            if !self.unsynced.iter().any(|u| u.0 == w.seg) {
                self.unsynced.push((w.seg, w.file.clone(), w.path.clone()));
            }
            writes.push(w);
        }
        if !self.buf.is_empty() {
            let last = self.segments.back().expect("at least one segment");
            let data = std::mem::replace(&mut self.buf, self.spare.pop().unwrap_or_default());
            let off = self.buf_off;
            self.buf_off += data.len() as u64;
            seg_written.push((last.first_seq, self.buf_off));
            if !self.unsynced.iter().any(|u| u.0 == last.first_seq) {
                self.unsynced
                    .push((last.first_seq, last.file.clone(), last.path.clone()));
            }
            writes.push(PendingWrite {
                file: last.file.clone(),
                path: last.path.clone(),
                off,
                data,
                seg: last.first_seq,
            });
        }
        let syncs = if fsync {
            self.unsynced.drain(..).map(|(_, f, p)| (f, p)).collect()
        } else {
            Vec::new()
        };
        let sync_dir = fsync && std::mem::take(&mut self.dir_dirty);
        let (cursor, unlink) = if cursor {
            self.cursor_gen += 1;
            let loc = self.head_loc();
            let slot = encode_slot(self.cursor_gen, self.head_seq, loc);
            self.cursor_written = (self.head_seq, loc);
            self.last_cursor = now;
            (
                Some((
                    self.cursor_file.clone(),
                    (self.cursor_gen % 2) * SLOT as u64,
                    slot,
                )),
                std::mem::take(&mut self.unlink),
            )
        } else {
            (None, Vec::new())
        };
        if fsync {
            self.last_fsync = now;
        }
        self.job_running = true;
        Some(SyncJob {
            dir: self.dir.clone(),
            fs: self.fs.clone(),
            writes,
            syncs,
            sync_dir,
            cursor,
            unlink,
            end_seq: self.next_seq,
            fsync,
            seg_written,
        })
    }

    /// A job finished; an error stops the spool (see [`Spool::failed`]).
    pub fn finish_job(&mut self, done: SyncDone) -> Result<(), SpoolError> {
        self.job_running = false;
        self.spare.extend(done.spare.into_iter().map(|mut b| {
            b.clear();
            b
        }));
        self.spare.truncate(4);
        if let Err(e) = done.result {
            self.fail_message(&e);
            return Err(e);
        }
        for (first, w) in done.seg_written {
            if let Some(s) = self.segments.iter_mut().find(|s| s.first_seq == first) {
                s.written = s.written.max(w);
            }
        }
        self.written_seq = self.written_seq.max(done.end_seq);
        if done.fsync {
            self.durable_seq = self.durable_seq.max(done.end_seq);
            self.counters.fsync.observe(done.took);
        }
        if self.disk.is_some() {
            self.read_ahead()?;
        }
        self.publish_gauges();
        Ok(())
    }

    fn fail(&mut self, e: SpoolError) {
        self.fail_message(&e);
    }

    fn fail_message(&mut self, e: &SpoolError) {
        self.failed = true;
        let text = crate::error::chain(e);
        tracing::error!(dir = %self.dir.display(), "{text}: the route stops reading its source; nothing more is acknowledged until the spool is open again");
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        *self.counters.failed.lock().expect("spool failure lock") = Some(text);
    }

    /// Whether a write or sync failed: the spool takes and acknowledges nothing more; open
    /// it again to recover.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Updates the gauges in the counters.
    pub fn publish_gauges(&self) {
        let c = &self.counters;
        c.bytes.store(self.total_bytes, Ordering::Relaxed);
        // Handed out and not released, and not handed out yet (dropped records moved
        // `send_seq` past them).
        let unreleased =
            self.inflight_unreleased as u64 + self.next_seq.saturating_sub(self.send_seq);
        c.messages.store(unreleased, Ordering::Relaxed);
        let oldest = self
            .inflight
            .iter()
            .find(|f| !f.released)
            .map(|f| f.appended_us)
            .or_else(|| self.queue.front().map(|u| u.appended_us))
            .unwrap_or(0);
        c.oldest_us.store(oldest, Ordering::Relaxed);
    }
}

fn seg_fully_written(s: &Segment) -> bool {
    s.written >= s.len
}

#[cfg(test)]
mod tests;
