//! A mergeable latency histogram with a bounded relative error: the
//! DDSketch construction (Masson, Rim and Lee, VLDB 2019).
//!
//! A value `x > 0` goes into bucket `ceil(log_γ x)` with
//! `γ = (1 + α) / (1 − α)`; a bucket answers for its values with
//! `2γ^i / (γ + 1)`, which is within `α` of every value in it. So a
//! quantile read from the buckets is within a relative `α` of the exact
//! quantile of the values inserted, whatever their distribution, and two
//! sketches with the same `α` merge by adding counts bucket by bucket:
//! the merge of the sketches of two sets is the sketch of their union.
//! That is what lets agents send histograms and the control plane add
//! them up over agents and time windows without ever averaging
//! percentiles.
//!
//! [`Sketch::new`] takes `α` (1% by default, [`DEFAULT_ALPHA`]; Prometheus
//! native histograms' finest schema is about 0.27% per bucket boundary,
//! OpenTelemetry's default exponential histogram 4.3%). Memory is bounded:
//! at most `max_buckets` buckets (default 2,048, which at 1% covers 18
//! orders of magnitude); past that the lowest buckets are folded into one,
//! so only the lowest quantiles lose accuracy, never the tail. Values at
//! or below [`MIN_VALUE`] (and negative ones) count as zero; NaN is not
//! counted.

/// The relative error by default: 1%.
pub const DEFAULT_ALPHA: f64 = 0.01;
/// Buckets kept at most, by default.
pub const DEFAULT_MAX_BUCKETS: usize = 2_048;
/// Values at or below this count as zero.
pub const MIN_VALUE: f64 = 1e-9;

/// Why a sketch cannot be made or merged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SketchError {
    #[error("the relative error must be in (0, 0.5), got {0}")]
    Alpha(f64),
    #[error("at least 16 buckets, got {0}")]
    Buckets(usize),
    #[error("sketches of different relative errors do not merge ({0} and {1})")]
    Mismatch(f64, f64),
    #[error("a sketch of {0} buckets is more than the {DEFAULT_MAX_BUCKETS} allowed")]
    TooLarge(usize),
    #[error("a sketch's offset {0} is out of range")]
    Offset(i32),
    #[error("a sketch's sum, min or max is not a finite number")]
    NotFinite,
}

/// A DDSketch: see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Sketch {
    alpha: f64,
    /// `ln γ`.
    ln_gamma: f64,
    max_buckets: usize,
    /// Counts of buckets `offset`, `offset + 1`, ...
    counts: Vec<u64>,
    offset: i32,
    zeros: u64,
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for Sketch {
    fn default() -> Self {
        Self::with_alpha(DEFAULT_ALPHA)
    }
}

impl Sketch {
    /// A sketch of relative error `alpha` keeping at most `max_buckets`.
    pub fn new(alpha: f64, max_buckets: usize) -> Result<Self, SketchError> {
        if !(alpha > 0.0 && alpha < 0.5) {
            return Err(SketchError::Alpha(alpha));
        }
        if max_buckets < 16 {
            return Err(SketchError::Buckets(max_buckets));
        }
        let gamma = (1.0 + alpha) / (1.0 - alpha);
        Ok(Self {
            alpha,
            ln_gamma: gamma.ln(),
            max_buckets,
            counts: Vec::new(),
            offset: 0,
            zeros: 0,
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        })
    }

    /// A sketch of relative error `alpha` (a valid one, checked by the
    /// caller: a constant) with the default bound on buckets.
    fn with_alpha(alpha: f64) -> Self {
        match Self::new(alpha, DEFAULT_MAX_BUCKETS) {
            Ok(s) => s,
            Err(_) => unreachable!("the default relative error is valid"),
        }
    }

    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Values counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Their sum (for a mean; not bounded in error by the sketch).
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// The smallest and largest value counted, if any.
    pub fn min_max(&self) -> Option<(f64, f64)> {
        (self.count > 0).then_some((self.min, self.max))
    }

    /// Buckets held now.
    pub fn buckets(&self) -> usize {
        self.counts.len()
    }

    fn index(&self, x: f64) -> i32 {
        (x.ln() / self.ln_gamma).ceil() as i32
    }

    /// What bucket `i` answers for its values.
    fn value(&self, i: i32) -> f64 {
        let gamma = self.ln_gamma.exp();
        2.0 * (f64::from(i) * self.ln_gamma).exp() / (gamma + 1.0)
    }

    /// Counts `x` once.
    pub fn insert(&mut self, x: f64) {
        self.insert_n(x, 1);
    }

    /// Counts `x` `n` times.
    pub fn insert_n(&mut self, x: f64, n: u64) {
        if x.is_nan() || n == 0 {
            return;
        }
        self.count += n;
        self.sum += x * n as f64;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
        if x <= MIN_VALUE {
            self.zeros += n;
            return;
        }
        let i = self.index(x);
        self.add(i, n);
    }

    /// Adds `n` to bucket `i`, growing (and, past the bound, folding the
    /// lowest buckets) as needed.
    fn add(&mut self, i: i32, n: u64) {
        if self.counts.is_empty() {
            self.offset = i;
            self.counts.push(n);
            return;
        }
        let top = self.offset + self.counts.len() as i32 - 1;
        if i < self.offset {
            let grow = (self.offset - i) as usize;
            if self.counts.len() + grow > self.max_buckets {
                // Below what is kept: into the lowest bucket.
                let room = self.max_buckets - self.counts.len();
                self.counts.splice(0..0, std::iter::repeat_n(0, room));
                self.offset -= room as i32;
                self.counts[0] += n;
                return;
            }
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.offset = i;
        } else if i > top {
            self.counts
                .resize(self.counts.len() + (i - top) as usize, 0);
            self.fold();
        }
        let at = (i - self.offset) as usize;
        self.counts[at] += n;
    }

    /// Folds the lowest buckets into one until at most `max_buckets` are
    /// left.
    fn fold(&mut self) {
        let excess = self.counts.len().saturating_sub(self.max_buckets);
        if excess == 0 {
            return;
        }
        let folded: u64 = self.counts.drain(..excess).sum();
        self.offset += excess as i32;
        self.counts[0] += folded;
    }

    /// Adds `other`'s counts: the sketch of the union of both sets.
    pub fn merge(&mut self, other: &Sketch) -> Result<(), SketchError> {
        if self.alpha != other.alpha {
            return Err(SketchError::Mismatch(self.alpha, other.alpha));
        }
        for (k, n) in other.counts.iter().enumerate() {
            if *n > 0 {
                self.add(other.offset + k as i32, *n);
            }
        }
        self.zeros += other.zeros;
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        Ok(())
    }

    /// The `q` quantile (0 ≤ q ≤ 1): within a relative `alpha` of the
    /// value of rank `floor(q × (count − 1))` among those counted (0-based,
    /// ascending). `None` when nothing was counted or `q` is outside [0, 1].
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        // The ends are known exactly.
        if q == 0.0 {
            return Some(self.min);
        }
        if q == 1.0 {
            return Some(self.max);
        }
        let rank = (q * (self.count - 1) as f64).floor() as u64;
        if rank < self.zeros {
            return Some(0.0_f64.clamp(self.min, self.max));
        }
        let mut seen = self.zeros;
        for (k, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen > rank {
                let v = self.value(self.offset + k as i32);
                return Some(v.clamp(self.min, self.max));
            }
        }
        Some(self.max)
    }
}

/// The wire form (`weir.telemetry.v1.Sketch`).
impl Sketch {
    pub fn to_proto(&self) -> weir_proto::telemetry::v1::Sketch {
        let empty = self.count == 0;
        weir_proto::telemetry::v1::Sketch {
            alpha: self.alpha,
            offset: self.offset,
            counts: self.counts.clone(),
            zeros: self.zeros,
            sum: self.sum,
            min: if empty { 0.0 } else { self.min },
            max: if empty { 0.0 } else { self.max },
        }
    }

    /// A sketch from the wire, checked: a valid `alpha`, at most
    /// [`DEFAULT_MAX_BUCKETS`] buckets at an index a latency can have,
    /// finite figures. The count is recomputed from the buckets.
    pub fn from_proto(p: &weir_proto::telemetry::v1::Sketch) -> Result<Self, SketchError> {
        let mut s = Self::new(p.alpha, DEFAULT_MAX_BUCKETS)?;
        if p.counts.len() > DEFAULT_MAX_BUCKETS {
            return Err(SketchError::TooLarge(p.counts.len()));
        }
        // Indexes of values between 1e-9 and 1e12 at any valid alpha.
        if p.offset.unsigned_abs() > 1 << 20 {
            return Err(SketchError::Offset(p.offset));
        }
        if !(p.sum.is_finite() && p.min.is_finite() && p.max.is_finite()) {
            return Err(SketchError::NotFinite);
        }
        let count = p
            .counts
            .iter()
            .fold(p.zeros, |total, n| total.saturating_add(*n));
        s.counts = p.counts.clone();
        s.offset = p.offset;
        s.zeros = p.zeros;
        s.count = count;
        s.sum = p.sum;
        if count > 0 {
            s.min = p.min.min(p.max);
            s.max = p.max.max(p.min);
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator (xorshift64*), so the tests always see
    /// the same values.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
            (x >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// The exact value of the rank the sketch answers for.
    fn exact(sorted: &[f64], q: f64) -> f64 {
        sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
    }

    fn check(values: &mut [f64], what: &str) {
        let mut s = Sketch::default();
        for v in values.iter() {
            s.insert(*v);
        }
        values.sort_by(f64::total_cmp);
        for q in [0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let want = exact(values, q);
            let got = s.quantile(q).expect("values");
            assert!(
                (got - want).abs() <= DEFAULT_ALPHA * want.abs() + 1e-12,
                "{what}: q{q}: {got} against {want}"
            );
        }
        assert_eq!(s.count(), values.len() as u64);
    }

    #[test]
    fn quantiles_are_within_one_percent_whatever_the_distribution() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let n = 20_000;
        // Uniform latencies from 50 µs to 2 s.
        let mut uniform: Vec<f64> = (0..n).map(|_| 50e-6 + rng.next() * 2.0).collect();
        check(&mut uniform, "uniform");
        // Exponential: most fast, a long tail.
        let mut exponential: Vec<f64> = (0..n).map(|_| -(1.0 - rng.next()).ln() * 0.003).collect();
        check(&mut exponential, "exponential");
        // Log-normal over six orders of magnitude (Box–Muller).
        let mut lognormal: Vec<f64> = (0..n)
            .map(|_| {
                let (u, v) = (1.0 - rng.next(), rng.next());
                let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                (z * 2.5).exp() * 1e-3
            })
            .collect();
        check(&mut lognormal, "lognormal");
        // Two modes: cache hits and misses.
        let mut bimodal: Vec<f64> = (0..n)
            .map(|i| {
                if i % 10 == 0 {
                    0.2 + rng.next() * 0.01
                } else {
                    0.001 + rng.next() * 1e-4
                }
            })
            .collect();
        check(&mut bimodal, "bimodal");
    }

    #[test]
    fn the_merge_of_sketches_is_the_sketch_of_the_union() {
        let mut rng = Rng(7);
        let values: Vec<f64> = (0..5_000).map(|_| rng.next() * 10.0).collect();
        let mut whole = Sketch::default();
        let mut parts = [Sketch::default(), Sketch::default(), Sketch::default()];
        for (i, v) in values.iter().enumerate() {
            whole.insert(*v);
            parts[i % 3].insert(*v);
        }
        let mut merged = Sketch::default();
        for p in &parts {
            merged.merge(p).expect("same alpha");
        }
        assert_eq!(merged.counts, whole.counts);
        assert_eq!(merged.offset, whole.offset);
        assert_eq!(merged.count(), whole.count());
        assert_eq!(merged.min_max(), whole.min_max());
        for q in [0.5, 0.9, 0.99] {
            assert_eq!(merged.quantile(q), whole.quantile(q));
        }
        let coarse = Sketch::new(0.02, 256).expect("valid");
        assert_eq!(
            merged.merge(&coarse),
            Err(SketchError::Mismatch(0.01, 0.02))
        );
    }

    #[test]
    fn the_wire_form_round_trips_and_bad_ones_are_refused() {
        let mut rng = Rng(11);
        let mut s = Sketch::default();
        for _ in 0..1_000 {
            s.insert(rng.next() * 0.5);
        }
        s.insert(0.0);
        let back = Sketch::from_proto(&s.to_proto()).expect("valid");
        assert_eq!(back, s);
        let empty = Sketch::from_proto(&Sketch::default().to_proto()).expect("valid");
        assert_eq!(empty.count(), 0);
        assert_eq!(empty.quantile(0.5), None);
        let mut bad = s.to_proto();
        bad.counts = vec![1; DEFAULT_MAX_BUCKETS + 1];
        assert!(matches!(
            Sketch::from_proto(&bad),
            Err(SketchError::TooLarge(_))
        ));
        let mut bad = s.to_proto();
        bad.sum = f64::NAN;
        assert_eq!(Sketch::from_proto(&bad), Err(SketchError::NotFinite));
        let mut bad = s.to_proto();
        bad.alpha = 0.9;
        assert_eq!(Sketch::from_proto(&bad), Err(SketchError::Alpha(0.9)));
        let mut bad = s.to_proto();
        bad.offset = i32::MIN;
        assert!(matches!(
            Sketch::from_proto(&bad),
            Err(SketchError::Offset(_))
        ));
    }

    #[test]
    fn memory_is_bounded_and_the_tail_stays_exact_to_alpha() {
        let mut s = Sketch::new(0.01, 64).expect("valid");
        // From 1 ns to 1,000 s: far more than 64 buckets of 2% apart.
        let mut values = Vec::new();
        let mut x = 1e-9;
        while x < 1e3 {
            s.insert(x);
            values.push(x);
            x *= 1.01;
        }
        assert!(s.buckets() <= 64, "{}", s.buckets());
        values.sort_by(f64::total_cmp);
        for q in [0.99, 0.999, 1.0] {
            let (want, got) = (exact(&values, q), s.quantile(q).expect("values"));
            assert!(
                (got - want).abs() <= 0.01 * want,
                "q{q}: {got} against {want}"
            );
        }
        // The low end folded: its quantiles are no better than the lowest
        // bucket kept, but never below the smallest value.
        assert!(s.quantile(0.0).expect("values") >= 1e-9);
    }

    #[test]
    fn zeros_nan_bad_settings_and_the_empty_sketch() {
        let mut s = Sketch::default();
        assert_eq!(s.quantile(0.5), None);
        s.insert(f64::NAN);
        assert_eq!(s.count(), 0);
        s.insert(0.0);
        s.insert(-1.0);
        s.insert_n(2.0, 2);
        assert_eq!(s.count(), 4);
        assert_eq!(s.quantile(0.0), Some(-1.0));
        let median = s.quantile(0.5).expect("values");
        assert!(median <= 0.0, "{median}");
        let top = s.quantile(1.0).expect("values");
        assert!((top - 2.0).abs() <= 0.02, "{top}");
        assert_eq!(s.quantile(1.5), None);
        assert_eq!(Sketch::new(0.0, 100), Err(SketchError::Alpha(0.0)));
        assert_eq!(Sketch::new(0.6, 100), Err(SketchError::Alpha(0.6)));
        assert_eq!(Sketch::new(0.01, 8), Err(SketchError::Buckets(8)));
    }
}
