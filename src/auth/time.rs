//! Time helpers for tokens: parse a lifetime such as `30d`, read unix seconds, print RFC 3339.

use std::time::{SystemTime, UNIX_EPOCH};

/// Token lifetimes are read by the one duration parser below every layer.
pub use crate::duration::parse_ttl;

/// Whole seconds since the unix epoch; times before 1970 count as 0.
pub fn unix_now(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Formats unix seconds as RFC 3339 UTC, e.g. `2026-11-23T11:49:17Z`.
///
/// Uses Howard Hinnant's `civil_from_days` so no date crate is needed.
pub fn format_rfc3339(unix_secs: u64) -> String {
    let days = unix_secs / 86_400;
    let rem = unix_secs % 86_400;
    let (hour, minute, second) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// Converts days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar.
///
/// The calendar is shifted to start on March 1 so the leap day is the last day of the year;
/// an era is 400 years (146097 days). Days are never negative here, so unsigned math works.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z / 146_097;
    let doe = z % 146_097; // day of era [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year [0, 365]
    let mp = (5 * doy + 2) / 153; // month, March-based [0, 11]
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn format_rfc3339_table() {
        let cases = [
            (0, "1970-01-01T00:00:00Z"),
            (59, "1970-01-01T00:00:59Z"),
            (86_399, "1970-01-01T23:59:59Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (951_868_800, "2000-03-01T00:00:00Z"),
            (1_763_900_000, "2025-11-23T12:13:20Z"),
            (4_107_542_400, "2100-03-01T00:00:00Z"),
        ];
        for (secs, text) in cases {
            assert_eq!(format_rfc3339(secs), text, "{secs}");
        }
        // The largest input must not overflow.
        assert!(format_rfc3339(u64::MAX).ends_with('Z'));
    }

    #[test]
    fn unix_now_counts_seconds_and_clamps_before_epoch() {
        assert_eq!(unix_now(UNIX_EPOCH + Duration::from_millis(1_500)), 1);
        assert_eq!(unix_now(UNIX_EPOCH - Duration::from_secs(10)), 0);
    }
}
