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

/// Whether an enrolled certificate (DER, with its `rna://tenant/…` name) is due for renewal at
/// `now`: past [`renew_at`], or expired. `None` for a certificate that was not enrolled
/// (`rna certs agent`), which keeps the 30-day expiry warning of long-lived certificates.
pub fn renewal_due(cert_der: &[u8], now: SystemTime) -> Option<bool> {
    let identity = super::agent_identity(cert_der).ok()?;
    let at = |secs: u64| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs));
    Some(now >= renew_at(at(identity.not_before)?, at(identity.not_after)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_enrolled_certificates_have_a_renewal_point() {
        let ca = crate::certs::Ca::generate("rna test CA").unwrap();
        let signer = super::super::Signer::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        let csr = super::super::make_csr("edge").unwrap();
        let admission = super::super::Admission {
            token_id: "0123456789ab".into(),
            tenant: "acme/prod".parse().unwrap(),
            agent: "edge".into(),
        };
        let now = SystemTime::now();
        let day = Duration::from_secs(24 * 60 * 60);
        let signed = signer
            .sign(&csr.csr_der, &admission, 30 * day, now)
            .unwrap();
        assert_eq!(renewal_due(&signed.cert_der, now), Some(false));
        assert_eq!(renewal_due(&signed.cert_der, now + 19 * day), Some(false));
        assert_eq!(renewal_due(&signed.cert_der, now + 21 * day), Some(true));
        assert_eq!(renewal_due(&signed.cert_der, now + 31 * day), Some(true));
        let manual = ca.issue_agent("edge").unwrap();
        let der = crate::certs::parse_certs(&manual.cert_pem).unwrap();
        assert_eq!(renewal_due(der[0].as_ref(), now), None);
    }

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
