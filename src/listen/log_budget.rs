//! At most a few log lines per interval for events that can come in floods (accept errors,
//! refused connections, failed handshakes), with a count of the events that got no line of
//! their own, so the log stays readable and still accounts for every event.

use std::time::Duration;

use tokio::time::Instant;

/// A budget of `burst` log lines per `window`. A window starts with the first line after the
/// previous one ended. Events that find the budget spent are counted; the count goes out with
/// the next line ([`line`](Self::line)) or in a summary when the window ends
/// ([`roll`](Self::roll)). Reads tokio's clock, so tests can pause and advance it.
#[derive(Debug, Clone)]
pub struct LogBudget {
    window: Duration,
    burst: u32,
    /// When the current window started; `None` before the first line and after a roll.
    started: Option<Instant>,
    /// Lines written in the current window.
    lines: u32,
    /// Events since the last line (or roll) that got no line.
    unlogged: u64,
}

impl LogBudget {
    /// Up to `burst` lines per `window`.
    pub fn new(window: Duration, burst: u32) -> Self {
        LogBudget {
            window,
            burst,
            started: None,
            lines: 0,
            unlogged: 0,
        }
    }

    /// One line per `window`.
    pub fn per(window: Duration) -> Self {
        LogBudget::new(window, 1)
    }

    /// Whether the current window is over (or none is open).
    fn window_over(&self, now: Instant) -> bool {
        self.started
            .is_none_or(|at| now.saturating_duration_since(at) >= self.window)
    }

    /// Spends one line of the budget if one is left: `Some(events not logged since the last
    /// line)` (the count starts again at zero), or `None` when the budget is spent (nothing is
    /// counted: call [`unlogged`](Self::unlogged) for an event that goes without a line).
    pub fn line(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.window_over(now) {
            self.started = Some(now);
            self.lines = 0;
        }
        if self.lines >= self.burst {
            return None;
        }
        self.lines += 1;
        Some(std::mem::take(&mut self.unlogged))
    }

    /// Counts one event that gets no line of its own.
    pub fn unlogged(&mut self) {
        self.unlogged += 1;
    }

    /// For one event: [`line`](Self::line), or, when the budget is spent, counts the event and
    /// returns `None`.
    pub fn event(&mut self) -> Option<u64> {
        let line = self.line();
        if line.is_none() {
            self.unlogged();
        }
        line
    }

    /// Ends the window if it is over: returns how many events of it went without a line
    /// (`None` when the window is still open or every event had its line). For a summary
    /// line on a timer, so the last window of a flood is reported when the flood stops.
    pub fn roll(&mut self) -> Option<u64> {
        if !self.window_over(Instant::now()) {
            return None;
        }
        self.started = None;
        self.lines = 0;
        let unlogged = std::mem::take(&mut self.unlogged);
        (unlogged > 0).then_some(unlogged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_per_window_carries_the_count_of_the_events_without_one() {
        let mut budget = LogBudget::per(Duration::from_secs(1));
        assert_eq!(budget.event(), Some(0));
        for _ in 0..5 {
            assert_eq!(budget.event(), None);
        }
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(budget.event(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(budget.event(), Some(6), "the five and the one at 999 ms");
        assert_eq!(budget.event(), None);
        tokio::time::advance(Duration::from_secs(5)).await;
        // `line` alone counts nothing: an event that is not worth counting (a recovery).
        assert_eq!(budget.line(), Some(1));
        assert_eq!(budget.line(), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(budget.line(), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_per_window_and_a_summary_when_it_ends() {
        let mut budget = LogBudget::new(Duration::from_secs(10), 2);
        assert_eq!(budget.roll(), None, "nothing to sum up before any event");
        assert_eq!(budget.event(), Some(0));
        assert_eq!(budget.event(), Some(0));
        for _ in 0..4 {
            assert_eq!(budget.event(), None);
        }
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(budget.roll(), None, "the window is still open");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(budget.roll(), Some(4));
        assert_eq!(budget.roll(), None, "summed up once");
        // A new window with a fresh burst.
        assert_eq!(budget.event(), Some(0));
        assert_eq!(budget.event(), Some(0));
        assert_eq!(budget.event(), None);
    }
}
