//! Small helpers the benchmarks in `tests/benches/` share: knobs, nearest-
//! rank percentiles, and CPU and load readings from `/proc`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A numeric knob from the environment, or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether cargo runs this as a benchmark (`cargo bench` passes `--bench`;
/// `cargo test --benches` does not, and a test run must not take minutes).
pub fn run_as_benchmark() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Nearest-rank percentile `q` (0..=1) of sorted samples; zero if none.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Busy CPU ticks of the whole machine so far (`/proc/stat`, all but idle
/// and iowait).
pub fn machine_busy_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let all: u64 = fields.iter().take(8).sum();
    Some(all - fields.get(3)? - fields.get(4)?)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if unknown).
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The three load averages, as `/proc/loadavg` prints them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
