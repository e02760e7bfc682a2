//! Configuration: defaults, then a TOML file, then environment variables,
//! then command-line flags (each later source wins), as the control plane.

use std::{net::SocketAddr, path::PathBuf};

use clap::Parser;
use serde::Deserialize;
use weir_core::logging::LogFormat;

/// Command-line flags; each also reads a `WEIR_AGENT_*` environment variable.
#[derive(Debug, Default, Parser)]
#[command(
    name = "weir-agent",
    version,
    about = "Weir agent: carries a node's event traffic to the instances the registry names"
)]
pub struct Args {
    /// TOML config file (keys as the long flags, with '_' for '-').
    #[arg(long, env = "WEIR_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's stable id (default: the host name).
    #[arg(long, env = "WEIR_AGENT_NODE_ID")]
    pub node_id: Option<String>,
    /// The node's failure domain.
    #[arg(long, env = "WEIR_AGENT_ZONE")]
    pub zone: Option<String>,
    /// Control-plane gRPC endpoints, comma separated.
    #[arg(long, env = "WEIR_AGENT_CONTROL_PLANE", value_delimiter = ',')]
    pub control_plane: Option<Vec<String>>,
    /// Namespace of services addressed without one.
    #[arg(long, env = "WEIR_AGENT_NAMESPACE")]
    pub namespace: Option<String>,
    /// Event ingress (HTTP/1.1 and h2c). Loopback by default: an agent open
    /// to the network is an open relay.
    #[arg(long, env = "WEIR_AGENT_INGRESS_ADDR")]
    pub ingress_addr: Option<SocketAddr>,
    /// Admin API: state, /healthz, /readyz, /metrics.
    #[arg(long, env = "WEIR_AGENT_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Local registration (`weir.registry.v1.Registry` for this node's
    /// services). Loopback by default.
    #[arg(long, env = "WEIR_AGENT_REGISTRY_ADDR")]
    pub registry_addr: Option<SocketAddr>,
    /// Largest event body the agent reads whole (structured and batch
    /// CloudEvents), in bytes.
    #[arg(long, env = "WEIR_AGENT_MAX_EVENT_BYTES")]
    pub max_event_bytes: Option<usize>,
    /// After the session comes back from a disconnection, how long an
    /// instance the control plane no longer lists keeps being routed while
    /// its agent registers it again (seconds, 0-600, default 30).
    #[arg(long, env = "WEIR_AGENT_STALE_GRACE_SECONDS")]
    pub stale_grace_seconds: Option<u64>,
    /// Ingress worker threads, each with its own runtime, listening socket
    /// and upstream pools (default: the number of CPUs; 1-64).
    #[arg(long, env = "WEIR_AGENT_WORKERS")]
    pub workers: Option<usize>,
    /// Directory where the agent keeps its registry view and policies
    /// (`view.pb`), so that it can route on them when it starts while no
    /// control plane answers. Created if missing. Unset: nothing is kept.
    #[arg(long, env = "WEIR_AGENT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The most the outbox (`{data_dir}/outbox/`) may hold, in bytes
    /// (default 1 GiB): past it, durable publishes are answered 503.
    #[arg(long, env = "WEIR_AGENT_OUTBOX_MAX_BYTES")]
    pub outbox_max_bytes: Option<u64>,
    /// Make every publish durable (fsync'd before it is answered), not
    /// only those to a topic a subscriber's policy asks it for.
    #[arg(long, env = "WEIR_AGENT_DURABLE_BY_DEFAULT")]
    pub durable_by_default: Option<bool>,
    /// What a publish to a topic no service subscribes to gets: `drop`
    /// (202, counted in weir_agent_outbox_unsubscribed_total; the default)
    /// or `reject` (404 no-subscriber).
    #[arg(long, env = "WEIR_AGENT_UNSUBSCRIBED")]
    pub unsubscribed: Option<Unsubscribed>,
    /// Refuse to start when the outbox cannot be opened (a damaged file,
    /// say) instead of running with publishing answering 503.
    #[arg(long, env = "WEIR_AGENT_OUTBOX_REQUIRED")]
    pub outbox_required: Option<bool>,
    /// Telemetry (spans, edge counts, trace context sent on to
    /// instances, reports to the control plane): on (default) or off.
    #[arg(long, env = "WEIR_AGENT_TELEMETRY")]
    pub telemetry: Option<bool>,
    /// Share of the traces this agent starts that it keeps, 0-1
    /// (default 0.01), unless the target's policy sets `tracing`.
    /// Failed and slow requests are kept whatever the rate.
    #[arg(long, env = "WEIR_AGENT_TRACE_SAMPLE_RATE")]
    pub trace_sample_rate: Option<f64>,
    /// Requests at least this slow are kept whatever the rate
    /// (milliseconds, 1-3600000, default 1000).
    #[arg(long, env = "WEIR_AGENT_TRACE_SLOW_MS")]
    pub trace_slow_ms: Option<u64>,
    /// Spans kept per second at most (default 1000; 1-1000000); the rest
    /// are dropped and counted in weir_agent_spans_dropped_total.
    #[arg(long, env = "WEIR_AGENT_SPANS_PER_SECOND")]
    pub spans_per_second: Option<u32>,
    /// Telemetry batches (encoded bytes) kept while no control plane
    /// takes them (default 16 MiB; 1 MiB-1 GiB); past it the oldest are
    /// dropped and counted.
    #[arg(long, env = "WEIR_AGENT_TELEMETRY_BUFFER_BYTES")]
    pub telemetry_buffer_bytes: Option<usize>,
    /// Log format: text or json.
    #[arg(long, env = "WEIR_AGENT_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

/// The TOML file: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<String>,
    pub zone: Option<String>,
    pub control_plane: Option<Vec<String>>,
    pub namespace: Option<String>,
    pub ingress_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub registry_addr: Option<SocketAddr>,
    pub max_event_bytes: Option<usize>,
    pub stale_grace_seconds: Option<u64>,
    pub workers: Option<usize>,
    pub data_dir: Option<PathBuf>,
    pub outbox_max_bytes: Option<u64>,
    pub durable_by_default: Option<bool>,
    pub unsubscribed: Option<Unsubscribed>,
    pub outbox_required: Option<bool>,
    pub telemetry: Option<bool>,
    pub trace_sample_rate: Option<f64>,
    pub trace_slow_ms: Option<u64>,
    pub spans_per_second: Option<u32>,
    pub telemetry_buffer_bytes: Option<usize>,
    pub log_format: Option<LogFormat>,
}

/// What a publish to a topic nobody subscribes to gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Unsubscribed {
    /// Accepted (202) and dropped, counted.
    #[default]
    Drop,
    /// 404 `no-subscriber`.
    Reject,
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: String,
    pub zone: String,
    pub control_plane: Vec<String>,
    pub namespace: String,
    pub ingress_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub registry_addr: SocketAddr,
    pub max_event_bytes: usize,
    pub stale_grace: std::time::Duration,
    pub workers: usize,
    /// Where the view and policies are persisted (none: not persisted).
    pub data_dir: Option<PathBuf>,
    pub outbox_max_bytes: u64,
    pub durable_by_default: bool,
    pub unsubscribed: Unsubscribed,
    pub outbox_required: bool,
    /// Spans and edge counts (node id and namespace filled at start).
    pub telemetry: crate::telemetry::Settings,
    pub log_format: LogFormat,
}

pub use weir_core::config::ConfigError;

/// Largest `max_event_bytes` accepted: events are read whole into memory.
const MAX_EVENT_BYTES_CAP: usize = 64 * 1024 * 1024;

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: host_name(),
            zone: String::new(),
            control_plane: vec![weir_client::DEFAULT_ENDPOINT.to_owned()],
            namespace: "default".to_owned(),
            ingress_addr: SocketAddr::from(([127, 0, 0, 1], 7080)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 7081)),
            registry_addr: SocketAddr::from(([127, 0, 0, 1], 7082)),
            max_event_bytes: 1024 * 1024,
            stale_grace: std::time::Duration::from_secs(30),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get().min(64)),
            data_dir: None,
            outbox_max_bytes: 1 << 30,
            durable_by_default: false,
            unsubscribed: Unsubscribed::Drop,
            outbox_required: false,
            telemetry: crate::telemetry::Settings::default(),
            log_format: LogFormat::Text,
        }
    }
}

/// The host name, as a node id (`node` when it cannot be read).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| weir_core::validate::instance_id("node_id", h).is_ok())
        .unwrap_or_else(|| "node".to_owned())
}

impl Config {
    /// Resolves flags (which already folded in the environment) over the
    /// config file over the defaults.
    pub fn resolve(args: Args) -> Result<Self, ConfigError> {
        let file: FileConfig = weir_core::config::read_file(args.config.as_deref())?;
        Self::merge(args, file)
    }

    fn merge(args: Args, file: FileConfig) -> Result<Self, ConfigError> {
        let d = Self::default();
        let invalid = |e: weir_core::validate::ValidationError| ConfigError::Invalid(e.to_string());
        let node_id = args.node_id.or(file.node_id).unwrap_or(d.node_id);
        weir_core::validate::instance_id("node_id", &node_id).map_err(invalid)?;
        let zone = args.zone.or(file.zone).unwrap_or(d.zone);
        weir_core::validate::short_text("zone", &zone).map_err(invalid)?;
        let control_plane: Vec<String> = args
            .control_plane
            .or(file.control_plane)
            .unwrap_or(d.control_plane)
            .into_iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if control_plane.is_empty() {
            return Err(ConfigError::Invalid("control_plane is empty".into()));
        }
        let namespace = args.namespace.or(file.namespace).unwrap_or(d.namespace);
        weir_core::validate::dns_label("namespace", &namespace).map_err(invalid)?;
        let max_event_bytes = args
            .max_event_bytes
            .or(file.max_event_bytes)
            .unwrap_or(d.max_event_bytes);
        if !(1024..=MAX_EVENT_BYTES_CAP).contains(&max_event_bytes) {
            return Err(ConfigError::Invalid(format!(
                "max_event_bytes must be 1024-{MAX_EVENT_BYTES_CAP} (got {max_event_bytes})"
            )));
        }
        let stale_grace = match args.stale_grace_seconds.or(file.stale_grace_seconds) {
            Some(s) if s > 600 => {
                return Err(ConfigError::Invalid(format!(
                    "stale_grace_seconds must be 0-600 (got {s})"
                )))
            }
            Some(s) => std::time::Duration::from_secs(s),
            None => d.stale_grace,
        };
        let outbox_max_bytes = args
            .outbox_max_bytes
            .or(file.outbox_max_bytes)
            .unwrap_or(d.outbox_max_bytes);
        if outbox_max_bytes < 1 << 20 {
            return Err(ConfigError::Invalid(format!(
                "outbox_max_bytes must be at least 1048576 (got {outbox_max_bytes})"
            )));
        }
        let workers = args.workers.or(file.workers).unwrap_or(d.workers);
        if !(1..=64).contains(&workers) {
            return Err(ConfigError::Invalid(format!(
                "workers must be 1-64 (got {workers})"
            )));
        }
        let mut telemetry = d.telemetry.clone();
        telemetry.enabled = args
            .telemetry
            .or(file.telemetry)
            .unwrap_or(telemetry.enabled);
        if let Some(rate) = args.trace_sample_rate.or(file.trace_sample_rate) {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError::Invalid(format!(
                    "trace_sample_rate must be 0-1 (got {rate})"
                )));
            }
            telemetry.sample_rate = rate;
        }
        if let Some(ms) = args.trace_slow_ms.or(file.trace_slow_ms) {
            if !(1..=3_600_000).contains(&ms) {
                return Err(ConfigError::Invalid(format!(
                    "trace_slow_ms must be 1-3600000 (got {ms})"
                )));
            }
            telemetry.slow = std::time::Duration::from_millis(ms);
        }
        if let Some(n) = args.spans_per_second.or(file.spans_per_second) {
            if !(1..=1_000_000).contains(&n) {
                return Err(ConfigError::Invalid(format!(
                    "spans_per_second must be 1-1000000 (got {n})"
                )));
            }
            telemetry.spans_per_second = n;
        }
        if let Some(n) = args.telemetry_buffer_bytes.or(file.telemetry_buffer_bytes) {
            if !(1 << 20..=1 << 30).contains(&n) {
                return Err(ConfigError::Invalid(format!(
                    "telemetry_buffer_bytes must be 1048576-1073741824 (got {n})"
                )));
            }
            telemetry.buffer_bytes = n;
        }
        telemetry.node_id = node_id.clone();
        telemetry.namespace = namespace.clone();
        Ok(Self {
            telemetry,
            node_id,
            stale_grace,
            workers,
            zone,
            control_plane,
            namespace,
            ingress_addr: args
                .ingress_addr
                .or(file.ingress_addr)
                .unwrap_or(d.ingress_addr),
            admin_addr: args.admin_addr.or(file.admin_addr).unwrap_or(d.admin_addr),
            registry_addr: args
                .registry_addr
                .or(file.registry_addr)
                .unwrap_or(d.registry_addr),
            max_event_bytes,
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .filter(|d| !d.as_os_str().is_empty()),
            outbox_max_bytes,
            durable_by_default: args
                .durable_by_default
                .or(file.durable_by_default)
                .unwrap_or(d.durable_by_default),
            unsubscribed: args
                .unsubscribed
                .or(file.unsubscribed)
                .unwrap_or(d.unsubscribed),
            outbox_required: args
                .outbox_required
                .or(file.outbox_required)
                .unwrap_or(d.outbox_required),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let file: FileConfig = toml::from_str(
            "node_id = \"n1\"\nzone = \"z1\"\ningress_addr = \"127.0.0.1:9000\"\ncontrol_plane = [\"http://a:1\", \"http://b:2\"]\n",
        )
        .expect("toml");
        let args = Args {
            zone: Some("z2".into()),
            ..Args::default()
        };
        let c = Config::merge(args, file).expect("valid");
        assert_eq!(c.node_id, "n1");
        assert_eq!(c.zone, "z2");
        assert_eq!(c.ingress_addr.port(), 9000);
        assert_eq!(c.admin_addr.port(), 7081);
        assert_eq!(c.control_plane, ["http://a:1", "http://b:2"]);
        assert_eq!(c.namespace, "default");
        assert_eq!(c.data_dir, None, "nothing is persisted unless asked");
        let file: FileConfig = toml::from_str("data_dir = \"/var/lib/weir\"").expect("toml");
        let c = Config::merge(Args::default(), file).expect("valid");
        assert_eq!(c.data_dir, Some(PathBuf::from("/var/lib/weir")));
    }

    #[test]
    fn bad_values_are_named() {
        let bad = |args: Args| match Config::merge(args, FileConfig::default()) {
            Err(ConfigError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert!(bad(Args {
            node_id: Some("a b".into()),
            ..Args::default()
        })
        .contains("node_id"));
        assert!(bad(Args {
            namespace: Some("Not_A_Label".into()),
            ..Args::default()
        })
        .contains("namespace"));
        assert!(bad(Args {
            max_event_bytes: Some(10),
            ..Args::default()
        })
        .contains("max_event_bytes"));
        assert!(bad(Args {
            control_plane: Some(vec![" ".into()]),
            ..Args::default()
        })
        .contains("control_plane"));
        assert!(bad(Args {
            trace_sample_rate: Some(1.5),
            ..Args::default()
        })
        .contains("trace_sample_rate"));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        assert!(toml::from_str::<FileConfig>("ingres_addr = \"127.0.0.1:1\"").is_err());
    }
}
