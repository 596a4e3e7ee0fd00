//! Hub-paced liveness: the heartbeat interval the hub announces grows with its fleet, so the
//! fleet's pings stay within a budget of packets per second, and sessions told an interval
//! that is now far off are sent `Pace`.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Shared;
use crate::proto::Control;
use crate::transport::control::Heartbeat;

/// How often the fleet's interval is worked out again. Sessions come and go in bursts (a
/// reconnect storm); once a second bounds the `Pace` messages a burst causes.
const EVERY: Duration = Duration::from_secs(1);

/// How far (as a factor, either way) the interval a session was told may be from the current
/// one before it is told again: small changes of the fleet cause no message at all.
const RETELL_FACTOR: f64 = 1.25;

/// The interval announced to each agent when `sessions` are connected: long enough that the
/// fleet sends at most `rate` pings a second, never shorter than `min` nor longer than
/// `ceiling` (the ceiling wins if the two cross).
pub fn paced_interval(sessions: usize, min: Duration, rate: u32, ceiling: Duration) -> Duration {
    let rate = rate.max(1);
    let budgeted = Duration::from_secs_f64(sessions as f64 / f64::from(rate));
    budgeted.max(min).min(ceiling)
}

/// The timing the hub announces and keeps itself for `interval`: the configured timeout,
/// or three intervals when that is longer (two lost pings never end a session).
pub fn paced_heartbeat(interval: Duration, timeout: Duration) -> Heartbeat {
    Heartbeat {
        interval,
        timeout: timeout.max(interval.saturating_mul(3)),
    }
}

/// Whether a session told `told` should be told `now`: they differ by the retell factor.
pub fn needs_retelling(told: Duration, now: Duration) -> bool {
    let (told, now) = (told.as_secs_f64(), now.as_secs_f64());
    if told <= 0.0 || now <= 0.0 {
        return told != now;
    }
    told / now >= RETELL_FACTOR || now / told >= RETELL_FACTOR
}

/// The timing for a session joining (or being re-paced) now, from the live session count.
pub fn current(shared: &Shared) -> Heartbeat {
    let config = &shared.config;
    let interval = paced_interval(
        shared.registry.len(),
        config.heartbeat_min,
        config.heartbeat_rate,
        config.heartbeat.interval,
    );
    paced_heartbeat(interval, config.heartbeat.timeout)
}

/// Re-evaluates the fleet's interval once a second until `stop` fires, and sends `Pace` to
/// every session whose told interval is off by the retell factor. A session whose control
/// outbox is full is skipped and gets the next round.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        retell(&shared);
    }
}

/// One round of [`run`]: returns how many sessions were sent `Pace`.
fn retell(shared: &Shared) -> usize {
    let now = current(shared);
    let mut told = 0;
    for session in shared.registry.sessions() {
        if !needs_retelling(session.heartbeat_interval(), now.interval) {
            continue;
        }
        let pace = Control::Pace {
            heartbeat_interval_ms: super::session::duration_ms(now.interval),
            heartbeat_timeout_ms: super::session::duration_ms(now.timeout),
        };
        if session.send_control(pace) {
            session.set_heartbeat_interval(now.interval);
            told += 1;
        }
    }
    if told > 0 {
        debug!(sessions = told, interval = ?now.interval, "heartbeat pace sent");
    }
    told
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn the_interval_scales_with_the_fleet_between_min_and_ceiling() {
        let (min, ceiling) = (MS(500), Duration::from_secs(10));
        let table = [
            (0, MS(500)),
            (1, MS(500)),
            (1_000, MS(500)),
            (1_001, Duration::from_micros(500_500)),
            (2_000, MS(1_000)),
            (3_000, MS(1_500)),
            (10_000, MS(5_000)),
            (20_000, MS(10_000)),
            (100_000, MS(10_000)),
        ];
        for (sessions, want) in table {
            assert_eq!(
                paced_interval(sessions, min, 2_000, ceiling),
                want,
                "{sessions} sessions"
            );
        }
        // A low budget, as the tests use: 2 pings a second.
        assert_eq!(paced_interval(1, MS(100), 2, ceiling), MS(500));
        assert_eq!(paced_interval(6, MS(100), 2, ceiling), MS(3_000));
        // The ceiling wins over the minimum if they cross; a rate of 0 is taken as 1.
        assert_eq!(paced_interval(1, MS(900), 2_000, MS(500)), MS(500));
        assert_eq!(paced_interval(3, MS(100), 0, ceiling), MS(3_000));
    }

    #[test]
    fn the_timeout_is_at_least_three_intervals() {
        let t = paced_heartbeat(MS(500), Duration::from_secs(30));
        assert_eq!(t.timeout, Duration::from_secs(30));
        let t = paced_heartbeat(Duration::from_secs(15), Duration::from_secs(30));
        assert_eq!(t.timeout, Duration::from_secs(45));
    }

    #[test]
    fn a_session_is_retold_only_past_the_factor() {
        assert!(!needs_retelling(MS(500), MS(500)));
        assert!(!needs_retelling(MS(500), MS(620)));
        assert!(needs_retelling(MS(500), MS(625)));
        assert!(needs_retelling(MS(625), MS(500)));
        assert!(!needs_retelling(MS(620), MS(500)));
        assert!(needs_retelling(Duration::ZERO, MS(500)));
    }
}
