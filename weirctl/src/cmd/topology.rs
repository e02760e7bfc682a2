//! `weirctl topology`: who talks to whom over the last minute (or 15):
//! every edge between services and topics with its rate, error ratio and
//! p99 latency, as the control plane merges it from every replica.

use anyhow::Result;
use weir_client::{
    telemetry::{GetTopologyRequest, GetTopologyResponse, TopologyEdge, TopologyNode},
    Client,
};

use super::Window;
use crate::{
    duration::{latency_ms, window_name},
    output::{percent, rate, table, Format},
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The window the rates and latencies cover.
    #[arg(long, value_enum, default_value_t = Window::OneMinute)]
    window: Window,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let window_seconds = args.window.seconds();
    let topology = client
        .get_topology(GetTopologyRequest { window_seconds })
        .await?;
    match format {
        Format::Json => println!("{}", weir_core::telemetry_json::topology(&topology)),
        Format::Table => print!("{}", topology_text(topology, window_seconds)),
    }
    Ok(())
}

/// A node id for people: `service:ns/name` is `ns/name`, `topic:ns/t` is
/// `topic ns/t`; an id of a kind this build does not know stays as it is.
fn short(id: &str) -> String {
    if let Some(service) = id.strip_prefix("service:") {
        service.to_owned()
    } else if let Some(topic) = id.strip_prefix("topic:") {
        format!("topic {topic}")
    } else {
        id.to_owned()
    }
}

/// Edges by `from`, then `to`, on the ids: services group before topics,
/// and the order does not depend on the answer's.
fn sorted_edges(mut edges: Vec<TopologyEdge>) -> Vec<TopologyEdge> {
    edges.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
    edges
}

const EDGE_HEADER: [&str; 5] = ["FROM", "TO", "RATE/s", "ERRORS", "P99"];

fn edge_row(e: &TopologyEdge) -> Vec<String> {
    vec![
        short(&e.from),
        short(&e.to),
        rate(e.rate_per_second),
        percent(e.error_ratio),
        latency_ms(e.p99_seconds),
    ]
}

/// `5 nodes (3 services, 2 topics), 4 edges over the last 1m`.
fn count_line(nodes: &[TopologyNode], edges: usize, window_seconds: u32) -> String {
    let services = nodes.iter().filter(|n| n.kind == "service").count();
    let topics = nodes.iter().filter(|n| n.kind == "topic").count();
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut kinds = vec![
        plural(services, "service", "services"),
        plural(topics, "topic", "topics"),
    ];
    let other = nodes.len() - services - topics;
    if other > 0 {
        kinds.push(format!("{other} other"));
    }
    format!(
        "{} ({}), {} over the last {}",
        plural(nodes.len(), "node", "nodes"),
        kinds.join(", "),
        plural(edges, "edge", "edges"),
        window_name(window_seconds)
    )
}

fn topology_text(topology: GetTopologyResponse, window_seconds: u32) -> String {
    let edges = sorted_edges(topology.edges);
    let mut out = String::new();
    if !edges.is_empty() {
        let rows: Vec<Vec<String>> = edges.iter().map(edge_row).collect();
        out.push_str(&table(&EDGE_HEADER, &rows));
        out.push('\n');
    }
    out.push_str(&count_line(&topology.nodes, edges.len(), window_seconds));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> TopologyNode {
        let (kind, rest) = id.split_once(':').unwrap_or(("", id));
        let (namespace, name) = rest.split_once('/').unwrap_or(("", rest));
        TopologyNode {
            id: id.into(),
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn edge(from: &str, to: &str, rate: f64) -> TopologyEdge {
        TopologyEdge {
            from: from.into(),
            to: to.into(),
            rate_per_second: rate,
            error_ratio: 0.025,
            p99_seconds: 0.0421,
        }
    }

    #[test]
    fn edges_sort_by_from_then_to_and_ids_read_short() {
        let topology = GetTopologyResponse {
            nodes: vec![
                node("service:default/web"),
                node("service:default/orders"),
                node("service:shop/billing"),
                node("topic:default/orders-created"),
            ],
            edges: vec![
                edge("topic:default/orders-created", "service:shop/billing", 1.0),
                edge("service:default/web", "service:default/orders", 12.5),
                edge(
                    "service:default/orders",
                    "topic:default/orders-created",
                    0.02,
                ),
                edge("service:default/web", "service:default/cart", 3.0),
            ],
        };
        let text = topology_text(topology.clone(), 60);
        let line = |cells: [&str; 5]| {
            format!(
                "{:<28}  {:<28}  {:<6}  {:<6}  {}",
                cells[0], cells[1], cells[2], cells[3], cells[4]
            )
        };
        let expected: Vec<String> = vec![
            line(["FROM", "TO", "RATE/s", "ERRORS", "P99"]),
            line([
                "default/orders",
                "topic default/orders-created",
                "0.02",
                "2.5%",
                "42.1ms",
            ]),
            line(["default/web", "default/cart", "3.00", "2.5%", "42.1ms"]),
            line(["default/web", "default/orders", "12.50", "2.5%", "42.1ms"]),
            line([
                "topic default/orders-created",
                "shop/billing",
                "1.00",
                "2.5%",
                "42.1ms",
            ]),
            String::new(),
            "4 nodes (3 services, 1 topic), 4 edges over the last 1m".into(),
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), expected);
        let j = weir_core::telemetry_json::topology(&topology);
        assert_eq!(j["edges"][0]["from"], "service:default/orders");
        assert_eq!(j["nodes"][3]["kind"], "topic");
        assert_eq!(short("agent:x"), "agent:x");
    }

    #[test]
    fn an_empty_topology_says_so() {
        assert_eq!(
            topology_text(GetTopologyResponse::default(), 900),
            "0 nodes (0 services, 0 topics), 0 edges over the last 15m\n"
        );
    }
}
