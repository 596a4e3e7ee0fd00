//! Time helpers for tokens: parse a lifetime such as `30d`, read unix seconds.

use std::time::{SystemTime, UNIX_EPOCH};

/// Token lifetimes are read by the one duration parser below every layer.
pub use crate::duration::parse_ttl;

/// Whole seconds since the unix epoch; times before 1970 count as 0.
pub fn unix_now(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unix_now_counts_seconds_and_clamps_before_epoch() {
        assert_eq!(unix_now(UNIX_EPOCH + Duration::from_millis(1_500)), 1);
        assert_eq!(unix_now(UNIX_EPOCH - Duration::from_secs(10)), 0);
    }
}
