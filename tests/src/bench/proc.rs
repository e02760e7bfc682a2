//! CPU, memory and load readings from `/proc`.

/// The fields of `/proc/<pid>/stat` the benchmarks use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub comm: String,
    pub ppid: u32,
    /// CPU time in user mode, clock ticks.
    pub utime: u64,
    /// CPU time in the kernel, clock ticks.
    pub stime: u64,
}

impl ProcStat {
    /// `/proc/<pid>/stat` text. The comm is in parentheses and may hold
    /// spaces and parentheses itself, so the fields after it are counted
    /// from the last `)`.
    fn parse(text: &str) -> Option<Self> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let comm = text.get(open + 1..close)?.to_owned();
        let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
        // After the comm: state(3) ppid(4) ... utime(14) stime(15).
        Some(Self {
            comm,
            ppid: fields.get(1)?.parse().ok()?,
            utime: fields.get(11)?.parse().ok()?,
            stime: fields.get(12)?.parse().ok()?,
        })
    }
}

/// `/proc/<pid>/stat` of a process (`pid` a number or `"self"`).
pub fn proc_stat(pid: &str) -> Option<ProcStat> {
    ProcStat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU time of a process so far (utime + stime), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    proc_stat(&pid.to_string()).map(|s| s.utime + s.stime)
}

/// A `/proc/<pid>/status` figure given in kB (`VmRSS`, `VmHWM`), as MiB.
pub fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Resident memory of a process (`VmRSS`), MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_mib(pid, "VmRSS")
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

/// Reads the CPU time of the parties of a benchmark: the control-plane
/// processes under test, etcd, this process and the whole machine.
#[derive(Clone, Debug)]
pub struct CpuMeter {
    planes: Vec<u32>,
    etcd: Option<u32>,
    ticks_per_sec: f64,
}

/// CPU seconds used so far by each party, or (as a difference, see
/// [`CpuSecs::minus`]) over a span.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuSecs {
    /// The control planes, summed.
    pub plane: f64,
    /// Of `plane`, in the kernel (stime).
    pub plane_sys: f64,
    pub etcd: f64,
    /// This (benchmark) process: the load generator.
    pub bench: f64,
    /// Every process on the machine (busy time of all CPUs).
    pub machine: f64,
}

impl CpuMeter {
    /// `planes`: control-plane pids (`ControlPlaneProcess::pid`); `etcd`:
    /// the private etcd's pid (`Etcd::pid`).
    pub fn new(planes: Vec<u32>, etcd: Option<u32>) -> Self {
        Self {
            planes,
            etcd,
            ticks_per_sec: clock_ticks(),
        }
    }

    pub fn ticks_per_sec(&self) -> f64 {
        self.ticks_per_sec
    }

    pub fn read(&self) -> CpuSecs {
        let hz = self.ticks_per_sec;
        let stats: Vec<ProcStat> = self
            .planes
            .iter()
            .filter_map(|p| proc_stat(&p.to_string()))
            .collect();
        let secs = |s: Option<ProcStat>| s.map_or(0.0, |s| (s.utime + s.stime) as f64 / hz);
        CpuSecs {
            plane: stats.iter().map(|s| (s.utime + s.stime) as f64 / hz).sum(),
            plane_sys: stats.iter().map(|s| s.stime as f64 / hz).sum(),
            etcd: secs(self.etcd.and_then(|p| proc_stat(&p.to_string()))),
            bench: secs(proc_stat("self")),
            machine: machine_busy_ticks().map_or(0.0, |t| t as f64 / hz),
        }
    }
}

impl CpuSecs {
    pub fn minus(self, earlier: Self) -> Self {
        Self {
            plane: self.plane - earlier.plane,
            plane_sys: self.plane_sys - earlier.plane_sys,
            etcd: self.etcd - earlier.etcd,
            bench: self.bench - earlier.bench,
            machine: self.machine - earlier.machine,
        }
    }

    pub fn plus(self, other: Self) -> Self {
        Self {
            plane: self.plane + other.plane,
            plane_sys: self.plane_sys + other.plane_sys,
            etcd: self.etcd + other.etcd,
            bench: self.bench + other.bench,
            machine: self.machine + other.machine,
        }
    }

    /// Processes other than ours (e.g. compilers of a concurrent build).
    pub fn other(self) -> f64 {
        (self.machine - self.etcd - self.plane - self.bench).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let text = "4242 (weir (x) y) S 17 4242 4242 0 -1 4194560 900 0 0 0 \
                    123 45 0 0 20 0 9 0 1000 2000000 500 18446744073709551615";
        let s = ProcStat::parse(text).unwrap();
        assert_eq!(s.comm, "weir (x) y");
        assert_eq!((s.ppid, s.utime, s.stime), (17, 123, 45));
        assert_eq!(ProcStat::parse("1 (short) S 0"), None);
    }

    #[test]
    fn this_process_is_readable() {
        let me = proc_stat("self").unwrap();
        assert!(!me.comm.is_empty());
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(rss_mib(std::process::id()).unwrap() > 0.0);
        assert!(status_mib(std::process::id(), "VmHWM").unwrap() > 0.0);
        assert!(machine_busy_ticks().is_some());
    }

    #[test]
    fn spans_subtract_and_add() {
        let a = CpuSecs {
            plane: 1.0,
            plane_sys: 0.5,
            etcd: 2.0,
            bench: 0.5,
            machine: 5.0,
        };
        let b = CpuSecs {
            plane: 3.0,
            plane_sys: 1.0,
            etcd: 2.5,
            bench: 1.5,
            machine: 9.0,
        };
        let d = b.minus(a);
        assert_eq!((d.plane, d.etcd, d.bench, d.machine), (2.0, 0.5, 1.0, 4.0));
        assert_eq!(d.other(), 0.5);
        assert_eq!(d.plus(a), b);
    }
}
