//! The spool through the real file system and through [`FaultFs`]: short writes, failing
//! `fdatasync`, a disk that fills up part-way through a record, torn and damaged records.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::fs::{FaultFs, Faults, RealFs};
use super::*;
use crate::model::{Props, QoS};

fn msg(i: u64) -> Message {
    Message {
        topic: format!("t/{i}").into(),
        payload: Bytes::from(format!("payload {i}")),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Props::default(),
    }
}

/// Syncs, closes and opens the spool again: nothing is left to send.
fn assert_reopens_empty(mut sp: Spool, s: &SpoolSettings) {
    sync(&mut sp).unwrap();
    drop(sp);
    let mut sp = open(s);
    assert_eq!(drain(&mut sp), Vec::<u64>::new());
}

/// Message `i` with a 10 KB payload.
fn big(i: u64) -> Message {
    Message {
        payload: Bytes::from(vec![b'x'; 10_000]),
        ..msg(i)
    }
}

/// Sends and releases `n` records.
fn release(sp: &mut Spool, n: usize) {
    for _ in 0..n {
        let o = sp.next_to_send().unwrap().unwrap();
        sp.release(o.seq);
    }
}

fn settings(dir: &Path) -> SpoolSettings {
    SpoolSettings {
        min_free_bytes: 0,
        ..SpoolSettings::new(dir.to_path_buf())
    }
}

fn open(s: &SpoolSettings) -> Spool {
    Spool::open(
        s.clone(),
        Arc::new(RealFs),
        Arc::new(SpoolCounters::new(s.dir.clone())),
    )
    .expect("spool opens")
}

fn open_faulty(s: &SpoolSettings, faults: &Arc<Faults>) -> Result<Spool, SpoolError> {
    Spool::open(
        s.clone(),
        Arc::new(FaultFs {
            faults: faults.clone(),
        }),
        Arc::new(SpoolCounters::new(s.dir.clone())),
    )
}

/// Runs group commits until nothing is left to do.
fn sync(sp: &mut Spool) -> Result<(), SpoolError> {
    while let Some(job) = sp.begin_job(true) {
        sp.finish_job(job.run())?;
    }
    Ok(())
}

/// Every record the spool hands out now, released at once; their topics' numbers.
fn drain(sp: &mut Spool) -> Vec<u64> {
    let mut out = Vec::new();
    while let Some(o) = sp.next_to_send().expect("reads") {
        out.push(o.msg.topic[2..].parse().expect("t/<n>"));
        sp.release(o.seq);
    }
    out
}

#[test]
fn records_come_out_in_order_and_a_released_spool_reopens_empty() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let mut sp = open(&s);
    for i in 0..100 {
        sp.append(&msg(i));
    }
    sync(&mut sp).unwrap();
    assert_eq!(sp.ack_threshold(), 101, "all 100 records are durable");
    assert_eq!(drain(&mut sp), (0..100).collect::<Vec<_>>());
    assert!(sp.is_empty());
    assert_reopens_empty(sp, &s);
}

#[test]
fn a_crash_keeps_every_synced_record_and_resends_only_the_unreleased() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let mut sp = open(&s);
    for i in 0..50 {
        sp.append(&msg(i));
    }
    sync(&mut sp).unwrap();
    // 20 sent and released, 5 sent and in flight, the cursor on disk.
    release(&mut sp, 20);
    for _ in 0..5 {
        sp.next_to_send().unwrap().unwrap();
    }
    sync(&mut sp).unwrap();
    // Appended, never handed to a job: not acknowledged, so the source still has them.
    for i in 50..60 {
        sp.append(&msg(i));
    }
    assert_eq!(sp.ack_threshold(), 51);
    drop(sp); // the crash: no more writes
    let mut sp = open(&s);
    assert_eq!(
        drain(&mut sp),
        (20..50).collect::<Vec<_>>(),
        "the 5 in flight come again (duplicates bounded by what was in flight); nothing acknowledged is lost"
    );
}

#[test]
fn a_torn_tail_is_cut_at_recovery_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let mut sp = open(&s);
    for i in 0..10 {
        sp.append(&msg(i));
    }
    sync(&mut sp).unwrap();
    drop(sp);
    let seg = dir.path().join(segment_name(1));
    let len = std::fs::metadata(&seg).unwrap().len();
    // A half-written last record, then bytes the kernel never wrote (zeros).
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(len - 7).unwrap();
    f.set_len(len + 4096).unwrap();
    drop(f);
    let mut sp = open(&s);
    assert_eq!(
        sp.counters().truncated_bytes.load(Ordering::Relaxed),
        4096 + len / 10,
        "the torn record and the zeros after it are cut"
    );
    assert_eq!(drain(&mut sp), (0..9).collect::<Vec<_>>());
    // New records go after the cut, and read back.
    sp.append(&msg(100));
    sync(&mut sp).unwrap();
    assert_eq!(drain(&mut sp), vec![100]);
    assert_reopens_empty(sp, &s);
}

#[test]
fn a_damaged_record_in_the_middle_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let mut sp = open(&s);
    let mut offsets = Vec::new();
    for i in 0..10 {
        offsets.push(sp.segments.back().unwrap().len);
        sp.append(&msg(i));
    }
    sync(&mut sp).unwrap();
    drop(sp);
    let seg = dir.path().join(segment_name(1));
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[offsets[4] as usize + 25] ^= 0xff; // inside record 4's body
    std::fs::write(&seg, &bytes).unwrap();
    let mut sp = open(&s);
    assert_eq!(drain(&mut sp), vec![0, 1, 2, 3, 5, 6, 7, 8, 9]);
    assert_eq!(sp.counters().dropped(SpoolDrop::Corrupt), 1);
    assert_eq!(sp.counters().truncated_bytes.load(Ordering::Relaxed), 0);
}

#[test]
fn released_segments_are_deleted_once_the_cursor_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let s = SpoolSettings {
        max_bytes: 1024 * 1024, // segments of 128 KiB
        ..settings(dir.path())
    };
    let mut sp = open(&s);
    for i in 0..60 {
        sp.append(&big(i));
        sync(&mut sp).unwrap();
    }
    let segs = |d: &Path| {
        std::fs::read_dir(d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_str()
                    .unwrap()
                    .ends_with(".seg")
            })
            .count()
    };
    assert!(segs(dir.path()) >= 4, "60 x 10 KB make several segments");
    assert_eq!(drain(&mut sp), (0..60).collect::<Vec<_>>());
    sync(&mut sp).unwrap();
    assert_eq!(
        segs(dir.path()),
        1,
        "only the segment being written is left"
    );
    assert_eq!(sp.counters().bytes.load(Ordering::Relaxed), sp.total_bytes);
}

#[test]
fn drop_oldest_drops_exactly_the_oldest_records_and_counts_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = SpoolSettings {
        max_bytes: 1024 * 1024,
        when_full: WhenFull::DropOldest,
        ..settings(dir.path())
    };
    let mut sp = open(&s);
    let n = 300; // about 3 MB into 1 MiB
    for i in 0..n {
        sp.append(&big(i));
        if i % 10 == 0 {
            sync(&mut sp).unwrap();
        }
    }
    sync(&mut sp).unwrap();
    assert!(sp.total_bytes <= s.max_bytes);
    let dropped = sp.counters().dropped(SpoolDrop::Full);
    assert!(dropped > 0);
    let got = drain(&mut sp);
    assert_eq!(
        got,
        (dropped..n).collect::<Vec<_>>(),
        "the {dropped} oldest are gone, every newer one is there"
    );
}

#[test]
fn block_takes_nothing_more_at_max_bytes_and_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = SpoolSettings {
        max_bytes: 256 * 1024,
        ..settings(dir.path())
    };
    let mut sp = open(&s);
    let mut i = 0;
    while sp.has_room() {
        sp.append(&Message {
            payload: Bytes::from(vec![b'x'; 1000]),
            ..msg(i)
        });
        i += 1;
        assert!(i < 10_000, "the spool never said it was full");
    }
    assert!(sp.counters().blocked.load(Ordering::Relaxed));
    sync(&mut sp).unwrap();
    assert_eq!(drain(&mut sp).len() as u64, i);
    assert_eq!(sp.counters().dropped(SpoolDrop::Full), 0);
    sync(&mut sp).unwrap();
    assert!(sp.has_room());
}

#[test]
fn the_free_disk_floor_blocks_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let s = SpoolSettings {
        min_free_bytes: 1_000_000,
        ..settings(dir.path())
    };
    faults.free_bytes.store(999_999, Ordering::Relaxed);
    let mut sp = open_faulty(&s, &faults).unwrap();
    assert!(!sp.has_room());
}

#[test]
fn short_writes_still_store_every_record_whole() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    faults.short_writes.store(7, Ordering::Relaxed);
    let s = settings(dir.path());
    let mut sp = open_faulty(&s, &faults).unwrap();
    for i in 0..200 {
        sp.append(&msg(i));
    }
    sync(&mut sp).unwrap();
    drop(sp);
    let mut sp = open(&s);
    assert_eq!(drain(&mut sp), (0..200).collect::<Vec<_>>());
}

#[test]
fn a_failed_fdatasync_acknowledges_nothing_and_reopening_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let s = settings(dir.path());
    let mut sp = open_faulty(&s, &faults).unwrap();
    for i in 0..10 {
        sp.append(&msg(i));
    }
    sync(&mut sp).unwrap();
    let acked = sp.ack_threshold();
    for i in 10..20 {
        sp.append(&msg(i));
    }
    faults.failing_syncs.store(1, Ordering::Relaxed);
    let err = sync(&mut sp).unwrap_err();
    assert!(matches!(err, SpoolError::Sync { .. }), "{err}");
    assert!(err.to_string().contains("fdatasync of"), "{err}");
    assert!(sp.failed());
    assert!(!sp.has_room(), "a failed spool takes nothing more");
    assert_eq!(sp.ack_threshold(), acked, "nothing more is acknowledged");
    assert!(sp.counters().failure().is_some());
    drop(sp);
    let mut sp = open_faulty(&s, &faults).unwrap();
    assert!(sp.counters().failure().is_none());
    let got = drain(&mut sp);
    assert_eq!(&got[..10], &(0..10).collect::<Vec<_>>()[..]);
}

#[test]
fn a_disk_that_fills_up_mid_record_is_a_named_error_and_the_torn_record_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let s = settings(dir.path());
    let mut sp = open_faulty(&s, &faults).unwrap();
    for i in 0..10 {
        sp.append(&msg(i));
    }
    sync(&mut sp).unwrap();
    faults.space_left.store(30, Ordering::Relaxed); // part of the next record
    for i in 10..20 {
        sp.append(&msg(i));
    }
    let err = sync(&mut sp).unwrap_err();
    assert!(matches!(err, SpoolError::DiskFull { .. }), "{err}");
    assert!(err.to_string().contains("disk is full"), "{err}");
    assert!(faults.injected().iter().any(|l| l.starts_with("ENOSPC")));
    drop(sp);
    faults.space_left.store(u64::MAX, Ordering::Relaxed);
    let mut sp = open_faulty(&s, &faults).unwrap();
    assert_eq!(sp.counters().truncated_bytes.load(Ordering::Relaxed), 30);
    assert_eq!(drain(&mut sp), (0..10).collect::<Vec<_>>());
}

#[test]
fn a_damaged_cursor_slot_falls_back_to_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let mut sp = open(&s);
    for i in 0..10 {
        sp.append(&msg(i));
    }
    sync(&mut sp).unwrap();
    for _ in 0..3 {
        let o = sp.next_to_send().unwrap().unwrap();
        sp.release(o.seq);
        sync(&mut sp).unwrap();
    }
    drop(sp);
    // The newest slot is damaged (a torn cursor write): the older one says 2 were released.
    let path = dir.path().join(CURSOR_FILE);
    let mut c = std::fs::read(&path).unwrap();
    let newest = if decode_slot(&c[..SLOT]).unwrap().0 > decode_slot(&c[SLOT..]).unwrap().0 {
        0
    } else {
        SLOT
    };
    c[newest + 9] ^= 0xff;
    std::fs::write(&path, &c).unwrap();
    let mut sp = open(&s);
    assert_eq!(drain(&mut sp), (2..10).collect::<Vec<_>>());
}

#[test]
fn records_past_max_age_or_message_expiry_are_dropped_when_their_turn_comes() {
    let dir = tempfile::tempdir().unwrap();
    let s = SpoolSettings {
        max_age: Some(Duration::from_millis(50)),
        ..settings(dir.path())
    };
    let mut sp = open(&s);
    sp.append(&msg(0));
    std::thread::sleep(Duration::from_millis(80));
    let mut expiring = msg(1);
    expiring.properties.message_expiry = Some(0);
    sp.append(&expiring);
    let mut later = msg(2);
    later.properties.message_expiry = Some(60);
    sp.append(&later);
    let o = sp.next_to_send().unwrap().expect("record 2");
    assert_eq!(o.msg.topic, "t/2");
    assert_eq!(o.msg.properties.message_expiry, Some(60));
    assert_eq!(sp.counters().dropped(SpoolDrop::MaxAge), 1);
    assert_eq!(sp.counters().dropped(SpoolDrop::Expired), 1);
    sp.release(o.seq);
    assert!(sp.is_empty());
}

#[test]
fn the_drain_rate_holds_records_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = SpoolSettings {
        rate_messages: Some(100), // a burst of 10
        ..settings(dir.path())
    };
    let mut sp = open(&s);
    for i in 0..50 {
        sp.append(&msg(i));
    }
    let first = drain(&mut sp).len();
    assert!((10..=11).contains(&first), "{first}");
    let at = sp.next_send_at().expect("the rest wait");
    assert!(at > Instant::now());
}

#[test]
fn a_backlog_larger_than_memory_is_read_back_from_disk_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let mut sp = open(&s);
    let n = 1000;
    for i in 0..n {
        sp.append(&Message {
            payload: Bytes::from(vec![b'y'; 10_000]),
            ..msg(i)
        });
        if i % 50 == 0 {
            sync(&mut sp).unwrap();
        }
    }
    sync(&mut sp).unwrap();
    assert!(sp.disk.is_some(), "10 MB does not fit the 4 MiB in memory");
    assert_eq!(drain(&mut sp), (0..n).collect::<Vec<_>>());
    // After the backlog, new records take the memory path again.
    sync(&mut sp).unwrap();
    sp.append(&msg(5000));
    assert!(sp.disk.is_none());
    assert_eq!(drain(&mut sp), vec![5000]);
}

#[test]
fn the_counters_add_up_after_drops_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = SpoolSettings {
        max_bytes: 1024 * 1024,
        when_full: WhenFull::DropOldest,
        ..settings(dir.path())
    };
    let check = |sp: &Spool| {
        sp.publish_gauges();
        let c = sp.counters();
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let dropped: u64 = SpoolDrop::ALL.iter().map(|r| c.dropped(*r)).sum();
        assert_eq!(
            get(&c.appended) + get(&c.recovered),
            get(&c.released) + dropped + get(&c.messages),
            "appended + recovered = released + dropped + messages"
        );
    };
    let mut sp = open(&s);
    // 20 in flight when the oldest segments are dropped under them.
    for i in 0..20 {
        sp.append(&big(i));
    }
    sync(&mut sp).unwrap();
    let in_flight: Vec<u64> = (0..20)
        .map(|_| sp.next_to_send().unwrap().unwrap().seq)
        .collect();
    for i in 20..300 {
        sp.append(&big(i));
        if i % 10 == 0 {
            sync(&mut sp).unwrap();
        }
    }
    sync(&mut sp).unwrap();
    assert!(sp.counters().dropped(SpoolDrop::Full) > 0);
    check(&sp);
    for seq in in_flight {
        sp.release(seq);
    }
    check(&sp);
    release(&mut sp, 10);
    sync(&mut sp).unwrap();
    check(&sp);
    drop(sp);
    let mut sp = open(&s);
    check(&sp);
    drain(&mut sp);
    check(&sp);
    assert!(sp.is_empty());
}
