//! Questions of the query model (dimensions, filters, zone, basis, reporting
//! currency) as tests draw and ask them; their ground truth is
//! [`tidemark_orderlog::question`].

use rand::Rng;
use rand::rngs::StdRng;
use sqlx::PgPool;

/// A revenue question as a client asks it.
#[derive(Clone, Debug)]
pub struct Slice {
    pub granularity: &'static str,
    pub tz: &'static str,
    /// Zero to two of `city`, `category`, `product`.
    pub group_by: Vec<&'static str>,
    /// Per attribute, the values kept.
    pub filters: Vec<(&'static str, Vec<String>)>,
    pub currency: Option<&'static str>,
    /// Convert to this currency (`report_currency`).
    pub report: Option<&'static str>,
    /// `order_time` basis, else `booking_time`.
    pub order_time: bool,
}

/// The cells of an answer (see [`tidemark_orderlog::question::Cells`]).
pub type SliceCells = tidemark_orderlog::question::Cells;

/// Zones worth asking in: whole-hour, half-hour and 45-minute offsets, and two
/// with daylight saving on either hemisphere.
pub const ZONES: [&str; 6] = [
    "UTC",
    "Europe/Berlin",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "America/New_York",
    "Australia/Adelaide",
];

impl Slice {
    /// A random question over the values [`crate::random_order`] makes.
    pub fn random(rng: &mut StdRng) -> Slice {
        const ATTRIBUTES: [&str; 3] = ["city", "category", "product"];
        let values = |attribute: &str| -> Vec<String> {
            match attribute {
                "city" => ["Berlin", "Paris", "São Paulo", "Zürich", "Oslo", "Nowhere"]
                    .map(str::to_owned)
                    .to_vec(),
                "category" => ["books", "games", "garden"].map(str::to_owned).to_vec(),
                _ => (0..30)
                    .map(|p| {
                        if p % 3 == 0 {
                            format!("p:{p}")
                        } else {
                            format!("p-{p}")
                        }
                    })
                    .collect(),
            }
        };
        let mut group_by = Vec::new();
        for _ in 0..rng.random_range(0..=2) {
            let a = ATTRIBUTES[rng.random_range(0..3)];
            if !group_by.contains(&a) {
                group_by.push(a);
            }
        }
        let mut filters = Vec::new();
        for a in ATTRIBUTES {
            if rng.random_bool(0.3) {
                let all = values(a);
                let n = rng.random_range(1..=3);
                let chosen = (0..n)
                    .map(|_| all[rng.random_range(0..all.len())].clone())
                    .collect();
                filters.push((a, chosen));
            }
        }
        Slice {
            granularity: ["minute", "quarter_hour", "hour", "hour", "day", "day"]
                [rng.random_range(0..6)],
            tz: ZONES[rng.random_range(0..ZONES.len())],
            group_by,
            filters,
            currency: rng
                .random_bool(0.2)
                .then(|| ["EUR", "JPY", "KWD"][rng.random_range(0..3)]),
            report: None,
            order_time: rng.random_bool(0.5),
        }
    }

    /// The query string (without range) REST takes for this question.
    pub fn query(&self) -> String {
        self.question().query()
    }

    /// The question as the log's ground truth takes it.
    pub fn question(&self) -> tidemark_orderlog::question::Question {
        tidemark_orderlog::question::Question {
            granularity: self.granularity.to_owned(),
            tz: self.tz.to_owned(),
            group_by: self.group_by.iter().map(|g| (*g).to_owned()).collect(),
            filters: self
                .filters
                .iter()
                .map(|(a, v)| ((*a).to_owned(), v.clone()))
                .collect(),
            currency: self.currency.map(str::to_owned),
            report: self.report.map(str::to_owned),
            order_time: self.order_time,
        }
    }

    /// The truth for this question over every order and adjustment in the log
    /// ([`tidemark_orderlog::question::Question::truth`]).
    pub async fn truth(&self, pool: &PgPool) -> SliceCells {
        self.question()
            .truth(pool, None, None)
            .await
            .unwrap_or_else(|e| panic!("truth of {self:?}: {e}"))
    }
}
