//! Telemetry end to end: a real control plane on etcd exporting to an
//! OTLP collector and a Zipkin endpoint in the test, a real `weir-agent`
//! at 100% sampling, HTTP instances in the test standing in for services.
//!
//! The chain: `web` sends an event to `orders` through the agent;
//! `orders` (the test, acting on what the instance received) publishes to
//! topic `placed` with the trace context it got; the agent delivers to
//! `billing`. That is one trace, found through the trace API, the JSON
//! API, `weirctl traces`, and both exporters.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use axum::{extract::State, http::StatusCode, routing, Json, Router};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::any_value::Value as Any,
    trace::v1::Span as OtlpSpan,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use weir_client::telemetry::{GetStatsRequest, ListTracesRequest, Span};
use weir_tests::{
    agent::AgentProcess,
    fixtures::{http_instances, subscribe, HttpInstance},
    poll_until, unique_prefix, weirctl, ControlPlaneProcess, Etcd,
};

const SETTLE: Duration = Duration::from_secs(15);

type Http = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

fn http() -> Http {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// What the OTLP collector got: spans with their resource's service.name.
#[derive(Debug, Default)]
struct Collected(Mutex<Vec<(String, OtlpSpan)>>);

/// The collector's service, over what it collected.
#[derive(Debug)]
struct Collector(Arc<Collected>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Any::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn otlp_collector(collected: Arc<Collected>) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(collected)))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok(addr)
}

/// What the Zipkin endpoint got: the spans of every POST.
type Zipkin = Arc<Mutex<Vec<serde_json::Value>>>;

async fn zipkin_endpoint(got: Zipkin) -> Result<SocketAddr> {
    async fn spans(State(got): State<Zipkin>, Json(body): Json<serde_json::Value>) -> StatusCode {
        if let Some(spans) = body.as_array() {
            got.lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(spans.iter().cloned());
        }
        StatusCode::ACCEPTED
    }
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/api/v2/spans", routing::post(spans))
        .with_state(got);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// POSTs a binary-mode event to `path` of the agent with `headers`.
async fn post(http: &Http, agent: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Result<u16> {
    let mut request = Request::post(format!("http://{agent}{path}"))
        .header("ce-specversion", "1.0")
        .header("ce-source", "/tests/telemetry")
        .header("content-type", "application/json");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = http
        .request(request.body(Full::new(Bytes::from_static(b"{}")))?)
        .await?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    Ok(status)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The span id a `traceparent` names.
fn parent_of(traceparent: &str) -> Result<(String, String)> {
    let parts: Vec<&str> = traceparent.split('-').collect();
    ensure!(parts.len() == 4, "traceparent {traceparent:?}");
    Ok((parts[1].to_owned(), parts[2].to_owned()))
}

fn attr(span: &Span, key: &str) -> Option<String> {
    use weir_client::telemetry::attribute::Value;
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| match a.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            Value::IntValue(i) => Some(i.to_string()),
            _ => None,
        })
}

#[tokio::test]
async fn a_chain_through_a_topic_is_one_trace_everywhere() -> Result<()> {
    weir_tests::init_tracing();
    let etcd = Etcd::start().await?;
    let collected = Arc::new(Collected::default());
    let otlp = otlp_collector(collected.clone()).await?;
    let zipkin: Zipkin = Arc::default();
    let zipkin_addr = zipkin_endpoint(zipkin.clone()).await?;
    let plane = ControlPlaneProcess::start_args(&[
        format!("--etcd-endpoints={}", etcd.endpoints().join(",")),
        format!("--etcd-prefix={}", unique_prefix("telemetry-chain")),
        format!("--otlp-endpoint=http://{otlp}"),
        format!("--zipkin-endpoint=http://{zipkin_addr}/api/v2/spans"),
    ])?;
    let client = weir_client::Client::connect([plane.endpoint()]).await?;
    let orders = http_instances(&client, "orders", "o", 1).await?.remove(0);
    let billing = HttpInstance::start().await?;
    subscribe(&client, "billing", "b0", &billing, &["placed"]).await?;
    let data = tempfile::tempdir()?;
    let agent = AgentProcess::start(
        &[plane.endpoint()],
        "node-1",
        &[
            format!("--data-dir={}", data.path().display()),
            "--trace-sample-rate=1".into(),
        ],
    )?;
    agent
        .wait_for_endpoints("default", "orders", 1, SETTLE)
        .await?;
    poll_until(
        SETTLE,
        "billing subscribes to placed",
        || agent.state(),
        |s| {
            s["subscriptions"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["topic"] == "placed"))
        },
    )
    .await?;

    // web → orders, through the agent.
    let http = http();
    let status = post(
        &http,
        agent.ingress_addr(),
        "/v1/services/orders/orders",
        &[
            ("weir-source", "web"),
            ("ce-id", "order-1"),
            ("ce-type", "com.shop.order.submitted"),
        ],
    )
    .await?;
    ensure!(status == 200, "web → orders answered {status}");
    let hit = orders.hits().pop().context("orders got the event")?;
    let got = hit
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .context("orders got a traceparent")?
        .to_owned();
    let (trace_id, orders_parent) = parent_of(&got)?;
    ensure!(got.ends_with("-01"), "sampled: {got}");

    // orders → topic placed, carrying the context it got.
    let status = post(
        &http,
        agent.ingress_addr(),
        "/v1/topics/placed",
        &[
            ("weir-source", "orders"),
            ("traceparent", &got),
            ("tracestate", "shop=orders"),
            ("ce-id", "placed-1"),
            ("ce-type", "com.shop.order.placed"),
        ],
    )
    .await?;
    ensure!(status == 202, "publish answered {status}");
    let delivered = poll_until(
        SETTLE,
        "billing got the event",
        || async { Ok(billing.hits()) },
        |h| !h.is_empty(),
    )
    .await?;
    let billing_tp = delivered[0]
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .context("billing got a traceparent")?
        .to_owned();
    let (billing_trace, billing_parent) = parent_of(&billing_tp)?;
    ensure!(
        delivered[0]
            .headers
            .get("tracestate")
            .is_some_and(|v| v == "shop=orders"),
        "the publisher's tracestate reaches the subscriber: {:?}",
        delivered[0].headers
    );
    ensure!(
        billing_trace == trace_id,
        "{billing_tp} is not in {trace_id}"
    );

    // The trace, from the control plane: five spans, one tree.
    let spans = poll_until(
        SETTLE,
        "the whole trace reported",
        || async {
            Ok(client
                .get_trace(&trace_id)
                .await
                .map(|t| t.spans)
                .unwrap_or_default())
        },
        |s| s.len() >= 5,
    )
    .await?;
    ensure!(spans.len() == 5, "{spans:#?}");
    let by_id: HashMap<String, &Span> = spans.iter().map(|s| (hex(&s.span_id), s)).collect();
    let named = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .with_context(|| format!("a span named {name:?} in {spans:#?}"))
    };
    let root = named("send orders")?;
    ensure!(
        root.parent_span_id.is_empty(),
        "the first request is the root"
    );
    ensure!(root.source.as_ref().is_some_and(|s| s.name == "web"));
    ensure!(attr(root, "cloudevents.event_id").as_deref() == Some("order-1"));
    ensure!(attr(root, "messaging.operation.type").as_deref() == Some("send"));
    let first_attempt = by_id
        .get(&orders_parent)
        .context("orders' parent span is in the trace")?;
    ensure!(first_attempt.parent_span_id == root.span_id);
    ensure!(attr(first_attempt, "weir.instance.id").as_deref() == Some("o0"));
    let publish = named("publish placed")?;
    ensure!(
        hex(&publish.parent_span_id) == orders_parent,
        "the publish is a child of what orders received"
    );
    ensure!(publish.source.as_ref().is_some_and(|s| s.name == "orders"));
    let deliver = named("deliver placed")?;
    ensure!(deliver.parent_span_id == publish.span_id);
    ensure!(deliver.target.as_ref().is_some_and(|t| t.name == "billing"));
    ensure!(attr(deliver, "messaging.operation.type").as_deref() == Some("process"));
    ensure!(attr(deliver, "cloudevents.event_id").as_deref() == Some("placed-1"));
    let last_attempt = by_id
        .get(&billing_parent)
        .context("billing's parent span is in the trace")?;
    ensure!(last_attempt.parent_span_id == deliver.span_id);

    // Listed by service, in JSON over HTTP, and by weirctl.
    let listed = client
        .list_traces(ListTracesRequest {
            service: "billing".into(),
            ..ListTracesRequest::default()
        })
        .await?;
    ensure!(
        listed.traces.iter().any(|t| t.trace_id == trace_id),
        "{listed:?}"
    );
    let json =
        weir_tests::http_get(plane.http_addr(), &format!("/api/v1/traces/{trace_id}")).await?;
    let body = json.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json: serde_json::Value = serde_json::from_str(body).context("a JSON body")?;
    ensure!(json["spans"].as_array().map(Vec::len) == Some(5), "{json}");
    let out = weirctl(&plane.endpoint(), &["traces", "--service", "billing"]).await?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains(&trace_id),
        "{out:?}"
    );
    let out = weirctl(&plane.endpoint(), &["traces", "show", &trace_id]).await?;
    ensure!(out.status.success(), "{out:?}");
    let tree = String::from_utf8_lossy(&out.stdout);
    for name in ["send orders", "publish placed", "deliver placed"] {
        ensure!(tree.contains(name), "{tree}");
    }

    // Both exporters got the same five spans, with their parents.
    let otlp_spans = poll_until(
        SETTLE,
        "the OTLP collector got the trace",
        || async {
            Ok(collected
                .0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, s)| hex(&s.trace_id) == trace_id)
                .cloned()
                .collect::<Vec<_>>())
        },
        |s| s.len() >= 5,
    )
    .await?;
    for (service, s) in &otlp_spans {
        let ours = by_id
            .get(&hex(&s.span_id))
            .context("an exported span the trace API has")?;
        ensure!(s.parent_span_id == ours.parent_span_id, "{s:?}");
        ensure!(s.name == ours.name);
        let want = ours.source.as_ref().map(|x| x.name.as_str()).unwrap_or("");
        ensure!(service == want, "service.name {service} for {}", s.name);
        if s.name == "deliver placed" {
            let kv = s
                .attributes
                .iter()
                .find(|kv| kv.key == "messaging.destination.name")
                .and_then(|kv| kv.value.clone())
                .and_then(|v| v.value);
            ensure!(kv == Some(Any::StringValue("placed".into())), "{s:?}");
        }
    }
    let zipkin_spans = poll_until(
        SETTLE,
        "the Zipkin endpoint got the trace",
        || async {
            Ok(zipkin
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|s| s["traceId"] == trace_id)
                .cloned()
                .collect::<Vec<_>>())
        },
        |s| s.len() >= 5,
    )
    .await?;
    for z in &zipkin_spans {
        let id = z["id"].as_str().context("id")?;
        let ours = by_id.get(id).context("a Zipkin span the trace API has")?;
        let parent = z["parentId"].as_str().unwrap_or("");
        ensure!(parent == hex(&ours.parent_span_id), "{z}");
        ensure!(
            z["timestamp"].as_u64() == Some(ours.start_unix_nanos / 1_000),
            "{z}"
        );
    }
    let root_z = zipkin_spans
        .iter()
        .find(|z| z["name"] == "send orders")
        .context("the root in Zipkin")?;
    ensure!(root_z["localEndpoint"]["serviceName"] == "web", "{root_z}");
    ensure!(
        root_z["tags"]["cloudevents.event_id"] == "order-1",
        "{root_z}"
    );
    drop(agent);
    Ok(())
}

/// Exact quantile as the sketch defines it: the value of rank
/// floor(q × (n − 1)), ascending.
fn exact(sorted: &[f64], q: f64) -> f64 {
    sorted[(q * (sorted.len() - 1) as f64).floor() as usize]
}

#[tokio::test]
async fn percentiles_match_the_raw_latencies_within_one_percent() -> Result<()> {
    let (_etcd, plane, client) = weir_tests::start_one("telemetry-percentiles").await?;
    let orders = http_instances(&client, "orders", "o", 1).await?.remove(0);
    // Three latency classes: at once, 20 ms and 60 ms.
    orders.delay_when("x-delay", "20", Duration::from_millis(20));
    orders.delay_when("x-delay", "60", Duration::from_millis(60));
    let agent = AgentProcess::start(
        &[plane.endpoint()],
        "node-1",
        &["--trace-sample-rate=1".into()],
    )?;
    agent
        .wait_for_endpoints("default", "orders", 1, SETTLE)
        .await?;
    let http = http();
    const N: usize = 200;
    for n in 0..N {
        let delay = match n % 10 {
            0..=5 => "0",
            6..=8 => "20",
            _ => "60",
        };
        let id = format!("e{n}");
        let status = post(
            &http,
            agent.ingress_addr(),
            "/v1/services/orders/",
            &[
                ("weir-source", "web"),
                ("ce-id", &id),
                ("ce-type", "t"),
                ("x-delay", delay),
            ],
        )
        .await?;
        ensure!(status == 200, "{status}");
    }
    // The raw latencies: each request's span, as the agent timed it.
    let traces = poll_until(
        SETTLE,
        "every request traced",
        || async {
            Ok(client
                .list_traces(ListTracesRequest {
                    service: "default/orders".into(),
                    limit: 1_000,
                    ..ListTracesRequest::default()
                })
                .await?
                .traces)
        },
        |t| t.len() >= N,
    )
    .await?;
    let mut raw: Vec<f64> = traces.iter().map(|t| t.duration_us as f64 / 1e6).collect();
    raw.sort_by(f64::total_cmp);
    let stats = poll_until(
        SETTLE,
        "every request counted",
        || async {
            Ok(client
                .get_stats(GetStatsRequest {
                    window_seconds: 900,
                    service: "default/orders".into(),
                    raw: false,
                })
                .await?)
        },
        |s| {
            s.services
                .first()
                .and_then(|x| x.traffic.as_ref())
                .is_some_and(|t| t.outcomes.is_some_and(|o| o.ok as usize >= N))
        },
    )
    .await?;
    let traffic = stats.services[0].traffic.clone().context("traffic")?;
    for (q, got) in [
        (0.5, traffic.p50_seconds),
        (0.9, traffic.p90_seconds),
        (0.99, traffic.p99_seconds),
    ] {
        let want = exact(&raw, q);
        // 1% relative, and 20 µs for the trace summaries' microsecond
        // units and their spans' separate wall-clock readings.
        ensure!(
            (got - want).abs() <= 0.01 * want + 20e-6,
            "p{}: {got} s against {want} s from the raw latencies",
            q * 100.0
        );
    }
    ensure!(traffic.p99_seconds >= 0.06, "{traffic:?}");
    ensure!(traffic.p50_seconds < 0.02, "{traffic:?}");
    // And the topology names the edge.
    let topology = client
        .get_topology(weir_client::telemetry::GetTopologyRequest {
            window_seconds: 900,
        })
        .await?;
    ensure!(
        topology
            .edges
            .iter()
            .any(|e| e.from == "service:default/web" && e.to == "service:default/orders"),
        "{topology:?}"
    );
    let out = weirctl(&plane.endpoint(), &["topology", "--window", "15m"]).await?;
    ensure!(out.status.success(), "{out:?}");
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("default/orders"),
        "{out:?}"
    );
    Ok(())
}

/// Sends `n` events from `web` to `orders` through `agent`; their
/// statuses.
async fn send_orders(http: &Http, agent: SocketAddr, prefix: &str, n: usize) -> Result<Vec<u16>> {
    let mut statuses = Vec::with_capacity(n);
    for k in 0..n {
        let id = format!("{prefix}-{k}");
        statuses.push(
            post(
                http,
                agent,
                "/v1/services/orders/",
                &[("weir-source", "web"), ("ce-id", &id), ("ce-type", "t")],
            )
            .await?,
        );
    }
    Ok(statuses)
}

#[tokio::test]
async fn any_replica_answers_for_the_whole_cluster() -> Result<()> {
    use weir_client::policy::{rate_limit::OnExcess, RateLimit, TrafficPolicy};
    let (_etcd, [r1, r2]) = weir_tests::start_replicas::<2>("telemetry-replicas").await?;
    let client = weir_client::Client::connect([r1.endpoint()]).await?;
    let orders = http_instances(&client, "orders", "o", 1).await?.remove(0);
    // Each agent reports to its own replica.
    let rate = "--trace-sample-rate=1".to_owned();
    let a = AgentProcess::start(&[r1.endpoint()], "node-a", std::slice::from_ref(&rate))?;
    let b = AgentProcess::start(&[r2.endpoint()], "node-b", &[rate])?;
    client
        .put_policy(
            TrafficPolicy {
                namespace: "default".into(),
                service: "orders".into(),
                rate_limit: Some(RateLimit {
                    requests_per_second: 1.0,
                    burst: 5,
                    on_excess: OnExcess::Reject as i32,
                    ..RateLimit::default()
                }),
                ..TrafficPolicy::default()
            },
            None,
        )
        .await?;
    weir_tests::agents::policy_status_until(
        &client,
        "orders",
        "both agents applying the limit",
        |s| s.applied == 2,
    )
    .await?;
    for agent in [&a, &b] {
        agent
            .wait_for_endpoints("default", "orders", 1, SETTLE)
            .await?;
    }
    let http = http();
    let from_a = send_orders(&http, a.ingress_addr(), "a", 20).await?;
    let from_b = send_orders(&http, b.ingress_addr(), "b", 20).await?;
    let limited = from_a.iter().chain(&from_b).filter(|s| **s == 429).count() as u64;
    ensure!(limited > 0, "the limit bit: {from_a:?} {from_b:?}");
    // Asked of r2 alone, the figures of both agents.
    let r2_client = weir_client::Client::connect([r2.endpoint()]).await?;
    let stats = poll_until(
        SETTLE,
        "both agents' traffic through r2",
        || async {
            Ok(r2_client
                .get_stats(GetStatsRequest {
                    window_seconds: 60,
                    service: "orders".into(),
                    raw: false,
                })
                .await?)
        },
        |s| {
            let o = s
                .services
                .first()
                .and_then(|x| x.traffic.as_ref())
                .and_then(|t| t.outcomes)
                .unwrap_or_default();
            o.ok + o.limited == 40
                && s.limits
                    .iter()
                    .map(|l| l.admitted + l.rejected)
                    .sum::<u64>()
                    == 40
        },
    )
    .await?;
    let o = stats.services[0]
        .traffic
        .as_ref()
        .and_then(|t| t.outcomes)
        .context("outcomes")?;
    ensure!(o.limited == limited, "{o:?} against {limited} 429s");
    ensure!(
        stats.limits.iter().map(|l| l.rejected).sum::<u64>() == limited,
        "{:?}",
        stats.limits
    );
    ensure!(stats.replicas.len() == 2, "{:?}", stats.replicas);
    ensure!(stats.missing_replicas.is_empty());
    // A trace node-a made, found through r2.
    let hit = orders.hits().into_iter().find(|h| {
        h.headers
            .get("ce-id")
            .is_some_and(|v| v.as_bytes().starts_with(b"a-"))
    });
    let tp = hit
        .and_then(|h| h.headers.get("traceparent").cloned())
        .context("a traceparent from node-a")?;
    let (trace_id, _) = parent_of(tp.to_str()?)?;
    let trace = poll_until(
        SETTLE,
        "node-a's trace through r2",
        || async {
            Ok(r2_client
                .get_trace(&trace_id)
                .await
                .map(|t| t.spans)
                .unwrap_or_default())
        },
        |s| s.len() >= 2,
    )
    .await?;
    ensure!(trace.iter().all(|s| s.node_id == "node-a"), "{trace:?}");
    let out = weirctl(&r2.endpoint(), &["stats", "orders"]).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("LIMIT BITING"),
        "{out:?}"
    );
    Ok(())
}
