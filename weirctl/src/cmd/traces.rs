//! `weirctl traces`: recent traces, newest first, filtered by service,
//! outcome, duration and age; `weirctl traces show TRACE_ID`: one trace
//! as a tree of spans with their timings, a waterfall in text.
//!
//! Spans come from every replica's agents, so a trace can be incomplete:
//! a span whose parent is not in the trace is drawn as a root (and says
//! so) rather than dropped, and a parent loop in bad data is broken at its
//! earliest span rather than hiding the spans in it.

use std::{
    collections::HashMap,
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use clap::Subcommand;
use weir_client::{
    telemetry::{attribute, ListTracesRequest, Span, TraceSummary},
    Client,
};
use weir_core::telemetry_json;

use crate::{
    duration::{self, latency_ms, nanos_ms},
    output::{service_label, table, utc, Format},
};

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    filter: Filter,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List recent traces, newest first (what `weirctl traces` does).
    List(Filter),
    /// Show one trace as a tree of spans with their timings.
    Show(ShowArgs),
}

/// Which traces to list.
#[derive(clap::Args, Debug, Default)]
struct Filter {
    /// Traces with a span of this service (as caller or callee):
    /// namespace/name, or a name in any namespace.
    #[arg(long)]
    service: Option<String>,
    /// Only traces with an error span, or only traces without.
    #[arg(long, value_enum)]
    outcome: Option<Outcome>,
    /// Traces at least this long (250ms, 2s, ...).
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    min_duration: Option<Duration>,
    /// Traces that started this recently (30s, 15m, 1h, ...).
    #[arg(long, value_parser = duration::parse, value_name = "DURATION")]
    since: Option<Duration>,
    /// At most this many (the control plane's default is 50).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    limit: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Outcome {
    Ok,
    Error,
}

#[derive(clap::Args, Debug)]
struct ShowArgs {
    /// The trace's id: 32 hex digits.
    #[arg(value_name = "TRACE_ID", value_parser = parse_trace_id)]
    trace_id: String,
    /// Leave out the timeline bar.
    #[arg(long)]
    no_bar: bool,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    match args.command {
        None => list(client, format, args.filter).await,
        Some(Command::List(filter)) => list(client, format, filter).await,
        Some(Command::Show(show_args)) => show(client, format, show_args).await,
    }
}

/// A W3C trace id, lowercased: checked here so a typo is named as such
/// rather than coming back as "not found".
fn parse_trace_id(s: &str) -> Result<String, String> {
    if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "a trace id is 32 hex digits, got {s:?} ({} characters)",
            s.chars().count()
        ))
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The request a filter asks for, `now_ms` being the time `--since`
/// counts back from.
fn request(filter: &Filter, now_ms: u64) -> ListTracesRequest {
    ListTracesRequest {
        service: filter.service.clone().unwrap_or_default(),
        outcome: match filter.outcome {
            Some(Outcome::Ok) => "ok".into(),
            Some(Outcome::Error) => "error".into(),
            None => String::new(),
        },
        min_duration_ms: filter.min_duration.map_or(0, millis),
        // A --since reaching before 1970 saturates to 0, "unbounded",
        // which selects the same traces.
        since_unix_ms: filter
            .since
            .map_or(0, |since| now_ms.saturating_sub(millis(since))),
        until_unix_ms: 0,
        limit: filter.limit.unwrap_or(0),
    }
}

async fn list(client: &Client, format: Format, filter: Filter) -> Result<()> {
    let mut traces = client
        .list_traces(request(&filter, now_unix_ms()))
        .await?
        .traces;
    newest_first(&mut traces);
    match format {
        Format::Json => println!("{}", telemetry_json::summaries(&traces)),
        Format::Table => {
            if traces.is_empty() {
                eprintln!("no traces");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = traces.iter().map(summary_row).collect();
            print!("{}", table(&SUMMARY_HEADER, &rows));
        }
    }
    Ok(())
}

/// The control plane answers newest first already; sorting again (stably)
/// keeps that promise even for a merged answer that breaks it.
fn newest_first(traces: &mut [TraceSummary]) {
    traces.sort_by_key(|t| std::cmp::Reverse(t.start_unix_ms));
}

const SUMMARY_HEADER: [&str; 7] = [
    "TRACE ID", "ROOT", "SERVICES", "START", "DURATION", "SPANS", "ERROR",
];

fn summary_row(t: &TraceSummary) -> Vec<String> {
    vec![
        t.trace_id.clone(),
        t.root_name.clone(),
        t.services.join(","),
        utc(i64::try_from(t.start_unix_ms).unwrap_or(i64::MAX)),
        latency_ms(t.duration_us as f64 / 1e6),
        t.spans.to_string(),
        if t.error { "error" } else { "-" }.into(),
    ]
}

async fn show(client: &Client, format: Format, args: ShowArgs) -> Result<()> {
    let spans = client
        .get_trace(&args.trace_id)
        .await
        .with_context(|| format!("trace {}", args.trace_id))?
        .spans;
    match format {
        Format::Json => println!("{}", telemetry_json::trace(&args.trace_id, &spans)),
        Format::Table => print!("{}", waterfall(&args.trace_id, &spans, !args.no_bar)),
    }
    Ok(())
}

/// One span in the tree, in drawing order.
#[derive(Debug)]
struct Line<'a> {
    span: &'a Span,
    /// The tree drawing before the span's name (`│  ├─ `).
    prefix: String,
    /// A root because its parent is not in the trace.
    orphan: bool,
}

/// The spans as a tree, depth first: each span under its parent, siblings
/// (and roots) by start time. Roots are spans without a parent or whose
/// parent is not in the trace; a span in a parent loop (bad data) is
/// drawn from the loop's earliest span. Iterative, so a deep trace cannot
/// overflow the stack.
fn tree(spans: &[Span]) -> Vec<Line<'_>> {
    let mut by_id: HashMap<&[u8], usize> = HashMap::new();
    for (i, s) in spans.iter().enumerate() {
        if !s.span_id.is_empty() {
            by_id.entry(s.span_id.as_slice()).or_insert(i);
        }
    }
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); spans.len()];
    let mut roots = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        match by_id.get(s.parent_span_id.as_slice()) {
            Some(&parent) if !s.parent_span_id.is_empty() && parent != i => {
                children[parent].push(i)
            }
            _ => roots.push(i),
        }
    }
    let by_start = |a: &usize, b: &usize| {
        (spans[*a].start_unix_nanos, spans[*a].end_unix_nanos, *a).cmp(&(
            spans[*b].start_unix_nanos,
            spans[*b].end_unix_nanos,
            *b,
        ))
    };
    roots.sort_by(by_start);
    for c in &mut children {
        c.sort_by(by_start);
    }
    // Spans no root reaches (a parent loop) come last, earliest first.
    let mut rest: Vec<usize> = (0..spans.len()).collect();
    rest.sort_by(by_start);

    let mut visited = vec![false; spans.len()];
    let mut lines = Vec::with_capacity(spans.len());
    // (span, its own prefix, the prefix its children continue)
    let mut stack: Vec<(usize, String, String)> = Vec::new();
    for root in roots.into_iter().chain(rest) {
        if visited[root] {
            continue;
        }
        stack.push((root, String::new(), String::new()));
        while let Some((i, prefix, continued)) = stack.pop() {
            if visited[i] {
                continue;
            }
            visited[i] = true;
            let s = &spans[i];
            lines.push(Line {
                span: s,
                prefix,
                orphan: !s.parent_span_id.is_empty()
                    && !by_id.contains_key(s.parent_span_id.as_slice()),
            });
            let kids: Vec<usize> = children[i]
                .iter()
                .copied()
                .filter(|c| !visited[*c])
                .collect();
            // Reversed, so the earliest child is drawn first.
            for (n, &c) in kids.iter().enumerate().rev() {
                let last = n + 1 == kids.len();
                stack.push((
                    c,
                    format!("{continued}{}", if last { "└─ " } else { "├─ " }),
                    format!("{continued}{}", if last { "   " } else { "│  " }),
                ));
            }
        }
    }
    lines
}

/// Columns of the timeline bar.
const BAR_WIDTH: u128 = 30;

/// Where a span falls in the trace, `|   ████      |`: at least one
/// block, so the shortest span still shows where it is.
fn bar(start: u64, end: u64, trace_start: u64, total: u64) -> String {
    let (from, to) = if total == 0 {
        (0, BAR_WIDTH)
    } else {
        let offset = u128::from(start.saturating_sub(trace_start));
        let until = u128::from(end.saturating_sub(trace_start));
        let total = u128::from(total);
        let from = (offset * BAR_WIDTH / total).min(BAR_WIDTH - 1);
        let to = (until * BAR_WIDTH)
            .div_ceil(total)
            .clamp(from + 1, BAR_WIDTH);
        (from, to)
    };
    let cells = |n: u128, c: &str| c.repeat(usize::try_from(n).unwrap_or(0));
    format!(
        "|{}{}{}|",
        cells(from, " "),
        cells(to - from, "█"),
        cells(BAR_WIDTH - to, " ")
    )
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a attribute::Value> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref())
}

fn attr_text(value: &attribute::Value) -> String {
    match value {
        attribute::Value::StringValue(s) => s.clone(),
        attribute::Value::IntValue(i) => i.to_string(),
        attribute::Value::DoubleValue(d) => d.to_string(),
        attribute::Value::BoolValue(b) => b.to_string(),
        attribute::Value::Strings(list) => list.values.join(","),
    }
}

/// Who called whom: `web → orders`, a publish `web → topic t`, a
/// delivery `web → topic t → billing`.
fn route(s: &Span) -> String {
    let mut route = service_label(s.source.as_ref());
    if !s.topic.is_empty() {
        let _ = write!(route, " → topic {}", s.topic);
    }
    match &s.target {
        Some(t) if !t.name.is_empty() => {
            let _ = write!(route, " → {}", service_label(Some(t)));
        }
        _ if s.topic.is_empty() => route.push_str(" → unknown"),
        _ => {}
    }
    route
}

/// `ok`, or how it failed (`✗ server_error`): the agent's own outcome
/// when it gave one, which tells a rate limit from a 5xx.
fn outcome(s: &Span) -> String {
    let named = match attr(s, "weir.outcome") {
        Some(attribute::Value::StringValue(o)) if !o.is_empty() => o.clone(),
        _ if s.error => "error".into(),
        _ => "ok".into(),
    };
    if s.error {
        format!("✗ {named}")
    } else {
        named
    }
}

/// The attributes worth a glance, short-named, then the error message.
fn details(line: &Line<'_>) -> String {
    let s = line.span;
    let mut parts: Vec<String> = [
        ("cloudevents.event_id", "event"),
        ("weir.instance.id", "instance"),
        ("http.response.status_code", "status"),
        ("rpc.grpc.status_code", "grpc"),
        ("weir.governance.decisions", "decisions"),
    ]
    .iter()
    .filter_map(|(key, short)| attr(s, key).map(|v| format!("{short}={}", attr_text(v))))
    .collect();
    if line.orphan {
        parts.push(format!(
            "(parent {} not in trace)",
            telemetry_json::hex(&s.parent_span_id)
        ));
    }
    if s.error && !s.status_message.is_empty() {
        parts.push(format!("error={:?}", s.status_message));
    }
    parts.join(" ")
}

/// The trace as text: a summary line, then one line per span in tree
/// order with its offset from the trace's start, its duration, where it
/// falls (unless `with_bar` is false), and what it was.
fn waterfall(trace_id: &str, spans: &[Span], with_bar: bool) -> String {
    if spans.is_empty() {
        return format!("trace {trace_id}: no spans\n");
    }
    let trace_start = spans.iter().map(|s| s.start_unix_nanos).min().unwrap_or(0);
    // A span cut off before it ended may carry no end: it counts as
    // ending where it started.
    let trace_end = spans
        .iter()
        .map(|s| s.end_unix_nanos.max(s.start_unix_nanos))
        .max()
        .unwrap_or(trace_start);
    let total = trace_end.saturating_sub(trace_start);
    let errors = spans.iter().filter(|s| s.error).count();
    let mut out = format!(
        "trace {trace_id}: {} spans, {}, started {}{}\n\n",
        spans.len(),
        nanos_ms(total),
        utc(i64::try_from(trace_start / 1_000_000).unwrap_or(i64::MAX)),
        match errors {
            0 => String::new(),
            1 => ", 1 error".into(),
            n => format!(", {n} errors"),
        }
    );
    let lines = tree(spans);
    let offsets: Vec<String> = lines
        .iter()
        .map(|l| {
            format!(
                "+{}",
                nanos_ms(l.span.start_unix_nanos.saturating_sub(trace_start))
            )
        })
        .collect();
    let durations: Vec<String> = lines
        .iter()
        .map(|l| {
            nanos_ms(
                l.span
                    .end_unix_nanos
                    .saturating_sub(l.span.start_unix_nanos),
            )
        })
        .collect();
    let right = |cells: &[String]| {
        let w = cells.iter().map(|c| c.chars().count()).max().unwrap_or(0);
        cells.iter().map(|c| format!("{c:>w$}")).collect::<Vec<_>>()
    };
    let (offsets, durations) = (right(&offsets), right(&durations));
    let rows: Vec<Vec<String>> = lines
        .iter()
        .zip(offsets.into_iter().zip(durations))
        .map(|(l, (offset, duration))| {
            let s = l.span;
            let mut row = vec![offset, duration];
            if with_bar {
                row.push(bar(
                    s.start_unix_nanos,
                    s.end_unix_nanos.max(s.start_unix_nanos),
                    trace_start,
                    total,
                ));
            }
            row.extend([
                format!("{}{}", l.prefix, s.name),
                telemetry_json::kind_name(s.kind).into(),
                route(s),
                outcome(s),
                details(l),
            ]);
            row
        })
        .collect();
    let mut header = vec!["OFFSET", "DURATION"];
    if with_bar {
        header.push("TIMELINE");
    }
    header.extend(["SPAN", "KIND", "SERVICE", "OUTCOME", "DETAILS"]);
    out.push_str(&table(&header, &rows));
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use weir_client::telemetry::{Attribute, ServiceRef, SpanKind, StringList};

    use super::*;

    const T0: u64 = 1_714_564_803_000_000_000;

    fn id(n: u8) -> Vec<u8> {
        vec![0, 0, 0, 0, 0, 0, 0, n]
    }

    fn span(n: u8, parent: Option<u8>, name: &str, start_us: u64, end_us: u64) -> Span {
        Span {
            trace_id: vec![0xab; 16],
            span_id: id(n),
            parent_span_id: parent.map(id).unwrap_or_default(),
            name: name.into(),
            kind: SpanKind::Client as i32,
            start_unix_nanos: T0 + start_us * 1_000,
            end_unix_nanos: T0 + end_us * 1_000,
            source: Some(ServiceRef {
                namespace: "default".into(),
                name: "web".into(),
            }),
            target: Some(ServiceRef {
                namespace: "default".into(),
                name: "orders".into(),
            }),
            ..Span::default()
        }
    }

    fn names<'a>(lines: &'a [Line<'_>]) -> Vec<(&'a str, &'a str)> {
        lines
            .iter()
            .map(|l| (l.span.name.as_str(), l.prefix.as_str()))
            .collect()
    }

    /// A root with two children (given late-first) and a grandchild, an
    /// orphan whose parent never arrived, in the order a merge might give.
    fn sample() -> Vec<Span> {
        vec![
            span(3, Some(1), "second", 6_000, 9_000),
            span(4, Some(2), "grandchild", 2_500, 4_000),
            span(9, Some(7), "orphan", 5_000, 5_500),
            span(1, None, "root", 0, 12_345),
            span(2, Some(1), "first", 1_000, 5_000),
        ]
    }

    #[test]
    fn spans_hang_under_their_parents_in_start_order_and_orphans_are_roots() {
        let spans = sample();
        let lines = tree(&spans);
        assert_eq!(
            names(&lines),
            vec![
                ("root", ""),
                ("first", "├─ "),
                ("grandchild", "│  └─ "),
                ("second", "└─ "),
                ("orphan", ""),
            ]
        );
        assert!(lines[4].orphan);
        assert!(!lines[0].orphan);
    }

    #[test]
    fn a_parent_loop_still_shows_every_span() {
        let spans = vec![
            span(1, Some(2), "a", 0, 10),
            span(2, Some(1), "b", 5, 10),
            span(3, Some(3), "self", 20, 30),
        ];
        let lines = tree(&spans);
        assert_eq!(names(&lines), vec![("self", ""), ("a", ""), ("b", "└─ ")]);
        assert!(
            lines.iter().all(|l| !l.orphan),
            "their parents are in the trace"
        );
    }

    #[test]
    fn the_waterfall_shows_offsets_durations_and_key_attributes() {
        let mut spans = sample();
        spans[0].error = true;
        spans[0].status_message = "503 from orders-2".into();
        spans[0].attributes = vec![
            Attribute {
                key: "weir.outcome".into(),
                value: Some(attribute::Value::StringValue("server_error".into())),
            },
            Attribute {
                key: "http.response.status_code".into(),
                value: Some(attribute::Value::IntValue(503)),
            },
            Attribute {
                key: "weir.governance.decisions".into(),
                value: Some(attribute::Value::Strings(StringList {
                    values: vec!["retried".into(), "ejected".into()],
                })),
            },
        ];
        spans[4].attributes = vec![Attribute {
            key: "weir.instance.id".into(),
            value: Some(attribute::Value::StringValue("orders-1".into())),
        }];
        let text = waterfall(&"ab".repeat(16), &spans, true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "trace abababababababababababababababab: 5 spans, 12.345ms, started 2024-05-01T12:00:03Z, 1 error"
        );
        assert!(
            lines[2].starts_with("OFFSET    DURATION  TIMELINE  "),
            "{text}"
        );
        assert!(
            lines[3].starts_with(&format!("+0.000ms  12.345ms  |{}|  root ", "█".repeat(30))),
            "{text}"
        );
        assert!(
            lines[3].ends_with("client  default/web → default/orders  ok"),
            "{text}"
        );
        assert!(
            lines[4].starts_with("+1.000ms   4.000ms  |  ███████████ "),
            "{text}"
        );
        assert!(lines[4].contains("instance=orders-1"), "{}", lines[4]);
        assert!(lines[5].contains("│  └─ grandchild"), "{}", lines[5]);
        assert!(
            lines[6].contains(
                "✗ server_error  status=503 decisions=retried,ejected error=\"503 from orders-2\""
            ),
            "{}",
            lines[6]
        );
        assert!(
            lines[7].contains("(parent 0000000000000007 not in trace)"),
            "{}",
            lines[7]
        );
        // Without the bar the columns close up.
        let plain = waterfall("x", &spans, false);
        assert!(!plain.contains('|'));
        assert!(plain.contains("OFFSET    DURATION  SPAN"), "{plain}");
        assert_eq!(waterfall("x", &[], true), "trace x: no spans\n");
    }

    #[test]
    fn bars_scale_to_the_trace_and_never_vanish() {
        assert_eq!(bar(0, 100, 0, 100), format!("|{}|", "█".repeat(30)));
        assert_eq!(
            bar(50, 51, 0, 100),
            format!("|{}█{}|", " ".repeat(15), " ".repeat(14))
        );
        assert_eq!(
            bar(100, 100, 0, 100),
            format!("|{}█|", " ".repeat(29)),
            "a span at the very end still shows"
        );
        assert_eq!(bar(7, 7, 7, 0), format!("|{}|", "█".repeat(30)));
    }

    #[test]
    fn routes_name_topics_between_services() {
        let mut s = span(1, None, "deliver t", 0, 1);
        assert_eq!(route(&s), "default/web → default/orders");
        s.topic = "default/t".into();
        assert_eq!(route(&s), "default/web → topic default/t → default/orders");
        s.target = None;
        assert_eq!(route(&s), "default/web → topic default/t");
        s.source = None;
        s.topic.clear();
        assert_eq!(route(&s), "unknown → unknown");
    }

    #[test]
    fn spans_print_as_json_with_hex_ids() {
        let s = span(2, Some(1), "first", 0, 1_500);
        let j = telemetry_json::span(&s);
        assert_eq!(j["trace_id"], "ab".repeat(16));
        assert_eq!(j["span_id"], "0000000000000002");
        assert_eq!(j["parent_span_id"], "0000000000000001");
        assert_eq!(j["kind"], "client");
        assert_eq!(j["duration_us"], 1_500);
        assert_eq!(j["source"]["name"], "web");
        assert_eq!(
            telemetry_json::span(&span(1, None, "root", 0, 1))["parent_span_id"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn summaries_list_newest_first() {
        let summary = |id: &str, start| TraceSummary {
            trace_id: id.into(),
            root_name: "send orders".into(),
            services: vec!["default/orders".into(), "default/web".into()],
            start_unix_ms: start,
            duration_us: 12_345,
            spans: 3,
            error: id == "b",
        };
        let mut traces = vec![
            summary("a", 1_000),
            summary("b", 3_000),
            summary("c", 2_000),
        ];
        newest_first(&mut traces);
        let ids: Vec<&str> = traces.iter().map(|t| t.trace_id.as_str()).collect();
        assert_eq!(ids, ["b", "c", "a"]);
        let row = summary_row(&traces[0]);
        assert_eq!(row[2], "default/orders,default/web");
        assert_eq!(row[3], "1970-01-01T00:00:03Z");
        assert_eq!(row[4], "12.3ms");
        assert_eq!(row[6], "error");
        assert_eq!(telemetry_json::summary(&traces[0])["duration_us"], 12_345);
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn flags_become_the_request() {
        let cli = Cli::try_parse_from([
            "traces",
            "--service",
            "default/orders",
            "--outcome",
            "error",
            "--min-duration",
            "250ms",
            "--since",
            "15m",
            "--limit",
            "20",
        ])
        .expect("parses");
        assert!(cli.args.command.is_none());
        let r = request(&cli.args.filter, 1_000_000_000);
        assert_eq!(r.service, "default/orders");
        assert_eq!(r.outcome, "error");
        assert_eq!(r.min_duration_ms, 250);
        assert_eq!(r.since_unix_ms, 1_000_000_000 - 900_000);
        assert_eq!(r.limit, 20);
        assert_eq!(request(&Filter::default(), 5), ListTracesRequest::default());

        assert!(Cli::try_parse_from(["traces", "--since", "15"]).is_err());
        assert!(Cli::try_parse_from(["traces", "--limit", "0"]).is_err());
        assert!(Cli::try_parse_from(["traces", "--outcome", "bad"]).is_err());

        let cli = Cli::try_parse_from(["traces", "show", &"AB".repeat(16)]).expect("parses");
        match cli.args.command {
            Some(Command::Show(show)) => assert_eq!(show.trace_id, "ab".repeat(16)),
            other => panic!("expected show, got {other:?}"),
        }
        assert!(Cli::try_parse_from(["traces", "show", "abc"]).is_err());
        assert!(
            Cli::try_parse_from(["traces", "--service", "x", "show", &"ab".repeat(16)]).is_err(),
            "filters do not apply to show"
        );
    }
}
