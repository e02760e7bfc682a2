//! Percentiles of samples, and the median and spread of rounds.

use std::time::Duration;

/// Nearest-rank percentile `q` (0..=1) of sorted samples; zero if none.
/// `q = 0` is the smallest sample, `q = 1` the largest.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One figure over several rounds: the median, and the spread as the
/// smallest and largest value (with 3 to 5 rounds an interquartile range
/// would say little more than min–max, and hide an outlier round).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// Rounds that gave the figure.
    pub n: usize,
    /// The middle value; with an even count, the mean of the two middle ones.
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// Of the values that are numbers; `None` if there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            n,
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    /// Whether the two min–max ranges share a value.
    pub fn overlaps(&self, other: &Self) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = ms(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        assert_eq!(percentile(&s, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&s, 0.5), Duration::from_millis(5));
        assert_eq!(percentile(&s, 0.51), Duration::from_millis(6));
        assert_eq!(percentile(&s, 0.99), Duration::from_millis(10));
        assert_eq!(percentile(&s, 1.0), Duration::from_millis(10));
        assert_eq!(percentile(&ms(&[7]), 0.99), Duration::from_millis(7));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn median_and_min_max_of_rounds() {
        let odd = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((odd.n, odd.median, odd.min, odd.max), (3, 2.0, 1.0, 3.0));
        let even = Spread::of(&[4.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!(
            (even.n, even.median, even.min, even.max),
            (4, 3.0, 1.0, 10.0)
        );
        // A round without the figure (NaN) does not count.
        let gap = Spread::of(&[5.0, f64::NAN]).unwrap();
        assert_eq!((gap.n, gap.median), (1, 5.0));
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN]), None);
    }

    #[test]
    fn ranges_overlap_when_they_share_a_value() {
        let a = Spread::of(&[1.0, 3.0]).unwrap();
        assert!(a.overlaps(&Spread::of(&[3.0, 4.0]).unwrap()));
        assert!(a.overlaps(&Spread::of(&[2.0]).unwrap()));
        assert!(!a.overlaps(&Spread::of(&[3.5, 4.0]).unwrap()));
        assert!(!Spread::of(&[3.5, 4.0]).unwrap().overlaps(&a));
    }
}
