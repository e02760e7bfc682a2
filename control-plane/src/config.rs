//! Configuration: defaults, then a TOML file, then environment variables,
//! then command-line flags (each later source wins).

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use serde::Deserialize;

/// Command-line flags; each also reads a `WEIR_*` environment variable.
#[derive(Debug, Default, Parser)]
#[command(
    name = "weir-control-plane",
    version,
    about = "Weir control plane: service registry over etcd"
)]
pub struct Args {
    /// TOML config file (keys as the long flags, with '_' for '-').
    #[arg(long, env = "WEIR_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, env = "WEIR_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// host:port at which the other replicas reach this one's gRPC API
    /// (they forward AskAgent calls here). Default: the bound gRPC
    /// address; set it when listening on 0.0.0.0 or behind NAT.
    #[arg(long, env = "WEIR_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// HTTP listen address for /healthz and /readyz.
    #[arg(long, env = "WEIR_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// etcd client URLs, comma separated.
    #[arg(long, env = "WEIR_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// Root prefix of every key Weir writes in etcd.
    #[arg(long, env = "WEIR_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// Dev mode: single node on the embedded in-process store (no etcd; data
    /// is lost on exit).
    #[arg(long, env = "WEIR_DEV")]
    pub dev: bool,
    /// Log format: text or json.
    #[arg(long, env = "WEIR_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// This replica's id among the replicas sharing health checks (default:
    /// random). DNS-label characters.
    #[arg(long, env = "WEIR_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Seconds within which the other replicas take over a dead replica's
    /// health checks (3-60, default 3). The membership lease is granted one
    /// second less, to leave etcd time to notice its expiry.
    #[arg(long, env = "WEIR_REPLICA_TTL_SECONDS")]
    pub replica_ttl_seconds: Option<u32>,
    /// Protection threshold, percent, of services that set none (0-100,
    /// default 50; 0 disables).
    #[arg(long, env = "WEIR_PROTECTION_THRESHOLD_PERCENT")]
    pub protection_threshold_percent: Option<u32>,
    /// How long a disconnected agent stays listed (its last-seen record is
    /// kept), 60-31536000 seconds (default 86400, one day).
    #[arg(long, env = "WEIR_AGENT_RETENTION_SECONDS")]
    pub agent_retention_seconds: Option<u64>,
    /// How many agents must report an instance out of their rotation
    /// (ejected, or its circuit breaker open) for the registry to mark it
    /// WARNING, 1-100 (default 2; fewer when fewer agents are connected).
    #[arg(long, env = "WEIR_OUTLIER_QUORUM")]
    pub outlier_quorum: Option<u32>,
    /// Export the spans agents report to an OTLP/gRPC collector, e.g.
    /// http://127.0.0.1:4317.
    #[arg(long, env = "WEIR_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Export the spans agents report to a Zipkin v2 endpoint, e.g.
    /// http://127.0.0.1:9411/api/v2/spans.
    #[arg(long, env = "WEIR_ZIPKIN_ENDPOINT")]
    pub zipkin_endpoint: Option<String>,
    /// Recent traces kept in memory at most (default 20000; 100-10000000).
    #[arg(long, env = "WEIR_TRACE_MAX_TRACES")]
    pub trace_max_traces: Option<usize>,
    /// Bytes of recent traces kept in memory at most (default 128 MiB;
    /// at least 1 MiB).
    #[arg(long, env = "WEIR_TRACE_MAX_BYTES")]
    pub trace_max_bytes: Option<usize>,
    /// A trace with a span at least this slow is kept longer, as one with
    /// an error (milliseconds, default 1000).
    #[arg(long, env = "WEIR_TRACE_SLOW_MS")]
    pub trace_slow_ms: Option<u64>,
}

pub use weir_core::logging::LogFormat;

/// The TOML file: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub grpc_addr: Option<SocketAddr>,
    pub advertise_addr: Option<String>,
    pub http_addr: Option<SocketAddr>,
    pub etcd_endpoints: Option<Vec<String>>,
    pub etcd_prefix: Option<String>,
    pub dev: Option<bool>,
    pub log_format: Option<LogFormat>,
    pub replica_id: Option<String>,
    pub replica_ttl_seconds: Option<u32>,
    pub protection_threshold_percent: Option<u32>,
    pub agent_retention_seconds: Option<u64>,
    pub outlier_quorum: Option<u32>,
    pub otlp_endpoint: Option<String>,
    pub zipkin_endpoint: Option<String>,
    pub trace_max_traces: Option<usize>,
    pub trace_max_bytes: Option<usize>,
    pub trace_slow_ms: Option<u64>,
}

/// Where the registry is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    Etcd { endpoints: Vec<String> },
    Embedded,
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub grpc_addr: SocketAddr,
    /// host:port the other replicas use for this one; None = the bound
    /// gRPC address.
    pub advertise_addr: Option<String>,
    pub http_addr: SocketAddr,
    pub store: StoreConfig,
    pub etcd_prefix: String,
    pub log_format: LogFormat,
    pub replica_id: String,
    pub replica_ttl_seconds: u32,
    pub protection_threshold_percent: u32,
    /// How long a disconnected agent's last-seen record is kept.
    pub agent_retention: Duration,
    /// Agents that must report an instance for it to be marked WARNING.
    pub outlier_quorum: u32,
    /// Where spans are exported (none by default).
    pub export: crate::telemetry::export::ExportConfig,
    /// Bounds of the recent-trace store.
    pub traces: crate::telemetry::traces::Limits,
}

/// Shortest and longest agent retention accepted, seconds.
pub const AGENT_RETENTION_SECONDS: std::ops::RangeInclusive<u64> = 60..=31_536_000;

/// A fresh random replica id.
pub fn random_replica_id() -> String {
    format!("cp-{:08x}", rand::random::<u32>())
}

pub use weir_core::config::ConfigError;

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 7070)),
            advertise_addr: None,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 7071)),
            store: StoreConfig::Etcd {
                endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            },
            etcd_prefix: "/weir".to_owned(),
            log_format: LogFormat::Text,
            replica_id: random_replica_id(),
            replica_ttl_seconds: 3,
            protection_threshold_percent: crate::hub::DEFAULT_PROTECTION_THRESHOLD_PERCENT,
            agent_retention: crate::agents::DEFAULT_RETENTION,
            outlier_quorum: crate::outliers::DEFAULT_QUORUM,
            export: crate::telemetry::export::ExportConfig::default(),
            traces: crate::telemetry::traces::Limits::default(),
        }
    }
}

impl Config {
    /// Resolves flags (which already folded in the environment) over the
    /// config file over the defaults.
    pub fn resolve(args: Args) -> Result<Self, ConfigError> {
        let file: FileConfig = weir_core::config::read_file(args.config.as_deref())?;
        Self::merge(args, file)
    }

    fn merge(args: Args, file: FileConfig) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let dev = args.dev || file.dev.unwrap_or(false);
        let endpoints = args.etcd_endpoints.or(file.etcd_endpoints);
        let store = match (dev, endpoints) {
            (true, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "--dev runs on the embedded store; do not also give --etcd-endpoints".into(),
                ))
            }
            (true, None) => StoreConfig::Embedded,
            (false, Some(endpoints)) => {
                let endpoints: Vec<String> = endpoints
                    .into_iter()
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect();
                if endpoints.is_empty() {
                    return Err(ConfigError::Invalid("etcd_endpoints is empty".into()));
                }
                StoreConfig::Etcd { endpoints }
            }
            (false, None) => defaults.store,
        };
        let etcd_prefix = args
            .etcd_prefix
            .or(file.etcd_prefix)
            .unwrap_or(defaults.etcd_prefix);
        if !etcd_prefix.starts_with('/') || etcd_prefix.contains("//") || etcd_prefix.len() > 128 {
            return Err(ConfigError::Invalid(format!(
                "etcd_prefix must start with '/', contain no empty segment and be at most 128 characters (got {etcd_prefix:?})"
            )));
        }
        let replica_id = args
            .replica_id
            .or(file.replica_id)
            .unwrap_or(defaults.replica_id);
        if weir_core::validate::dns_label("replica_id", &replica_id).is_err() {
            return Err(ConfigError::Invalid(format!(
                "replica_id must be a DNS label: 1-63 characters of a-z, 0-9 and '-' (got {replica_id:?})"
            )));
        }
        let replica_ttl_seconds = args
            .replica_ttl_seconds
            .or(file.replica_ttl_seconds)
            .unwrap_or(defaults.replica_ttl_seconds);
        if !(3..=60).contains(&replica_ttl_seconds) {
            return Err(ConfigError::Invalid(format!(
                "replica_ttl_seconds must be 3-60 (got {replica_ttl_seconds})"
            )));
        }
        let protection_threshold_percent = args
            .protection_threshold_percent
            .or(file.protection_threshold_percent)
            .unwrap_or(defaults.protection_threshold_percent);
        if protection_threshold_percent > 100 {
            return Err(ConfigError::Invalid(format!(
                "protection_threshold_percent must be 0-100 (got {protection_threshold_percent})"
            )));
        }
        let advertise_addr = args.advertise_addr.or(file.advertise_addr);
        if let Some(addr) = &advertise_addr {
            check_advertise_addr(addr)?;
        }
        let agent_retention_seconds = args
            .agent_retention_seconds
            .or(file.agent_retention_seconds)
            .unwrap_or(defaults.agent_retention.as_secs());
        if !AGENT_RETENTION_SECONDS.contains(&agent_retention_seconds) {
            return Err(ConfigError::Invalid(format!(
                "agent_retention_seconds must be {}-{} (got {agent_retention_seconds})",
                AGENT_RETENTION_SECONDS.start(),
                AGENT_RETENTION_SECONDS.end()
            )));
        }
        let outlier_quorum = args
            .outlier_quorum
            .or(file.outlier_quorum)
            .unwrap_or(defaults.outlier_quorum);
        if !(1..=100).contains(&outlier_quorum) {
            return Err(ConfigError::Invalid(format!(
                "outlier_quorum must be 1-100 (got {outlier_quorum})"
            )));
        }
        let mut traces = defaults.traces;
        if let Some(n) = args.trace_max_traces.or(file.trace_max_traces) {
            if !(100..=10_000_000).contains(&n) {
                return Err(ConfigError::Invalid(format!(
                    "trace_max_traces must be 100-10000000 (got {n})"
                )));
            }
            traces.max_traces = n;
        }
        if let Some(n) = args.trace_max_bytes.or(file.trace_max_bytes) {
            if n < 1 << 20 {
                return Err(ConfigError::Invalid(format!(
                    "trace_max_bytes must be at least 1048576 (got {n})"
                )));
            }
            traces.max_bytes = n;
        }
        if let Some(ms) = args.trace_slow_ms.or(file.trace_slow_ms) {
            if ms == 0 || ms > 3_600_000 {
                return Err(ConfigError::Invalid(format!(
                    "trace_slow_ms must be 1-3600000 (got {ms})"
                )));
            }
            traces.slow_nanos = ms * 1_000_000;
        }
        let endpoint = |name: &str, e: Option<String>| -> Result<Option<String>, ConfigError> {
            match e.map(|e| e.trim().to_owned()).filter(|e| !e.is_empty()) {
                Some(e) if !e.starts_with("http://") => Err(ConfigError::Invalid(format!(
                    "{name} must be an http:// URL (got {e:?})"
                ))),
                other => Ok(other),
            }
        };
        let export = crate::telemetry::export::ExportConfig {
            otlp_endpoint: endpoint("otlp_endpoint", args.otlp_endpoint.or(file.otlp_endpoint))?,
            zipkin_endpoint: endpoint(
                "zipkin_endpoint",
                args.zipkin_endpoint.or(file.zipkin_endpoint),
            )?,
            ..defaults.export
        };
        Ok(Self {
            export,
            traces,
            outlier_quorum,
            replica_id,
            replica_ttl_seconds,
            protection_threshold_percent,
            advertise_addr,
            agent_retention: Duration::from_secs(agent_retention_seconds),
            grpc_addr: args
                .grpc_addr
                .or(file.grpc_addr)
                .unwrap_or(defaults.grpc_addr),
            http_addr: args
                .http_addr
                .or(file.http_addr)
                .unwrap_or(defaults.http_addr),
            store,
            etcd_prefix,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}

/// An advertised address must be `host:port` (no scheme, no path), with a
/// port: the other replicas dial `http://{addr}`.
fn check_advertise_addr(addr: &str) -> Result<(), ConfigError> {
    let bad = || {
        ConfigError::Invalid(format!(
            "advertise_addr must be host:port, e.g. 10.0.0.7:7070 or cp-1.weir:7070 (got {addr:?})"
        ))
    };
    let authority: axum::http::uri::Authority = addr.parse().map_err(|_| bad())?;
    if authority.port_u16().is_none()
        || authority.as_str().contains('@')
        || authority.host().is_empty()
    {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_over_defaults() {
        let file: FileConfig = toml::from_str(
            "grpc_addr = \"127.0.0.1:9000\"\nhttp_addr = \"127.0.0.1:9001\"\netcd_endpoints = [\"http://e1:2379\"]\n",
        )
        .expect("toml");
        let args = Args {
            grpc_addr: Some("127.0.0.1:9100".parse().expect("addr")),
            ..Args::default()
        };
        let c = Config::merge(args, file).expect("valid");
        assert_eq!(c.grpc_addr.port(), 9100);
        assert_eq!(c.http_addr.port(), 9001);
        assert_eq!(
            c.store,
            StoreConfig::Etcd {
                endpoints: vec!["http://e1:2379".into()]
            }
        );
        assert_eq!(c.etcd_prefix, "/weir");
    }

    #[test]
    fn rejects_contradictions_and_bad_prefix() {
        let args = Args {
            dev: true,
            etcd_endpoints: Some(vec!["http://x:1".into()]),
            ..Args::default()
        };
        assert!(Config::merge(args, FileConfig::default()).is_err());
        let args = Args {
            etcd_prefix: Some("weir".into()),
            ..Args::default()
        };
        assert!(Config::merge(args, FileConfig::default()).is_err());
        assert!(toml::from_str::<FileConfig>("unknown = 1").is_err());
    }

    #[test]
    fn advertise_addr_and_agent_retention_are_checked() {
        let file: FileConfig =
            toml::from_str("advertise_addr = \"cp-1.weir:7070\"\nagent_retention_seconds = 3600\n")
                .expect("toml");
        let c = Config::merge(Args::default(), file).expect("valid");
        assert_eq!(c.advertise_addr.as_deref(), Some("cp-1.weir:7070"));
        assert_eq!(c.agent_retention, Duration::from_secs(3600));
        let c = Config::merge(Args::default(), FileConfig::default()).expect("defaults");
        assert_eq!(
            (c.advertise_addr, c.agent_retention.as_secs()),
            (None, 86400)
        );
        for bad in [
            "cp-1",
            "http://cp-1:7070",
            "cp-1:7070/x",
            "u@cp-1:7070",
            ":7070",
        ] {
            let args = Args {
                advertise_addr: Some(bad.into()),
                ..Args::default()
            };
            let e = Config::merge(args, FileConfig::default()).expect_err(bad);
            assert!(e.to_string().contains("advertise_addr"), "{bad}: {e}");
        }
        let args = Args {
            agent_retention_seconds: Some(59),
            ..Args::default()
        };
        let e = Config::merge(args, FileConfig::default()).expect_err("too short");
        assert!(e.to_string().contains("agent_retention_seconds"), "{e}");
    }
}
