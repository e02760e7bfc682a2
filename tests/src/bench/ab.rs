//! Which binaries a benchmark measures, in which order, and the table of
//! their figures over the rounds.
//!
//! Without `WEIR_BENCH_BASE` a benchmark measures this checkout's binary
//! once (or `WEIR_BENCH_ROUNDS` times, then with the median and spread of
//! every figure). With `WEIR_BENCH_BASE=<git rev>` it measures the base
//! revision's binary and this checkout's in interleaved rounds (base, this,
//! base, this, ...; `WEIR_BENCH_ROUNDS`, default 3), so load from outside
//! the benchmark that comes and goes hits both alike, and reports per
//! figure both medians, their ratio and each one's spread.

use std::{
    collections::HashMap,
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Result;

use super::{build, env_num, Spread};

/// Rounds of an A/B comparison unless `WEIR_BENCH_ROUNDS` says otherwise.
const DEFAULT_AB_ROUNDS: u64 = 3;

/// One binary being measured.
#[derive(Clone, Debug)]
pub struct Side {
    /// `base 4ec0f85` or `this 1a2b3c4`.
    pub label: String,
    pub binary: PathBuf,
}

/// What a benchmark run measures.
#[derive(Clone, Debug)]
pub struct Plan {
    /// This checkout's control plane (built next to the benchmark).
    pub this: Side,
    /// The base revision's, with `WEIR_BENCH_BASE`.
    pub base: Option<Side>,
    /// Runs of each side.
    pub rounds: usize,
}

impl Plan {
    /// Reads the knobs and builds what is measured: this checkout's
    /// binaries (`cargo build --release --bins`, unless
    /// `WEIR_BENCH_SKIP_BUILD=1`) and, with `WEIR_BENCH_BASE`, the base
    /// revision's control plane (see `build::build_base`).
    pub fn prepare() -> Result<Self> {
        let built = build::BuiltIn::current()?;
        if !built.release {
            eprintln!(
                "warning: not a release build ({}); figures are not representative",
                built.profile_dir.display()
            );
        }
        let skip_build = std::env::var_os("WEIR_BENCH_SKIP_BUILD").is_some_and(|v| v != "0");
        let base = match std::env::var("WEIR_BENCH_BASE") {
            Ok(rev) if !rev.trim().is_empty() => {
                let (short, binary) = build::build_base(&built, rev.trim(), skip_build)?;
                Some(Side {
                    label: format!("base {short}"),
                    binary,
                })
            }
            _ => None,
        };
        if !skip_build {
            build::build_this(&built)?;
        }
        let this = Side {
            label: format!("this {}", build::describe_this()),
            binary: crate::workspace_binary(build::BINARY)?,
        };
        let default_rounds = if base.is_some() { DEFAULT_AB_ROUNDS } else { 1 };
        let rounds = usize::try_from(env_num("WEIR_BENCH_ROUNDS", default_rounds).max(1))?;
        let plan = Self { this, base, rounds };
        eprintln!("bench: {}", plan.describe());
        Ok(plan)
    }

    /// A plan without building anything (for tests of the schedule).
    pub fn of(this: Side, base: Option<Side>, rounds: usize) -> Self {
        Self {
            this,
            base,
            rounds: rounds.max(1),
        }
    }

    fn describe(&self) -> String {
        let this = format!("{} ({})", self.this.label, self.this.binary.display());
        match &self.base {
            Some(base) => format!(
                "{} rounds of {} ({}) and {this}, interleaved",
                self.rounds,
                base.label,
                base.binary.display()
            ),
            None if self.rounds > 1 => format!("{} rounds of {this}", self.rounds),
            None => this,
        }
    }

    /// Runs `once` on every run in order ([`Plan::runs`]), each under a
    /// heading when there are several, then prints the comparison
    /// ([`Rounds::print`]). `once` measures one binary, prints its own
    /// tables and returns its figures.
    pub async fn measure<F, Fut>(&self, mut once: F) -> Result<()>
    where
        F: FnMut(Run) -> Fut,
        Fut: Future<Output = Result<Vec<Figure>>>,
    {
        let mut rounds = Rounds::new(self);
        for run in self.runs() {
            run.announce();
            let figures = once(run.clone()).await?;
            rounds.record(&run, figures);
        }
        rounds.print();
        Ok(())
    }

    /// The runs in order: base, this, base, this, ... (or this alone).
    pub fn runs(&self) -> Vec<Run> {
        let total = self.rounds * if self.base.is_some() { 2 } else { 1 };
        let mut runs = Vec::with_capacity(total);
        for round in 1..=self.rounds {
            if let Some(base) = &self.base {
                runs.push(Run {
                    round,
                    index: runs.len() + 1,
                    total,
                    rounds: self.rounds,
                    side: base.clone(),
                    is_base: true,
                });
            }
            runs.push(Run {
                round,
                index: runs.len() + 1,
                total,
                rounds: self.rounds,
                side: self.this.clone(),
                is_base: false,
            });
        }
        runs
    }
}

/// One run of a benchmark, on one binary.
#[derive(Clone, Debug)]
pub struct Run {
    /// 1-based.
    pub round: usize,
    pub rounds: usize,
    /// 1-based position among all runs, and their number.
    pub index: usize,
    pub total: usize,
    pub side: Side,
    pub is_base: bool,
}

impl Run {
    pub fn binary(&self) -> &Path {
        &self.side.binary
    }

    /// Prints a heading before the run's own tables, when there is more
    /// than one run.
    pub fn announce(&self) {
        if self.total > 1 {
            println!();
            println!(
                "## Run {} of {}: round {} of {}, {} ({})",
                self.index,
                self.total,
                self.round,
                self.rounds,
                self.side.label,
                self.binary().display()
            );
        }
    }
}

/// Which way a figure is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
    /// A reference (e.g. raw etcd, which no binary changes).
    Neither,
}

/// One figure of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub name: String,
    /// `ops/s`, `ms`, `MiB`, `cores`, `×` ...
    pub unit: &'static str,
    pub value: f64,
    pub better: Better,
}

impl Figure {
    pub fn new(name: impl Into<String>, unit: &'static str, value: f64, better: Better) -> Self {
        Self {
            name: name.into(),
            unit,
            value,
            better,
        }
    }

    pub fn higher(name: impl Into<String>, unit: &'static str, value: f64) -> Self {
        Self::new(name, unit, value, Better::Higher)
    }

    pub fn lower(name: impl Into<String>, unit: &'static str, value: f64) -> Self {
        Self::new(name, unit, value, Better::Lower)
    }

    /// A latency in ms, lower is better.
    pub fn ms(name: impl Into<String>, d: Duration) -> Self {
        Self::lower(name, "ms", d.as_secs_f64() * 1e3)
    }
}

#[derive(Debug)]
struct Series {
    unit: &'static str,
    better: Better,
    base: Vec<f64>,
    this: Vec<f64>,
}

/// The figures of every run, by name in the order they first came.
#[derive(Debug)]
pub struct Rounds {
    plan: Plan,
    order: Vec<String>,
    series: HashMap<String, Series>,
}

/// How this side's figure compares with the base's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Better,
    Worse,
    /// The min–max ranges overlap (or the figure has no better side).
    WithinSpread,
}

impl Verdict {
    fn of(better: Better, base: &Spread, this: &Spread) -> Self {
        if better == Better::Neither || base.overlaps(this) {
            return Self::WithinSpread;
        }
        let higher = this.median > base.median;
        if higher == (better == Better::Higher) {
            Self::Better
        } else {
            Self::Worse
        }
    }

    fn text(self) -> &'static str {
        match self {
            Self::Better => "better",
            Self::Worse => "WORSE",
            Self::WithinSpread => "≈",
        }
    }
}

impl Rounds {
    pub fn new(plan: &Plan) -> Self {
        Self {
            plan: plan.clone(),
            order: Vec::new(),
            series: HashMap::new(),
        }
    }

    pub fn record(&mut self, run: &Run, figures: Vec<Figure>) {
        for f in figures {
            let series = self.series.entry(f.name.clone()).or_insert_with(|| {
                self.order.push(f.name.clone());
                Series {
                    unit: f.unit,
                    better: f.better,
                    base: Vec::new(),
                    this: Vec::new(),
                }
            });
            if run.is_base {
                series.base.push(f.value);
            } else {
                series.this.push(f.value);
            }
        }
    }

    /// (name, unit, base, this) of every figure.
    fn spreads(&self) -> Vec<(String, &Series, Option<Spread>, Option<Spread>)> {
        self.order
            .iter()
            .filter_map(|name| {
                let s = self.series.get(name)?;
                Some((name.clone(), s, Spread::of(&s.base), Spread::of(&s.this)))
            })
            .collect()
    }

    /// The comparison table (A/B), or the median and spread of this
    /// binary's rounds; nothing after a single run.
    pub fn print(&self) {
        let rounds = self.plan.rounds;
        let incomplete = |n: usize| {
            if n < rounds {
                format!(" [{n} of {rounds} rounds]")
            } else {
                String::new()
            }
        };
        match &self.plan.base {
            Some(base) => {
                println!();
                println!(
                    "## A/B: {} vs {}, {rounds} rounds interleaved (base first)",
                    base.label, self.plan.this.label
                );
                println!();
                println!(
                    "Median of the rounds; spread is min–max over the rounds; this/base is \
                     the ratio of the medians. Verdict: better or WORSE only when the two \
                     min–max ranges do not overlap, else ≈ (within the rounds' spread)."
                );
                println!();
                println!(
                    "| figure | unit | base median | base min–max | this median | this min–max | this/base | verdict |"
                );
                println!("|---|---|---:|---:|---:|---:|---:|---|");
                for (name, s, b, t) in self.spreads() {
                    let (Some(b), Some(t)) = (b, t) else {
                        println!(
                            "| {name} | {} | {} | | {} | | | only one side has it |",
                            s.unit,
                            b.map_or("—".into(), |b| fmt_num(b.median)),
                            t.map_or("—".into(), |t| fmt_num(t.median)),
                        );
                        continue;
                    };
                    let ratio = if b.median.abs() > f64::EPSILON {
                        format!("{:.2}", t.median / b.median)
                    } else {
                        "n/a".into()
                    };
                    println!(
                        "| {name}{} | {} | {} | {} | {} | {} | {ratio} | {} |",
                        incomplete(b.n.min(t.n)),
                        s.unit,
                        fmt_num(b.median),
                        fmt_range(&b),
                        fmt_num(t.median),
                        fmt_range(&t),
                        // One round has no spread to judge by.
                        if b.n < 2 || t.n < 2 {
                            "— (one round)"
                        } else {
                            Verdict::of(s.better, &b, &t).text()
                        },
                    );
                }
            }
            None if rounds > 1 => {
                println!();
                println!(
                    "## {} over {rounds} rounds (median; spread is min–max)",
                    self.plan.this.label
                );
                println!();
                println!("| figure | unit | median | min–max |");
                println!("|---|---|---:|---:|");
                for (name, s, _, t) in self.spreads() {
                    if let Some(t) = t {
                        println!(
                            "| {name}{} | {} | {} | {} |",
                            incomplete(t.n),
                            s.unit,
                            fmt_num(t.median),
                            fmt_range(&t)
                        );
                    }
                }
            }
            None => {}
        }
    }
}

/// Decimals for a figure of this size: 0 from 100, 1 from 10, else 2.
fn decimals(x: f64) -> usize {
    let a = x.abs();
    if a >= 100.0 {
        0
    } else if a >= 10.0 {
        1
    } else {
        2
    }
}

/// A figure with as many decimals as its size deserves, thousands
/// separated.
fn fmt_num(x: f64) -> String {
    fmt_fixed(x, decimals(x))
}

fn fmt_fixed(x: f64, decimals: usize) -> String {
    let s = format!("{x:.decimals$}");
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

/// `min–max`, both ends with the decimals of the larger one.
fn fmt_range(s: &Spread) -> String {
    let d = decimals(s.min.abs().max(s.max.abs()));
    format!("{}–{}", fmt_fixed(s.min, d), fmt_fixed(s.max, d))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn side(label: &str) -> Side {
        Side {
            label: label.into(),
            binary: PathBuf::from(format!("/bin/{label}")),
        }
    }

    #[test]
    fn ab_runs_alternate_base_first() {
        let plan = Plan::of(side("this"), Some(side("base")), 3);
        let runs = plan.runs();
        let order: Vec<(usize, bool)> = runs.iter().map(|r| (r.round, r.is_base)).collect();
        assert_eq!(
            order,
            [
                (1, true),
                (1, false),
                (2, true),
                (2, false),
                (3, true),
                (3, false)
            ]
        );
        assert!(runs.iter().all(|r| r.total == 6));
        assert_eq!(runs[3].index, 4);
        assert_eq!(runs[2].binary(), Path::new("/bin/base"));
    }

    #[test]
    fn without_base_this_runs_alone() {
        let runs = Plan::of(side("this"), None, 1).runs();
        assert_eq!(runs.len(), 1);
        assert!(!runs[0].is_base);
        assert_eq!(Plan::of(side("this"), None, 2).runs().len(), 2);
    }

    #[test]
    fn rounds_collect_each_side_by_name() {
        let plan = Plan::of(side("this"), Some(side("base")), 2);
        let mut rounds = Rounds::new(&plan);
        for (run, v) in plan.runs().iter().zip([1.0, 2.0, 3.0, 4.0]) {
            let mut figures = vec![Figure::higher("rate", "ops/s", v)];
            // A figure only some runs have (e.g. a capacity step).
            if run.round == 2 {
                figures.push(Figure::ms("late", Duration::from_millis(5)));
            }
            rounds.record(run, figures);
        }
        let spreads = rounds.spreads();
        assert_eq!(spreads.len(), 2);
        let (name, _, b, t) = &spreads[0];
        assert_eq!(name, "rate");
        assert_eq!(b.unwrap().median, 2.0);
        assert_eq!(t.unwrap().median, 3.0);
        assert_eq!(spreads[1].2.unwrap().n, 1);
        assert_eq!(spreads[1].3.unwrap().median, 5.0);
    }

    #[test]
    fn verdict_only_outside_the_spread() {
        let s = |v: &[f64]| Spread::of(v).unwrap();
        let (lo, hi, mid) = (s(&[1.0, 2.0]), s(&[3.0, 4.0]), s(&[1.5, 3.5]));
        assert_eq!(Verdict::of(Better::Higher, &lo, &hi), Verdict::Better);
        assert_eq!(Verdict::of(Better::Lower, &lo, &hi), Verdict::Worse);
        assert_eq!(Verdict::of(Better::Lower, &hi, &lo), Verdict::Better);
        assert_eq!(
            Verdict::of(Better::Higher, &lo, &mid),
            Verdict::WithinSpread
        );
        assert_eq!(
            Verdict::of(Better::Neither, &lo, &hi),
            Verdict::WithinSpread
        );
    }

    #[test]
    fn numbers_are_grouped_and_rounded_by_size() {
        assert_eq!(fmt_num(31_385.4), "31,385");
        assert_eq!(fmt_num(-1_234_567.0), "-1,234,567");
        assert_eq!(fmt_num(12.345), "12.3");
        assert_eq!(fmt_num(0.061), "0.06");
        assert_eq!(fmt_num(100.0), "100");
        assert_eq!(fmt_range(&Spread::of(&[9.5, 20.0]).unwrap()), "9.5–20.0");
    }
}
