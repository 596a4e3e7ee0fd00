//! Renewal of an enrolled agent's certificate while it runs: at two thirds of the lifetime a
//! new key and certificate are fetched over the renewal exchange, written to the state
//! folder, and handed to every hub connection, which makes a new session with them before it
//! lets the old one drain (make-before-break).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::enroll::{renew, AgentState, EnrollmentError};
use super::{admin, AgentConfig, Retry};
use crate::transport::ClientTls;

/// Longest single wait before the renewal point is looked at again: the wait runs on the
/// monotonic clock, and a machine that slept must still renew by the wall clock.
const RECHECK: Duration = Duration::from_secs(60 * 60);

/// The agent's client certificate in force, and how many times it was replaced: a hub
/// connection whose session was made with an older generation moves to a new session.
#[derive(Debug, Clone)]
pub(super) struct CurrentTls {
    /// 0 for the material the agent started with, one more for each renewal.
    pub(super) generation: u64,
    /// CA, certificate and key.
    pub(super) tls: ClientTls,
}

/// The channel every hub connection watches for a renewed certificate.
pub(super) type TlsWatch = tokio::sync::watch::Sender<CurrentTls>;

/// When the certificate of `tls` is due for renewal and when it expires; `None` for a
/// certificate that was not enrolled (it carries no `rna://tenant/…` identity).
pub(super) fn schedule(tls: &ClientTls) -> Option<(SystemTime, SystemTime)> {
    let identity = crate::enroll::agent_identity(tls.certificate()?).ok()?;
    let at = |secs| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs));
    let (not_before, not_after) = (at(identity.not_before)?, at(identity.not_after)?);
    Some((crate::enroll::renew_at(not_before, not_after), not_after))
}

/// `12 s`, `3 d 4 h`: how long is left, for the log lines.
fn left(until: SystemTime, now: SystemTime) -> String {
    match until.duration_since(now) {
        Ok(d) if d.as_secs() >= 2 * 24 * 60 * 60 => format!(
            "{} d {} h",
            d.as_secs() / 86_400,
            (d.as_secs() % 86_400) / 3600
        ),
        Ok(d) if d.as_secs() >= 2 * 60 * 60 => format!("{} h", d.as_secs() / 3600),
        Ok(d) => format!("{} s", d.as_secs()),
        Err(_) => "nothing (it has expired)".into(),
    }
}

/// Renews the agent's certificate each time it passes two thirds of its lifetime, until
/// `cancel` fires. A failed renewal is retried with backoff while the current certificate
/// lasts, each failure logged with the lifetime left; a refusal that cannot change (the
/// certificate was revoked) stops renewing. Cancel-safe.
pub(super) async fn renew_certificates(
    config: Arc<AgentConfig>,
    state: AgentState,
    tls: Arc<TlsWatch>,
    metrics: Arc<admin::AgentMetrics>,
    cancel: CancellationToken,
) {
    let mut retry = Retry::new(config.backoff.refused, config.backoff.refused_max);
    loop {
        let current = tls.borrow().tls.clone();
        let Some((renew_at, not_after)) = schedule(&current) else {
            return;
        };
        let wait = renew_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        if !wait.is_zero() {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait.min(RECHECK)) => continue,
            }
        }
        let renewed = tokio::select! {
            _ = cancel.cancelled() => return,
            r = renew(&config.hubs, config.server_name.as_deref(), &config.name, &current, &state) => r,
        };
        let now = SystemTime::now();
        match renewed {
            Ok(renewed) => {
                retry = Retry::new(config.backoff.refused, config.backoff.refused_max);
                metrics.certificate_expiry("agent", renewed.not_after);
                info!(serial = %renewed.serial, expires_in = %left(renewed.not_after, now),
                    state = %state.dir().display(),
                    "certificate renewed; moving to new sessions made with it");
                tls.send_modify(|c| {
                    c.generation += 1;
                    c.tls = renewed.tls;
                });
            }
            Err(EnrollmentError::Refused { code, message })
                if code == crate::enroll::RefusalCode::Revoked =>
            {
                error!("certificate renewal refused ({code}): {message}; enroll again with a new join token");
                return;
            }
            Err(e) => {
                let delay = retry.next_delay();
                warn!(retry_in = ?delay, expires_in = %left(not_after, now),
                    "certificate renewal failed: {e}");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_left_reads_at_its_scale() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let cases = [
            (12, "12 s"),
            (3 * 3600, "3 h"),
            (3 * 86_400 + 4 * 3600, "3 d 4 h"),
        ];
        for (secs, want) in cases {
            assert_eq!(left(now + Duration::from_secs(secs), now), want);
        }
        assert_eq!(
            left(now - Duration::from_secs(1), now),
            "nothing (it has expired)"
        );
    }
}
