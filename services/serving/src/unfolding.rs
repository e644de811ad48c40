//! Reading the batch view without `FINAL` where no row of it can be there twice.
//!
//! `FINAL` passes every row a read overlaps through one merging thread — a third
//! to a half of the revenue cells statement's CPU, measured — to fold the rows of
//! one fault: a run's partition attached twice, by a compactor paused between its
//! check and its attach that resumes after its successor published the same run
//! (`compactor::run::publish`; ClickHouse 18.16 cannot make check and attach one
//! step). That fault only ever adds rows, so it shows as more rows of the
//! published runs than their publishes staged ([`tidemark_batchview::clean`]).
//!
//! So, on a single server: the view's [`Generation`] (the highest block number of
//! each partition, which every attach raises) is counted once per published state
//! and generation, in the background; a read at a generation counted clean goes
//! without `FINAL`, and its rows are kept only if the generation is the same after
//! it — an attach between the check and the read's snapshot of parts would have
//! raised it — or else read again, folding. Every other read folds: before a
//! count, while one runs, after one found rows twice (until a publish moves the
//! generation), and always on a sharded view (its `Distributed` reads go to
//! replicas this cannot see).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};

use sqlx::PgPool;
use tidemark_batchview::{Generation, PublishedState};

pub struct Unfolding {
    ch: clickhouse::Client,
    pool: PgPool,
    /// The last generation counted, of which published state, and its verdict.
    known: Mutex<Option<Known>>,
    counting: AtomicBool,
}

#[derive(Clone)]
struct Known {
    run_id: u64,
    base_run_id: u64,
    generation: Generation,
    clean: bool,
}

impl Unfolding {
    pub fn new(ch: clickhouse::Client, pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            ch,
            pool,
            known: Mutex::new(None),
            counting: AtomicBool::new(false),
        })
    }

    /// The generation at which a read for `state` may go without `FINAL`, if the
    /// view's present one was counted clean for it; a generation not counted yet
    /// starts a count (in the background) and this read folds.
    pub async fn clean_generation(self: &Arc<Self>, state: &PublishedState) -> Option<Generation> {
        let generation = tidemark_batchview::generation(&self.ch).await.ok()?;
        let known = self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match known {
            Some(k)
                if k.run_id == state.run_id
                    && k.base_run_id == state.base_run_id
                    && k.generation == generation =>
            {
                k.clean.then_some(generation)
            }
            _ => {
                self.count(state.clone(), generation);
                None
            }
        }
    }

    /// Whether the view's generation is still `generation` (after a read).
    pub async fn unchanged(&self, generation: &Generation) -> bool {
        tidemark_batchview::generation(&self.ch)
            .await
            .is_ok_and(|now| now == *generation)
    }

    /// Counts `generation` for `state` in the background, unless a count runs.
    fn count(self: &Arc<Self>, state: PublishedState, generation: Generation) {
        if self.counting.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            match tidemark_batchview::clean(&this.ch, &this.pool, &state, &generation).await {
                Ok(Some(clean)) => {
                    if !clean {
                        tracing::warn!(
                            run_id = state.run_id,
                            "The batch view holds more rows of the published runs than they \
                             staged (a run attached twice): its reads fold them (FINAL) until \
                             the next publish"
                        );
                    }
                    let result = if clean { "clean" } else { "rows twice" };
                    metrics::counter!("serving_batch_generations_total", "result" => result)
                        .increment(1);
                    *this.known.lock().unwrap_or_else(PoisonError::into_inner) = Some(Known {
                        run_id: state.run_id,
                        base_run_id: state.base_run_id,
                        generation,
                        clean,
                    });
                }
                // The generation moved while counting: a later read counts again.
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "Counting the batch view's rows failed"),
            }
            this.counting.store(false, Ordering::Release);
        });
    }
}
