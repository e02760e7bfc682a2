//! Health-check specs: the proto's [`HealthCheck`] validated and resolved
//! into what the checker runs, with the documented defaults filled in.

use std::time::Duration;

use weir_proto::registry::v1::{health_check::Kind, HealthCheck, Instance};

use crate::validate::{err, ValidationError};

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

/// Validates an instance's health check (at registration) and fills its
/// defaults in place, so the stored record says what runs. `ephemeral` is
/// the instance's flag.
pub fn normalize(check: &mut HealthCheck, ephemeral: bool) -> Result<(), ValidationError> {
    const F: &str = "instance.health_check";
    let Some(kind) = &mut check.kind else {
        return Err(err(
            format!("{F}.kind"),
            "must be one of http, tcp, grpc or ttl (or leave health_check unset)",
        ));
    };
    match kind {
        Kind::Http(h) => {
            if h.path.is_empty() {
                h.path = "/".into();
            }
            if !h.path.starts_with('/')
                || h.path.len() > MAX_HTTP_PATH
                || !h.path.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(err(
                    format!("{F}.http.path"),
                    format!("must start with '/' and be at most {MAX_HTTP_PATH} printable ASCII characters without spaces"),
                ));
            }
            if h.expected_status_min == 0 && h.expected_status_max == 0 {
                h.expected_status_min = 200;
                h.expected_status_max = 399;
            }
            if !(100..=599).contains(&h.expected_status_min)
                || !(h.expected_status_min..=599).contains(&h.expected_status_max)
            {
                return Err(err(
                    format!("{F}.http.expected_status_min"),
                    format!(
                        "expected status range must be within 100-599 with min <= max (got {}-{})",
                        h.expected_status_min, h.expected_status_max
                    ),
                ));
            }
        }
        Kind::Tcp(_) => {}
        Kind::Grpc(g) => {
            if g.service.len() > 255 || !g.service.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(
                    format!("{F}.grpc.service"),
                    "must be at most 255 printable ASCII characters without spaces",
                ));
            }
        }
        Kind::Ttl(_) => {
            if !ephemeral {
                return Err(err(
                    format!("{F}.ttl"),
                    "a TTL check needs an ephemeral instance (the heartbeat is the check)",
                ));
            }
        }
    }
    if check.interval_ms == 0 {
        check.interval_ms = DEFAULT_INTERVAL_MS;
    }
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&check.interval_ms) {
        return Err(err(
            format!("{F}.interval_ms"),
            format!("must be {MIN_INTERVAL_MS}-{MAX_INTERVAL_MS} (0 = default {DEFAULT_INTERVAL_MS}) (got {})", check.interval_ms),
        ));
    }
    if check.timeout_ms == 0 {
        check.timeout_ms = DEFAULT_TIMEOUT_MS.min(check.interval_ms);
    }
    if !(MIN_TIMEOUT_MS..=check.interval_ms).contains(&check.timeout_ms) {
        return Err(err(
            format!("{F}.timeout_ms"),
            format!(
                "must be {MIN_TIMEOUT_MS}-interval_ms ({}) (got {})",
                check.interval_ms, check.timeout_ms
            ),
        ));
    }
    for (name, value, default) in [
        (
            "failures_before_critical",
            &mut check.failures_before_critical,
            DEFAULT_FAILURES_BEFORE_CRITICAL,
        ),
        (
            "successes_before_passing",
            &mut check.successes_before_passing,
            DEFAULT_SUCCESSES_BEFORE_PASSING,
        ),
    ] {
        if *value == 0 {
            *value = default;
        }
        if *value > MAX_THRESHOLD {
            return Err(err(
                format!("{F}.{name}"),
                format!("must be 1-{MAX_THRESHOLD} (0 = default {default}) (got {value})"),
            ));
        }
    }
    if check.deregister_critical_after_seconds != 0 {
        if ephemeral {
            return Err(err(
                format!("{F}.deregister_critical_after_seconds"),
                "only for persistent instances (an ephemeral one leaves when its lease expires)",
            ));
        }
        if !(MIN_DEREGISTER_AFTER_S..=MAX_DEREGISTER_AFTER_S)
            .contains(&check.deregister_critical_after_seconds)
        {
            return Err(err(
                format!("{F}.deregister_critical_after_seconds"),
                format!(
                    "must be {MIN_DEREGISTER_AFTER_S}-{MAX_DEREGISTER_AFTER_S} (0 = never) (got {})",
                    check.deregister_critical_after_seconds
                ),
            ));
        }
    }
    if check.port > 65_535 {
        return Err(err(
            format!("{F}.port"),
            format!(
                "must be 1-65535 (0 = the instance's port) (got {})",
                check.port
            ),
        ));
    }
    Ok(())
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
    use weir_proto::registry::v1::{GrpcCheck, HttpCheck, TtlCheck};

    use super::*;

    fn http(path: &str) -> HealthCheck {
        HealthCheck {
            kind: Some(Kind::Http(HttpCheck {
                path: path.into(),
                ..HttpCheck::default()
            })),
            ..HealthCheck::default()
        }
    }

    #[test]
    fn defaults_are_filled_and_resolved() {
        let mut c = http("");
        normalize(&mut c, false).expect("valid");
        assert_eq!((c.interval_ms, c.timeout_ms), (1000, 1000));
        assert_eq!(
            (c.failures_before_critical, c.successes_before_passing),
            (2, 2)
        );
        let i = Instance {
            host: "10.0.0.1".into(),
            port: 8080,
            health_check: Some(c),
            ..Instance::default()
        };
        let spec = resolve(&i).expect("active check");
        assert_eq!(
            spec.probe,
            Probe::Http {
                path: "/".into(),
                expected: (200, 399)
            }
        );
        assert_eq!(spec.port, 8080);
        assert_eq!(spec.interval, Duration::from_secs(1));
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: Vec<(HealthCheck, bool, &str)> = vec![
            (HealthCheck::default(), false, "health_check.kind"),
            (http("healthz"), false, "http.path"),
            (
                HealthCheck {
                    kind: Some(Kind::Http(HttpCheck {
                        path: "/".into(),
                        expected_status_min: 500,
                        expected_status_max: 200,
                    })),
                    ..HealthCheck::default()
                },
                false,
                "expected_status_min",
            ),
            (
                HealthCheck {
                    kind: Some(Kind::Ttl(TtlCheck {})),
                    ..HealthCheck::default()
                },
                false,
                "health_check.ttl",
            ),
            (
                HealthCheck {
                    interval_ms: 50,
                    ..http("/")
                },
                false,
                "interval_ms",
            ),
            (
                HealthCheck {
                    interval_ms: 1000,
                    timeout_ms: 2000,
                    ..http("/")
                },
                false,
                "timeout_ms",
            ),
            (
                HealthCheck {
                    failures_before_critical: 21,
                    ..http("/")
                },
                false,
                "failures_before_critical",
            ),
            (
                HealthCheck {
                    successes_before_passing: 99,
                    ..http("/")
                },
                false,
                "successes_before_passing",
            ),
            (
                HealthCheck {
                    deregister_critical_after_seconds: 30,
                    ..http("/")
                },
                true,
                "deregister_critical_after_seconds",
            ),
            (
                HealthCheck {
                    deregister_critical_after_seconds: 5,
                    ..http("/")
                },
                false,
                "deregister_critical_after_seconds",
            ),
            (
                HealthCheck {
                    port: 70_000,
                    ..http("/")
                },
                false,
                "health_check.port",
            ),
            (
                HealthCheck {
                    kind: Some(Kind::Grpc(GrpcCheck {
                        service: "a b".into(),
                    })),
                    ..HealthCheck::default()
                },
                false,
                "grpc.service",
            ),
        ];
        for (mut check, ephemeral, field) in cases {
            let e = normalize(&mut check, ephemeral).expect_err(field);
            assert!(e.to_string().contains(field), "{e} should name {field}");
        }
    }

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
