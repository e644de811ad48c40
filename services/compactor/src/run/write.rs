//! Step 2: write the run's orders from the raw lake to the Parquet lake.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use futures::{StreamExt, TryStreamExt};
use polars::prelude::*;

use super::{Compactor, Result, Run, RunError, manifest, timed};
use crate::aggregate::CurrencyTotals;
use crate::held::Held;
use crate::lake;

/// The new orders a run read from the raw lake and wrote to the Parquet lake.
pub struct Written {
    /// The run's order lines and corrections, as the stage and the audit read them.
    pub orders: Held,
    /// Raw records in the run's range, before de-duplication.
    pub raw_records: u64,
    pub raw_totals: CurrencyTotals,
    /// The run's Parquet files, and their bytes.
    pub parquet_keys: Vec<String>,
    pub parquet_bytes: u64,
    pub days: BTreeSet<i64>,
}

impl Compactor {
    /// Reads the run's new orders from the raw lake and writes them to the Parquet
    /// lake, one file per event date.
    ///
    /// A task downloads the raw objects (four at a time) and parses them (two at a
    /// time, on blocking threads), keeping only the run's range; meanwhile this one
    /// types, de-duplicates and encodes them in groups of about [`GROUP_ROWS`]
    /// records, and uploads each date's file in parts of
    /// `compactor.upload_part_bytes` as it grows (a group's parts while the next
    /// group is encoded; completed once the run's last group is in it; aborted if
    /// the step fails). Memory holds a group of raw
    /// records and a part of each date's file, not the run as text, as full frames
    /// or as whole files.
    pub async fn write_lake(&self, run: &Run) -> Result<Written> {
        self.set_step(run, "write_lake").await?;
        let files =
            manifest::raw_files_between(&self.pool, run.from_threshold, run.threshold).await?;
        let repeats = lake::Repeats::of(files.iter().map(|f| (f.after, f.until, f.hour)));
        match self.write_lake_files(run, files.clone(), repeats).await {
            Err(RunError::Lake(lake::LakeError::OutsideBatch(e))) => {
                tracing::warn!(
                    run_id = run.run_id,
                    error = %e,
                    "A raw object holds a record outside its relay batch; \
                     written again checking every record for repeats"
                );
                self.write_lake_files(run, files, lake::Repeats::everywhere())
                    .await
            }
            written => written,
        }
    }

    /// [`Compactor::write_lake`] of `files`, with the order-id set holding the
    /// records that `repeats` says may repeat.
    async fn write_lake_files(
        &self,
        run: &Run,
        files: Vec<manifest::RawFile>,
        repeats: lake::Repeats,
    ) -> Result<Written> {
        /// Records per group (each a Parquet row group per date): large enough
        /// for good row groups (DuckDB writes 122,880 rows), small enough that the
        /// first group's encoding starts early and overlaps the rest's parsing.
        /// With 250,000, eight objects downloaded ahead and four parsed ones
        /// queued, a run of 1M orders peaked at 466–486 MB in this step; with
        /// these, four and two, at 358 MB in the same time (`bench compactor`).
        const GROUP_ROWS: usize = 125_000;
        let raw_files = files.len();
        let repeats = Arc::new(repeats);
        let (from, to) = (run.from_threshold, run.threshold);
        let (tx, mut parsed) = tokio::sync::mpsc::channel::<Result<DataFrame>>(2);
        let store = self.store.clone();
        let reader = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            let mut frames = futures::stream::iter(files)
                .map(move |file| {
                    let store = store.clone();
                    async move { Ok::<_, RunError>((store.get(&file.key).await?, file)) }
                })
                .buffered(4)
                .map(|got| async {
                    let (body, file) = got?;
                    let repeats = repeats.clone();
                    tokio::task::spawn_blocking(move || {
                        let raw = lake::in_range(lake::parse_raw(&body)?, from, to)?;
                        repeats.mark(raw, &file.key, (file.after, file.until))
                    })
                    .await
                    .expect("the parse task does not panic")
                    .map_err(RunError::from)
                })
                .buffered(2);
            while let Some(frame) = frames.next().await {
                let failed = frame.is_err();
                if tx.send(frame).await.is_err() || failed {
                    return;
                }
            }
        }));
        let run_id = run.run_id;
        let key_of = |day: i64| lake::lake_key(day, &format!("part-{run_id:012}"));
        // Each date's file, uploaded in parts while it is written (S3 multipart).
        let mut uploads: BTreeMap<i64, lake::Upload> = BTreeMap::new();
        let (mut wait_ms, mut encode_ms, mut upload_ms, mut parts) = (0, 0, 0, 0);
        let mut ids_held = 0;
        let written = async {
            let (mut writer, mut group, mut rows) = (
                lake::LakeWriter::holding(self.settings.spill()),
                Vec::new(),
                0,
            );
            // Parts of the dates' files taken from the writer, not yet sent.
            let mut ready: Vec<(i64, Vec<u8>)> = Vec::new();
            loop {
                let t = Instant::now();
                let next = parsed.recv().await.transpose()?;
                wait_ms += t.elapsed().as_millis() as u64;
                let done = next.is_none();
                if let Some(frame) = next {
                    rows += frame.height();
                    group.push(frame);
                }
                if rows >= GROUP_ROWS || (done && !group.is_empty()) {
                    // The previous group's parts go up while this one is encoded
                    // (on a blocking thread: polars never runs on this task).
                    let t = Instant::now();
                    let frames = std::mem::take(&mut group);
                    let encoding =
                        tokio::task::spawn_blocking(move || writer.add(frames).map(|()| writer));
                    let sending = send_parts(
                        &self.store,
                        &mut uploads,
                        std::mem::take(&mut ready),
                        &key_of,
                    );
                    let ((encoded, encoded_ms), (sent, sent_ms)) =
                        tokio::join!(timed(t, encoding), timed(t, Box::pin(sending)));
                    parts += sent?;
                    writer = encoded.expect("the lake task does not panic")?;
                    (encode_ms, upload_ms) = (encode_ms + encoded_ms, upload_ms + sent_ms);
                    rows = 0;
                    ready = writer.take_parts(self.settings.upload_part_bytes);
                }
                if done {
                    break;
                }
            }
            let t = Instant::now();
            parts += Box::pin(send_parts(&self.store, &mut uploads, ready, &key_of)).await?;
            upload_ms += t.elapsed().as_millis() as u64;
            // The channel also closes if the reader died: only its clean end means
            // that every object was read.
            reader.await.expect("the raw reader does not panic");
            let (raw_records, raw_totals) = (writer.raw_records, writer.raw_totals.clone());
            ids_held = writer.ids_held();
            let (files, orders) = tokio::task::spawn_blocking(move || writer.finish())
                .await
                .expect("the lake task does not panic")?;
            let mut written = Written {
                orders,
                raw_records,
                raw_totals,
                parquet_keys: Vec::new(),
                parquet_bytes: 0,
                days: BTreeSet::new(),
            };
            let t = Instant::now();
            for file in files {
                let key = key_of(file.day);
                let bytes = match uploads.remove(&file.day) {
                    Some(mut upload) => {
                        self.store.upload_part(&mut upload, file.body).await?;
                        let bytes = upload.bytes;
                        self.store.complete(upload).await?;
                        bytes
                    }
                    None => {
                        let bytes = file.body.len() as u64;
                        self.store.put(&key, file.body).await?;
                        bytes
                    }
                };
                let record = manifest::LakeFile {
                    key: &key,
                    dt: manifest::date_of(file.day),
                    run_id: run_id as i64,
                    rows: file.rows as i64,
                    bytes: bytes as i64,
                    compacted: false,
                };
                let mut tx = self.begin().await?;
                manifest::record(&mut *tx, &record).await?;
                self.commit(tx).await?;
                written.parquet_keys.push(key);
                written.parquet_bytes += bytes;
                written.days.insert(file.day);
            }
            upload_ms += t.elapsed().as_millis() as u64;
            Ok::<_, RunError>(written)
        }
        .await;
        // A failed run's parts are dropped (the next attempt writes the same keys).
        for (_, upload) in uploads {
            if let Err(e) = self.store.abort(upload).await {
                tracing::warn!(error = %e, run_id, "An unfinished Parquet upload was not aborted");
            }
        }
        let written = written?;
        tracing::info!(
            run_id = run.run_id,
            raw_files,
            raw_records = written.raw_records,
            orders = written.orders.height(),
            orders_mb = written.orders.estimated_size() / 1_000_000,
            spilled_mb = written.orders.spilled().0 / 1_000_000,
            spilled_files = written.orders.spilled().1,
            ids_held,
            parquet_files = written.parquet_keys.len(),
            parquet_mb = written.parquet_bytes / 1_000_000,
            wait_ms,
            encode_ms,
            parts,
            upload_ms,
            "Lake written"
        );
        Ok(written)
    }

    /// Every order in the Parquet lake with `txid < threshold`.
    pub async fn read_lake(&self, threshold: u64) -> Result<Held> {
        let keys = manifest::lake_files(&self.pool).await?;
        let frames = self.read_parquet(&keys).await?;
        if frames.is_empty() {
            return Ok(Held::of(&DataFrame::empty())?);
        }
        let all = concat(
            frames.into_iter().map(IntoLazy::lazy).collect::<Vec<_>>(),
            UnionArgs::default(),
        )?
        .filter(col("txid").lt(lit(threshold.min(i64::MAX as u64) as i64)));
        let measured = lake::with_measures(all)
            .select(lake::MEASURED.map(col))
            .collect()?;
        Ok(Held::of(&measured)?)
    }

    /// Downloads objects, eight at a time, in order.
    async fn fetch(&self, keys: &[String]) -> Result<Vec<bytes::Bytes>> {
        let bodies: Vec<bytes::Bytes> = futures::stream::iter(keys.to_vec())
            .map(|key| {
                let store = self.store.clone();
                async move { store.get(&key).await }
            })
            .buffered(8)
            .try_collect()
            .await?;
        Ok(bodies)
    }

    pub(super) async fn read_parquet(&self, keys: &[String]) -> Result<Vec<DataFrame>> {
        let bodies = self.fetch(keys).await?;
        let mut frames = Vec::with_capacity(bodies.len());
        for body in bodies {
            frames.push(lake::from_parquet(&body)?);
        }
        Ok(frames)
    }
}

/// Sends `parts` (date, bytes) as the next parts of their dates' uploads, starting
/// an upload at a date's first part. Returns the parts sent.
async fn send_parts(
    store: &lake::Store,
    uploads: &mut BTreeMap<i64, lake::Upload>,
    parts: Vec<(i64, Vec<u8>)>,
    key_of: &impl Fn(i64) -> String,
) -> Result<usize> {
    let sent = parts.len();
    for (day, body) in parts {
        let upload = match uploads.entry(day) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(store.start_upload(&key_of(day)).await?),
        };
        store.upload_part(upload, body).await?;
    }
    Ok(sent)
}
