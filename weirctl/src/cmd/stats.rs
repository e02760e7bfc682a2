//! `weirctl stats [SERVICE]`: traffic over the last minute (or 15) per
//! service, as what it received, and per edge (who called it, through
//! which topic), with outcomes, error ratio and latency percentiles. The
//! percentiles are the control plane's, computed once from sketches merged
//! across replicas, never averages of averages.
//!
//! A replica that did not answer leaves its agents' traffic out; that is
//! said on stderr, so the tables stay parseable and nobody takes a partial
//! answer for the whole.

use anyhow::Result;
use weir_client::{
    telemetry::{Edge, EdgeStats, GetStatsRequest, GetStatsResponse, ServiceStats, Traffic},
    Client,
};

use super::Window;
use crate::{
    duration::{latency_ms, window_name},
    output::{percent, rate, service_label, table, topic_label, Format},
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this service and the edges it is on: namespace/name, or a name
    /// in any namespace.
    service: Option<String>,
    /// The window the figures cover.
    #[arg(long, value_enum, default_value_t = Window::OneMinute)]
    window: Window,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let stats = client
        .get_stats(GetStatsRequest {
            window_seconds: args.window.seconds(),
            service: args.service.unwrap_or_default(),
            raw: false,
        })
        .await?;
    if let Some(line) = missing_line(&stats.missing_replicas) {
        eprintln!("{line}");
    }
    match format {
        Format::Json => println!("{}", weir_core::telemetry_json::stats(&stats)),
        Format::Table => print!("{}", stats_text(stats)),
    }
    Ok(())
}

fn missing_line(missing: &[String]) -> Option<String> {
    (!missing.is_empty()).then(|| format!("replicas not answering: {}", missing.join(", ")))
}

/// `default/web → default/orders`, a publish `default/web → topic t`, a
/// delivery `default/web → default/billing via topic t`.
fn edge_label(e: Option<&Edge>) -> String {
    let Some(e) = e else {
        return "unknown".into();
    };
    let from = service_label(e.source.as_ref());
    let target = e.target.as_ref().filter(|t| !t.name.is_empty());
    match (target, topic_label(e.topic.as_ref())) {
        (Some(t), Some(topic)) => format!("{from} → {} via {topic}", service_label(Some(t))),
        (Some(t), None) => format!("{from} → {}", service_label(Some(t))),
        (None, Some(topic)) => format!("{from} → {topic}"),
        (None, None) => format!("{from} → unknown"),
    }
}

const NUMBERS_HEADER: [&str; 10] = [
    "RATE/s", "OK", "4XX", "5XX", "LIMITED", "REJECTED", "ERR%", "P50", "P90", "P99",
];

/// The figures after the name, as `NUMBERS_HEADER` names them.
fn numbers(t: Option<&Traffic>) -> Vec<String> {
    let t = t.cloned().unwrap_or_default();
    let o = t.outcomes.unwrap_or_default();
    vec![
        rate(t.rate_per_second),
        o.ok.to_string(),
        o.client_error.to_string(),
        o.server_error.to_string(),
        o.limited.to_string(),
        o.rejected.to_string(),
        percent(t.error_ratio),
        latency_ms(t.p50_seconds),
        latency_ms(t.p90_seconds),
        latency_ms(t.p99_seconds),
    ]
}

fn service_row(s: &ServiceStats) -> Vec<String> {
    let mut row = vec![service_label(s.service.as_ref())];
    row.extend(numbers(s.traffic.as_ref()));
    row
}

fn edge_row(e: &EdgeStats) -> Vec<String> {
    let mut row = vec![edge_label(e.edge.as_ref())];
    row.extend(numbers(e.traffic.as_ref()));
    row
}

fn header(first: &'static str) -> Vec<&'static str> {
    let mut h = vec![first];
    h.extend(NUMBERS_HEADER);
    h
}

/// Services by name, then edges by their label, each a table; an empty
/// window says so instead of printing bare headers.
fn stats_text(stats: GetStatsResponse) -> String {
    let window = window_name(stats.window_seconds);
    let mut services: Vec<Vec<String>> = stats.services.iter().map(service_row).collect();
    services.sort();
    let mut edges: Vec<Vec<String>> = stats.edges.iter().map(edge_row).collect();
    edges.sort();
    if services.is_empty() && edges.is_empty() {
        return format!("no traffic in the last {window}\n");
    }
    let mut out = String::new();
    if !services.is_empty() {
        out.push_str(&table(&header("SERVICE"), &services));
    }
    if !edges.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&table(&header("EDGE"), &edges));
    }
    let limits: Vec<Vec<String>> = stats
        .limits
        .iter()
        .filter(|l| l.rejected + l.queued + l.shadow_rejected > 0)
        .map(|l| {
            vec![
                service_label(l.service.as_ref()),
                l.rule.clone(),
                l.admitted.to_string(),
                l.queued.to_string(),
                l.rejected.to_string(),
                l.shadow_rejected.to_string(),
                rate(l.rejected_per_second),
            ]
        })
        .collect();
    if !limits.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &[
                "LIMIT BITING",
                "RULE",
                "ADMITTED",
                "QUEUED",
                "REJECTED",
                "SHADOW",
                "REJ/s",
            ],
            &limits,
        ));
    }
    let breakers: Vec<Vec<String>> = stats
        .breakers
        .iter()
        .filter_map(|n| {
            let b = n.breaker.as_ref()?;
            Some(vec![
                format!("{}/{}", b.namespace, b.service),
                b.instance_id.clone(),
                n.node_id.clone(),
                b.state.clone(),
                b.why.clone(),
            ])
        })
        .collect();
    if !breakers.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &["BREAKER OPEN", "INSTANCE", "NODE", "STATE", "WHY"],
            &breakers,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use weir_client::telemetry::{Outcomes, ServiceRef, TopicRef};

    use super::*;

    fn service(namespace: &str, name: &str) -> Option<ServiceRef> {
        Some(ServiceRef {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    fn traffic(ok: u64, server_error: u64, p99: f64) -> Option<Traffic> {
        Some(Traffic {
            outcomes: Some(Outcomes {
                ok,
                client_error: 1,
                server_error,
                limited: 2,
                rejected: 0,
            }),
            rate_per_second: (ok + server_error + 3) as f64 / 60.0,
            error_ratio: server_error as f64 / (ok + server_error + 3) as f64,
            p50_seconds: 0.001_234,
            p90_seconds: 0.0101,
            p99_seconds: p99,
            ..Traffic::default()
        })
    }

    #[test]
    fn services_then_edges_with_outcomes_and_latencies_in_ms() {
        let stats = GetStatsResponse {
            window_seconds: 60,
            services: vec![
                ServiceStats {
                    service: service("default", "orders"),
                    traffic: traffic(100, 7, 0.250),
                },
                ServiceStats {
                    service: service("default", "billing"),
                    traffic: traffic(57, 0, 0.0),
                },
            ],
            edges: vec![
                EdgeStats {
                    edge: Some(Edge {
                        source: service("default", "web"),
                        target: service("default", "orders"),
                        topic: None,
                    }),
                    traffic: traffic(100, 7, 0.250),
                },
                EdgeStats {
                    edge: Some(Edge {
                        source: service("default", "orders"),
                        target: service("default", "billing"),
                        topic: Some(TopicRef {
                            namespace: "default".into(),
                            name: "orders-created".into(),
                        }),
                    }),
                    traffic: traffic(57, 0, 0.0),
                },
            ],
            replicas: vec!["cp-1".into()],
            missing_replicas: vec!["cp-2".into(), "cp-3".into()],
            ..GetStatsResponse::default()
        };
        let text = stats_text(stats.clone());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with(
                "SERVICE          RATE/s  OK   4XX  5XX  LIMITED  REJECTED  ERR%  P50     P90     P99"
            ), "{text}");
        assert!(lines[1].starts_with("default/billing"), "{text}");
        assert!(lines[2].starts_with("default/orders"), "{text}");
        let orders: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            orders,
            [
                "default/orders",
                "1.83",
                "100",
                "1",
                "7",
                "2",
                "0",
                "6.4%",
                "1.23ms",
                "10.1ms",
                "250ms"
            ]
        );
        assert!(lines[1].ends_with("-"), "no p99 without requests: {text}");
        assert_eq!(lines[3], "");
        assert!(lines[4].starts_with("EDGE"), "{text}");
        assert!(
            lines[5]
                .starts_with("default/orders → default/billing via topic default/orders-created"),
            "{text}"
        );
        assert!(
            lines[6].starts_with("default/web → default/orders "),
            "{text}"
        );
        assert_eq!(
            missing_line(&stats.missing_replicas).as_deref(),
            Some("replicas not answering: cp-2, cp-3")
        );
        assert_eq!(missing_line(&[]), None);

        let j = weir_core::telemetry_json::stats(&stats);
        assert_eq!(j["services"][0]["service"]["name"], "orders");
        assert_eq!(j["services"][0]["traffic"]["outcomes"]["server_error"], 7);
        assert_eq!(j["edges"][1]["topic"]["name"], "orders-created");
        assert_eq!(j["edges"][0]["topic"], serde_json::Value::Null);
        assert_eq!(j["missing_replicas"][1], "cp-3");
    }

    #[test]
    fn edges_name_publishes_deliveries_and_unknown_callers() {
        let topic = Some(TopicRef {
            namespace: "default".into(),
            name: "t".into(),
        });
        let publish = Edge {
            source: service("default", "web"),
            target: None,
            topic: topic.clone(),
        };
        assert_eq!(edge_label(Some(&publish)), "default/web → topic default/t");
        let unknown = Edge {
            source: service("default", ""),
            target: service("", "orders"),
            topic: None,
        };
        assert_eq!(edge_label(Some(&unknown)), "unknown → orders");
        assert_eq!(edge_label(None), "unknown");
    }

    #[test]
    fn an_empty_window_says_so() {
        let empty = GetStatsResponse {
            window_seconds: 900,
            ..GetStatsResponse::default()
        };
        assert_eq!(stats_text(empty), "no traffic in the last 15m\n");
    }
}
