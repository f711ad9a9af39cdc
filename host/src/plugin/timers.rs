//! The timers an aggregator (WIT 0.2 `timers`) asks for, kept by the host, and the clock
//! they and `clock.now-millis` read: the real one in the bridge, a virtual one that
//! `edgebridge plugin test --messages` moves along a timeline. Pure: nothing here sleeps; the
//! route client wakes at [`Timers::next_due`] and asks for what is due.

use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// The time a plugin sees.
#[derive(Debug, Clone, Default)]
pub enum HostClock {
    /// The system's clocks.
    #[default]
    Real,
    /// A clock moved by hand (milliseconds since the Unix epoch).
    Virtual(Arc<AtomicU64>),
}

fn process_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl HostClock {
    /// Milliseconds since the Unix epoch.
    pub fn now_millis(&self) -> u64 {
        match self {
            HostClock::Real => SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            HostClock::Virtual(ms) => ms.load(Ordering::Relaxed),
        }
    }

    /// Timer time: microseconds on a clock that never goes back (the monotonic clock since
    /// the process started; the virtual clock in microseconds).
    pub fn timer_now(&self) -> u64 {
        match self {
            HostClock::Real => process_start().elapsed().as_micros() as u64,
            HostClock::Virtual(ms) => ms.load(Ordering::Relaxed) * 1000,
        }
    }

    /// The monotonic instant of a timer time (real clock only).
    pub fn instant_of(at: u64) -> Instant {
        process_start() + Duration::from_micros(at)
    }
}

/// A timer that is due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// Its name.
    pub name: String,
    /// When it was due (timer time, µs).
    pub at: u64,
}

/// One plugin instance's timers, with the policy's limits.
#[derive(Debug, Default)]
pub struct Timers {
    /// Name → (deadline, generation).
    set: HashMap<String, (u64, u64)>,
    /// Deadlines, soonest first; entries whose generation is stale are skipped.
    queue: BinaryHeap<std::cmp::Reverse<(u64, u64, String)>>,
    generation: u64,
    /// The policy's `timers.max`.
    pub max: usize,
    /// The policy's `timers.minPeriod`.
    pub min_period: Duration,
    /// Whether the policy grants `timers`.
    pub granted: bool,
}

impl Timers {
    /// Timers under a policy's limits.
    pub fn new(granted: bool, max: usize, min_period: Duration) -> Timers {
        Timers {
            granted,
            max,
            min_period,
            ..Timers::default()
        }
    }

    /// Sets (or moves) `name` to `now + after`.
    pub fn set(&mut self, name: String, after: Duration, now: u64) -> Result<(), String> {
        if !self.granted {
            return Err("timers are not granted by this plugin's policy".into());
        }
        if after < self.min_period {
            return Err(format!(
                "{} ms is shorter than the policy's timers.minPeriod of {} ms",
                after.as_millis(),
                self.min_period.as_millis()
            ));
        }
        if name.len() > 256 {
            return Err("a timer name is at most 256 bytes".into());
        }
        if !self.set.contains_key(&name) && self.set.len() >= self.max {
            return Err(format!(
                "{} timers are set, the policy's timers.max",
                self.max
            ));
        }
        self.generation += 1;
        let at = now.saturating_add(after.as_micros() as u64);
        self.set.insert(name.clone(), (at, self.generation));
        self.queue
            .push(std::cmp::Reverse((at, self.generation, name)));
        // Moved timers leave stale entries: keep the heap within a bound of the live set.
        if self.queue.len() > 2 * self.set.len() + 64 {
            self.queue = self
                .set
                .iter()
                .map(|(n, (at, g))| std::cmp::Reverse((*at, *g, n.clone())))
                .collect();
        }
        Ok(())
    }

    /// Cancels `name`.
    pub fn cancel(&mut self, name: &str) {
        self.set.remove(name);
    }

    /// Timers set.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// No timer is set.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// When the soonest timer is due.
    pub fn next_due(&mut self) -> Option<u64> {
        while let Some(std::cmp::Reverse((at, g, name))) = self.queue.peek() {
            if self.set.get(name).is_some_and(|(_, live)| live == g) {
                return Some(*at);
            }
            self.queue.pop();
        }
        None
    }

    /// Removes and returns the timers due at `now`, soonest first (at most `limit`).
    pub fn take_due(&mut self, now: u64, limit: usize) -> Vec<Due> {
        let mut due = Vec::new();
        while due.len() < limit {
            match self.next_due() {
                Some(at) if at <= now => {
                    let std::cmp::Reverse((at, _, name)) = self.queue.pop().expect("peeked");
                    self.set.remove(&name);
                    due.push(Due { name, at });
                }
                _ => break,
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_order_move_cancel_and_keep_to_the_policy() {
        let mut t = Timers::new(true, 2, Duration::from_millis(10));
        assert!(
            t.set("a".into(), Duration::from_millis(5), 0).is_err(),
            "minPeriod"
        );
        t.set("a".into(), Duration::from_millis(30), 0).unwrap();
        t.set("b".into(), Duration::from_millis(20), 0).unwrap();
        let e = t.set("c".into(), Duration::from_millis(20), 0).unwrap_err();
        assert!(e.contains("timers.max"), "{e}");
        t.set("a".into(), Duration::from_millis(10), 0).unwrap();
        assert_eq!(t.next_due(), Some(10_000), "moved, not added");
        assert_eq!(t.len(), 2);
        assert!(t.take_due(9_999, 10).is_empty());
        let due = t.take_due(25_000, 10);
        assert_eq!(
            due.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        t.set("c".into(), Duration::from_millis(10), 0).unwrap();
        t.cancel("c");
        assert_eq!(t.next_due(), None);
        let mut denied = Timers::new(false, 10, Duration::ZERO);
        assert!(denied.set("x".into(), Duration::from_secs(1), 0).is_err());
    }

    #[test]
    fn moving_one_timer_many_times_keeps_the_queue_bounded() {
        let mut t = Timers::new(true, 10, Duration::ZERO);
        for i in 0..10_000 {
            t.set("a".into(), Duration::from_millis(100), i).unwrap();
        }
        assert!(t.queue.len() <= 2 * t.len() + 65);
        assert_eq!(t.take_due(u64::MAX, 10).len(), 1);
    }
}
