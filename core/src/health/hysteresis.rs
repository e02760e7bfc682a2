//! Turning a stream of check results into a status that does not bounce.
//!
//! Rules (documented on `HealthCheck` in the proto), with f =
//! `failures_before_critical` and s = `successes_before_passing`:
//! - CRITICAL once f of the last f + s - 1 results failed. An instance that
//!   cannot pass s checks in a row between failures is held out.
//! - Up from CRITICAL (or WARNING) only after s non-failing results in a row;
//!   the new status is WARNING if any of them was a warning, else PASSING.
//! - PASSING to WARNING once f of the last f + s - 1 results were warnings
//!   or worse (and fewer than f failed).
//! - A new instance (UNKNOWN) takes the status of its first non-failing
//!   result at once, or goes CRITICAL by the failure rule.

use std::collections::VecDeque;

use weir_proto::registry::v1::HealthStatus;

/// One check's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

/// The hysteresis state of one instance.
#[derive(Clone, Debug)]
pub struct Tracker {
    status: HealthStatus,
    failures_before_critical: usize,
    successes_before_passing: usize,
    recent: VecDeque<Outcome>,
}

impl Tracker {
    /// Starts at `status` (the stored one, so a replica that takes over an
    /// instance goes on from where the last one left it).
    pub fn new(
        status: HealthStatus,
        failures_before_critical: u32,
        successes_before_passing: u32,
    ) -> Self {
        let f = usize::try_from(failures_before_critical.max(1)).unwrap_or(1);
        let s = usize::try_from(successes_before_passing.max(1)).unwrap_or(1);
        Self {
            status,
            failures_before_critical: f,
            successes_before_passing: s,
            recent: VecDeque::with_capacity(f + s),
        }
    }

    pub fn status(&self) -> HealthStatus {
        self.status
    }

    fn window(&self) -> usize {
        self.failures_before_critical + self.successes_before_passing - 1
    }

    /// Consecutive results at the end of the window that satisfy `p`.
    fn streak(&self, p: impl Fn(Outcome) -> bool) -> usize {
        self.recent.iter().rev().take_while(|o| p(**o)).count()
    }

    /// Records a result; returns the new status when it changed, with the
    /// number of consecutive results that led to it.
    pub fn record(&mut self, outcome: Outcome) -> Option<(HealthStatus, u32)> {
        self.recent.push_back(outcome);
        while self.recent.len() > self.window() {
            self.recent.pop_front();
        }
        let f = self.failures_before_critical;
        let s = self.successes_before_passing;
        let failures = self.recent.iter().filter(|o| **o == Outcome::Fail).count();
        let non_pass = self.recent.iter().filter(|o| **o != Outcome::Pass).count();
        let clean = self.streak(|o| o != Outcome::Fail);
        let next = match self.status {
            _ if failures >= f => HealthStatus::Critical,
            HealthStatus::Unknown if outcome != Outcome::Fail => up(outcome),
            HealthStatus::Critical | HealthStatus::Unknown if clean >= s => self.up_from_streak(s),
            HealthStatus::Warning if self.streak(|o| o == Outcome::Pass) >= s => {
                HealthStatus::Passing
            }
            HealthStatus::Passing if non_pass >= f => HealthStatus::Warning,
            current => current,
        };
        if next == self.status {
            return None;
        }
        self.status = next;
        let run = match next {
            HealthStatus::Critical => failures,
            HealthStatus::Warning => non_pass.max(1),
            _ => clean.max(1),
        };
        Some((next, u32::try_from(run).unwrap_or(u32::MAX)))
    }

    fn up_from_streak(&self, s: usize) -> HealthStatus {
        if self
            .recent
            .iter()
            .rev()
            .take(s)
            .any(|o| *o == Outcome::Warn)
        {
            HealthStatus::Warning
        } else {
            HealthStatus::Passing
        }
    }
}

fn up(o: Outcome) -> HealthStatus {
    match o {
        Outcome::Pass => HealthStatus::Passing,
        Outcome::Warn => HealthStatus::Warning,
        Outcome::Fail => HealthStatus::Critical,
    }
}

#[cfg(test)]
mod tests {
    use super::{HealthStatus::*, Outcome::*, *};

    fn run(start: HealthStatus, f: u32, s: u32, results: &[Outcome]) -> Vec<HealthStatus> {
        let mut t = Tracker::new(start, f, s);
        results
            .iter()
            .map(|o| {
                t.record(*o);
                t.status()
            })
            .collect()
    }

    #[test]
    fn goes_down_after_f_failures_and_up_after_s_passes() {
        assert_eq!(
            run(Passing, 2, 2, &[Fail, Fail, Pass, Pass, Pass]),
            [Passing, Critical, Critical, Passing, Passing]
        );
        assert_eq!(
            run(Passing, 3, 1, &[Fail, Fail, Fail, Pass]),
            [Passing, Passing, Critical, Passing]
        );
    }

    #[test]
    fn a_single_blip_does_not_move_it() {
        assert_eq!(
            run(Passing, 2, 2, &[Pass, Fail, Pass, Pass, Fail, Pass, Pass]),
            [Passing; 7]
        );
    }

    #[test]
    fn a_flapping_instance_is_held_out_after_one_transition() {
        let mut t = Tracker::new(Passing, 2, 2);
        let mut transitions = 0;
        for k in 0..100 {
            if t.record(if k % 2 == 0 { Fail } else { Pass }).is_some() {
                transitions += 1;
            }
        }
        assert_eq!(transitions, 1);
        assert_eq!(t.status(), Critical);
    }

    #[test]
    fn new_instances_start_fast_but_fail_by_the_rule() {
        assert_eq!(run(Unknown, 2, 2, &[Pass]), [Passing]);
        assert_eq!(run(Unknown, 2, 2, &[Fail, Fail]), [Unknown, Critical]);
        assert_eq!(run(Unknown, 2, 2, &[Warn]), [Warning]);
    }

    #[test]
    fn warnings_have_their_own_hysteresis() {
        assert_eq!(
            run(Passing, 2, 2, &[Warn, Warn, Pass, Pass]),
            [Passing, Warning, Warning, Passing]
        );
        assert_eq!(run(Critical, 2, 2, &[Warn, Pass]), [Critical, Warning]);
    }

    #[test]
    fn transitions_report_their_run() {
        let mut t = Tracker::new(Passing, 3, 2);
        assert_eq!(t.record(Fail), None);
        assert_eq!(t.record(Fail), None);
        assert_eq!(t.record(Fail), Some((Critical, 3)));
        assert_eq!(t.record(Pass), None);
        assert_eq!(t.record(Pass), Some((Passing, 2)));
    }
}
