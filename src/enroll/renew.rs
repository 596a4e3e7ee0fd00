//! When an agent renews its certificate: once two thirds of its lifetime has passed, leaving
//! a third (ten days of a 30-day certificate) for retries while the hub is unreachable.

use std::time::{Duration, SystemTime};

/// The instant to renew a certificate valid from `not_before` to `not_after`: two thirds of
/// the way through. An empty or inverted window renews at once (`not_before`).
pub fn renew_at(not_before: SystemTime, not_after: SystemTime) -> SystemTime {
    match not_after.duration_since(not_before) {
        Ok(lifetime) if !lifetime.is_zero() => {
            // Whole nanoseconds: u128 holds any SystemTime span times two.
            let nanos = lifetime.as_nanos() * 2 / 3;
            let two_thirds = Duration::new(
                u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX),
                (nanos % 1_000_000_000) as u32,
            );
            not_before.checked_add(two_thirds).unwrap_or(not_after)
        }
        _ => not_before,
    }
}

/// How long from `now` until [`renew_at`]; zero when that is already past.
pub fn renew_in(now: SystemTime, not_before: SystemTime, not_after: SystemTime) -> Duration {
    renew_at(not_before, not_after)
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renewal_schedule_table() {
        let day = 24 * 60 * 60;
        // (not_before, not_after, now, renew at, renew in)
        let cases: &[(SystemTime, SystemTime, SystemTime, SystemTime, Duration)] = &[
            (
                at(0),
                at(30 * day),
                at(0),
                at(20 * day),
                Duration::from_secs(20 * day),
            ),
            (
                at(1_000),
                at(1_030),
                at(1_000),
                at(1_020),
                Duration::from_secs(20),
            ),
            (
                at(1_000),
                at(1_030),
                at(1_019),
                at(1_020),
                Duration::from_secs(1),
            ),
            (at(1_000), at(1_030), at(1_025), at(1_020), Duration::ZERO),
            (at(1_000), at(1_030), at(2_000), at(1_020), Duration::ZERO),
            (
                at(0),
                at(10),
                at(0),
                at(0) + Duration::new(6, 666_666_666),
                Duration::new(6, 666_666_666),
            ),
            (
                at(0),
                at(1),
                at(0),
                at(0) + Duration::from_nanos(666_666_666),
                Duration::from_nanos(666_666_666),
            ),
            // Empty and inverted windows renew at their start.
            (at(50), at(50), at(60), at(50), Duration::ZERO),
            (at(50), at(40), at(45), at(50), Duration::from_secs(5)),
            (
                at(0),
                at(u64::MAX / 4),
                at(0),
                at(u64::MAX / 6),
                Duration::from_secs(u64::MAX / 6),
            ),
        ];
        for &(nb, na, now, when, wait) in cases {
            assert_eq!(renew_at(nb, na), when, "{nb:?} {na:?}");
            assert_eq!(renew_in(now, nb, na), wait, "{nb:?} {na:?} {now:?}");
        }
    }
}
