//! R5 with the compactor as a process of its own: SIGKILLed at each step of a run,
//! and ClickHouse stopped or hung mid-run. Nothing is ever half-published, and the rerun
//! publishes the exact result with no ClickHouse row twice.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_testkit::Process;

use crate::{Env, batch};

const STEPS: [&str; 5] = ["wait_for_relay", "write_lake", "stage", "audit", "publish"];

fn run_once(env: &Env) -> Process {
    Process::spawn(
        env!("CARGO_BIN_EXE_tidemark-compactor"),
        &["run-once"],
        &env.service_env(),
    )
}

/// The step the running batch run has reached, if one is running.
async fn running_step(env: &Env) -> Option<String> {
    sqlx::query_scalar("SELECT step FROM batch_runs WHERE status = 'running'")
        .fetch_optional(&env.db.pool)
        .await
        .unwrap()
}

/// Starts `run-once` and waits until it is inside `step`; `None` when the run went
/// past the step (or finished) before it was seen.
async fn at_step(env: &Env, step: &str) -> Option<Process> {
    let mut process = run_once(env);
    loop {
        if running_step(env).await.as_deref() == Some(step) {
            return Some(process);
        }
        if process.exited().is_some() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Runs `run-once` to its end; it must publish.
async fn rerun(env: &Env) {
    let status = run_once(env).exit(Duration::from_secs(120)).await;
    assert!(status.success(), "the rerun publishes: {status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn r5_compactor_sigkilled_at_each_step_never_half_publishes() {
    let started = std::time::Instant::now();
    let env = Env::new(8).await;
    let mut rng = StdRng::seed_from_u64(51);
    let mut sent = Vec::new();
    env.ingest(&batch(&mut rng, &mut sent, 500)).await;
    rerun(&env).await;
    let rounds = if tidemark_testkit::heavy() { 3 } else { 1 };
    let (mut kills, mut worst_drift, mut worst_dupes, mut cells) = (0, 0, 0, 0);
    for _ in 0..rounds {
        for step in STEPS {
            // Enough orders that every step lasts long enough to be caught in.
            env.ingest(&batch(&mut rng, &mut sent, 3_000)).await;
            let mut attempts = 0;
            let process = loop {
                attempts += 1;
                if let Some(p) = at_step(&env, step).await {
                    break p;
                }
                assert!(attempts < 10, "never caught a run inside {step}");
                // The run went past the step unseen (a short step on a busy
                // machine): the next one gets orders of its own to work on.
                env.ingest(&batch(&mut rng, &mut sent, 1_000)).await;
            };
            // Somewhere inside the step.
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
            process.kill();
            kills += 1;
            // Nothing half-published: what is published is exact below its watermark.
            let (drift, _) = env.drift().await;
            worst_drift = worst_drift.max(drift);
            rerun(&env).await;
            let (drift, n) = env.drift().await;
            let dupes = env.duplicate_rows().await;
            eprintln!(
                "killed in {step} (attempt {attempts}) at {:.0} s: drift {drift} of {n} cells, \
                 duplicate rows {dupes}",
                started.elapsed().as_secs_f64()
            );
            worst_drift = worst_drift.max(drift);
            worst_dupes = worst_dupes.max(dupes);
            cells = n;
        }
    }
    env.assert_lake_consistent().await;
    tidemark_testkit::figure(
        "R5",
        format!(
            "compactor as a process, SIGKILLed inside each of {} steps ({kills} kills), \
             {} orders: drift {worst_drift} (of {cells} cells, after each kill and rerun), \
             duplicate ClickHouse rows {worst_dupes}",
            STEPS.len(),
            sent.len()
        ),
    );
    assert_eq!(worst_drift, 0);
    assert_eq!(worst_dupes, 0);
}

/// What a ClickHouse fault mid-run left: the slowest a failed run took to end
/// after the fault, and the worst drift and duplicate rows after each rerun.
struct FaultOutcome {
    /// Attempts in publish whose run flipped before the fault landed (then exact,
    /// and repeated).
    late: usize,
    slowest_failure: Duration,
    worst_drift: usize,
    worst_dupes: u64,
    cells: usize,
}

/// For each of `stage` and `publish`: catches a run inside the step, does `fault`
/// to the private ClickHouse, and waits for the run to fail by itself (at most
/// `within`); then `recover`s it, checks that nothing was published, reruns, and
/// measures drift and duplicate rows.
async fn clickhouse_fault_mid_run(
    clickhouse: &tidemark_testkit::PrivateClickHouse,
    env: &Env,
    seed: u64,
    within: Duration,
    fault: fn(&tidemark_testkit::PrivateClickHouse),
    recover: impl AsyncFn(&tidemark_testkit::PrivateClickHouse),
) -> FaultOutcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sent = Vec::new();
    env.ingest(&batch(&mut rng, &mut sent, 500)).await;
    rerun(env).await;
    let mut outcome = FaultOutcome {
        late: 0,
        slowest_failure: Duration::ZERO,
        worst_drift: 0,
        worst_dupes: 0,
        cells: 0,
    };
    for step in ["stage", "publish"] {
        // Seen in publish, the run may finish its ClickHouse part (attaching the
        // partitions, milliseconds) before the fault lands, then flip and fail in a
        // later step: published with ClickHouse there, which must be exact. Such an
        // attempt is checked and repeated with fresh orders.
        let mut late = 0;
        let before = loop {
            env.ingest(&batch(&mut rng, &mut sent, 3_000)).await;
            let before = env.published().await.run_id;
            let process = loop {
                if let Some(p) = at_step(env, step).await {
                    break p;
                }
            };
            fault(clickhouse);
            let faulted = std::time::Instant::now();
            let status = process.exit(within).await;
            outcome.slowest_failure = outcome.slowest_failure.max(faulted.elapsed());
            assert!(
                !status.success(),
                "a run without ClickHouse fails: {status}"
            );
            let state = tidemark_batchview::PublishedState::load(&env.db.pool)
                .await
                .unwrap()
                .unwrap();
            if state.run_id == before {
                break before;
            }
            late += 1;
            outcome.late += 1;
            assert!(
                step == "publish" && late < 5,
                "nothing published without ClickHouse ({step}, attempt {late})"
            );
            recover(clickhouse).await;
            let (drift, _) = env.drift().await;
            assert_eq!(drift, 0, "a run published before the fault is exact");
        };
        recover(clickhouse).await;
        let (drift, _) = env.drift().await;
        outcome.worst_drift = outcome.worst_drift.max(drift);
        rerun(env).await;
        assert!(env.published().await.run_id > before);
        let (drift, n) = env.drift().await;
        outcome.worst_drift = outcome.worst_drift.max(drift);
        outcome.worst_dupes = outcome.worst_dupes.max(env.duplicate_rows().await);
        outcome.cells = n;
    }
    outcome
}

#[tokio::test(flavor = "multi_thread")]
async fn r5_clickhouse_stopped_mid_run_publishes_nothing_then_the_rerun_is_exact() {
    let clickhouse = tidemark_testkit::PrivateClickHouse::start().await;
    let env = Env::on(clickhouse.config(), tidemark_testkit::s3(), 8).await;
    let outcome = clickhouse_fault_mid_run(
        &clickhouse,
        &env,
        52,
        Duration::from_secs(120),
        |ch| ch.stop(),
        async |ch| ch.resume().await,
    )
    .await;
    tidemark_testkit::figure(
        "R5",
        format!(
            "ClickHouse stopped while the compactor was in stage, then in publish: the runs \
             failed, nothing published ({} attempts in publish flipped before the stop \
             landed: exact, repeated); after restart the rerun: drift {} of {} cells, \
             duplicate ClickHouse rows {}",
            outcome.late, outcome.worst_drift, outcome.cells, outcome.worst_dupes
        ),
    );
    assert_eq!(outcome.worst_drift, 0);
    assert_eq!(outcome.worst_dupes, 0);
}

/// ClickHouse hangs (SIGSTOP: connections accepted by the kernel, nothing
/// answered) while a run is in `stage`, then in `publish`. Without a client
/// timeout the run would wait for ever holding its lease; with
/// `clickhouse.timeout` (5 s here) it fails, publishes nothing, and the rerun
/// after SIGCONT is exact.
#[tokio::test(flavor = "multi_thread")]
async fn r5_clickhouse_hung_mid_run_fails_within_the_timeout_then_the_rerun_is_exact() {
    const TIMEOUT: Duration = Duration::from_secs(5);
    let clickhouse = tidemark_testkit::PrivateClickHouse::start().await;
    let config = tidemark_platform::config::ClickHouseConfig {
        timeout: TIMEOUT,
        ..clickhouse.config()
    };
    let env = Env::on(config, tidemark_testkit::s3(), 8).await;
    // A run reaches ClickHouse within seconds of the step starting, then waits
    // out the timeout (a few requests may be in flight, each bounded alike).
    let outcome = clickhouse_fault_mid_run(
        &clickhouse,
        &env,
        53,
        Duration::from_secs(60),
        |ch| ch.pause(),
        async |ch| ch.unpause(),
    )
    .await;
    tidemark_testkit::figure(
        "R5",
        format!(
            "ClickHouse hung (SIGSTOP) while the compactor was in stage, then in publish, \
             clickhouse.timeout {} s: the runs failed by themselves within {:.1} s, nothing \
             published ({} attempts in publish flipped before the pause landed: exact, \
             repeated); after SIGCONT the rerun: drift {} of {} cells, duplicate ClickHouse \
             rows {}",
            TIMEOUT.as_secs(),
            outcome.slowest_failure.as_secs_f64(),
            outcome.late,
            outcome.worst_drift,
            outcome.cells,
            outcome.worst_dupes
        ),
    );
    assert_eq!(outcome.worst_drift, 0);
    assert_eq!(outcome.worst_dupes, 0);
}

/// Who holds the `compactor` lease, and its token.
async fn runner(env: &Env) -> Option<(String, i64)> {
    sqlx::query_as("SELECT holder, token FROM leases WHERE role = 'compactor'")
        .fetch_optional(&env.db.pool)
        .await
        .unwrap()
}

/// R20 (issue 22, standby workers) for the compactor, default lease (5 s): a run
/// caught mid-way is SIGKILLed while a second runner waits for the lease: the
/// second takes the run over within 10 s and publishes it. Then a runner is
/// SIGSTOPped inside its run past the lease; the waiting one resumes and publishes
/// the run, and the paused one, woken, has its next write refused (by the fence,
/// or — paused inside a write's transaction — by Postgres having ended it) and
/// exits with that error. The batch view stays exact, no ClickHouse row twice, the
/// lake consistent.
#[tokio::test(flavor = "multi_thread")]
async fn r20_a_waiting_compactor_takes_over_a_killed_or_paused_run() {
    let env = Env::new(8).await;
    let service_env = env.service_env().set("TIDEMARK_LEASE__TTL", &5_000);
    let spawn = |name: &str| {
        Process::spawn_capturing(
            env!("CARGO_BIN_EXE_tidemark-compactor"),
            &["run-once"],
            &service_env.clone().set("TIDEMARK_LEASE__INSTANCE", &name),
        )
    };
    let mut rng = StdRng::seed_from_u64(20);
    let mut sent = Vec::new();
    env.ingest(&batch(&mut rng, &mut sent, 500)).await;
    rerun(&env).await;

    // SIGKILL inside the run; the waiting runner takes it over.
    let mut takeovers = Vec::new();
    let mut refusal = "";
    for (first, second, signal) in [("a", "b", "KILL"), ("c", "d", "STOP")] {
        env.ingest(&batch(&mut rng, &mut sent, 3_000)).await;
        let mut attempts = 0;
        let leader = loop {
            attempts += 1;
            let mut process = spawn(first);
            let caught = loop {
                if running_step(&env).await.as_deref() == Some("write_lake") {
                    break true;
                }
                if process.exited().is_some() {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            if caught {
                break process;
            }
            assert!(attempts < 10, "never caught a run inside write_lake");
            env.ingest(&batch(&mut rng, &mut sent, 3_000)).await;
        };
        assert_eq!(runner(&env).await.unwrap().0, first);
        let standby = spawn(second);
        let run_id: i64 =
            sqlx::query_scalar("SELECT run_id FROM batch_runs WHERE status = 'running'")
                .fetch_one(&env.db.pool)
                .await
                .unwrap();
        leader.signal(signal);
        let stopped = std::time::Instant::now();
        tidemark_testkit::eventually(
            Duration::from_secs(15),
            "the waiting runner takes over",
            || async {
                runner(&env)
                    .await
                    .is_some_and(|(holder, _)| holder == second)
            },
        )
        .await;
        let took_over = stopped.elapsed().as_secs_f64();
        assert!(took_over < 10.0, "taken over in {took_over:.1} s");
        let (status, log) = standby.output(Duration::from_secs(120)).await;
        assert!(status.success(), "the successor publishes: {status}\n{log}");
        let published: String =
            sqlx::query_scalar("SELECT status FROM batch_runs WHERE run_id = $1")
                .bind(run_id)
                .fetch_one(&env.db.pool)
                .await
                .unwrap();
        assert_eq!(published, "published", "the run it took over");
        if signal == "KILL" {
            leader.kill();
        } else {
            leader.signal("CONT");
            let (status, log) = leader.output(Duration::from_secs(60)).await;
            assert!(!status.success(), "the paused runner fails: {log}");
            // Its next write is refused by the fence; or, paused inside a write's
            // transaction, Postgres ended that transaction after the lease's
            // duration (so the successor was not held up) and the write is gone.
            refusal = if log.contains("lease moved on") {
                "refused by the fence"
            } else if log.contains("idle-in-transaction") {
                "ended by Postgres (paused inside its transaction)"
            } else if log.contains("s3: request has timed out") {
                // Paused inside an S3 request: the SDK counts the pause against its
                // timeout. A put that lands late rewrites an object of the run with
                // the same content (the lake is checked consistent below).
                "timed out in S3 (paused inside the request)"
            } else {
                panic!("the paused runner's late write was not refused:\n{log}")
            };
        }
        takeovers.push(took_over);
    }
    let (drift, cells) = env.drift().await;
    let dupes = env.duplicate_rows().await;
    env.assert_lake_consistent().await;
    tidemark_testkit::figure(
        "R20",
        format!(
            "compactor, default 5 s lease, a second runner waiting: a run SIGKILLed in \
             write_lake taken over in {:.1} s, one SIGSTOPped there in {:.1} s (woken, \
             its late write was {refusal} and it exited with that error); \
             drift {drift} of {cells} cells, duplicate ClickHouse rows {dupes}",
            takeovers[0], takeovers[1]
        ),
    );
    assert_eq!((drift, dupes), (0, 0));
}
