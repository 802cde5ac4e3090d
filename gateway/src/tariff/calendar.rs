//! Local time for pricing: a site zone as a fixed UTC offset, and the calendar facts a tariff
//! needs (local date, hour, weekday, month, hour boundaries) from UTC milliseconds.
//!
//! Only zones without daylight saving time are accepted: with a fixed offset every local day has
//! 24 hours and every local hour starts on a whole UTC hour plus the offset, which the pricing
//! code relies on (an hour that repeats or vanishes would make a time-of-use edge ambiguous).
//! Kenya and its neighbours have no DST. Zones with DST would need the tz database (a crate
//! or the system's zoneinfo); until a site needs one they are refused by [`SiteZone::parse`].

use std::fmt;

pub const MS_PER_HOUR: i64 = 3_600_000;
pub const MS_PER_DAY: i64 = 24 * MS_PER_HOUR;

/// Zones known to keep one offset all year (minutes east of UTC).
const FIXED_ZONES: &[(&str, i32)] = &[
    ("UTC", 0),
    ("Etc/UTC", 0),
    ("Africa/Nairobi", 180),
    ("Africa/Kampala", 180),
    ("Africa/Dar_es_Salaam", 180),
    ("Africa/Addis_Ababa", 180),
    ("Africa/Mogadishu", 180),
    ("Africa/Kigali", 120),
    ("Africa/Bujumbura", 120),
    ("Africa/Lusaka", 120),
    ("Africa/Maputo", 120),
    ("Africa/Johannesburg", 120),
    ("Africa/Lagos", 60),
    ("Africa/Accra", 0),
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZoneError {
    #[error(
        "unknown or unsupported time zone {0:?}: use a zone without daylight saving time \
         (for example Africa/Nairobi) or a fixed offset such as UTC+03:00"
    )]
    Unsupported(String),
}

/// A site's time zone as a fixed offset from UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteZone {
    offset_minutes: i32,
}

impl Default for SiteZone {
    fn default() -> Self {
        SiteZone::NAIROBI
    }
}

impl SiteZone {
    /// `[site] timezone`'s default.
    pub const NAIROBI: SiteZone = SiteZone {
        offset_minutes: 180,
    };
    pub const UTC: SiteZone = SiteZone { offset_minutes: 0 };

    /// A zone name from [`FIXED_ZONES`], or `UTC+HH:MM` / `UTC-HH:MM`.
    pub fn parse(s: &str) -> Result<SiteZone, ZoneError> {
        if let Some(&(_, m)) = FIXED_ZONES.iter().find(|(name, _)| *name == s) {
            return Ok(SiteZone { offset_minutes: m });
        }
        let bad = || ZoneError::Unsupported(s.to_owned());
        let rest = s.strip_prefix("UTC").ok_or_else(bad)?;
        let (sign, hm) = match rest.as_bytes().first() {
            Some(b'+') => (1, &rest[1..]),
            Some(b'-') => (-1, &rest[1..]),
            _ => return Err(bad()),
        };
        let (h, m) = hm.split_once(':').ok_or_else(bad)?;
        let digits = |x: &str| x.len() == 2 && x.bytes().all(|b| b.is_ascii_digit());
        if !digits(h) || !digits(m) {
            return Err(bad());
        }
        let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 14 || m > 59 {
            return Err(bad());
        }
        Ok(SiteZone {
            offset_minutes: sign * (h * 60 + m),
        })
    }

    pub fn offset_minutes(self) -> i32 {
        self.offset_minutes
    }

    fn local_ms(self, utc_ms: i64) -> i64 {
        // Saturating: times come from outside; a garbage one must not overflow.
        utc_ms.saturating_add(i64::from(self.offset_minutes) * 60_000)
    }

    /// Local day number (days since 1970-01-01 local).
    pub fn day(self, utc_ms: i64) -> i64 {
        self.local_ms(utc_ms).div_euclid(MS_PER_DAY)
    }

    pub fn date(self, utc_ms: i64) -> LocalDate {
        LocalDate::from_days(self.day(utc_ms))
    }

    /// Local hour of the day, 0..=23.
    pub fn hour(self, utc_ms: i64) -> u8 {
        (self.local_ms(utc_ms).rem_euclid(MS_PER_DAY) / MS_PER_HOUR) as u8
    }

    pub fn weekday(self, utc_ms: i64) -> Weekday {
        // 1970-01-01 was a Thursday (index 3 with Monday = 0).
        Weekday((self.day(utc_ms) + 3).rem_euclid(7) as u8)
    }

    pub fn month(self, utc_ms: i64) -> MonthKey {
        self.date(utc_ms).month_key()
    }

    /// The first local hour boundary strictly after `utc_ms`.
    pub fn next_hour_start(self, utc_ms: i64) -> i64 {
        let local = self.local_ms(utc_ms);
        utc_ms.saturating_add(MS_PER_HOUR - local.rem_euclid(MS_PER_HOUR))
    }

    /// 00:00 local time of `date`, in UTC milliseconds.
    pub fn midnight(self, date: LocalDate) -> i64 {
        date.days() * MS_PER_DAY - i64::from(self.offset_minutes) * 60_000
    }
}

/// Monday = 0 … Sunday = 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weekday(pub u8);

impl Weekday {
    pub fn is_weekend(self) -> bool {
        self.0 >= 5
    }
}

/// A calendar month as `year * 12 + (month - 1)`, so consecutive months are consecutive numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MonthKey(pub i64);

/// A local calendar date (proleptic Gregorian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalDate {
    pub year: i32,
    pub month: u8,
    pub day: u8,
}

impl LocalDate {
    /// The date of a day number (days since 1970-01-01), by the SDK's `civil_from_days`.
    pub fn from_days(days: i64) -> LocalDate {
        let (y, m, d) = umeme_plugin_sdk::civil_from_days(days);
        LocalDate {
            year: y as i32,
            month: m,
            day: d,
        }
    }

    /// Howard Hinnant's `days_from_civil`: days since 1970-01-01.
    pub fn days(self) -> i64 {
        let (m, d) = (i64::from(self.month), i64::from(self.day));
        let y = i64::from(self.year) - i64::from(m <= 2);
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    pub fn month_key(self) -> MonthKey {
        MonthKey(i64::from(self.year) * 12 + i64::from(self.month) - 1)
    }

    /// `YYYY-MM-DD`, a real date.
    pub fn parse(s: &str) -> Option<LocalDate> {
        let b = s.as_bytes();
        if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<u32> {
            let part = &s[r];
            part.bytes()
                .all(|c| c.is_ascii_digit())
                .then(|| part.parse().ok())?
        };
        let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        if !(1..=12).contains(&m) || d == 0 {
            return None;
        }
        let date = LocalDate {
            year: y as i32,
            month: m as u8,
            day: d as u8,
        };
        // Round-tripping through the day number refuses 31 April, 29 February 2027 and so on.
        (LocalDate::from_days(date.days()) == date).then_some(date)
    }
}

impl fmt::Display for LocalDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl<'de> serde::Deserialize<'de> for LocalDate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LocalDate::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("expected a date YYYY-MM-DD, got {s:?}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_numbers_round_trip_over_four_centuries() {
        for days in (-200_000..200_000).step_by(7) {
            assert_eq!(LocalDate::from_days(days).days(), days);
        }
    }

    #[test]
    fn nairobi_midnight_is_21_00_utc_the_day_before() {
        let z = SiteZone::parse("Africa/Nairobi").unwrap();
        let d = LocalDate::parse("2026-03-01").unwrap();
        let m = z.midnight(d);
        assert_eq!(umeme_plugin_sdk::iso8601_utc(m), "2026-02-28T21:00:00.000Z");
        assert_eq!(z.date(m), d);
        assert_eq!(z.date(m - 1), LocalDate::parse("2026-02-28").unwrap());
        assert_eq!(z.hour(m), 0);
        assert_eq!(z.hour(m - 1), 23);
        assert_eq!(z.weekday(m), Weekday(6), "1 March 2026 is a Sunday");
        assert_eq!(z.next_hour_start(m - 1), m);
        assert_eq!(z.next_hour_start(m), m + MS_PER_HOUR);
    }

    #[test]
    fn zones_with_daylight_saving_time_are_refused() {
        for bad in [
            "Europe/London",
            "America/New_York",
            "UTC+3",
            "UTC+15:00",
            "EAT",
        ] {
            assert!(SiteZone::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(SiteZone::parse("UTC+05:30").unwrap().offset_minutes(), 330);
        assert_eq!(SiteZone::parse("UTC-03:00").unwrap().offset_minutes(), -180);
    }

    #[test]
    fn impossible_dates_are_refused() {
        for bad in [
            "2026-02-29",
            "2026-04-31",
            "2026-13-01",
            "2026-1-01",
            "2026-01-00",
            "x",
        ] {
            assert_eq!(LocalDate::parse(bad), None, "{bad}");
        }
        assert!(LocalDate::parse("2028-02-29").is_some());
    }
}
