//! Where the heavy steps of computing an answer run: threads of their own,
//! optionally at a lower CPU priority than the threads answering requests.
//!
//! A kept answer is sent in well under a millisecond; computing a new one takes
//! milliseconds of CPU (counting buyers, converting currencies, writing JSON,
//! compressing) — 10 ms for a small question with a live stream, 100–250 ms for
//! a 30-day dashboard under load. Those steps run here rather than on the
//! runtime's workers, so a worker never holds a request behind them, and at most
//! `serving.compute_threads` of them run at once (the rest wait their turn).
//! The steps are pure CPU; their reads (ClickHouse, Redis, Postgres) stay on the
//! runtime's workers, whose connections are shared with the requests.
//!
//! `serving.compute_niceness` above 0 runs them that many steps of `nice` below
//! the process (and `SCHED_BATCH`): a request's thread then takes a core from a
//! computation at once, and computations get what everything else leaves. At
//! 10, in `cargo xtask bench serving` (100,000 orders), REST's p99 at 2,000/s
//! did not move (4.02 ms, 4.33 at 0, the runs' spread 3.3–5.3) and while
//! ClickHouse was busy with the distinct dashboard questions the steps waited
//! seconds (p50 ≤ 5 s against ≤ 100 ms at 0): off by default.

use std::future::Future;

use thread_priority::{
    NormalThreadSchedulePolicy, ThreadPriority, ThreadPriorityValue, ThreadSchedulePolicy,
};
use tokio::runtime::{Handle, Runtime};

/// The threads computing answers' heavy steps. Dropping it lets the steps
/// running finish in the background.
pub struct Computing {
    runtime: Option<Runtime>,
    handle: Handle,
}

impl Computing {
    /// At most `threads` steps run at once (more wait their turn), on threads
    /// `niceness` steps of `nice` below this one (0: the same priority; at most 19).
    pub fn new(threads: usize, niceness: u8) -> std::io::Result<Computing> {
        let target = (nice_of_this_thread() + i32::from(niceness)).min(19);
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            // The runtime's own worker runs nothing: the steps are blocking tasks.
            .worker_threads(1)
            .max_blocking_threads(threads.max(1))
            .thread_name("serving-compute");
        if niceness > 0 {
            builder.on_thread_start(move || {
                if let Err(e) = lower_this_thread(target) {
                    tracing::warn!(error = %e, niceness = target, "Computing at the requests' priority");
                }
            });
        }
        let runtime = builder.build()?;
        Ok(Computing {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// Runs `step` on a computing thread; a panic in it resumes in the caller.
    pub fn run<R, F>(&self, step: F) -> impl Future<Output = R> + use<R, F>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let running = self.handle.spawn_blocking(step);
        async move {
            match running.await {
                Ok(value) => value,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Cancelled only when the runtime shuts down, which happens
                // only when the service stops.
                Err(e) => panic!("a computing step was cancelled: {e}"),
            }
        }
    }
}

impl Drop for Computing {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Without waiting: it may be dropped on a runtime's thread.
            runtime.shutdown_background();
        }
    }
}

/// The `nice` value of the calling thread (field 19 of its `stat`), 0 when it
/// cannot be read.
fn nice_of_this_thread() -> i32 {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|stat| {
            // The command name (field 2) may hold spaces: count after its ')'.
            let after = &stat[stat.rfind(')')? + 1..];
            after.split_whitespace().nth(16)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Sets the calling thread to `SCHED_BATCH` at `nice` value `niceness`.
fn lower_this_thread(niceness: i32) -> Result<(), thread_priority::Error> {
    let policy = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
    // The crate names normal threads' niceness through its 0–99 scale: find the
    // step that maps to the value wanted.
    let priority = (*ThreadPriorityValue::MIN..=*ThreadPriorityValue::MAX)
        .filter_map(|p| ThreadPriorityValue::try_from(p).ok())
        .map(ThreadPriority::Crossplatform)
        .find(|p| p.to_posix(policy).ok() == Some(niceness))
        .ok_or(thread_priority::Error::Priority(
            "no step maps to that nice value",
        ))?;
    thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        priority,
        policy,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn steps_run_below_the_callers_priority_and_their_panics_reach_the_caller() {
        let caller = nice_of_this_thread();
        let computing = Computing::new(2, 7).unwrap();
        let niceness = computing.run(nice_of_this_thread).await;
        assert_eq!(niceness, (caller + 7).min(19));
        assert_eq!(
            nice_of_this_thread(),
            caller,
            "the caller's thread is unchanged"
        );
        let same = Computing::new(1, 0).unwrap();
        assert_eq!(same.run(nice_of_this_thread).await, caller);

        let panicked = tokio::spawn(computing.run(|| panic!("a step failed"))).await;
        assert!(panicked.unwrap_err().is_panic());
        assert_eq!(
            computing.run(|| 6 * 7).await,
            42,
            "still computing after a panic"
        );
    }
}
