//! The CPU scheduling policy of the bridge's threads (`edgebridge run --scheduling`).
//!
//! `batch` is Linux's `SCHED_BATCH`: a bridge thread woken by arriving data does not preempt
//! the thread running on the core (a broker, say); it runs when a core is free or when the
//! running thread's turn ends, and then reads everything that arrived meanwhile in one go. On
//! a box where the brokers and the bridge share few cores, that makes the bridge's batches
//! larger and its CPU per message smaller at full load (docs/benchmarks.md measures it, and
//! what it costs in latency); where a core is idle, the bridge runs at once as before.
//! `normal` (the default) leaves the policy the process was started with.
//!
//! The policy is set on the main thread before any other thread starts (the log writer, the
//! async runtime's workers, the embedded broker's): every thread inherits it. The crate
//! `thread-priority` makes the call (this workspace forbids `unsafe`); it uses
//! `pthread_setschedparam`, which works with musl, whose `sched_setscheduler` does not.

use thread_priority::{
    NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
};

/// `SCHED_BATCH`.
const BATCH: ThreadSchedulePolicy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);

/// Why the policy could not be set (a seccomp profile that forbids the call, say).
#[derive(Debug, thiserror::Error)]
pub enum SchedulingError {
    /// The policy was refused.
    #[error("cannot set the scheduling policy SCHED_BATCH on the bridge's threads")]
    Policy(#[source] thread_priority::Error),
    /// The nice value could not be read, or put back after the policy was set.
    #[error("cannot keep the process's nice value while setting SCHED_BATCH")]
    Nice(#[source] std::io::Error),
}

/// Sets `SCHED_BATCH` on the calling thread, which the threads it starts from now on inherit.
/// The thread's nice value stays what it was.
pub fn batch() -> Result<(), SchedulingError> {
    let nice =
        rustix::process::getpriority_process(None).map_err(|e| SchedulingError::Nice(e.into()))?;
    // `thread-priority` sets a nice value with a normal policy, from its 0..=99 scale; 48 is
    // nice 0. The nice value the thread had is put back below.
    let priority = ThreadPriority::Crossplatform(
        ThreadPriorityValue::try_from(48u8).expect("48 is within 0..=99"),
    );
    let set = thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        priority,
        BATCH,
    );
    // It sets the policy first and the nice value after, so a refused nice value (raising
    // the priority of a process started with a positive one needs a privilege) leaves the
    // policy set: what counts is the policy the thread now has.
    let policy = thread_priority::thread_schedule_policy();
    if rustix::process::getpriority_process(None).ok() != Some(nice) {
        rustix::process::setpriority_process(None, nice)
            .map_err(|e| SchedulingError::Nice(e.into()))?;
    }
    match (set, policy) {
        (_, Ok(BATCH)) => Ok(()),
        (Err(e), _) => Err(SchedulingError::Policy(e)),
        (Ok(()), Err(e)) => Err(SchedulingError::Policy(e)),
        (Ok(()), Ok(_)) => Err(SchedulingError::Policy(thread_priority::Error::Priority(
            "the policy read back is not SCHED_BATCH",
        ))),
    }
}

/// The scheduling policy of thread `tid` of process `pid` (field 41 of
/// `/proc/PID/task/TID/stat`: 0 normal, 3 batch), or `None` where it cannot be read.
pub fn policy_of(pid: u32, tid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    // The command name may hold spaces and ends at the last ')'; the field after it is the
    // third.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(41 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's ID (`/proc/thread-self` links to `PID/task/TID`).
    fn tid() -> u32 {
        let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
        link.file_name().unwrap().to_str().unwrap().parse().unwrap()
    }

    /// A thread sets SCHED_BATCH on itself and keeps its nice value (5 here, which an
    /// unprivileged thread may not lower again); a thread it starts afterwards has the
    /// policy too, and the thread that did not set it keeps its own.
    #[test]
    fn batch_is_set_keeps_the_nice_value_and_is_inherited() {
        let pid = std::process::id();
        let main_tid = tid();
        let before = policy_of(pid, main_tid).expect("own policy readable");
        let (set, nice, child) = std::thread::spawn(move || {
            rustix::process::setpriority_process(None, 5).expect("raising nice is allowed");
            batch().expect("SCHED_BATCH needs no privilege");
            let nice = rustix::process::getpriority_process(None).unwrap();
            let me = policy_of(pid, tid());
            let child = std::thread::spawn(move || policy_of(pid, tid()))
                .join()
                .unwrap();
            (me, nice, child)
        })
        .join()
        .unwrap();
        assert_eq!(set, Some(3));
        assert_eq!(nice, 5);
        assert_eq!(child, Some(3));
        assert_eq!(policy_of(pid, main_tid), Some(before));
    }
}
