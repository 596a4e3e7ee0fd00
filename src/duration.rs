//! Durations as people write them (`500ms`, `10s`, `5m`, `30d`): one parser and one printer
//! for configuration keys, flags, Kubernetes wait timeouts and token lifetimes.
//!
//! It sits below every layer that reads a duration (config, auth, hub), so none of them
//! imports another for it.

use std::time::Duration;

/// What one unit suffix stands for.
#[derive(Clone, Copy)]
enum Unit {
    /// Milliseconds.
    Millis,
    /// This many seconds.
    Secs(u64),
}

/// Why a text is not a duration; each reader words it for its own users.
#[derive(Debug, PartialEq, Eq)]
enum Problem {
    /// A unit suffix the reader does not accept (or a sign, space or fraction before one).
    Unit,
    /// No digits before the unit.
    Missing,
    /// More than `u64` can hold, before or after scaling by the unit.
    TooLarge,
    /// Zero of any unit: every duration read here bounds a wait, and zero would be no wait.
    Zero,
}

/// Splits `s` into a whole number and a unit from `units`, and scales it.
fn parse_with(s: &str, units: &[(&str, Unit)]) -> Result<Duration, Problem> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let unit = units
        .iter()
        .find(|(name, _)| *name == suffix)
        .map(|(_, unit)| *unit)
        .ok_or(Problem::Unit)?;
    if digits.is_empty() {
        return Err(Problem::Missing);
    }
    let n: u64 = digits.parse().map_err(|_| Problem::TooLarge)?;
    if n == 0 {
        return Err(Problem::Zero);
    }
    match unit {
        Unit::Millis => Ok(Duration::from_millis(n)),
        Unit::Secs(size) => n
            .checked_mul(size)
            .map(Duration::from_secs)
            .ok_or(Problem::TooLarge),
    }
}

/// The units of configuration durations; a bare number is seconds.
const DURATION_UNITS: &[(&str, Unit)] = &[
    ("ms", Unit::Millis),
    ("", Unit::Secs(1)),
    ("s", Unit::Secs(1)),
    ("m", Unit::Secs(60)),
    ("h", Unit::Secs(3600)),
    ("d", Unit::Secs(86_400)),
];

/// The units of token lifetimes: weeks instead of milliseconds; a bare number is seconds.
const TTL_UNITS: &[(&str, Unit)] = &[
    ("", Unit::Secs(1)),
    ("s", Unit::Secs(1)),
    ("m", Unit::Secs(60)),
    ("h", Unit::Secs(3600)),
    ("d", Unit::Secs(86_400)),
    ("w", Unit::Secs(7 * 86_400)),
];

/// Parses `500ms`, `10s`, `5m`, `2h`, `1d`, or a bare number of seconds, as configuration
/// keys, flags and Kubernetes wait timeouts take them. Zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_with(s, DURATION_UNITS).map_err(|problem| match problem {
        Problem::Zero => format!("invalid duration {s:?}: must be greater than zero"),
        Problem::Unit | Problem::Missing | Problem::TooLarge => format!(
            "invalid duration {s:?}: expected a number with a unit ms, s, m, h or d (e.g. 10s)"
        ),
    })
}

/// [`parse_duration`] for settings where zero means "not at all" (`0s`, `0`, `0ms`).
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    match parse_with(s, DURATION_UNITS) {
        Err(Problem::Zero) => Ok(Duration::ZERO),
        _ => parse_duration(s),
    }
}

/// Parses a token lifetime: a positive whole number followed by `s`, `m`, `h`, `d` or `w`
/// (seconds, minutes, hours, days, weeks); a bare number means seconds.
///
/// Zero, overflow, signs, spaces, fractions and unknown units are refused with a message that
/// names the input.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    parse_with(s, TTL_UNITS).map_err(|problem| match problem {
        Problem::Unit => format!(
            "invalid ttl {s:?}: expected a number with an optional unit s, m, h, d or w \
             (e.g. 30d)"
        ),
        Problem::Missing => format!("invalid ttl {s:?}: missing number (e.g. 30d)"),
        Problem::TooLarge => format!("invalid ttl {s:?}: number is too large"),
        Problem::Zero => format!("invalid ttl {s:?}: must be greater than zero"),
    })
}

/// Writes `d` the way [`parse_duration`] reads it, in the largest unit that keeps it exact
/// (`90s`, `5m`, `1500ms`), so a printed configuration parses back to the same value.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) || ms == 0 {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s.is_multiple_of(size) {
            return format!("{}{unit}", s / size);
        }
    }
    format!("{s}s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        let ok = [
            ("500ms", Duration::from_millis(500)),
            ("10", Duration::from_secs(10)),
            ("10s", Duration::from_secs(10)),
            ("5m", Duration::from_secs(300)),
            ("2h", Duration::from_secs(7200)),
            ("1d", Duration::from_secs(86_400)),
        ];
        for (s, d) in ok {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        let unit = |s: &str| {
            format!(
                "invalid duration {s:?}: expected a number with a unit ms, s, m, h or d (e.g. 10s)"
            )
        };
        for bad in [
            "",
            "s",
            "10x",
            "-1s",
            "1.5s",
            "2w",
            " 5s",
            "99999999999999999999d",
            "999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), Err(unit(bad)), "{bad}");
        }
        for zero in ["0", "0s", "0ms", "0d"] {
            assert_eq!(
                parse_duration(zero),
                Err(format!(
                    "invalid duration {zero:?}: must be greater than zero"
                ))
            );
        }
    }

    #[test]
    fn durations_print_in_the_largest_exact_unit_and_parse_back() {
        let table = [
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(45), "45s"),
            (Duration::from_secs(60), "1m"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_secs(86_400 * 3), "3d"),
        ];
        for (d, text) in table {
            assert_eq!(format_duration(d), text);
            assert_eq!(parse_duration(text), Ok(d), "{text}");
        }
    }

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
            "500ms",
            "99999999999999999999",
            "18446744073709551615w",
        ];
        for input in bad {
            let err = parse_ttl(input).expect_err(input);
            assert!(err.contains(&format!("{input:?}")), "{input}: {err}");
        }
        // Each refusal says what is wrong.
        let table = [
            (
                "5y",
                "expected a number with an optional unit s, m, h, d or w (e.g. 30d)",
            ),
            ("d", "missing number (e.g. 30d)"),
            ("", "missing number (e.g. 30d)"),
            ("99999999999999999999", "number is too large"),
            ("18446744073709551615w", "number is too large"),
            ("0d", "must be greater than zero"),
        ];
        for (input, why) in table {
            assert_eq!(
                parse_ttl(input),
                Err(format!("invalid ttl {input:?}: {why}")),
                "{input}"
            );
        }
    }

    /// The layers config reads from (hub, agent, auth, transport, proto) take durations from
    /// here: importing them from config would point a lower layer at an upper one.
    #[test]
    fn lower_layers_take_durations_from_here_not_from_config() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut offenders = Vec::new();
        let mut folders: Vec<_> = ["hub", "agent", "auth", "transport", "proto"]
            .iter()
            .map(|f| src.join(f))
            .collect();
        while let Some(folder) = folders.pop() {
            for entry in std::fs::read_dir(&folder).expect("read src folder") {
                let path = entry.expect("folder entry").path();
                if path.is_dir() {
                    folders.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).expect("read source");
                    if text.contains("crate::config") {
                        offenders.push(path.display().to_string());
                    }
                }
            }
        }
        assert!(offenders.is_empty(), "these import config: {offenders:?}");
    }
}
