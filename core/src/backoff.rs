//! Capped exponential backoff: `base`, `2 × base`, `4 × base`, … up to a
//! cap, optionally jittered so that many clients failing together spread
//! out instead of retrying in lockstep.

use std::time::Duration;

/// How a delay is randomised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Jitter {
    /// The delay as computed.
    #[default]
    None,
    /// Uniform in `[d/2, d]`: spreads retries out but always waits at least
    /// half the delay.
    Half,
    /// Uniform in `[0, d]` ("full jitter").
    Full,
}

impl Jitter {
    /// Applies this jitter to `d`, given `sample`, a uniform draw in
    /// `[0, 1]` (clamped), so the arithmetic is testable without a random
    /// source.
    pub fn apply(self, d: Duration, sample: f64) -> Duration {
        let sample = if sample.is_finite() {
            sample.clamp(0.0, 1.0)
        } else {
            1.0
        };
        match self {
            Jitter::None => d,
            Jitter::Half => d.mul_f64(0.5 + sample / 2.0),
            Jitter::Full => d.mul_f64(sample),
        }
    }
}

/// The delay before retry number `attempt` (1-based; 0 counts as 1):
/// `base × 2^(attempt - 1)`, at most `max`. No jitter.
pub fn exponential(base: Duration, max: Duration, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << doublings).min(max)
}

/// A retry loop's backoff: each [`Backoff::next_delay`] waits twice as long
/// as the one before, up to the cap, until [`Backoff::reset`] after a
/// success.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: Jitter,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, never above `max`, without jitter.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            jitter: Jitter::None,
            attempt: 0,
        }
    }

    /// The same backoff with `jitter` applied to every delay.
    pub fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// Counts a failure and returns how long to wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        let d = exponential(self.base, self.max, self.attempt);
        match self.jitter {
            Jitter::None => d,
            j => j.apply(d, rand::random_range(0.0..=1.0)),
        }
    }

    /// Failures counted since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// After a success: the next failure waits `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_up_to_the_cap() {
        let d: Vec<_> = (1..=6)
            .map(|a| exponential(100 * MS, 1000 * MS, a))
            .collect();
        assert_eq!(d, [100, 200, 400, 800, 1000, 1000].map(|n| n * MS));
        assert_eq!(exponential(100 * MS, 1000 * MS, 0), 100 * MS);
        assert_eq!(
            exponential(100 * MS, Duration::from_secs(5), u32::MAX),
            Duration::from_secs(5),
            "no overflow"
        );
    }

    #[test]
    fn resets_after_success() {
        let mut b = Backoff::new(100 * MS, Duration::from_secs(5));
        assert_eq!(b.next_delay(), 100 * MS);
        assert_eq!(b.next_delay(), 200 * MS);
        assert_eq!(b.attempt(), 2);
        b.reset();
        assert_eq!(b.next_delay(), 100 * MS);
    }

    #[test]
    fn jitter_stays_in_its_range() {
        let d = 800 * MS;
        assert_eq!(Jitter::None.apply(d, 0.3), d);
        assert_eq!(Jitter::Half.apply(d, 0.0), 400 * MS);
        assert_eq!(Jitter::Half.apply(d, 1.0), d);
        assert_eq!(Jitter::Full.apply(d, 0.0), Duration::ZERO);
        assert_eq!(Jitter::Full.apply(d, 0.5), 400 * MS);
        assert_eq!(Jitter::Full.apply(d, 7.0), d, "sample clamped");
        assert_eq!(Jitter::Full.apply(d, f64::NAN), d);
        let mut b = Backoff::new(100 * MS, 400 * MS).with_jitter(Jitter::Half);
        for cap in [100, 200, 400, 400] {
            let got = b.next_delay();
            assert!(got >= cap * MS / 2 && got <= cap * MS, "{got:?} vs {cap}");
        }
    }
}
