//! Finished answers, serialized, shared by both doors.
//!
//! A revenue or summary answer is a function of its question and the data version:
//! the published run, the speed cursor and the exchange rates. Its bytes are kept
//! per question with the version they were computed at; a repeated question whose
//! data has not moved gets the same bytes (a reference, not a copy).
//!
//! With a live stream the speed cursor moves every few milliseconds, so a popular
//! question would be recomputed by every request, each one queueing behind the
//! others. Instead computations of one question are coalesced: one request computes,
//! and the requests that arrive while it does take its answer when it is done —
//! exact as of the position it states, which is at most one computation older than
//! the moment they arrived. A failure is shared the same way (only with the
//! requests that waited for it) and never kept.
//!
//! Under load even that wait is too long: every request after a computation
//! finishes finds the data moved and waits for the next one. So while a question
//! is being computed, a request for it takes the last answer at once if that
//! answer is at most `max_stale` old (`Outcome::Stale`). It is exact as of the
//! position it states, like every answer; only the waiting is skipped. A request
//! that finds no computation running computes, so answers keep moving with the
//! data.
//!
//! At thousands of requests a second one request in every computation's length
//! still found none running and waited for the one it started: that wait was the
//! p99. So a request that finds none running, but an answer finished at most
//! `revalidate_within` ago (off by default), takes that answer at once and leaves the new
//! computation running in the background (`Outcome::Revalidating`; stale while
//! revalidate). Only a question asked again within that short window is
//! answered so: one asked less often computes for its request as before, so a
//! dashboard's poll or a test's next question sees the data as it is. An answer
//! so given trails the data by at most one computation and the window.
//!
//! Back to back, those background computations of one hot question took a core
//! (REST p99 24 ms at 2,000/s beside `/healthz`'s 1.4 ms). So an answer finished at
//! most `recent_within` ago is given as it is, starting nothing (`Outcome::Recent`):
//! a hot question is computed at most once per that interval and its computation.
//! A question whose last computation took longer than `recent_within` (a 30-day
//! dashboard answer: 100–250 ms under load) has both windows lengthened by the
//! difference, so it is computed at most half the time rather than back to back;
//! its answers then trail the data by at most two of its computations and the
//! window.
//!
//! These windows count from when the answer was last known current — finished,
//! or found at an unchanged data version by a later request — not only from when
//! it was finished: a live stream moves the version in steps (every 100 ms in the
//! benchmark), and the first request after each step found an answer finished
//! long before (though current until a moment ago) and computed for itself, 0.5 %
//! of requests waiting 25–100 ms for a computation.
//!
//! A request that could not read the data version (a store is down) gets none of
//! these shortcuts: no kept, stale or revalidating answer, only its own
//! computation (or one that finished after it arrived), so an outage is answered
//! as an outage — 503, or a partial answer that says so — at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::compute::Computing;

/// Answers this large or larger are also kept gzip-compressed for the clients
/// that accept it; smaller ones gain too little for the work.
pub const GZIP_FROM: usize = 16 * 1024;

/// A kept answer: its JSON and, made once — the first time a client that
/// accepts gzip asks for an answer of at least [`GZIP_FROM`] bytes — the same
/// compressed. A dashboard's 30-day answer of 3.3 MB is then sent as an eighth of
/// that to every browser asking it again, and compressed once per data version
/// rather than once per request. The compressed copy is not counted in
/// `cache_bytes` (it is a fraction of the JSON it comes from).
#[derive(Clone, Debug)]
pub struct Body {
    pub json: Bytes,
    gzip: Arc<tokio::sync::OnceCell<Bytes>>,
}

impl Body {
    pub fn new(json: Bytes) -> Body {
        Body {
            json,
            gzip: Arc::default(),
        }
    }

    /// Whether the compressed copy has been made (a client took it).
    fn compressed(&self) -> bool {
        self.gzip.initialized()
    }

    /// The answer gzip-compressed (fastest level: it may be made while a request
    /// waits) on a computing thread, or `None` when it is too small to be worth it.
    pub async fn gzip(&self, computing: &Computing) -> Option<Bytes> {
        if self.json.len() < GZIP_FROM {
            return None;
        }
        let gzip = self
            .gzip
            .get_or_init(|| {
                let compressing = computing.run({
                    let json = self.json.clone();
                    move || compress(&json)
                });
                crate::views::timed("gzip", compressing)
            })
            .await;
        Some(gzip.clone())
    }
}

/// The kept answer as a `200 application/json` response: gzip-compressed when
/// the request's `Accept-Encoding` takes gzip and the answer is large enough
/// ([`Body::gzip`]). Either way it says `Vary: Accept-Encoding`, so a shared
/// cache keeps the two apart.
pub async fn respond(body: &Body, request: &HeaderMap, computing: &Computing) -> Response {
    let json = (
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let vary = (header::VARY, HeaderValue::from_static("accept-encoding"));
    if accepts_gzip(request)
        && let Some(gzip) = body.gzip(computing).await
    {
        let encoding = (header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        return ([json, vary, encoding], gzip).into_response();
    }
    ([json, vary], body.json.clone()).into_response()
}

/// Whether `Accept-Encoding` takes gzip (RFC 9110 §12.5.3): named (or as
/// `x-gzip`) with a non-zero weight, or else covered by `*` with one.
pub fn accepts_gzip(request: &HeaderMap) -> bool {
    let (mut named, mut any) = (None, None);
    for item in request
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let weight = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            named = Some(weight > 0.0);
        } else if coding == "*" {
            any = Some(weight > 0.0);
        }
    }
    named.or(any).unwrap_or(false)
}

/// Two answers are equal when their JSON is (the compressed copy follows from it).
impl PartialEq for Body {
    fn eq(&self, other: &Body) -> bool {
        self.json == other.json
    }
}

fn compress(json: &[u8]) -> Bytes {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(json.len() / 8),
        flate2::Compression::fast(),
    );
    encoder
        .write_all(json)
        .expect("writing to a Vec does not fail");
    Bytes::from(encoder.finish().expect("writing to a Vec does not fail"))
}

/// What an answer depends on: the published run, the speed cursor, the rates.
/// `None` where the caller could not read it (see [`Answers::get`]).
pub type DataVersion = (Option<u64>, Option<String>, Option<String>);

/// The data version for a question of `route`, its read timed
/// (`serving_data_version_seconds`: every cached answer waits for it).
pub async fn timed_version(
    views: &crate::views::Views,
    route: &'static str,
) -> Option<DataVersion> {
    let started = Instant::now();
    let version = views.data_version().await;
    metrics::histogram!("serving_data_version_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    version
}

/// The last outcome of one question. An answer's instant is when it was last
/// known current: when it was finished, or later when a request found the data
/// version it was computed at unchanged.
struct Slot<E> {
    answer: Option<(Option<DataVersion>, Body, Instant)>,
    failure: Option<(E, Instant)>,
    /// How long the last answer took to compute.
    cost: Duration,
}

impl<E> Default for Slot<E> {
    fn default() -> Self {
        Slot {
            answer: None,
            failure: None,
            cost: Duration::ZERO,
        }
    }
}

/// One question: its outcomes (locked while it is computed, also by a
/// computation left running in the background) and, readable without waiting
/// for a computation, its last answer and when it was finished.
struct Entry<E> {
    slot: Arc<tokio::sync::Mutex<Slot<E>>>,
    last: Mutex<Option<(Body, Instant)>>,
}

impl<E> Default for Entry<E> {
    fn default() -> Self {
        Entry {
            slot: Arc::new(tokio::sync::Mutex::new(Slot::default())),
            last: Mutex::new(None),
        }
    }
}

/// Answers by question, coalesced per question.
pub struct Answers<E> {
    slots: Mutex<Slots<E>>,
    capacity: usize,
    /// Most bytes of answers kept (past it the store starts over).
    max_bytes: usize,
    /// The oldest answer given while the question is being computed.
    max_stale: Duration,
    /// The oldest answer given at once while a newer one is computed in the
    /// background (0: never).
    revalidate_within: Duration,
    /// The oldest answer given at once without computing a newer one (0: never).
    recent_within: Duration,
    /// Where an answer is compressed ahead of its clients (see [`Answers::compressing`]).
    computing: Option<Arc<Computing>>,
}

struct Slots<E> {
    by_question: HashMap<String, Arc<Entry<E>>>,
    /// Bytes of the answers kept in `by_question`'s slots.
    bytes: usize,
}

/// How an answer was had (for the cache metric).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Kept from an earlier request at the same data version.
    Hit,
    /// Computed by another request while this one waited.
    Shared,
    /// The last answer, given at once while another request computes a newer one.
    Stale,
    /// The last answer, just finished, given at once while this request leaves a
    /// newer one computing in the background.
    Revalidating,
    /// The last answer, finished so recently that no newer one is computed yet.
    Recent,
    /// Computed for this request.
    Computed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Shared => "shared",
            Outcome::Stale => "stale",
            Outcome::Revalidating => "revalidating",
            Outcome::Recent => "recent",
            Outcome::Computed => "miss",
        }
    }
}

impl<E: Clone + Send + 'static> Answers<E> {
    pub fn new(
        capacity: usize,
        max_bytes: usize,
        max_stale: Duration,
        revalidate_within: Duration,
        recent_within: Duration,
    ) -> Self {
        Answers {
            slots: Mutex::new(Slots {
                by_question: HashMap::new(),
                bytes: 0,
            }),
            capacity: capacity.max(1),
            max_bytes,
            max_stale,
            revalidate_within,
            recent_within,
            computing: None,
        }
    }

    /// Compresses a question's new answer with its computation, on `computing`,
    /// when its last answer was taken compressed: otherwise the first requests
    /// after each computation — a dashboard's 0.9 MB answer every tenth of a
    /// second under a live stream — waited for the compression (2–5 ms) that
    /// the others took at once.
    #[must_use]
    pub fn compressing(mut self, computing: Arc<Computing>) -> Self {
        self.computing = Some(computing);
        self
    }

    /// Bytes of the answers kept now.
    pub fn kept_bytes(&self) -> usize {
        self.slots.lock().expect("not poisoned").bytes
    }

    /// The answer to `question` at `version` (observed by the caller before
    /// asking; `None` when it could not be read): kept, shared from a computation
    /// that finished while this request waited, the last one while a newer one is
    /// computed, or computed by `compute` (for this request, or in the
    /// background). Without a version only the last two.
    pub async fn get<F, Fut>(
        self: &Arc<Self>,
        question: String,
        version: Option<DataVersion>,
        compute: F,
    ) -> (Result<Body, E>, Outcome)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Bytes, E>> + Send + 'static,
    {
        let arrived = Instant::now();
        let entry = {
            let mut slots = self.slots.lock().expect("not poisoned");
            if slots.by_question.len() >= self.capacity
                && !slots.by_question.contains_key(&question)
            {
                slots.by_question.clear();
                slots.bytes = 0;
            }
            slots
                .by_question
                .entry(question.clone())
                .or_default()
                .clone()
        };
        let mut slot = match entry.slot.clone().try_lock_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // Another request computes this question: a recent answer will do.
                let last = entry.last.lock().expect("not poisoned").clone();
                if let Some((bytes, finished)) = last
                    && version.is_some()
                    && !self.max_stale.is_zero()
                    && finished.elapsed() <= self.max_stale
                {
                    return (Ok(bytes), Outcome::Stale);
                }
                entry.slot.clone().lock_owned().await
            }
        };
        if let Some((at, bytes, finished)) = &mut slot.answer
            && at.is_some()
            && *at == version
        {
            // Still current: the windows below count from now.
            *finished = Instant::now();
            let bytes = bytes.clone();
            *entry.last.lock().expect("not poisoned") = Some((bytes.clone(), *finished));
            return (Ok(bytes), Outcome::Hit);
        }
        if let Some((_, bytes, finished)) = &slot.answer {
            if *finished >= arrived {
                return (Ok(bytes.clone()), Outcome::Shared);
            }
            let age = finished.elapsed();
            let within = |window: Duration| version.is_some() && !window.is_zero() && age <= window;
            // A question that takes longer to compute than the recent window is
            // computed at most half the time: both windows grow by the difference.
            let longer = slot.cost.saturating_sub(self.recent_within);
            let (recent_within, revalidate_within) = match self.recent_within.is_zero() {
                true => (Duration::ZERO, self.revalidate_within),
                false if self.revalidate_within.is_zero() => {
                    (self.recent_within + longer, Duration::ZERO)
                }
                false => (self.recent_within + longer, self.revalidate_within + longer),
            };
            if within(recent_within) {
                return (Ok(bytes.clone()), Outcome::Recent);
            }
            if within(revalidate_within) {
                let bytes = bytes.clone();
                let answers = self.clone();
                tokio::spawn(async move {
                    answers
                        .compute(slot, &question, &entry, version, compute)
                        .await
                });
                return (Ok(bytes), Outcome::Revalidating);
            }
        }
        if let Some((failure, finished)) = &slot.failure
            && *finished >= arrived
        {
            return (Err(failure.clone()), Outcome::Shared);
        }
        let result = self
            .compute(slot, &question, &entry, version, compute)
            .await;
        (result, Outcome::Computed)
    }

    /// Computes the answer into its `slot` (held until it is kept).
    async fn compute<F, Fut>(
        &self,
        mut slot: tokio::sync::OwnedMutexGuard<Slot<E>>,
        question: &str,
        entry: &Arc<Entry<E>>,
        version: Option<DataVersion>,
        compute: F,
    ) -> Result<Body, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        let started = Instant::now();
        let result = compute().await.map(Body::new);
        let compressed = slot.answer.as_ref().is_some_and(|(_, b, _)| b.compressed());
        if let (Ok(body), true, Some(computing)) = (&result, compressed, &self.computing) {
            body.gzip(computing).await;
        }
        let finished = Instant::now();
        match &result {
            Ok(body) => {
                slot.cost = finished - started;
                let before = slot.answer.as_ref().map_or(0, |(_, b, _)| b.json.len());
                slot.answer = Some((version, body.clone(), finished));
                slot.failure = None;
                *entry.last.lock().expect("not poisoned") = Some((body.clone(), finished));
                self.account(question, entry, before, body.json.len());
            }
            Err(e) => slot.failure = Some((e.clone(), finished)),
        }
        result
    }

    /// Counts a slot's answer going from `before` to `after` bytes, if the slot is
    /// still kept; past `max_bytes` the store starts over from this answer.
    fn account(&self, question: &str, slot: &Arc<Entry<E>>, before: usize, after: usize) {
        let mut slots = self.slots.lock().expect("not poisoned");
        if !slots
            .by_question
            .get(question)
            .is_some_and(|kept| Arc::ptr_eq(kept, slot))
        {
            return;
        }
        slots.bytes = slots.bytes.saturating_sub(before) + after;
        if slots.bytes > self.max_bytes {
            // Start over, keeping this answer if it fits by itself.
            slots.by_question.clear();
            slots.bytes = 0;
            if after <= self.max_bytes {
                slots.by_question.insert(question.to_owned(), slot.clone());
                slots.bytes = after;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn gzip_is_taken_when_named_or_covered_by_a_star_with_a_weight_above_zero() {
        let takes = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
            }
            accepts_gzip(&headers)
        };
        assert!(takes(&["gzip"]));
        assert!(takes(&["gzip, deflate, br, zstd"]), "as browsers send it");
        assert!(takes(&["br", "GZip;q=0.5"]), "several headers, any case");
        assert!(takes(&["x-gzip"]));
        assert!(takes(&["*"]));
        assert!(takes(&["br;q=1, *;q=0.1"]));
        assert!(!takes(&[]));
        assert!(!takes(&["identity"]));
        assert!(!takes(&["br, deflate"]));
        assert!(!takes(&["gzip;q=0"]));
        assert!(!takes(&["gzip; q=0.000"]));
        assert!(!takes(&["*;q=1, gzip;q=0"]), "naming it wins over the star");
        assert!(!takes(&["*;q=0"]));
    }

    #[tokio::test]
    async fn a_large_answer_is_compressed_once_and_inflates_to_itself() {
        use std::io::Read;
        let json: Vec<u8> = (0..2_000)
            .flat_map(|i| format!("{{\"bucket\":{i},\"orders\":{}}},", i % 7).into_bytes())
            .collect();
        assert!(json.len() >= GZIP_FROM);
        let body = Body::new(Bytes::from(json.clone()));
        let computing = Computing::new(1, 0).unwrap();
        let (first, again) = (
            body.gzip(&computing).await.unwrap(),
            body.clone().gzip(&computing).await.unwrap(),
        );
        assert_eq!(first.as_ptr(), again.as_ptr(), "kept, not compressed again");
        assert!(first.len() * 4 < json.len());
        let mut inflated = Vec::new();
        flate2::read::GzDecoder::new(&first[..])
            .read_to_end(&mut inflated)
            .unwrap();
        assert_eq!(inflated, json);
        let small = Body::new(Bytes::from_static(b"{\"points\":[]}"));
        assert_eq!(small.gzip(&computing).await, None);
    }

    #[tokio::test]
    async fn the_next_answer_of_a_question_taken_compressed_is_compressed_before_it_is_given() {
        let computing = Arc::new(Computing::new(1, 0).unwrap());
        let answers = Arc::new(
            Answers::<String>::new(10, 1 << 20, Duration::ZERO, Duration::ZERO, Duration::ZERO)
                .compressing(computing.clone()),
        );
        let large = |n: usize| {
            let json: String = (0..2_000)
                .map(|i| format!("{{\"n\":{n},\"i\":{i}}},"))
                .collect();
            move || std::future::ready(Ok::<_, String>(Bytes::from(json)))
        };
        for q in ["plain", "taken"] {
            let (a, _) = answers.get(q.into(), version("1"), large(1)).await;
            assert!(!a.unwrap().compressed(), "none taken yet");
        }
        let (taken, _) = answers.get("taken".into(), version("1"), large(1)).await;
        assert!(taken.unwrap().gzip(&computing).await.is_some());
        let (next, o) = answers.get("taken".into(), version("2"), large(2)).await;
        assert_eq!(o, Outcome::Computed);
        assert!(next.unwrap().compressed(), "made with the computation");
        let (plain, _) = answers.get("plain".into(), version("2"), large(2)).await;
        assert!(!plain.unwrap().compressed(), "no client took it compressed");
    }

    #[tokio::test]
    async fn a_question_slow_to_compute_is_computed_at_most_half_the_time() {
        let cost = Duration::from_millis(300);
        let answers = Arc::new(Answers::<String>::new(
            10,
            1 << 20,
            Duration::ZERO,
            Duration::from_millis(30),
            Duration::from_millis(10),
        ));
        let slow = |answer: &'static str| {
            move || async move {
                tokio::time::sleep(cost).await;
                Ok::<_, String>(Bytes::from(answer))
            }
        };
        let (a, o) = answers.get("q".into(), version("1"), slow("a")).await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("a"), Outcome::Computed));
        // Past the 10 ms window, well within the 300 ms the computation took: the
        // data moved, yet the answer is given and nothing is computed.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (a, o) = answers.get("q".into(), version("2"), slow("b")).await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("a"), Outcome::Recent));
        // Past both lengthened windows (300 ms, 320 ms): computed for the request.
        tokio::time::sleep(cost + Duration::from_millis(100)).await;
        let (a, o) = answers.get("q".into(), version("2"), slow("c")).await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("c"), Outcome::Computed));
    }

    fn version(cursor: &str) -> Option<DataVersion> {
        Some((Some(1), Some(cursor.to_owned()), None))
    }

    fn store(max_stale: Duration, revalidate_within: Duration) -> Arc<Answers<String>> {
        Arc::new(Answers::new(
            10,
            1 << 20,
            max_stale,
            revalidate_within,
            Duration::ZERO,
        ))
    }

    /// A computation of `answer`, counted.
    fn counted(
        computed: &Arc<AtomicUsize>,
        answer: &'static str,
    ) -> impl FnOnce() -> std::future::Ready<Result<Bytes, String>> + Send + 'static {
        let computed = computed.clone();
        move || {
            computed.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(Bytes::from(answer)))
        }
    }

    #[tokio::test]
    async fn a_kept_answer_is_served_until_the_data_moves() {
        let answers = store(Duration::ZERO, Duration::ZERO);
        let computed = Arc::new(AtomicUsize::new(0));
        let (a, o) = answers
            .get("q".into(), version("1"), counted(&computed, "a"))
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("a"), Outcome::Computed));
        let (a, o) = answers
            .get("q".into(), version("1"), counted(&computed, "b"))
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("a"), Outcome::Hit));
        let (a, o) = answers
            .get("q".into(), version("2"), counted(&computed, "c"))
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("c"), Outcome::Computed));
        let (a, _) = answers
            .get("r".into(), version("2"), counted(&computed, "d"))
            .await;
        assert_eq!(a.unwrap().json, Bytes::from("d"));
        assert_eq!(computed.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_question_asked_again_at_once_gets_its_answer_while_the_next_is_computed() {
        let answers = store(Duration::from_secs(60), Duration::from_secs(60));
        let computed = Arc::new(AtomicUsize::new(0));
        let (a, o) = answers
            .get("q".into(), version("1"), counted(&computed, "a"))
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("a"), Outcome::Computed));
        // The data moves: the just-finished answer at once, the next one computing
        // in the background, held until released.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let background = computed.clone();
        let (a, o) = answers
            .get("q".into(), version("2"), move || async move {
                background.fetch_add(1, Ordering::SeqCst);
                released.await.expect("released");
                Ok(Bytes::from("b"))
            })
            .await;
        assert_eq!(
            (a.unwrap().json, o),
            (Bytes::from("a"), Outcome::Revalidating)
        );
        // Meanwhile the background computation holds the question: stale answers.
        let (a, o) = answers
            .get("q".into(), version("3"), counted(&computed, "x"))
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("a"), Outcome::Stale));
        release.send(()).expect("computing");
        // Once it is done, its answer is kept at its version.
        until_computed(&answers, "b").await;
        let (a, o) = answers
            .get("q".into(), version("2"), counted(&computed, "y"))
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("b"), Outcome::Hit));
        assert_eq!(computed.load(Ordering::SeqCst), 2, "a and b, nothing else");

        // A question not asked again within the window computes for its request.
        let brief = store(Duration::from_secs(60), Duration::from_millis(1));
        let (a, _) = brief
            .get("q".into(), version("1"), counted(&computed, "a"))
            .await;
        assert_eq!(a.unwrap().json, Bytes::from("a"));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let (a, o) = brief
            .get("q".into(), version("2"), counted(&computed, "c"))
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("c"), Outcome::Computed));
    }

    #[tokio::test]
    async fn a_question_asked_again_within_the_recent_interval_starts_no_computation() {
        let answers = Arc::new(Answers::new(
            10,
            1 << 20,
            Duration::ZERO,
            Duration::ZERO,
            Duration::from_secs(60),
        ));
        let computed = Arc::new(AtomicUsize::new(0));
        let (a, _) = answers
            .get("q".into(), version("1"), counted(&computed, "a"))
            .await;
        assert_eq!(a.unwrap().json, Bytes::from("a"));
        for cursor in ["2", "3", "4"] {
            let (a, o) = answers
                .get("q".into(), version(cursor), counted(&computed, "b"))
                .await;
            assert_eq!((a.unwrap().json, o), (Bytes::from("a"), Outcome::Recent));
        }
        assert_eq!(computed.load(Ordering::SeqCst), 1, "nothing computed again");
        // Not for a request that cannot read the data version.
        let (a, o) = answers.get("q".into(), None, counted(&computed, "c")).await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("c"), Outcome::Computed));
    }

    #[tokio::test]
    async fn the_windows_count_from_when_the_answer_was_last_known_current() {
        let answers = Arc::new(Answers::new(
            10,
            1 << 20,
            Duration::ZERO,
            Duration::ZERO,
            Duration::from_millis(30),
        ));
        let computed = Arc::new(AtomicUsize::new(0));
        let (a, _) = answers
            .get("q".into(), version("1"), counted(&computed, "a"))
            .await;
        assert_eq!(a.unwrap().json, Bytes::from("a"));
        // Finished longer ago than the window, but current until now.
        tokio::time::sleep(Duration::from_millis(40)).await;
        let (a, o) = answers
            .get("q".into(), version("1"), counted(&computed, "x"))
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("a"), Outcome::Hit));
        let (a, o) = answers
            .get("q".into(), version("2"), counted(&computed, "b"))
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("a"), Outcome::Recent));
        // Past the window since it was last current: computed for the request.
        tokio::time::sleep(Duration::from_millis(40)).await;
        let (a, o) = answers
            .get("q".into(), version("2"), counted(&computed, "b"))
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("b"), Outcome::Computed));
        assert_eq!(computed.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_that_cannot_read_the_data_version_computes_for_itself() {
        let answers = store(Duration::from_secs(60), Duration::from_secs(60));
        let computed = Arc::new(AtomicUsize::new(0));
        let (a, _) = answers
            .get("q".into(), version("1"), counted(&computed, "a"))
            .await;
        assert_eq!(a.unwrap().json, Bytes::from("a"));
        // Neither kept nor revalidating: the store is down, the request sees it.
        let (a, o) = answers
            .get("q".into(), None, || async { Err("down".to_owned()) })
            .await;
        assert_eq!((a, o), (Err("down".to_owned()), Outcome::Computed));
        // Nor stale while another computation runs.
        let (started, start) = tokio::sync::oneshot::channel::<()>();
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let slow = tokio::spawn({
            let answers = answers.clone();
            async move {
                answers
                    .get("q".into(), version("2"), move || async move {
                        started.send(()).unwrap();
                        finished.await.unwrap();
                        Ok(Bytes::from("b"))
                    })
                    .await
            }
        });
        start.await.unwrap();
        let waiting = tokio::spawn({
            let answers = answers.clone();
            async move {
                answers
                    .get("q".into(), None, || async { Err("down".to_owned()) })
                    .await
            }
        });
        for _ in 0..10 {
            // Lets the request run until it waits for the computation.
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "no stale answer without a version");
        // (The readable request was answered at once, revalidating in the background.)
        let (a, o) = slow.await.unwrap();
        assert_eq!(
            (a.unwrap().json, o),
            (Bytes::from("a"), Outcome::Revalidating)
        );
        finish.send(()).unwrap();
        // It shares the computation that finished after it arrived.
        let (a, o) = waiting.await.unwrap();
        assert_eq!((a.unwrap().json, o), (Bytes::from("b"), Outcome::Shared));
        // A readable version finds the answer kept again.
        let (a, o) = answers
            .get("q".into(), version("2"), counted(&computed, "x"))
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("b"), Outcome::Hit));
    }

    /// Waits until the computation of `q` left in the background has kept
    /// `expected` and let the question go.
    async fn until_computed(answers: &Arc<Answers<String>>, expected: &str) {
        let entry = answers
            .slots
            .lock()
            .unwrap()
            .by_question
            .get("q")
            .cloned()
            .expect("asked");
        loop {
            if let Ok(slot) = entry.slot.try_lock()
                && slot
                    .answer
                    .as_ref()
                    .is_some_and(|(_, body, _)| body.json == expected)
            {
                return;
            }
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn requests_arriving_during_a_computation_share_it() {
        let answers = store(Duration::ZERO, Duration::ZERO);
        let computed = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let (answers, computed) = (answers.clone(), computed.clone());
            tokio::spawn(async move {
                answers
                    .get("q".into(), version("1"), || async move {
                        computed.fetch_add(1, Ordering::SeqCst);
                        released.await.expect("released");
                        Err::<Bytes, _>("store down".to_owned())
                    })
                    .await
            })
        };
        // Wait until the first request computes, then ask at a later version.
        while computed.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let asking = Arc::new(AtomicUsize::new(0));
        let waiters: Vec<_> = (0..5)
            .map(|i| {
                let (answers, computed) = (answers.clone(), computed.clone());
                let asking = asking.clone();
                tokio::spawn(async move {
                    asking.fetch_add(1, Ordering::SeqCst);
                    answers
                        .get("q".into(), version(&format!("{}", i + 2)), || async move {
                            computed.fetch_add(1, Ordering::SeqCst);
                            Ok(Bytes::from("late"))
                        })
                        .await
                })
            })
            .collect();
        // Each waiter counts itself in the same poll that it asks in.
        while asking.load(Ordering::SeqCst) < 5 {
            tokio::task::yield_now().await;
        }
        release.send(()).expect("computing");
        assert_eq!(
            first.await.unwrap(),
            (Err("store down".to_owned()), Outcome::Computed)
        );
        for waiter in waiters {
            assert_eq!(
                waiter.await.unwrap(),
                (Err("store down".to_owned()), Outcome::Shared)
            );
        }
        assert_eq!(computed.load(Ordering::SeqCst), 1);
        // A failure is not kept: the next request computes.
        let (a, o) = answers
            .get("q".into(), version("1"), || async { Ok(Bytes::from("up")) })
            .await;
        assert_eq!(
            (a.map(|b| b.json), o),
            (Ok(Bytes::from("up")), Outcome::Computed)
        );
    }

    #[tokio::test]
    async fn while_a_question_is_computed_its_recent_answer_is_given_at_once() {
        let answers = store(Duration::from_secs(60), Duration::ZERO);
        let (a, _) = answers
            .get("q".into(), version("1"), || async { Ok(Bytes::from("a")) })
            .await;
        assert_eq!(a.unwrap().json, Bytes::from("a"));
        // The data moves; one request computes the new answer, held until released.
        let (computing, computed) = tokio::sync::oneshot::channel::<()>();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let answers = answers.clone();
            tokio::spawn(async move {
                answers
                    .get("q".into(), version("2"), || async move {
                        computing.send(()).expect("waiting");
                        released.await.expect("released");
                        Ok(Bytes::from("b"))
                    })
                    .await
            })
        };
        computed.await.expect("computing");
        // Meanwhile: the last answer at once, for this question only.
        let (a, o) = answers
            .get("q".into(), version("3"), || async { Ok(Bytes::from("c")) })
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("a"), Outcome::Stale));
        let (a, o) = answers
            .get("r".into(), version("3"), || async { Ok(Bytes::from("r")) })
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("r"), Outcome::Computed));
        release.send(()).expect("computing");
        assert_eq!(
            first.await.unwrap(),
            (Ok(Body::new(Bytes::from("b"))), Outcome::Computed)
        );
        // No computation running: a request at a newer version computes.
        let (a, o) = answers
            .get("q".into(), version("3"), || async { Ok(Bytes::from("c")) })
            .await;
        assert_eq!((a.unwrap().json, o), (Bytes::from("c"), Outcome::Computed));
    }

    #[tokio::test]
    async fn kept_answers_never_hold_more_than_their_budget() {
        let answers = Arc::new(Answers::<String>::new(
            1_000,
            10_000,
            Duration::ZERO,
            Duration::ZERO,
            Duration::ZERO,
        ));
        for i in 0..50 {
            let (a, o) = answers
                .get(format!("q{i}"), version("1"), || async {
                    Ok(Bytes::from(vec![b'x'; 3_000]))
                })
                .await;
            assert_eq!((a.unwrap().json.len(), o), (3_000, Outcome::Computed));
            assert!(
                answers.kept_bytes() <= 10_000,
                "{} kept",
                answers.kept_bytes()
            );
        }
        // Within the budget, answers are kept: the last three are hits.
        let (_, o) = answers
            .get("q49".into(), version("1"), || async { Ok(Bytes::new()) })
            .await;
        assert_eq!(o, Outcome::Hit);
        // A question answered again at a new version replaces its bytes.
        let before = answers.kept_bytes();
        let (_, o) = answers
            .get("q49".into(), version("2"), || async {
                Ok(Bytes::from(vec![b'y'; 1_000]))
            })
            .await;
        assert_eq!(o, Outcome::Computed);
        assert_eq!(answers.kept_bytes(), before - 2_000);
    }
}
