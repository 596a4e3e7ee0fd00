//! systemd readiness and watchdog notifications (sd_notify); all no-ops when not run by
//! systemd (NOTIFY_SOCKET unset).

use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Whether a failed notification was already logged (log once, never fail the service).
static WARNED: AtomicBool = AtomicBool::new(false);

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::debug!("systemd notification failed: {e}");
        }
    }
}

/// Tells systemd the service is ready (READY=1 plus STATUS=<status>). Call after every socket
/// is bound (hub) or after local setup (agent).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the service is reloading (RELOADING=1 with MONOTONIC_USEC); call
/// [`reloaded`] after.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// READY=1 again after a reload.
pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// STOPPING=1 with a status line.
pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// STATUS=<text> only.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// If systemd enabled the watchdog for this process, spawns a task that sends WATCHDOG=1 every
/// half period until `shutdown` fires. Returns whether the watchdog is enabled.
pub fn spawn_watchdog(shutdown: CancellationToken) -> bool {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return false;
    };
    let half = (period / 2).max(std::time::Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(half);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => send(&[NotifyState::Watchdog]),
            }
        }
    });
    true
}
