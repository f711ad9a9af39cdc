//! The few file-system operations the spool uses, behind a trait so that the tests can put a
//! fault-injecting layer ([`FaultFs`]) between the spool and the disk: short writes, failing
//! `fdatasync`, a disk that fills up (ENOSPC part-way through a record), a free-space reading.

use std::fmt;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// An open file (positional reads and writes; shared with the sync job).
pub trait FsFile: Send + Sync + fmt::Debug {
    /// Writes some of `buf` at `offset`; returns how much (may be less than asked).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;
    /// Reads into `buf` from `offset`; returns how much (0 at the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates (or extends) the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Its length now, bytes.
    fn size(&self) -> io::Result<u64>;
}

/// The folder operations.
pub trait Fs: Send + Sync + fmt::Debug {
    /// Creates the folder and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names in a folder.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Opens a file for reading and writing, creating it if `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn FsFile>>;
    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// `fsync` of a folder (makes created and removed names durable).
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Bytes free for an unprivileged writer on the file system of `dir`.
    fn free_bytes(&self, dir: &Path) -> io::Result<u64>;
}

/// Writes all of `buf` at `offset`, however short the writes.
pub fn write_all_at(f: &dyn FsFile, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match f.write_at(buf, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads until `buf` is full or the file ends; returns how much was read.
pub fn read_full_at(f: &dyn FsFile, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

// === impl RealFs ===

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

#[derive(Debug)]
struct RealFile(std::fs::File);

impl FsFile for RealFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.0.write_at(buf, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

impl Fs for RealFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            if let Some(name) = e?.file_name().to_str() {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn FsFile>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)?;
        Ok(Arc::new(RealFile(f)))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        std::fs::File::open(dir)?.sync_all()
    }
    fn free_bytes(&self, dir: &Path) -> io::Result<u64> {
        let s = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
        Ok(s.f_bavail.saturating_mul(s.f_frsize))
    }
}

// === impl FaultFs ===

/// What [`FaultFs`] does wrong; change it at any time from the test.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every write writes at most this many bytes (0: whole writes).
    pub short_writes: AtomicU32,
    /// The next this many `fdatasync` calls fail with EIO.
    pub failing_syncs: AtomicU32,
    /// Bytes that may still be written before the disk is full (`u64::MAX`: no limit); a
    /// write that crosses it writes up to it and fails with ENOSPC.
    pub space_left: AtomicU64,
    /// What `free_bytes` answers (`u64::MAX`: the real value).
    pub free_bytes: AtomicU64,
    /// Every operation fails with EIO.
    pub dead: AtomicBool,
    /// `fdatasync` calls that succeeded.
    pub syncs: AtomicU64,
    log: Mutex<Vec<String>>,
}

impl Faults {
    /// No faults yet.
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults {
            space_left: AtomicU64::new(u64::MAX),
            free_bytes: AtomicU64::new(u64::MAX),
            ..Faults::default()
        })
    }

    /// The faults injected so far, one line each.
    pub fn injected(&self) -> Vec<String> {
        self.log.lock().expect("fault log").clone()
    }

    fn note(&self, what: String) {
        self.log.lock().expect("fault log").push(what);
    }

    fn check_dead(&self) -> io::Result<()> {
        if self.dead.load(Ordering::Relaxed) {
            self.note("operation on a dead disk".into());
            return Err(io::Error::from_raw_os_error(5));
        }
        Ok(())
    }
}

/// The real file system with [`Faults`] injected.
#[derive(Debug, Clone)]
pub struct FaultFs {
    /// The faults, shared with the test.
    pub faults: Arc<Faults>,
}

#[derive(Debug)]
struct FaultFile {
    inner: Arc<dyn FsFile>,
    faults: Arc<Faults>,
    name: PathBuf,
}

impl FsFile for FaultFile {
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.faults.check_dead()?;
        let mut n = buf.len();
        let short = self.faults.short_writes.load(Ordering::Relaxed) as usize;
        if short > 0 && n > short {
            n = short;
        }
        let left = self.faults.space_left.load(Ordering::Relaxed);
        if left != u64::MAX && n as u64 > left {
            if left > 0 {
                self.inner.write_at(&buf[..left as usize], offset)?;
                self.faults.space_left.store(0, Ordering::Relaxed);
            }
            self.faults.note(format!(
                "ENOSPC writing {} bytes at {offset} of {} ({left} written)",
                buf.len(),
                self.name.display()
            ));
            return Err(io::Error::from_raw_os_error(28));
        }
        let n = self.inner.write_at(&buf[..n], offset)?;
        if left != u64::MAX {
            self.faults
                .space_left
                .store(left - n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.faults.check_dead()?;
        self.inner.read_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.faults.check_dead()?;
        let failing = self.faults.failing_syncs.load(Ordering::Relaxed);
        if failing > 0 {
            self.faults
                .failing_syncs
                .store(failing - 1, Ordering::Relaxed);
            self.faults
                .note(format!("fdatasync of {} failed (EIO)", self.name.display()));
            return Err(io::Error::from_raw_os_error(5));
        }
        self.inner.sync_data()?;
        self.faults.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.faults.check_dead()?;
        self.inner.set_len(len)
    }
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
}

impl Fs for FaultFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.faults.check_dead()?;
        RealFs.create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.faults.check_dead()?;
        RealFs.list(dir)
    }
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn FsFile>> {
        self.faults.check_dead()?;
        Ok(Arc::new(FaultFile {
            inner: RealFs.open(path, create)?,
            faults: self.faults.clone(),
            name: path.to_path_buf(),
        }))
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        self.faults.check_dead()?;
        RealFs.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.faults.check_dead()?;
        RealFs.sync_dir(dir)
    }
    fn free_bytes(&self, dir: &Path) -> io::Result<u64> {
        match self.faults.free_bytes.load(Ordering::Relaxed) {
            u64::MAX => RealFs.free_bytes(dir),
            n => Ok(n),
        }
    }
}
