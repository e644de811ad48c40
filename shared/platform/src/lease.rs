//! Leases: one writer per single-writer role, and standbys that take over.
//!
//! The lake relay, the speed consumer, the vault loader and the compactor may each
//! run as several instances; a row of `leases` (one per role) decides which one
//! writes. Every instance runs [`Lease::run`]: the holder renews the row every
//! `ttl / 3`; the others try to take it every `ttl / 3` and succeed only once it
//! has expired — by Postgres's clock, so the instances' clocks never matter. A
//! leader that dies is replaced within `ttl + ttl / 3`; one that shuts down
//! releases the row and is replaced at the standby's next try.
//!
//! Expiry alone cannot stop a leader that was paused (SIGSTOP, a long GC-like
//! stall, a VM migration) and wakes up still believing it leads, with a write
//! already on its way. So every change of holder increments the row's `token`,
//! the fencing token, and each role's writes carry the token they were planned
//! under: [`Fence::check`] last in the write's own Postgres transaction (it
//! share-locks the row until the commit, so a takeover waits for the write to
//! commit and any later write with the old token is refused), or the speed view's
//! Redis script, which keeps the highest token it has seen. A leader paused inside
//! a transaction would hold its locks, and so the takeover, until Postgres ends the
//! transaction: [`Fence::bound`] makes that happen after `ttl` of idleness. A refused write is counted in
//! `lease_fenced_writes_total{role}` and fails that step; the instance finds it
//! is no longer the leader at its next renewal.
//!
//! `lease_leading{role}` is 1 on the instance that leads and 0 on standbys, and
//! `/readyz` names the leader.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::config::{Validate, millis};

/// How long a lease lasts and who this instance is.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LeaseConfig {
    /// How long a lease lasts without renewal. A dead leader is replaced within
    /// `ttl + ttl / 3`; a shorter lease also makes a slow renewal (Postgres busy for
    /// longer than `ttl`) cost the leader its lease.
    #[serde(with = "millis")]
    pub ttl: Duration,
    /// This instance's name in `leases.holder` and on `/readyz`; by default the host
    /// name, the process id and a random suffix (unique per start).
    pub instance: Option<String>,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(5),
            instance: None,
        }
    }
}

impl Validate for LeaseConfig {
    fn validate(&self, problems: &mut Vec<String>) {
        if self.ttl < Duration::from_millis(300) {
            problems.push("lease.ttl must be at least 300 ms".into());
        }
        if self.instance.as_ref().is_some_and(|i| i.trim().is_empty()) {
            problems.push("lease.instance must not be blank".into());
        }
    }
}

/// A write refused because its token is no longer the role's.
#[derive(Debug, thiserror::Error)]
#[error("the {role} lease moved on: this write carries token {token}, the role's is now {current}")]
pub struct Fenced {
    pub role: &'static str,
    pub token: u64,
    pub current: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

/// The right to write for a role, as of when a step started: its fencing token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    pub role: &'static str,
    /// 0 for an unfenced role (see [`Lease::unfenced`]).
    pub token: u64,
    /// The lease's duration: how long a write's transaction may sit idle.
    pub ttl: Duration,
}

impl Fence {
    /// At the start of a write's transaction: if this process stalls inside it
    /// (paused, or cut off), Postgres ends the transaction after the lease's
    /// duration, releasing its locks for the successor, rather than after the
    /// pool's minute.
    pub async fn bound(&self, tx: &mut PgConnection) -> Result<(), sqlx::Error> {
        if self.token == 0 {
            return Ok(());
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL idle_in_transaction_session_timeout = {}",
            self.ttl.as_millis().max(1)
        )))
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Last in the write's transaction, right before its commit: refuses the write
    /// unless the role's token is still this one. The row stays share-locked until
    /// the commit, so a takeover (which updates it) either came first and this
    /// write is refused, or waits for the commit. (It also [bounds](Fence::bound)
    /// the transaction.)
    pub async fn check(&self, tx: &mut PgConnection) -> Result<(), FenceError> {
        if self.token == 0 {
            return Ok(());
        }
        self.bound(&mut *tx).await?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT token FROM leases WHERE role = $1 FOR SHARE")
                .bind(self.role)
                .fetch_optional(tx)
                .await?;
        let current = current.unwrap_or(0) as u64;
        if current == self.token {
            Ok(())
        } else {
            Err(self.refused(current).into())
        }
    }

    /// Counts and describes a write refused because the role's token is `current`.
    pub fn refused(&self, current: u64) -> Fenced {
        metrics::counter!("lease_fenced_writes_total", "role" => self.role).increment(1);
        tracing::warn!(
            role = self.role,
            token = self.token,
            current,
            "A write of a former leader was refused"
        );
        Fenced {
            role: self.role,
            token: self.token,
            current,
        }
    }
}

/// Where an instance stands for a role, as `/readyz` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Standing {
    /// `leading`, `standby`, or `unfenced` (the only writer by construction).
    pub state: &'static str,
    /// This instance.
    pub instance: String,
    /// The instance that leads, as last seen (`None` before the first round).
    pub leader: Option<String>,
    /// The leader's fencing token, as last seen.
    pub token: Option<u64>,
}

#[derive(Default)]
struct State {
    /// Leading with this token until this instant (by this process's clock).
    held: Option<(u64, Instant)>,
    /// The row as last read: holder and token.
    seen: Option<(String, u64)>,
}

/// One instance's lease on one role.
#[derive(Clone)]
pub struct Lease(Arc<Inner>);

struct Inner {
    /// `None` for an unfenced lease.
    pool: Option<PgPool>,
    role: &'static str,
    instance: String,
    ttl: Duration,
    state: Mutex<State>,
}

impl Lease {
    pub fn new(pool: PgPool, role: &'static str, config: &LeaseConfig) -> Lease {
        let instance = config.instance.clone().unwrap_or_else(default_instance);
        metrics::gauge!("lease_leading", "role" => role).set(0.0);
        Lease(Arc::new(Inner {
            pool: Some(pool),
            role,
            instance,
            ttl: config.ttl,
            state: Mutex::default(),
        }))
    }

    /// A lease that always leads with token 0 and checks nothing: for a role run
    /// in-process by a test or a tool that is the only writer by construction.
    /// (Redis refuses its writes once a fenced leader has written.)
    pub fn unfenced(role: &'static str) -> Lease {
        Lease(Arc::new(Inner {
            pool: None,
            role,
            instance: "unfenced".into(),
            ttl: Duration::MAX,
            state: Mutex::default(),
        }))
    }

    pub fn role(&self) -> &'static str {
        self.0.role
    }

    pub fn instance(&self) -> &str {
        &self.0.instance
    }

    /// The right to write now, if this instance leads (and its lease has not run
    /// out by its own clock since the last renewal).
    pub fn fence(&self) -> Option<Fence> {
        if self.0.pool.is_none() {
            return Some(Fence {
                role: self.0.role,
                token: 0,
                ttl: self.0.ttl,
            });
        }
        let state = self.0.state.lock().expect("lease state");
        let (token, until) = state.held?;
        (Instant::now() < until).then_some(Fence {
            role: self.0.role,
            token,
            ttl: self.0.ttl,
        })
    }

    /// Where this instance stands, for `/readyz`.
    pub fn standing(&self) -> Standing {
        if self.0.pool.is_none() {
            return Standing {
                state: "unfenced",
                instance: self.0.instance.clone(),
                leader: Some(self.0.instance.clone()),
                token: Some(0),
            };
        }
        let leading = self.fence().is_some();
        let state = self.0.state.lock().expect("lease state");
        Standing {
            state: if leading { "leading" } else { "standby" },
            instance: self.0.instance.clone(),
            leader: state.seen.as_ref().map(|(holder, _)| holder.clone()),
            token: state.seen.as_ref().map(|(_, token)| *token),
        }
    }

    /// One round: renews the lease if this instance holds it, takes it if it has
    /// expired, and otherwise notes who holds it. Returns whether this instance
    /// leads.
    pub async fn round(&self) -> Result<bool, sqlx::Error> {
        let Some(pool) = &self.0.pool else {
            return Ok(true);
        };
        let started = Instant::now();
        let taken: Option<i64> = sqlx::query_scalar(
            "INSERT INTO leases AS l (role, holder, token, acquired_at, expires_at) \
             VALUES ($1, $2, 1, clock_timestamp(), clock_timestamp() + make_interval(secs => $3)) \
             ON CONFLICT (role) DO UPDATE SET \
               token = CASE WHEN l.holder = EXCLUDED.holder THEN l.token ELSE l.token + 1 END, \
               acquired_at = CASE WHEN l.holder = EXCLUDED.holder THEN l.acquired_at \
                                  ELSE EXCLUDED.acquired_at END, \
               holder = EXCLUDED.holder, \
               expires_at = EXCLUDED.expires_at \
             WHERE l.holder = EXCLUDED.holder OR l.expires_at <= clock_timestamp() \
             RETURNING token",
        )
        .bind(self.0.role)
        .bind(&self.0.instance)
        .bind(self.0.ttl.as_secs_f64())
        .fetch_optional(pool)
        .await?;
        let seen = match taken {
            Some(token) => Some((self.0.instance.clone(), token as u64)),
            None => sqlx::query_as::<_, (String, i64)>(
                "SELECT holder, token FROM leases WHERE role = $1",
            )
            .bind(self.0.role)
            .fetch_optional(pool)
            .await?
            .map(|(holder, token)| (holder, token as u64)),
        };
        let mut state = self.0.state.lock().expect("lease state");
        let was = state.held.map(|(token, _)| token);
        state.held = taken.map(|token| (token as u64, started + self.0.ttl));
        state.seen = seen;
        let now = state.held.map(|(token, _)| token);
        drop(state);
        if was != now {
            metrics::gauge!("lease_leading", "role" => self.0.role).set(now.map_or(0.0, |_| 1.0));
            match now {
                Some(token) => {
                    metrics::counter!("lease_acquired_total", "role" => self.0.role).increment(1);
                    tracing::info!(role = self.0.role, token, instance = %self.0.instance, "Leading");
                }
                None => {
                    tracing::warn!(role = self.0.role, instance = %self.0.instance, "Lost the lease; standing by");
                }
            }
        }
        Ok(taken.is_some())
    }

    /// Waits until this instance holds the lease (trying every `ttl / 3`), for a
    /// role held only while it works (the compactor, for the length of a run).
    pub async fn acquire(&self) -> Result<Fence, sqlx::Error> {
        loop {
            if self.round().await?
                && let Some(fence) = self.fence()
            {
                return Ok(fence);
            }
            tokio::time::sleep(self.0.ttl / 3).await;
        }
    }

    /// Renews the lease every `ttl / 3` for as long as the returned handle lives
    /// (a role holding it while it works; see [`Lease::acquire`]).
    pub fn keep(&self) -> tokio_util::task::AbortOnDropHandle<()> {
        let lease = self.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease.0.ttl / 3).await;
                if let Err(e) = lease.round().await {
                    tracing::warn!(role = lease.0.role, error = %e, "Lease renewal failed");
                }
            }
        }))
    }

    /// Gives the lease up (at shutdown), so a standby takes over at its next try.
    pub async fn release(&self) -> Result<(), sqlx::Error> {
        let Some(pool) = &self.0.pool else {
            return Ok(());
        };
        self.0.state.lock().expect("lease state").held = None;
        metrics::gauge!("lease_leading", "role" => self.0.role).set(0.0);
        sqlx::query(
            "UPDATE leases SET expires_at = clock_timestamp() WHERE role = $1 AND holder = $2",
        )
        .bind(self.0.role)
        .bind(&self.0.instance)
        .execute(pool)
        .await?;
        Ok(())
    }

    /// Renews or tries to take the lease every `ttl / 3` until `shutdown`, then
    /// releases it if held. Call it once per instance and role, beside the role's
    /// worker; the worker writes only while [`Lease::fence`] gives it a token.
    pub async fn run(self, shutdown: CancellationToken) {
        let every = self.0.ttl / 3;
        while !shutdown.is_cancelled() {
            if let Err(e) = self.round().await {
                tracing::warn!(role = self.0.role, error = %e, "Lease round failed");
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
        }
        if self.fence().is_some()
            && let Err(e) = self.release().await
        {
            tracing::warn!(role = self.0.role, error = %e, "Could not release the lease; it expires");
        }
    }
}

fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &suffix[..8])
}
