//! A plugin's `state` (0.1.0 `kv`) kept across a restart of the bridge, in the spool's
//! directory of its route: one file per (plugin, route), written whole to a temporary file,
//! synced and renamed over the last one, so that a crash leaves the old file or the new one,
//! never half of either. What changed since the last save is lost with a crash (the bridge
//! saves every [`SAVE_EVERY`] and at a clean stop).
//!
//! Written by hand: the format is a list of (key, value, expiry) records and a checksum, a
//! few dozen lines; an embedded database (sled, redb) would be a second storage engine beside
//! the spool for a file that is always read and written whole.
//!
//! Layout (little-endian): `EBKV` `1` (format version, u8), the plugin's `state-format`
//! (u8 0 = none, 1 = a u32 follows), the record count (u32), then per record the key length
//! (u32), the key (UTF-8), the value length (u32), the value, the expiry (u64 Unix ms, 0 =
//! none); last, the CRC-32C of everything before it (u32).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::KvStore;

/// How often the bridge saves the states that changed.
pub const SAVE_EVERY: Duration = Duration::from_secs(5);

const MAGIC: &[u8; 4] = b"EBKV";
const VERSION: u8 = 1;
/// Largest state file read back (a policy's `kv.maxBytes` is far below it).
const MAX_FILE: u64 = 256 << 20;

/// Why a state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// Reading or writing the file failed.
    #[error("plugin state file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a state file this version wrote, or it is damaged.
    #[error("plugin state file {path}: {what}; starting with empty state")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// The file's bytes for `kv`.
pub fn encode(kv: &KvStore) -> Vec<u8> {
    let mut out = Vec::with_capacity(kv.bytes() + 16 * kv.len() + 16);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    match kv.format {
        None => out.push(0),
        Some(f) => {
            out.push(1);
            out.extend_from_slice(&f.to_le_bytes());
        }
    }
    let mut entries: Vec<_> = kv.map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for (k, (v, exp)) in entries {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v);
        out.extend_from_slice(&exp.unwrap_or(0).to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The state in `bytes` (pure); `Err` names what is wrong.
pub fn decode(bytes: &[u8]) -> Result<KvStore, String> {
    let body_len = bytes
        .len()
        .checked_sub(4)
        .ok_or_else(|| "shorter than its checksum".to_string())?;
    let (body, crc) = bytes.split_at(body_len);
    if crc32c::crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return Err("checksum mismatch (damaged or cut short)".into());
    }
    let mut r = Reader { b: body, at: 0 };
    if r.take(4)? != MAGIC {
        return Err("not an edgebridge state file".into());
    }
    let version = r.take(1)?[0];
    if version != VERSION {
        return Err(format!(
            "format version {version}, this bridge reads {VERSION}"
        ));
    }
    let mut kv = KvStore {
        format: match r.take(1)?[0] {
            0 => None,
            1 => Some(r.u32()?),
            other => return Err(format!("state-format tag {other}")),
        },
        ..KvStore::default()
    };
    let count = r.u32()?;
    for _ in 0..count {
        let klen = r.u32()? as usize;
        let key = std::str::from_utf8(r.take(klen)?)
            .map_err(|_| "a key is not UTF-8".to_string())?
            .to_string();
        let vlen = r.u32()? as usize;
        let value = r.take(vlen)?.to_vec();
        let exp = u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
        kv.bytes += key.len() + value.len();
        kv.map.insert(key, (value, (exp != 0).then_some(exp)));
    }
    if r.at != body.len() {
        return Err("bytes after the last record".into());
    }
    Ok(kv)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| "a record runs past the end".to_string())?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
}

/// Reads the state saved at `path`: `Ok(None)` when there is none yet.
pub fn load(path: &Path) -> Result<Option<KvStore>, PersistError> {
    let io = |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut bytes = Vec::new();
    use std::io::Read;
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(PersistError::Damaged {
            path: path.to_path_buf(),
            what: format!("larger than {} MiB", MAX_FILE >> 20),
        });
    }
    decode(&bytes)
        .map(Some)
        .map_err(|what| PersistError::Damaged {
            path: path.to_path_buf(),
            what,
        })
}

/// Writes `bytes` to `path` whole: a temporary file beside it, synced, renamed over it, and
/// the folder synced; the folder is created first.
pub fn save(path: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let io = |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = path.with_extension("kv.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_data().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// The state file of `plugin` on `route` under a spool folder: a folder per route, a file per
/// plugin.
pub fn file_for(spool_base: &Path, route: &str, plugin: &str) -> PathBuf {
    use crate::config::file_name;
    spool_base
        .join("plugin-state")
        .join(file_name(route))
        .join(format!("{}.kv", file_name(plugin)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugin::host::KvQuota;

    fn sample() -> KvStore {
        let mut kv = KvStore {
            format: Some(7),
            ..KvStore::default()
        };
        let q = KvQuota {
            granted: true,
            max_keys: 100,
            max_bytes: 1 << 20,
        };
        kv.set("a/b".into(), b"20.5".to_vec(), None, 0, q).unwrap();
        kv.set("ünï".into(), vec![0, 255, 7], Some(1_900_000_000_000), 0, q)
            .unwrap();
        kv.set("empty".into(), Vec::new(), None, 0, q).unwrap();
        kv
    }

    #[test]
    fn a_state_round_trips_with_its_format_expiries_and_byte_count() {
        let kv = sample();
        let mut back = decode(&encode(&kv)).unwrap();
        assert_eq!(back.format, Some(7));
        assert_eq!(back.len(), 3);
        assert_eq!(back.bytes(), kv.bytes());
        assert_eq!(back.get("a/b", 1), Some(b"20.5".to_vec()));
        assert_eq!(back.get("ünï", 1), Some(vec![0, 255, 7]));
        // The expiry came back: past it, the key is gone.
        assert_eq!(back.get("ünï", 1_900_000_000_000), None);
        let none = decode(&encode(&KvStore::default())).unwrap();
        assert_eq!((none.format, none.len()), (None, 0));
    }

    #[test]
    fn every_damaged_byte_and_every_cut_is_refused() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "byte {i} flipped was accepted");
        }
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "cut at {n} was accepted");
        }
    }

    #[test]
    fn a_missing_file_is_no_state_and_a_damaged_one_says_which() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_for(dir.path(), "up/1", "deadband");
        assert!(path.ends_with("plugin-state/up_1/deadband.kv"));
        assert!(load(&path).unwrap().is_none());
        save(&path, &encode(&sample())).unwrap();
        assert_eq!(load(&path).unwrap().unwrap().len(), 3);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, bytes).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("up_1/deadband.kv") && e.contains("checksum"),
            "{e}"
        );
    }

    #[test]
    fn a_save_that_fails_leaves_the_last_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_for(dir.path(), "r", "p");
        save(&path, &encode(&sample())).unwrap();
        // The temporary file's name taken by a folder: the write fails before the rename.
        std::fs::create_dir(path.with_extension("kv.tmp")).unwrap();
        let mut other = sample();
        other.clear();
        assert!(save(&path, &encode(&other)).is_err());
        assert_eq!(load(&path).unwrap().unwrap().len(), 3);
    }
}
