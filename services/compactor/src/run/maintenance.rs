//! After a run: lake compaction; and the backfill, which re-derives lake partitions
//! from the raw JSON and rebuilds.

use std::collections::BTreeSet;

use chrono::NaiveDate;
use polars::prelude::*;
use tidemark_batchview::PublishedState;

use super::{Compactor, Kind, Outcome, Result, manifest};
use crate::lake;

impl Compactor {
    /// Merges a date partition's files into one once it holds too many.
    pub async fn compact(&self, days: &BTreeSet<i64>) -> Result<()> {
        for day in days {
            let dt = manifest::date_of(*day);
            let files = manifest::lake_files_on(&self.pool, dt).await?;
            if files.len() <= self.settings.max_files_per_partition {
                continue;
            }
            let keys: Vec<String> = files.iter().map(|(k, _)| k.clone()).collect();
            let newest = files.iter().map(|(_, r)| *r).max().unwrap_or(0);
            let frames = self.read_parquet(&keys).await?;
            let mut merged = concat(
                frames.into_iter().map(IntoLazy::lazy).collect::<Vec<_>>(),
                UnionArgs::default(),
            )?
            .sort(["txid", "seq", "line_no"], SortMultipleOptions::default())
            .collect()?;
            let key = lake::lake_key(*day, &format!("compact-{newest:012}"));
            let rows = merged.height() as i64;
            let body = lake::to_parquet(&mut merged)?;
            let bytes = body.len() as i64;
            self.store.put(&key, body).await?;
            let file = manifest::LakeFile {
                key: &key,
                dt,
                run_id: newest,
                rows,
                bytes,
                compacted: true,
            };
            let mut tx = self.begin().await?;
            manifest::replace(&mut tx, &keys, &file).await?;
            self.commit(tx).await?;
            self.remove_unlisted(*day).await?;
            tracing::info!(key, files = keys.len(), rows, "Compacted a lake partition");
        }
        Ok(())
    }

    /// Deletes the objects of a date partition that the manifest no longer lists
    /// (the files a compaction or a rewrite replaced).
    async fn remove_unlisted(&self, day: i64) -> Result<()> {
        let listed: BTreeSet<String> = manifest::lake_files_on(&self.pool, manifest::date_of(day))
            .await?
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        let any = lake::lake_key(day, "x");
        let prefix = any.rsplit_once('/').map_or("", |(p, _)| p).to_owned() + "/";
        for object in self.store.list(&prefix).await? {
            if !listed.contains(&object) {
                self.store.delete(&object).await?;
            }
        }
        Ok(())
    }

    /// Re-derives the lake's date partitions in `[from, to]` from the raw JSON
    /// (everything the published batch view covers), then rebuilds the aggregates.
    pub async fn backfill(&self, from: NaiveDate, to: NaiveDate) -> Result<Outcome> {
        if let Some(state) = PublishedState::load(&self.pool).await? {
            for dt in from.iter_days().take_while(|dt| *dt <= to) {
                self.rewrite_partition(dt, &state).await?;
            }
        }
        self.run_once(Kind::Rebuild).await
    }

    async fn rewrite_partition(&self, dt: NaiveDate, state: &PublishedState) -> Result<()> {
        let keys = manifest::raw_files_on(&self.pool, dt, state.threshold).await?;
        let mut raw_bytes = Vec::new();
        for key in &keys {
            let body = self.store.get(key).await?;
            raw_bytes.extend_from_slice(&body);
            if !body.ends_with(b"\n") {
                raw_bytes.push(b'\n');
            }
        }
        let day = dt
            .and_hms_opt(0, 0, 0)
            .map_or(0, |t| t.and_utc().timestamp() / 86_400);
        let key = lake::lake_key(day, &format!("backfill-{:012}", state.run_id));
        let mut written = None;
        if !raw_bytes.is_empty() {
            let raw = lake::parse_raw(&raw_bytes)?;
            let mut orders = lake::orders_from_raw(raw, 0, state.threshold)?;
            if orders.height() > 0 {
                let rows = orders.height() as i64;
                let body = lake::to_parquet(&mut orders)?;
                let bytes = body.len() as i64;
                self.store.put(&key, body).await?;
                written = Some(manifest::LakeFile {
                    key: &key,
                    dt,
                    run_id: state.run_id as i64,
                    rows,
                    bytes,
                    compacted: true,
                });
            }
        }
        let mut tx = self.begin().await?;
        manifest::replace_date(&mut tx, dt, written.as_ref()).await?;
        self.commit(tx).await?;
        self.remove_unlisted(day).await?;
        tracing::info!(%dt, raw_files = keys.len(), "Rewrote a lake partition from the raw lake");
        Ok(())
    }
}
