//! What the agent does when an attempt fails: which outcome an attempt had
//! ([`Class`], from the error or the answer, gRPC statuses included), what
//! the policy allows ([`Failure`]: the `retry` and `timeout` sections, by
//! default and per rule), and how many retries a service may have
//! ([`Budget`]). Pure; the attempt loop in `ingress::attempts` drives them.

mod budget;

pub use budget::Budget;

use std::time::Duration;

use http::{HeaderMap, StatusCode};
use weir_core::{
    backoff::Backoff,
    policy::resolve::{Retry, RetryOn, Timeout},
};

/// How a failed attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// No connection: refused, unreachable, connect timeout. The request
    /// was never sent.
    ConnectFailure,
    /// Reset or closed after the request was (partly) sent, before the
    /// response head.
    Reset,
    /// A 5xx answer, or gRPC UNAVAILABLE.
    Http5xx,
    /// 429, or gRPC RESOURCE_EXHAUSTED.
    Http429,
    /// The per-try timeout passed, or gRPC DEADLINE_EXCEEDED.
    Timeout,
}

impl Class {
    pub const ALL: [Class; 5] = [
        Class::ConnectFailure,
        Class::Reset,
        Class::Http5xx,
        Class::Http429,
        Class::Timeout,
    ];

    /// The `retry_on` value that allows a retry after this outcome.
    pub fn retry_on(self) -> RetryOn {
        match self {
            Class::ConnectFailure => RetryOn::ConnectFailure,
            Class::Reset => RetryOn::Reset,
            Class::Http5xx => RetryOn::Http5xx,
            Class::Http429 => RetryOn::Http429,
            Class::Timeout => RetryOn::Timeout,
        }
    }

    /// Whether the instance never saw the request.
    pub fn never_sent(self) -> bool {
        self == Class::ConnectFailure
    }

    /// Whether the instance should leave this agent's rotation at once
    /// (it refuses or drops connections).
    pub fn ejects(self) -> bool {
        matches!(self, Class::ConnectFailure | Class::Reset)
    }

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::ConnectFailure => "connect_failure",
            Class::Reset => "reset",
            Class::Http5xx => "5xx",
            Class::Http429 => "429",
            Class::Timeout => "timeout",
        }
    }
}

/// What one service's failure handling is counted in.
#[derive(Debug, Clone)]
pub struct FailureMetrics {
    /// Retries made, by the outcome retried ([`Class::ALL`] order).
    retries: [metrics::Counter; 5],
    /// Retries the policy allowed and the budget refused.
    pub budget_exhausted: metrics::Counter,
    /// Requests answered 504 because their deadline passed.
    pub timeouts: metrics::Counter,
    /// Retries a retry section in shadow mode would have made.
    pub shadow_retries: metrics::Counter,
    /// Requests that ran past a timeout section in shadow mode.
    pub shadow_timeouts: metrics::Counter,
    pub ejection: crate::eject::EjectionMetrics,
}

impl FailureMetrics {
    /// The metrics of the service `labels` names (namespace, service).
    pub fn new(labels: &[(&'static str, String); 2]) -> Self {
        let [(ns_key, ns), (svc_key, svc)] = labels.clone();
        Self {
            retries: Class::ALL.map(|c| {
                metrics::counter!("weir_agent_retries_total", ns_key => ns.clone(), svc_key => svc.clone(), "on" => c.as_str())
            }),
            budget_exhausted: metrics::counter!("weir_agent_retry_budget_exhausted_total", labels),
            timeouts: metrics::counter!("weir_agent_timeouts_total", labels),
            shadow_retries: metrics::counter!("weir_agent_shadow_retries_total", labels),
            shadow_timeouts: metrics::counter!("weir_agent_shadow_timeouts_total", labels),
            ejection: crate::eject::EjectionMetrics::new(labels),
        }
    }

    /// Counts a retry after `class`.
    pub fn retried(&self, class: Class) {
        if let Some(i) = Class::ALL.iter().position(|c| *c == class) {
            self.retries[i].increment(1);
        }
    }
}

/// gRPC status codes the agent classes (`google.rpc.Code`).
const DEADLINE_EXCEEDED: u32 = 4;
const RESOURCE_EXHAUSTED: u32 = 8;
const UNAVAILABLE: u32 = 14;

/// The class of a gRPC status code: UNAVAILABLE is a 5xx, RESOURCE_EXHAUSTED
/// a 429, DEADLINE_EXCEEDED a timeout; any other status (OK, or an
/// application's answer such as INVALID_ARGUMENT) is not a failure to retry.
pub fn grpc_class(code: u32) -> Option<Class> {
    match code {
        UNAVAILABLE => Some(Class::Http5xx),
        RESOURCE_EXHAUSTED => Some(Class::Http429),
        DEADLINE_EXCEEDED => Some(Class::Timeout),
        _ => None,
    }
}

/// The class of an answer's head: 5xx and 429 by status; for a gRPC
/// answer (HTTP 200), the `grpc-status` of a trailers-only answer (a
/// status in the trailers comes after the head, when the answer already
/// streams to the caller). `None`: an answer to pass on.
pub fn answer_class(status: StatusCode, headers: &HeaderMap) -> Option<Class> {
    if status.is_server_error() {
        return Some(Class::Http5xx);
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Some(Class::Http429);
    }
    if status == StatusCode::OK {
        // Only gRPC answers carry it; plain HTTP answers never look further.
        let code = headers.get("grpc-status")?;
        return grpc_class(
            std::str::from_utf8(code.as_bytes())
                .ok()?
                .trim()
                .parse()
                .ok()?,
        );
    }
    None
}

/// The failure handling of one scope (a service's defaults, or a rule):
/// its resolved `retry` and `timeout` sections.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Failure {
    pub retry: Option<Retry>,
    pub timeout: Option<Timeout>,
}

impl Failure {
    /// Whether requests need nothing but one attempt: no retry and no
    /// deadline, applied or in shadow.
    #[inline]
    pub fn is_none(&self) -> bool {
        self.retry.is_none() && self.timeout.is_none()
    }

    /// Attempts allowed, the first included: 1 without a retry applied.
    pub fn attempts(&self) -> u32 {
        match &self.retry {
            Some(r) if !r.shadow => r.attempts.max(1),
            _ => 1,
        }
    }

    /// Whether the policy lets `class` be retried (applied or in shadow).
    pub fn retries(&self, class: Class) -> bool {
        self.retry
            .as_ref()
            .is_some_and(|r| r.retry_on.contains(&class.retry_on()))
    }

    /// Whether a retry is evaluated but not applied.
    pub fn retry_shadow(&self) -> bool {
        self.retry.as_ref().is_some_and(|r| r.shadow)
    }

    /// The deadline of a whole request, when applied.
    pub fn total(&self) -> Option<Duration> {
        self.timeout.filter(|t| !t.shadow).map(|t| t.total)
    }

    /// The deadline in shadow mode: only counted.
    pub fn shadow_total(&self) -> Option<Duration> {
        self.timeout.filter(|t| t.shadow).map(|t| t.total)
    }

    /// The bound on each attempt, when a retry applies one.
    pub fn per_try(&self) -> Option<Duration> {
        self.retry
            .as_ref()
            .filter(|r| !r.shadow)
            .and_then(|r| r.per_try_timeout)
    }

    /// The backoff between attempts (full jitter), when retries apply.
    pub fn backoff(&self) -> Option<Backoff> {
        self.retry
            .as_ref()
            .filter(|r| !r.shadow)
            .map(Retry::backoff)
    }

    /// The budget share, percent, of retries over requests.
    pub fn budget_percent(&self) -> Option<f64> {
        self.retry.as_ref().map(|r| r.budget_percent)
    }
}

/// A [`Failure`] as the admin API shows it.
#[derive(Debug, serde::Serialize)]
pub struct FailureState {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<TimeoutState>,
}

#[derive(Debug, serde::Serialize)]
pub struct RetryState {
    pub attempts: u32,
    pub retry_on: Vec<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_ms: Option<u64>,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub budget_percent: f64,
    pub shadow: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct TimeoutState {
    pub total_ms: u64,
    pub shadow: bool,
}

impl FailureState {
    /// `None` when `f` has neither a retry nor a timeout.
    pub fn of(f: &Failure) -> Option<Self> {
        if f.is_none() {
            return None;
        }
        let ms = |d: Duration| d.as_millis() as u64;
        Some(Self {
            retry: f.retry.as_ref().map(|r| RetryState {
                attempts: r.attempts,
                retry_on: r
                    .retry_on
                    .iter()
                    .map(|on| match on {
                        RetryOn::ConnectFailure => "CONNECT_FAILURE",
                        RetryOn::Http5xx => "HTTP_5XX",
                        RetryOn::Http429 => "HTTP_429",
                        RetryOn::Timeout => "TIMEOUT",
                        RetryOn::Reset => "RESET",
                    })
                    .collect(),
                per_try_timeout_ms: r.per_try_timeout.map(ms),
                backoff_base_ms: ms(r.backoff_base),
                backoff_max_ms: ms(r.backoff_max),
                budget_percent: r.budget_percent,
                shadow: r.shadow,
            }),
            timeout: f.timeout.map(|t| TimeoutState {
                total_ms: ms(t.total),
                shadow: t.shadow,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn grpc(code: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static(code));
        h
    }

    #[test]
    fn answers_are_classed_by_status_and_grpc_status() {
        let none = HeaderMap::new();
        assert_eq!(
            answer_class(StatusCode::SERVICE_UNAVAILABLE, &none),
            Some(Class::Http5xx)
        );
        assert_eq!(
            answer_class(StatusCode::INTERNAL_SERVER_ERROR, &none),
            Some(Class::Http5xx)
        );
        assert_eq!(
            answer_class(StatusCode::TOO_MANY_REQUESTS, &none),
            Some(Class::Http429)
        );
        for other in [StatusCode::OK, StatusCode::NOT_FOUND, StatusCode::CONFLICT] {
            assert_eq!(answer_class(other, &none), None, "{other}");
        }
        assert_eq!(
            answer_class(StatusCode::OK, &grpc("14")),
            Some(Class::Http5xx)
        );
        assert_eq!(
            answer_class(StatusCode::OK, &grpc("8")),
            Some(Class::Http429)
        );
        assert_eq!(
            answer_class(StatusCode::OK, &grpc("4")),
            Some(Class::Timeout)
        );
        for other in ["0", "3", "5", "13", "x", ""] {
            assert_eq!(answer_class(StatusCode::OK, &grpc(other)), None, "{other}");
        }
    }

    #[test]
    fn only_listed_outcomes_retry_and_shadow_never_does() {
        let retry = Retry {
            attempts: 3,
            per_try_timeout: Some(Duration::from_millis(50)),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            retry_on: vec![RetryOn::Http5xx, RetryOn::Reset],
            budget_percent: 20.0,
            shadow: false,
        };
        let f = Failure {
            retry: Some(retry.clone()),
            timeout: None,
        };
        assert!(f.retries(Class::Http5xx) && f.retries(Class::Reset));
        assert!(!f.retries(Class::Http429) && !f.retries(Class::ConnectFailure));
        assert_eq!(f.attempts(), 3);
        assert_eq!(f.per_try(), Some(Duration::from_millis(50)));
        let shadow = Failure {
            retry: Some(Retry {
                shadow: true,
                ..retry
            }),
            timeout: Some(Timeout {
                total: Duration::from_secs(1),
                shadow: true,
            }),
        };
        assert_eq!(shadow.attempts(), 1);
        assert!(shadow.retries(Class::Http5xx) && shadow.retry_shadow());
        assert_eq!(shadow.per_try(), None);
        assert!(shadow.backoff().is_none());
        assert_eq!(shadow.total(), None);
        assert_eq!(shadow.shadow_total(), Some(Duration::from_secs(1)));
        assert!(Failure::default().is_none());
        assert_eq!(Failure::default().attempts(), 1);
    }
}
