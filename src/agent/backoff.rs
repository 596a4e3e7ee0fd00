//! Reconnect pacing: exponential delays with jitter that never exceed their stated maximum.
//!
//! Each delay is drawn uniformly from the upper half of its exponential step ("equal
//! jitter"): `step = min(max, first × 2^n)`, delay in `[step / 2, step]`. The jitter is taken
//! out of the step, never added on top, so the documented maximum is the real maximum, and
//! agents that failed together (a hub restart) still spread their retries.

use std::time::Duration;

/// The delays of one run of failures; [`next`](Retry::next) gives the next one. Start a new
/// `Retry` after a success.
#[derive(Debug, Clone)]
pub struct Retry {
    /// The first step.
    first: Duration,
    /// The largest step, and so the largest delay, jitter included.
    max: Duration,
    /// Failures so far in this run.
    attempt: u32,
    /// xorshift64* state: jitter needs spread, not secrecy.
    rng: u64,
}

impl Retry {
    /// Delays growing from about `first` to at most `max`.
    pub fn new(first: Duration, max: Duration) -> Retry {
        let mut seed = [0u8; 8];
        let random = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        let seed = match random {
            Ok(()) => u64::from_le_bytes(seed),
            // Without the system source, the clock still differs between agents.
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        };
        Retry::with_seed(first, max, seed)
    }

    /// Like [`new`](Retry::new) with a fixed jitter seed (tests).
    pub fn with_seed(first: Duration, max: Duration, seed: u64) -> Retry {
        Retry {
            first: first.min(max),
            max,
            attempt: 0,
            // xorshift must not start at zero.
            rng: seed | 1,
        }
    }

    /// The largest delay this run can give.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The next delay: within `[step / 2, step]`, where the step doubles per failure from
    /// `first` up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        let step = self.first.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let spread = step.saturating_sub(half).as_nanos() as u64;
        let jitter = match spread {
            0 => 0,
            n => self.random() % (n + 1),
        };
        half + Duration::from_nanos(jitter)
    }

    /// A delay drawn uniformly from `[0, window]`, for a retry that should be immediate but
    /// not at the same instant as every other agent's: after a hub restart the whole fleet
    /// notices within one keep-alive interval, and an instant retry from each would arrive
    /// as one burst. Does not count as a failure of the run.
    pub fn spread(&mut self, window: Duration) -> Duration {
        match window.as_nanos() as u64 {
            0 => Duration::ZERO,
            n => Duration::from_nanos(self.random() % (n + 1)),
        }
    }

    fn random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// (first, max, the steps of the first delays): every delay lies in [step / 2, step].
    #[test]
    fn delays_double_and_never_exceed_the_maximum() {
        let table: [(Duration, Duration, &[u64]); 3] = [
            // Connection failures: 200 ms up to 30 s.
            (
                ms(200),
                ms(30_000),
                &[
                    200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 30_000, 30_000,
                ],
            ),
            // Refusals (token, certificate): 1 s up to a minute.
            (
                ms(1_000),
                ms(60_000),
                &[1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000],
            ),
            // A first step above the maximum is clamped to it.
            (ms(5_000), ms(1_000), &[1_000, 1_000]),
        ];
        for seed in [1, 7, 0xdead_beef, u64::MAX] {
            for (first, max, steps) in table {
                let mut retry = Retry::with_seed(first, max, seed);
                for &step in steps {
                    let delay = retry.next_delay();
                    let step = ms(step);
                    assert!(
                        delay >= step / 2 && delay <= step,
                        "seed {seed}: {delay:?} outside [{:?}, {step:?}]",
                        step / 2
                    );
                }
            }
        }
    }

    #[test]
    fn the_maximum_holds_forever_and_jitter_spreads() {
        let max = ms(30_000);
        let mut retry = Retry::new(ms(200), max);
        let mut late = Vec::new();
        for i in 0..10_000 {
            let delay = retry.next_delay();
            assert!(delay <= max, "attempt {i}: {delay:?} exceeds {max:?}");
            if i > 100 {
                late.push(delay);
            }
        }
        assert!(late.iter().all(|d| *d >= max / 2));
        late.sort();
        late.dedup();
        assert!(late.len() > 100, "jitter should spread delays: {late:?}");
    }

    #[test]
    fn a_spread_stays_in_its_window_covers_it_and_leaves_the_steps_alone() {
        let window = ms(500);
        let mut retry = Retry::new(ms(200), ms(30_000));
        let mut seen = Vec::new();
        for _ in 0..10_000 {
            let d = retry.spread(window);
            assert!(d <= window, "{d:?} beyond {window:?}");
            seen.push(d);
        }
        // Spread over the whole window: each tenth of it is hit (about 1,000 times each).
        for tenth in 0..10u32 {
            let (lo, hi) = (window * tenth / 10, window * (tenth + 1) / 10);
            let n = seen.iter().filter(|d| **d >= lo && **d < hi).count();
            assert!(n > 700, "{n} delays in [{lo:?}, {hi:?})");
        }
        // Spreads are not failures: the next backoff delay is still the first step's.
        let delay = retry.next_delay();
        assert!(delay >= ms(100) && delay <= ms(200), "{delay:?}");
        assert_eq!(retry.spread(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn zero_delays_stay_zero() {
        let mut retry = Retry::with_seed(Duration::ZERO, Duration::ZERO, 3);
        assert_eq!(retry.next_delay(), Duration::ZERO);
    }
}
