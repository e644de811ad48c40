//! Questions of the query model answered by SQL over the log: the ground truth
//! the tests and `tidemark-verify` compare served answers with. Written apart
//! from the serving code on purpose: Postgres's own time-zone database buckets
//! the local hours and days, and the conversion rule is restated in SQL.

use std::collections::BTreeMap;

use sqlx::PgPool;

/// A revenue question (the query parameters of `GET /v1/revenue`, parsed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// `minute`, `hour` or `day`.
    pub granularity: String,
    /// An IANA zone.
    pub tz: String,
    /// Zero to two of `city`, `category`, `product`.
    pub group_by: Vec<String>,
    /// Per attribute, the values kept.
    pub filters: Vec<(String, Vec<String>)>,
    pub currency: Option<String>,
    /// Convert to this currency (`report_currency`).
    pub report: Option<String>,
    /// `order_time` basis, else `booking_time`.
    pub order_time: bool,
}

/// Which events an answer covers: those below the batch `threshold` (a
/// transaction id) and those at or before the speed `cursor` (txid, seq).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsOf {
    pub threshold: u64,
    pub cursor: (u64, i64),
}

/// The cells of an answer: (bucket start as unix seconds, the grouped values,
/// currency) → gross revenue, orders, items, refunded minor units, refunded items,
/// cancelled orders, buyers (distinct users with an order line there).
pub type Cells = BTreeMap<(i64, Vec<String>, String), [i64; 7]>;

impl Question {
    /// The query string of `GET /v1/revenue` for this question, without its range
    /// (values percent-encoded; a comma or backslash in a value escaped).
    pub fn query(&self) -> String {
        let encode = |v: &str| -> String {
            v.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect()
        };
        let basis = if self.order_time {
            "order_time"
        } else {
            "booking_time"
        };
        let mut q = format!(
            "granularity={}&tz={}&basis={basis}",
            self.granularity,
            encode(&self.tz)
        );
        if !self.group_by.is_empty() {
            q += &format!("&group_by={}", self.group_by.join(","));
        }
        for (a, values) in &self.filters {
            let values: Vec<String> = values
                .iter()
                .map(|v| v.replace('\\', r"\\").replace(',', r"\,"))
                .collect();
            q += &format!("&{a}={}", encode(&values.join(",")));
        }
        for (name, value) in [
            ("currency", &self.currency),
            ("report_currency", &self.report),
        ] {
            if let Some(c) = value {
                q += &format!("&{name}={c}");
            }
        }
        q
    }

    /// The truth for this question over every order and adjustment in the log.
    ///
    /// Two levels: per minute and combination of the values of the stored shape
    /// that covers the question's dimensions (`Dimension::covering`; an order
    /// counts once per combination), then into the question's buckets and groups.
    /// With `report`, amounts are converted at the rate of their UTC date (the
    /// last within 7 days, EUR 1, crossed through the euro), rounding cumulative
    /// within the date per group and currency: a bucket's part of a date is
    /// round(rate × amount since midnight at its end) − round(… at its start),
    /// half to even — the documented rule, in SQL.
    ///
    /// `as_of` restricts the events to those an answer covers; `range` (unix
    /// seconds) reads only events within two days of it and keeps the buckets
    /// that start in it.
    pub async fn truth(
        &self,
        pool: &PgPool,
        as_of: Option<AsOf>,
        range: Option<(i64, i64)>,
    ) -> Result<Cells, sqlx::Error> {
        let column = |a: &str, lines: &str| match a {
            "city" => "o.city".to_owned(),
            "category" => format!("{lines}.category"),
            "product" => format!("{lines}.product_id"),
            other => panic!("unknown attribute {other}"),
        };
        let named: Vec<tidemark_domain::Attribute> = self
            .group_by
            .iter()
            .chain(self.filters.iter().map(|(a, _)| a))
            .map(|a| a.parse().expect("city, category or product"))
            .collect();
        let shape: Vec<&str> = tidemark_domain::Dimension::covering(&named)
            .attributes()
            .iter()
            .map(|a| a.as_str())
            .collect();
        let bucket_of = |m: &str| match self.granularity.as_str() {
            "minute" => format!("(floor(extract(epoch FROM {m}) / 60) * 60)::int8"),
            "quarter_hour" => format!(
                "(floor(extract(epoch FROM {m}))::int8 \
                  - mod(floor(extract(epoch FROM ({m} AT TIME ZONE $1)))::int8, 900))"
            ),
            "hour" => format!(
                "(floor(extract(epoch FROM {m}))::int8 \
                  - mod(floor(extract(epoch FROM ({m} AT TIME ZONE $1)))::int8, 3600))"
            ),
            "day" => format!(
                "extract(epoch FROM (({m} AT TIME ZONE $1)::date::timestamp AT TIME ZONE $1))::int8"
            ),
            other => panic!("unknown granularity {other}"),
        };
        let bucket = bucket_of("m");
        // Columns of the shape in the inner level, named a0, a1, …
        let inner = |lines: &str| -> (String, String) {
            let select: Vec<String> = shape
                .iter()
                .enumerate()
                .map(|(i, a)| format!("{} AS a{i}", column(a, lines)))
                .collect();
            let mut filter = String::new();
            for (i, (a, _)) in self.filters.iter().enumerate() {
                filter += &format!(" AND {} = ANY(${})", column(a, lines), i + 9);
            }
            (select.iter().map(|s| format!(", {s}")).collect(), filter)
        };
        let groups: Vec<String> = self
            .group_by
            .iter()
            .map(|g| format!("a{}", shape.iter().position(|a| a == g).expect("covered")))
            .collect();
        let group_array = if groups.is_empty() {
            "ARRAY[]::text[]".to_owned()
        } else {
            format!("ARRAY[{}]::text[]", groups.join(", "))
        };
        let shape_columns: String = (0..shape.len()).map(|i| format!(", a{i}")).collect();
        let distinct = |id: &str, lines: &str| {
            if shape.is_empty() {
                id.to_owned()
            } else {
                let cols: Vec<String> = shape.iter().map(|a| column(a, lines)).collect();
                format!("({id}, {})", cols.join(", "))
            }
        };
        // $3: the reporting currency or NULL. Exponents of the currencies used.
        let exponents: String = tidemark_domain::Currency::all()
            .map(|c| format!("('{c}', {})", c.exponent()))
            .collect::<Vec<_>>()
            .join(", ");
        // Units of `currency` per euro on the piece's UTC date `k.d`.
        let rate = |currency: &str| {
            format!(
                "(CASE WHEN {currency} = 'EUR' THEN 1::numeric ELSE \
                   (SELECT r.per_eur FROM fx_rates r WHERE r.currency = {currency} \
                    AND r.day <= k.d AND r.day >= k.d - 7 ORDER BY r.day DESC LIMIT 1) END)"
            )
        };
        // An amount of `currency` on date `d` in $3, exact, rounded half to even.
        let convert = |amount: &str| {
            format!(
                "(SELECT CASE WHEN y - floor(y) > 0.5 THEN floor(y) + 1 \
                              WHEN y - floor(y) < 0.5 THEN floor(y) \
                              ELSE floor(y) + abs(mod(floor(y), 2)) END \
                  FROM (SELECT ({amount}) * {} \
                          * power(10::numeric, (SELECT e FROM exps WHERE c = $3) \
                                  - (SELECT e FROM exps WHERE c = k.currency)) / {} AS y) q)",
                rate("$3"),
                rate("k.currency")
            )
        };
        // Minute cells → pieces (answer bucket × UTC date × group × currency);
        // the first amount converted with rounding cumulative within a UTC date:
        // round(P(end)) − round(P(start)), P the exact amount since midnight.
        let outer = format!(
            "pieces AS ( \
               SELECT {bucket} AS b, (m AT TIME ZONE 'UTC')::date AS d, {group_array} AS g, \
                      currency, sum(x1) AS x1, sum(x2) AS x2, sum(x3) AS x3 \
               FROM cells GROUP BY 1, 2, 3, 4), \
             cumulative AS ( \
               SELECT *, sum(x1) OVER (PARTITION BY g, currency, d ORDER BY b) AS c1 FROM pieces) \
             SELECT k.b, k.g, coalesce($3, k.currency), \
                    sum(CASE WHEN $3::text IS NULL OR k.currency = $3 THEN k.x1 \
                             ELSE {} - {} END)::int8, \
                    sum(k.x2)::int8, sum(k.x3)::int8 \
             FROM cumulative k GROUP BY 1, 2, 3",
            convert("k.c1"),
            convert("k.c1 - k.x1")
        );
        // The events an answer covers, and those near its range.
        let covered = |t: &str| {
            format!(
                " AND ($4::int8 IS NULL OR {t}.txid < $4::text::xid8 \
                       OR ({t}.txid, {t}.seq) <= ($5::text::xid8, $6))"
            )
        };
        let near = |at: &str| {
            format!(
                " AND ($7::int8 IS NULL OR ({at} >= to_timestamp($7 - 172800) \
                       AND {at} < to_timestamp($8 + 172800)))"
            )
        };
        let mut cells = Cells::new();
        // Gross.
        let (select, filter) = inner("l");
        let sql = format!(
            "WITH exps(c, e) AS (VALUES {exponents}), cells AS ( \
               SELECT date_trunc('minute', o.created_at) AS m{select}, o.currency::text AS currency, \
                      sum(l.quantity::int8 * l.unit_price_minor) AS x1, \
                      count(DISTINCT {}) AS x2, sum(l.quantity) AS x3 \
               FROM orders o JOIN order_lines l USING (order_id) \
               WHERE ($2::text IS NULL OR o.currency::text = $2){filter}{}{} \
               GROUP BY m{shape_columns}, currency), {outer}",
            distinct("o.order_id", "l"),
            covered("o"),
            near("o.created_at"),
        );
        for (key, [r, o, i]) in self.rows(pool, &sql, as_of, range).await? {
            cells.entry(key).or_default()[..3].copy_from_slice(&[r, o, i]);
        }
        // Buyers: distinct users of the order lines a cell holds.
        let groups: Vec<String> = self.group_by.iter().map(|a| column(a, "l")).collect();
        let group_array = if groups.is_empty() {
            "ARRAY[]::text[]".to_owned()
        } else {
            format!("ARRAY[{}]::text[]", groups.join(", "))
        };
        let sql = format!(
            "SELECT {}, {group_array}, coalesce($3, o.currency::text), \
                    count(DISTINCT o.user_id)::int8, 0::int8, 0::int8 \
             FROM orders o JOIN order_lines l USING (order_id) \
             WHERE ($2::text IS NULL OR o.currency::text = $2){filter}{}{} \
             GROUP BY 1, 2, 3",
            bucket_of("date_trunc('minute', o.created_at)"),
            covered("o"),
            near("o.created_at"),
        );
        for (key, [b, _, _]) in self.rows(pool, &sql, as_of, range).await? {
            cells.entry(key).or_default()[6] = b;
        }
        // Corrections on the basis.
        let at = if self.order_time {
            "o.created_at"
        } else {
            "a.created_at"
        };
        let (select, filter) = inner("ol");
        let sql = format!(
            "WITH exps(c, e) AS (VALUES {exponents}), cells AS ( \
               SELECT date_trunc('minute', {at}) AS m{select}, o.currency::text AS currency, \
                      coalesce(sum(al.amount_minor), 0) AS x1, coalesce(sum(al.quantity), 0) AS x2, \
                      count(DISTINCT {}) FILTER (WHERE a.kind = 'cancellation') AS x3 \
               FROM adjustments a JOIN orders o ON o.order_id = a.order_id \
               JOIN order_lines ol ON ol.order_id = a.order_id \
               LEFT JOIN adjustment_lines al \
                    ON al.adjustment_id = a.adjustment_id AND al.line_no = ol.line_no \
               WHERE (al.line_no IS NOT NULL OR a.kind = 'cancellation') \
                 AND ($2::text IS NULL OR o.currency::text = $2){filter}{}{} \
               GROUP BY m{shape_columns}, currency), {outer}",
            distinct("a.adjustment_id", "ol"),
            covered("a"),
            near(at),
        );
        for (key, [f, fi, c]) in self.rows(pool, &sql, as_of, range).await? {
            cells.entry(key).or_default()[3..6].copy_from_slice(&[f, fi, c]);
        }
        if let Some((from, to)) = range {
            cells.retain(|(bucket, _, _), _| *bucket >= from && *bucket < to);
        }
        Ok(cells)
    }

    async fn rows(
        &self,
        pool: &PgPool,
        sql: &str,
        as_of: Option<AsOf>,
        range: Option<(i64, i64)>,
    ) -> Result<Vec<((i64, Vec<String>, String), [i64; 3])>, sqlx::Error> {
        let mut query = sqlx::query_as::<_, (i64, Vec<String>, String, i64, i64, i64)>(
            sqlx::AssertSqlSafe(sql.to_owned()),
        )
        .bind(&self.tz)
        .bind(&self.currency)
        .bind(&self.report)
        .bind(as_of.map(|a| a.threshold as i64))
        .bind(as_of.map(|a| a.cursor.0.to_string()))
        .bind(as_of.map(|a| a.cursor.1))
        .bind(range.map(|r| r.0))
        .bind(range.map(|r| r.1));
        for (_, values) in &self.filters {
            query = query.bind(values.clone());
        }
        Ok(query
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|(b, g, c, x, y, z)| ((b, g, c), [x, y, z]))
            .collect())
    }
}
