//! Health-check specs: a stored instance's [`HealthCheck`] resolved into
//! what the checker runs, with the documented defaults filled in. The
//! checks on input (and the filling of defaults into the stored record) are
//! [`crate::validate::health_check`]'s; the limits are here, shared by both.
//!
//! [`HealthCheck`]: weir_proto::registry::v1::HealthCheck

use std::time::Duration;

use weir_proto::registry::v1::{health_check::Kind, Instance};

pub const DEFAULT_INTERVAL_MS: u32 = 1_000;
pub const MIN_INTERVAL_MS: u32 = 100;
pub const MAX_INTERVAL_MS: u32 = 3_600_000;
pub const DEFAULT_TIMEOUT_MS: u32 = 1_000;
pub const MIN_TIMEOUT_MS: u32 = 10;
pub const DEFAULT_FAILURES_BEFORE_CRITICAL: u32 = 2;
pub const DEFAULT_SUCCESSES_BEFORE_PASSING: u32 = 2;
pub const MAX_THRESHOLD: u32 = 20;
pub const MIN_DEREGISTER_AFTER_S: u32 = 10;
pub const MAX_DEREGISTER_AFTER_S: u32 = 604_800;
pub const MAX_HTTP_PATH: usize = 1024;

/// What one check does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Http { path: String, expected: (u16, u16) },
    Tcp,
    Grpc { service: String },
}

/// A check the checker can run: where, what, how often, and the
/// hysteresis thresholds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub host: String,
    pub port: u16,
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub failures_before_critical: u32,
    pub successes_before_passing: u32,
    pub deregister_critical_after: Option<Duration>,
}

/// The check to run for a (normalized, stored) instance, or None when it has
/// no active check (none, or TTL).
pub fn resolve(i: &Instance) -> Option<CheckSpec> {
    let check = i.health_check.as_ref()?;
    let probe = match check.kind.as_ref()? {
        Kind::Http(h) => Probe::Http {
            path: if h.path.is_empty() {
                "/".into()
            } else {
                h.path.clone()
            },
            expected: (
                u16::try_from(h.expected_status_min).unwrap_or(200).max(100),
                u16::try_from(h.expected_status_max).unwrap_or(399).max(100),
            ),
        },
        Kind::Tcp(_) => Probe::Tcp,
        Kind::Grpc(g) => Probe::Grpc {
            service: g.service.clone(),
        },
        Kind::Ttl(_) => return None,
    };
    let port = if check.port != 0 { check.port } else { i.port };
    let interval = check.interval_ms.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS);
    Some(CheckSpec {
        host: i.host.clone(),
        port: u16::try_from(port).ok()?,
        probe,
        interval: Duration::from_millis(u64::from(interval)),
        timeout: Duration::from_millis(u64::from(check.timeout_ms.clamp(MIN_TIMEOUT_MS, interval))),
        failures_before_critical: check.failures_before_critical.clamp(1, MAX_THRESHOLD),
        successes_before_passing: check.successes_before_passing.clamp(1, MAX_THRESHOLD),
        deregister_critical_after: (check.deregister_critical_after_seconds != 0)
            .then(|| Duration::from_secs(u64::from(check.deregister_critical_after_seconds))),
    })
}

#[cfg(test)]
mod tests {
    use weir_proto::registry::v1::{HealthCheck, TtlCheck};

    use super::*;

    #[test]
    fn ttl_checks_run_nothing() {
        let i = Instance {
            ephemeral: true,
            health_check: Some(HealthCheck {
                kind: Some(Kind::Ttl(TtlCheck {})),
                ..HealthCheck::default()
            }),
            ..Instance::default()
        };
        assert_eq!(resolve(&i), None);
    }
}
