//! Time helpers for tokens: parse a lifetime such as `30d`, read unix seconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses a token lifetime: a positive whole number followed by `s`, `m`, `h`, `d` or `w`
/// (seconds, minutes, hours, days, weeks); a bare number means seconds.
///
/// Zero, overflow, signs, spaces, fractions and unknown units are refused with a message that
/// names the input.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => s.split_at(at),
        None => (s, ""),
    };
    let multiplier: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => 24 * 60 * 60,
        "w" => 7 * 24 * 60 * 60,
        _ => {
            return Err(format!(
                "invalid ttl {s:?}: expected a number with an optional unit s, m, h, d or w \
                 (e.g. 30d)"
            ))
        }
    };
    if digits.is_empty() {
        return Err(format!("invalid ttl {s:?}: missing number (e.g. 30d)"));
    }
    let count: u64 = digits
        .parse()
        .map_err(|_| format!("invalid ttl {s:?}: number is too large"))?;
    if count == 0 {
        return Err(format!("invalid ttl {s:?}: must be greater than zero"));
    }
    let secs = count
        .checked_mul(multiplier)
        .ok_or_else(|| format!("invalid ttl {s:?}: number is too large"))?;
    Ok(Duration::from_secs(secs))
}

/// Whole seconds since the unix epoch; times before 1970 count as 0.
pub fn unix_now(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_ttl_table() {
        let ok: &[(&str, u64)] = &[
            ("1", 1),
            ("3600", 3600),
            ("3600s", 3600),
            ("90m", 90 * 60),
            ("12h", 12 * 3600),
            ("30d", 30 * 86_400),
            ("2w", 14 * 86_400),
        ];
        for (input, secs) in ok {
            assert_eq!(parse_ttl(input), Ok(Duration::from_secs(*secs)), "{input}");
        }
        let bad = [
            "",
            "0",
            "0d",
            "d",
            "-5",
            "+5",
            "1.5h",
            "5 d",
            " 5d",
            "5y",
            "5dd",
            "1h30m",
            "abc",
            "99999999999999999999",
            "18446744073709551615w",
        ];
        for input in bad {
            let err = parse_ttl(input).expect_err(input);
            assert!(err.contains(&format!("{input:?}")), "{input}: {err}");
        }
    }

    #[test]
    fn unix_now_counts_seconds_and_clamps_before_epoch() {
        assert_eq!(unix_now(UNIX_EPOCH + Duration::from_millis(1_500)), 1);
        assert_eq!(unix_now(UNIX_EPOCH - Duration::from_secs(10)), 0);
    }
}
