//! Instants as people read them: unix seconds printed as RFC 3339 UTC. A leaf, because token
//! listings (`auth`), certificate expiry warnings (`certs`), the status page (`hub`) and the
//! CLI all print the same form.

/// The last second a civil date can name, 9999-12-31T23:59:59Z; X.509 times stop there too.
const LAST_SECOND: i64 = 253_402_300_799;

/// Formats unix seconds as RFC 3339 UTC, e.g. `2026-11-23T11:49:17Z`.
///
/// Calendar arithmetic is `jiff`'s (already built for the Kubernetes client), on a civil UTC
/// date-time, whose range reaches the end of year 9999 (a `jiff::Timestamp` stops a day
/// earlier so every offset fits). Later instants, which no certificate or token expiry
/// reaches, print as that last second instead of failing.
pub fn format_rfc3339(unix_secs: u64) -> String {
    let secs = i64::try_from(unix_secs).map_or(LAST_SECOND, |s| s.min(LAST_SECOND));
    let epoch = jiff::civil::datetime(1970, 1, 1, 0, 0, 0, 0);
    // In range by construction (0 ..= LAST_SECOND from 1970); the fallback never shows.
    let at = epoch
        .checked_add(jiff::SignedDuration::from_secs(secs))
        .unwrap_or(epoch);
    format!("{at}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

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
            // The last X.509 second, the latest a certificate can expire.
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ];
        for (secs, text) in cases {
            assert_eq!(format_rfc3339(secs), text, "{secs}");
        }
        // The largest inputs must not overflow or panic, and stay whole seconds.
        for secs in [253_402_300_800, i64::MAX as u64, u64::MAX] {
            let text = format_rfc3339(secs);
            assert!(text.starts_with("9999-12-3"), "{secs}: {text}");
            assert!(text.ends_with('Z') && !text.contains('.'), "{secs}: {text}");
        }
    }
}
