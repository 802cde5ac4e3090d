//! A meter's consumption per hour or per local day, from the hourly usage store (schema 5,
//! written at fold time: see [`crate::store::fold_keeping`]). The admin API's
//! `GET /api/meters/{id}/usage` and the CLI's `meter usage` both read it here.

use rusqlite::Connection;
use serde::Serialize;

use crate::store::{self, StoreError};
use crate::tariff::calendar::{LocalDate, SiteZone};

const MS_PER_HOUR: i64 = 3_600_000;
const MS_PER_DAY: i64 = 86_400_000;
/// Longest range of one answer: 31 days of hours (744 points), 400 days of days (the
/// store's default retention).
pub const MAX_HOURS: i64 = 31 * 24;
pub const MAX_DAYS: i64 = 400;
/// Times are refused beyond ±this (UTC ms of 10000-01-01): the bucket arithmetic stays far
/// from `i64`'s ends, whatever a query says.
pub const MAX_TIME_MS: i64 = 253_402_300_800_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Hour,
    Day,
}

impl Step {
    pub fn parse(s: &str) -> Option<Step> {
        match s {
            "hour" => Some(Step::Hour),
            "day" => Some(Step::Day),
            _ => None,
        }
    }
}

/// One bar of the chart: the bucket's start (UTC ms) and its Wh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Point {
    pub at: i64,
    pub wh: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("from must be before to")]
    Empty,
    #[error("the range holds {0} buckets; at most {MAX_HOURS} hours or {MAX_DAYS} days")]
    TooLong(i64),
    #[error("from and to must lie between years -9999 and 9999")]
    OutOfRange,
}

/// The starts (UTC ms) of every bucket starting in `from..to` (hours: UTC hours; days: local
/// days of `zone`), and where the last one ends.
pub fn buckets(
    zone: SiteZone,
    from: i64,
    to: i64,
    step: Step,
) -> Result<(Vec<i64>, i64), RangeError> {
    if !(-MAX_TIME_MS..=MAX_TIME_MS).contains(&from) || !(-MAX_TIME_MS..=MAX_TIME_MS).contains(&to)
    {
        return Err(RangeError::OutOfRange);
    }
    if to <= from {
        return Err(RangeError::Empty);
    }
    let starts: Vec<i64> = match step {
        Step::Hour => {
            let first = from - from.rem_euclid(MS_PER_HOUR);
            let n = (to - first + MS_PER_HOUR - 1) / MS_PER_HOUR;
            if n > MAX_HOURS {
                return Err(RangeError::TooLong(n));
            }
            (0..n).map(|i| first + i * MS_PER_HOUR).collect()
        }
        Step::Day => {
            let (d0, d1) = (zone.day(from), zone.day(to - 1));
            let n = d1 - d0 + 1;
            if n > MAX_DAYS {
                return Err(RangeError::TooLong(n));
            }
            (d0..=d1)
                .map(|d| zone.midnight(LocalDate::from_days(d)))
                .collect()
        }
    };
    let width = match step {
        Step::Hour => MS_PER_HOUR,
        Step::Day => MS_PER_DAY,
    };
    let end = starts.last().map_or(to, |&s| s + width);
    Ok((starts, end))
}

/// Every bucket starting in `from..to` (see [`buckets`]) with its Wh, 0 for buckets without
/// use, so a chart needs no gap filling.
pub fn points(
    conn: &Connection,
    zone: SiteZone,
    meter: &str,
    from: i64,
    to: i64,
    step: Step,
) -> Result<Result<Vec<Point>, RangeError>, StoreError> {
    let (starts, end) = match buckets(zone, from, to, step) {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    let hours = store::usage_hours(conn, meter, starts[0], end)?;
    let mut out: Vec<Point> = starts.iter().map(|&at| Point { at, wh: 0 }).collect();
    for (hour, wh) in hours {
        // The bucket holding this hour: the last start at or before it.
        let i = starts.partition_point(|&s| s <= hour).saturating_sub(1);
        out[i].wh += wh;
    }
    Ok(Ok(out))
}

/// One bucket of the site's use: every meter but the main one, and the main meter when one is
/// marked; the dashboard's "energy today / this month".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SitePoint {
    pub at: i64,
    pub wh: i64,
    #[serde(rename = "mainWh", skip_serializing_if = "Option::is_none")]
    pub main_wh: Option<i64>,
}

/// The site's use per bucket (see [`buckets`]).
pub fn site_points(
    conn: &Connection,
    zone: SiteZone,
    from: i64,
    to: i64,
    step: Step,
) -> Result<Result<Vec<SitePoint>, RangeError>, StoreError> {
    let (starts, end) = match buckets(zone, from, to, step) {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    let (main, others) = store::site_usage(conn, &starts, end)?;
    Ok(Ok(starts
        .iter()
        .enumerate()
        .map(|(i, &at)| SitePoint {
            at,
            wh: others[i],
            main_wh: main.as_ref().map(|m| m[i]),
        })
        .collect()))
}

/// `from..to` (UTC ms) of a local day, for `--day`.
pub fn day_span(zone: SiteZone, day: LocalDate) -> (i64, i64) {
    let start = zone.midnight(day);
    (start, start + MS_PER_DAY)
}

/// `from..to` (UTC ms) of a local month `YYYY-MM`, for `--month`.
pub fn month_span(zone: SiteZone, month: &str) -> Option<(i64, i64)> {
    let first = LocalDate::parse(&format!("{month}-01"))?;
    let next = if first.month == 12 {
        LocalDate {
            year: first.year + 1,
            month: 1,
            day: 1,
        }
    } else {
        LocalDate {
            month: first.month + 1,
            ..first
        }
    };
    Some((zone.midnight(first), zone.midnight(next)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_month_spans_its_local_days_and_december_ends_at_new_year() {
        let z = SiteZone::NAIROBI;
        let (from, to) = month_span(z, "2026-12").unwrap();
        assert_eq!(to - from, 31 * MS_PER_DAY);
        assert_eq!(crate::api::iso8601(from), "2026-11-30T21:00:00.000Z");
        assert_eq!(month_span(z, "2026-13"), None);
        assert_eq!(month_span(z, "2026-1"), None);
    }
}
