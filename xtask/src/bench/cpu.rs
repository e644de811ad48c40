//! Where a run's CPU went: the core-seconds each program on the machine used
//! during it, and how busy the machine was (its steal time included: on a shared
//! host, the time a neighbour took from our virtual cores).
//!
//! A benchmark that runs the whole pipeline on two cores (load generator, ingest,
//! Postgres, the speed consumer, Redis) is bound by their sum: the meter says
//! which program a figure's cost sits in, and whether the machine itself was
//! short of time.

use std::collections::HashMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

use anyhow::Result;
use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System, UpdateKind};
use tokio_util::sync::CancellationToken;

/// How often the processes are read: a program that exits during the run
/// (the load generator) is counted up to its last reading.
const EVERY: Duration = Duration::from_millis(250);

/// The CPU a run used, by program and for the machine.
#[derive(Debug, Clone)]
pub(super) struct CpuUse {
    pub seconds: f64,
    /// Core-seconds per program (its executable's name), most first.
    pub programs: Vec<(String, f64)>,
    /// Core-seconds per process id (a program may run as several processes).
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "the benchmarks print programs; the meter's test finds itself by pid"
        )
    )]
    pub processes: HashMap<u32, f64>,
    /// Shares of the machine's time over the run (0–1 each).
    pub busy: f64,
    pub steal: f64,
}

impl CpuUse {
    /// What this run used beyond `idle` (the same machine without the run's
    /// work, its use scaled to this run's length): each program's core-seconds
    /// and the machine's busy share less idle's, the work's own cost. A
    /// program's may come out below zero by the spread between the two.
    pub fn beyond(&self, idle: &CpuUse) -> CpuUse {
        let scale = self.seconds / idle.seconds.max(f64::EPSILON);
        let idle_of: HashMap<&str, f64> = idle
            .programs
            .iter()
            .map(|(program, used)| (program.as_str(), *used))
            .collect();
        let mut programs: Vec<(String, f64)> = self
            .programs
            .iter()
            .map(|(program, used)| {
                let before = idle_of.get(program.as_str()).copied().unwrap_or(0.0);
                (program.clone(), used - scale * before)
            })
            .collect();
        programs.sort_by(|a, b| b.1.total_cmp(&a.1));
        CpuUse {
            seconds: self.seconds,
            programs,
            processes: HashMap::new(),
            busy: self.busy - idle.busy,
            steal: self.steal,
        }
    }

    /// `postgres 41.2 s (0.69 cores), tidemark-ingest 30.1 s (0.50), …; machine busy 97 %, steal 2 %`
    /// with, given `per` units of work, the microseconds each program spent per unit.
    pub fn text(&self, per: Option<(f64, &str)>) -> String {
        let mut out = String::new();
        for (n, (program, used)) in self.programs.iter().take(6).enumerate() {
            if n > 0 {
                out.push_str(", ");
            }
            let _ = write!(
                out,
                "{program} {used:.1} s ({:.2} cores",
                used / self.seconds.max(f64::EPSILON)
            );
            if let Some((units, name)) = per.filter(|(units, _)| *units > 0.0) {
                let _ = write!(out, ", {:.1} µs per {name}", 1e6 * used / units);
            }
            out.push(')');
        }
        let rest: f64 = self.programs.iter().skip(6).map(|(_, s)| s).sum();
        let _ = write!(
            out,
            ", the rest {rest:.1} s; over {:.0} s, the machine busy {:.0} %, stolen by the host {:.1} %",
            self.seconds,
            100.0 * self.busy,
            100.0 * self.steal
        );
        out
    }
}

/// The machine's time since boot, from the first line of `/proc/stat` (in
/// ticks): busy (user, nice, system, irq, softirq), idle (with I/O wait), steal.
#[derive(Debug, Clone, Copy, Default)]
struct MachineTicks {
    busy: u64,
    idle: u64,
    steal: u64,
}

fn machine_ticks() -> MachineTicks {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| fields.get(i).copied().unwrap_or(0);
    MachineTicks {
        busy: at(0) + at(1) + at(2) + at(5) + at(6),
        idle: at(3) + at(4),
        steal: at(7),
    }
}

/// Reads the processes' CPU time until stopped; [`CpuMeter::finish`] gives the use.
pub(super) struct CpuMeter {
    stop: CancellationToken,
    sampler: tokio::task::JoinHandle<CpuUse>,
}

impl CpuMeter {
    /// Starts counting once every process has been read a first time.
    pub async fn start() -> Self {
        let started = Instant::now();
        let machine_before = machine_ticks();
        let readings = Readings {
            system: System::new(),
            seen: HashMap::new(),
        }
        .read(true)
        .await;
        let stop = CancellationToken::new();
        let sampler = tokio::spawn(sample(readings, started, machine_before, stop.clone()));
        Self { stop, sampler }
    }

    pub async fn finish(self) -> Result<CpuUse> {
        self.stop.cancel();
        Ok(self.sampler.await?)
    }
}

/// A process by pid and start time (pids are reused): its program, its CPU time
/// (ms) when first seen and when last seen.
type Seen = HashMap<(u32, u64), (String, u64, u64)>;

/// The processes and what was seen of them so far.
struct Readings {
    system: System,
    seen: Seen,
}

impl Readings {
    /// Reads every process's CPU time (a few milliseconds of `/proc`, off the
    /// runtime's threads); `first` marks the run's start.
    async fn read(mut self, first: bool) -> Self {
        tokio::task::spawn_blocking(move || {
            // Processes only: a process's time is the sum of its threads', and
            // listed as processes of their own (sysinfo's default) they were
            // counted twice. Kernel threads (block I/O's workers) are processes
            // of their own and stay listed.
            let kind = ProcessRefreshKind::nothing()
                .with_cpu()
                .with_exe(UpdateKind::OnlyIfNotSet)
                .without_tasks();
            self.system
                .refresh_processes_specifics(ProcessesToUpdate::All, true, kind);
            for (pid, process) in self.system.processes() {
                // The kernel's name of the process, unless it was cut at 15
                // bytes (`tidemark-loadte`): then its executable's. Not the
                // executable's always: Debian's `redis-server` is a link to
                // `redis-check-rdb`.
                let name = process.name();
                let program = if name.len() >= 15 {
                    process.exe().and_then(|e| e.file_name()).unwrap_or(name)
                } else {
                    name
                }
                .to_string_lossy()
                .into_owned();
                let used = process.accumulated_cpu_time();
                // A process started during the run counts from 0.
                let entry = self
                    .seen
                    .entry((pid.as_u32(), process.start_time()))
                    .or_insert((program, if first { used } else { 0 }, used));
                entry.2 = used;
            }
            self
        })
        .await
        .expect("reading /proc does not panic")
    }
}

async fn sample(
    mut readings: Readings,
    started: Instant,
    machine_before: MachineTicks,
    stop: CancellationToken,
) -> CpuUse {
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(EVERY) => {}
        }
        readings = readings.read(false).await;
    }
    readings = readings.read(false).await;
    let machine = machine_ticks();
    let mut by_program: HashMap<String, f64> = HashMap::new();
    let mut processes: HashMap<u32, f64> = HashMap::new();
    for ((pid, _), (program, first, last)) in readings.seen {
        let used = last.saturating_sub(first) as f64 / 1e3;
        *by_program.entry(program).or_default() += used;
        *processes.entry(pid).or_default() += used;
    }
    let mut programs: Vec<(String, f64)> = by_program
        .into_iter()
        .filter(|(_, used)| *used > 0.0)
        .collect();
    programs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let busy = machine.busy.saturating_sub(machine_before.busy) as f64;
    let idle = machine.idle.saturating_sub(machine_before.idle) as f64;
    let steal = machine.steal.saturating_sub(machine_before.steal) as f64;
    let total = (busy + idle + steal).max(1.0);
    CpuUse {
        seconds: started.elapsed().as_secs_f64(),
        programs,
        processes,
        busy: busy / total,
        steal: steal / total,
    }
}

/// The statements of one database by the time Postgres spent executing them
/// (`pg_stat_statements`, which the test stack loads), counted from
/// [`Statements::start`].
pub(super) struct Statements {
    pool: sqlx::PgPool,
}

/// One statement's share: its text (cut), calls, total and mean milliseconds.
#[derive(Debug, Clone)]
pub(super) struct Statement {
    pub query: String,
    pub calls: i64,
    pub total_ms: f64,
}

impl Statements {
    pub async fn start(db_url: &str) -> Result<Self> {
        let pool = sqlx::PgPool::connect(db_url).await?;
        sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .execute(&pool)
            .await?;
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&pool)
            .await?;
        Ok(Self { pool })
    }

    /// The `n` statements of this database that took the most time so far.
    pub async fn top(self, n: i64) -> Result<Vec<Statement>> {
        let rows: Vec<(String, i64, f64)> = sqlx::query_as(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90), calls, total_exec_time \
             FROM pg_stat_statements \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY total_exec_time DESC LIMIT $1",
        )
        .bind(n)
        .fetch_all(&self.pool)
        .await?;
        self.pool.close().await;
        Ok(rows
            .into_iter()
            .map(|(query, calls, total_ms)| Statement {
                query,
                calls,
                total_ms,
            })
            .collect())
    }
}

/// `12.3 s in 4,000 calls: INSERT INTO orders …; …`
pub(super) fn statements_text(statements: &[Statement]) -> String {
    statements
        .iter()
        .map(|s| {
            format!(
                "{:.1} s in {} calls ({:.2} ms each): {}",
                s.total_ms / 1e3,
                s.calls,
                s.total_ms / s.calls.max(1) as f64,
                s.query
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_work_of_a_run_is_its_use_beyond_the_idle_machine_s() {
        let used = |seconds: f64, programs: &[(&str, f64)], busy: f64| CpuUse {
            seconds,
            programs: programs
                .iter()
                .map(|(p, s)| ((*p).to_owned(), *s))
                .collect(),
            processes: HashMap::new(),
            busy,
            steal: 0.0,
        };
        // Idle measured over half the run's time: its use counts twice.
        let run = used(
            4.0,
            &[("clickhouse", 2.4), ("postgres", 1.1), ("serving", 2.0)],
            0.8,
        );
        let idle = used(
            2.0,
            &[("postgres", 0.5), ("serving", 0.1), ("cron", 0.2)],
            0.3,
        );
        let work = run.beyond(&idle);
        let programs: Vec<(&str, i64)> = work
            .programs
            .iter()
            .map(|(p, s)| (p.as_str(), (s * 1000.0).round() as i64))
            .collect();
        assert_eq!(
            programs,
            [("clickhouse", 2400), ("serving", 1800), ("postgres", 100)]
        );
        assert!((work.busy - 0.5).abs() < 1e-9 && (work.seconds - 4.0).abs() < 1e-9);
    }

    /// This process's CPU time so far, seconds, as the kernel counts it
    /// (`utime` and `stime` of `/proc/self/stat`, in ticks of 1/100 s).
    fn own_cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 1..];
        let fields: Vec<u64> = after_name
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        (fields[0] + fields[1]) as f64 / 100.0
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_program_is_counted_with_its_time() {
        let meter = CpuMeter::start().await;
        let before = own_cpu_seconds();
        // This test's own process spins until the kernel has counted 0.6 s of its
        // CPU (however long that takes on a busy machine).
        tokio::task::spawn_blocking(move || {
            let mut n = 0u64;
            while own_cpu_seconds() - before < 0.6 {
                for _ in 0..100_000 {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
        })
        .await
        .unwrap();
        let used = meter.finish().await.unwrap();
        let counted_by_kernel = own_cpu_seconds() - before;
        // By pid: the test runner runs this binary's other tests beside it, as
        // processes of the same program.
        let seconds = used
            .processes
            .get(&std::process::id())
            .expect("the test's own process is listed");
        let me = std::env::current_exe().unwrap();
        let me = me.file_name().unwrap().to_string_lossy();
        assert!(
            *seconds >= 0.4 && *seconds <= counted_by_kernel + 0.05,
            "{seconds} core-seconds counted, the kernel counted {counted_by_kernel}"
        );
        assert!(used.busy > 0.0 && used.busy <= 1.0);
        assert!(used.text(Some((1.0, "run"))).contains(&*me));
    }
}
