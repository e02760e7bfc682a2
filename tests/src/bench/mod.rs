//! The toolkit the benchmarks in `tests/benches/` share: knobs from the
//! environment, nearest-rank percentiles and the median and spread of
//! rounds, CPU and memory readings from `/proc`, building the release
//! binary being measured, and interleaved A/B rounds of two
//! `weir-control-plane` binaries. How to run them: `docs/benchmarks.md`.
//!
//! A benchmark's `main` is [`main`]; its `run_once` measures one binary,
//! prints its usual tables and returns its [`Figure`]s, and
//! [`Plan::measure`] calls it once, or for each run of an A/B comparison:
//!
//! ```text
//! fn main() -> Result<()> {
//!     bench::main("name", |plan| async move {
//!         plan.measure(|run| async move { run_once(run.binary()).await }).await
//!     })
//! }
//! ```

mod ab;
mod build;
pub mod peers;
mod proc;
mod stats;

use std::{
    future::Future,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, Context, Result};

pub use ab::{Better, Figure, Plan, Rounds, Run, Side};
pub use proc::{
    clock_ticks, cpu_ticks, loadavg, machine_busy_ticks, proc_stat, rss_mib, status_mib, CpuMeter,
    CpuSecs, ProcStat,
};
pub use stats::{percentile, Spread};

/// A numeric knob from the environment, or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A comma-separated list of counts from the environment, or `default`.
pub fn env_counts(name: &str, default: &str) -> Result<Vec<usize>> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{name}: comma-separated counts"))
}

/// Whether cargo runs this as a benchmark (`cargo bench` passes `--bench`;
/// `cargo test --benches` does not, and a test run must not take minutes).
pub fn run_as_benchmark() -> bool {
    std::env::args().any(|a| a == "--bench")
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A benchmark's `main`. Under `cargo test --benches` it only says how to
/// run the benchmark. Under `cargo bench` it builds what is measured
/// ([`Plan::prepare`]: this checkout's release binaries, and the base
/// revision's control plane with `WEIR_BENCH_BASE`), then runs `run` on a
/// multi-threaded runtime until it ends or Ctrl-C.
///
/// The processes a run starts are killed when their handles drop, which
/// happens on every way out of `run`: success, error, panic or Ctrl-C
/// (which drops the `run` future).
pub fn main<F, Fut>(name: &str, run: F) -> Result<()>
where
    F: FnOnce(Plan) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    if !run_as_benchmark() {
        println!("{name} benchmark: run it with `cargo bench -p weir-tests --bench {name}`");
        return Ok(());
    }
    let plan = Plan::prepare()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        tokio::select! {
            done = run(plan) => done,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    // Tasks still running (stand-in agents, watchers) die with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

/// Starts `binary` as a control-plane replica on `etcd` under `prefix`
/// (free ports, ready line awaited), as `ControlPlaneProcess::start` does
/// with this checkout's binary.
pub fn start_plane(
    binary: &std::path::Path,
    etcd: &crate::Etcd,
    prefix: &str,
) -> Result<crate::ControlPlaneProcess> {
    crate::ControlPlaneProcess::start_binary(
        binary,
        &[
            format!("--etcd-endpoints={}", etcd.endpoints().join(",")),
            format!("--etcd-prefix={prefix}"),
        ],
    )
}

/// A private etcd for a benchmark: fresh data dir, revision
/// auto-compaction (so a long run does not grow the store without bound).
pub async fn private_etcd() -> Result<crate::Etcd> {
    crate::Etcd::start_with(crate::EtcdOptions {
        extra_args: vec![
            "--auto-compaction-mode=revision".into(),
            "--auto-compaction-retention=10000".into(),
        ],
        private: true,
    })
    .await
}
