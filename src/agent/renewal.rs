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

/// The agent's client certificate in force, and how many times it or the connect token was
/// replaced: a hub connection whose session was made with an older generation moves to a new
/// session.
#[derive(Debug, Clone)]
pub(super) struct Credentials {
    /// 0 for the material the agent started with, one more for each renewal or rotation.
    pub(super) generation: u64,
    /// CA, certificate and key.
    pub(super) tls: ClientTls,
    /// A rotated connect token that could not be written to the token file: used instead of
    /// the file until the agent restarts.
    pub(super) token: Option<crate::identity::Secret>,
}

/// The channel every hub connection watches for a renewed certificate.
pub(super) type TlsWatch = tokio::sync::watch::Sender<Credentials>;

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
    let reach = super::enroll::Reach::of(&config);
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
            r = renew(&config.hubs, config.server_name.as_deref(), &config.name, &current, &state, &reach) => r,
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

/// Stores each connect token the hub rotated (`rotated`, from any session) in `token_file`
/// (0600), or keeps it in memory when the file cannot be written, and moves every hub
/// connection to a new session with it: the hub revokes the old token once no session uses
/// it. Ends when every session's sender is gone.
pub(super) async fn store_rotated_tokens(
    mut rotated: tokio::sync::mpsc::UnboundedReceiver<crate::identity::Secret>,
    token_file: Option<std::path::PathBuf>,
    credentials: Arc<TlsWatch>,
) {
    while let Some(token) = rotated.recv().await {
        // Several sessions (one per hub address) deliver the same token: store it once.
        let known = credentials
            .borrow()
            .token
            .as_ref()
            .map(|t| t.expose().to_owned());
        let on_file = token_file
            .as_deref()
            .and_then(|path| crate::auth::load_secret_file(path).ok());
        if known.as_deref() == Some(token.expose())
            || on_file
                .as_ref()
                .is_some_and(|t| t.expose() == token.expose())
        {
            continue;
        }
        let stored = match &token_file {
            Some(path) => {
                let text = format!("{}\n", token.expose());
                let path = path.clone();
                let written = tokio::task::spawn_blocking(move || {
                    crate::fsutil::replace_file(
                        &path,
                        text.as_bytes(),
                        crate::fsutil::FileMode::Exactly(0o600),
                    )
                    .map(|_| path)
                })
                .await;
                match written {
                    Ok(Ok(path)) => {
                        info!(file = %path.display(),
                            "connect token rotated by the hub and stored; moving to new sessions with it");
                        true
                    }
                    Ok(Err(e)) => {
                        warn!(
                            "connect token rotated by the hub, but it cannot be stored: {}; \
                               using it until the agent restarts",
                            e.problem
                        );
                        false
                    }
                    Err(e) => {
                        warn!(
                            "connect token rotated by the hub, but storing it failed: {e}; \
                               using it until the agent restarts"
                        );
                        false
                    }
                }
            }
            None => {
                warn!(
                    "connect token rotated by the hub; the agent has no token file, so it \
                       uses the new token until it restarts"
                );
                false
            }
        };
        credentials.send_modify(|c| {
            c.generation += 1;
            c.token = (!stored).then_some(token);
        });
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
