//! The agent end to end: a real control plane on etcd, real `weir-agent`
//! processes, real HTTP and gRPC instances on loopback.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HttpClient},
    rt::TokioExecutor,
};
use weir_client::{
    policy::{load_balancer::Algorithm, LoadBalancer, TrafficPolicy},
    Client, Protocol,
};
use weir_tests::{
    agent::AgentProcess,
    fixtures::{instance, HttpInstance},
    poll_until, start_one,
};

const SETTLE: Duration = Duration::from_secs(10);

type Http = HttpClient<HttpConnector, Full<Bytes>>;

fn http() -> Http {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

/// One response: status, `weir-reason`, body.
async fn post(
    http: &Http,
    agent: &AgentProcess,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String, String)> {
    let mut request = Request::post(format!("http://{}{path}", agent.ingress_addr()));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = http
        .request(request.body(Full::new(Bytes::from(body.to_owned())))?)
        .await?;
    let status = response.status().as_u16();
    let reason = response
        .headers()
        .get("weir-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, reason, String::from_utf8_lossy(&body).into_owned()))
}

/// Registers `servers` as instances `i0..` of `service` with `weights`.
async fn register(
    client: &Client,
    service: &str,
    servers: &[HttpInstance],
    weights: &[u32],
) -> Result<()> {
    for (n, server) in servers.iter().enumerate() {
        let mut i = instance(
            "default",
            service,
            &format!("i{n}"),
            u32::from(server.port()),
        );
        i.weight = weights.get(n).copied().unwrap_or(0);
        client.register(i).await?;
    }
    Ok(())
}

fn within(count: usize, expected: f64, tolerance: f64) -> bool {
    (count as f64 - expected).abs() <= expected * tolerance
}

#[tokio::test]
async fn two_agents_spread_requests_by_round_robin_and_by_weight() -> Result<()> {
    let (_etcd, plane, client) = start_one("agent-rr").await?;
    let servers = [
        HttpInstance::start().await?,
        HttpInstance::start().await?,
        HttpInstance::start().await?,
    ];
    // Unequal weights, but no policy: plain round robin, the default.
    register(&client, "orders", &servers, &[100, 300, 500]).await?;
    let weighted = [
        HttpInstance::start().await?,
        HttpInstance::start().await?,
        HttpInstance::start().await?,
    ];
    register(&client, "billing", &weighted, &[100, 200, 300]).await?;
    client
        .put_policy(
            TrafficPolicy {
                namespace: "default".into(),
                service: "billing".into(),
                load_balancer: Some(LoadBalancer {
                    algorithm: Algorithm::WeightedRoundRobin as i32,
                    ..LoadBalancer::default()
                }),
                ..TrafficPolicy::default()
            },
            None,
        )
        .await?;
    let agents = [
        AgentProcess::start(&[plane.endpoint()], "node-1", &[])?,
        AgentProcess::start(&[plane.endpoint()], "node-2", &[])?,
    ];
    let http = http();
    for agent in &agents {
        agent
            .wait_for_endpoints("default", "orders", 3, SETTLE)
            .await?;
        agent
            .wait_for_endpoints("default", "billing", 3, SETTLE)
            .await?;
    }
    // Both agents enforce the whole policy (its one section is balancing).
    poll_until(
        SETTLE,
        "both agents applying billing's policy",
        || async { Ok(client.policy_status("default", "billing").await?) },
        |s| s.applied == 2,
    )
    .await?;

    for n in 0..3000 {
        let agent = &agents[n % 2];
        let (status, reason, _) = post(&http, agent, "/v1/services/orders/work", &[], "x").await?;
        ensure!(status == 200, "request {n}: {status} {reason}");
        let (status, reason, _) = post(&http, agent, "/v1/services/billing/pay", &[], "x").await?;
        ensure!(status == 200, "request {n}: {status} {reason}");
    }
    let counts: Vec<usize> = servers.iter().map(|s| s.hits().len()).collect();
    ensure!(
        counts.iter().all(|c| within(*c, 1000.0, 0.05)),
        "round robin (weights ignored without a policy) spread 3,000 requests as {counts:?}"
    );
    ensure!(
        servers
            .iter()
            .all(|s| s.hits().iter().all(|h| h.path == "/work")),
        "the /v1/services/orders prefix is removed"
    );
    let counts: Vec<usize> = weighted.iter().map(|s| s.hits().len()).collect();
    ensure!(
        within(counts[0], 500.0, 0.05)
            && within(counts[1], 1000.0, 0.05)
            && within(counts[2], 1500.0, 0.05),
        "WEIGHTED_ROUND_ROBIN with weights 100/200/300 spread 3,000 requests as {counts:?}"
    );

    // A Host naming the service routes like the path does.
    let before = servers.iter().map(|s| s.hits().len()).sum::<usize>();
    let (status, _, _) = post(
        &http,
        &agents[0],
        "/direct",
        &[("host", "orders.default")],
        "x",
    )
    .await?;
    ensure!(status == 200);
    let after = servers.iter().map(|s| s.hits().len()).sum::<usize>();
    ensure!(after == before + 1, "the Host form reached an instance");
    Ok(())
}

#[tokio::test]
async fn cloudevents_pass_intact_and_bad_ones_are_named() -> Result<()> {
    let (_etcd, plane, client) = start_one("agent-ce").await?;
    let servers = [HttpInstance::start().await?];
    register(&client, "orders", &servers, &[]).await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "orders", 1, SETTLE)
        .await?;
    let http = http();
    let path = "/v1/services/orders/events";

    // Binary mode: attributes in ce-* headers, data as the body.
    let binary = [
        ("ce-specversion", "1.0"),
        ("ce-id", "b-1"),
        ("ce-source", "/shop/cart"),
        ("ce-type", "shop.order.created"),
        ("ce-subject", "order-7"),
        (
            "ce-traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("content-type", "application/json"),
    ];
    let (status, reason, _) = post(&http, &agent, path, &binary, r#"{"total":12}"#).await?;
    ensure!(status == 200, "binary: {status} {reason}");
    let hit = servers[0]
        .hits()
        .pop()
        .context("the instance got the event")?;
    for (k, v) in binary {
        ensure!(
            hit.headers.get(k).is_some_and(|h| h == v),
            "header {k} arrived as {:?}",
            hit.headers.get(k)
        );
    }
    ensure!(hit.body == r#"{"total":12}"#);

    // Structured mode: the body is the event, passed byte for byte.
    let structured = r#"{"specversion":"1.0","id":"s-1","source":"/shop","type":"shop.paid","datacontenttype":"application/json","data":{"n":1},"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}"#;
    let ct = [(
        "content-type",
        "application/cloudevents+json; charset=utf-8",
    )];
    let (status, reason, _) = post(&http, &agent, path, &ct, structured).await?;
    ensure!(status == 200, "structured: {status} {reason}");
    let hit = servers[0]
        .hits()
        .pop()
        .context("the instance got the event")?;
    ensure!(
        hit.body == structured,
        "structured body arrived as {:?}",
        hit.body
    );

    // A bad event: 400 naming the attribute.
    let (status, reason, body) = post(&http, &agent, path, &binary[..3], "").await?;
    ensure!(status == 400 && reason == "bad-event", "{status} {reason}");
    ensure!(body.contains("ce-type is required"), "{body}");
    let (status, _, body) = post(
        &http,
        &agent,
        path,
        &ct,
        r#"{"specversion":"1.0","id":"x","type":"t"}"#,
    )
    .await?;
    ensure!(
        status == 400 && body.contains("attribute source is required"),
        "{status} {body}"
    );

    // Batch: each event delivered on its own, one result per event.
    let before = servers[0].hits().len();
    let batch = r#"[
        {"specversion":"1.0","id":"e1","source":"/s","type":"t.a","data":"one"},
        {"specversion":"1.0","id":"e2","source":"/s","data":"no type"},
        {"specversion":"1.0","id":"e3","source":"/s","type":"t.b","subject":"x"}
    ]"#;
    let ct = [("content-type", "application/cloudevents-batch+json")];
    let (status, _, body) = post(&http, &agent, path, &ct, batch).await?;
    ensure!(status == 207, "batch: {status} {body}");
    let results: Vec<serde_json::Value> = serde_json::from_str(&body)?;
    let summary: Vec<(String, u64)> = results
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap_or("").to_owned(),
                r["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    ensure!(
        summary == [("e1".into(), 200), ("e2".into(), 400), ("e3".into(), 200)],
        "{summary:?}"
    );
    ensure!(results[1]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("attribute type is required")));
    let delivered: Vec<serde_json::Value> = servers[0].hits()[before..]
        .iter()
        .map(|h| serde_json::from_slice(&h.body))
        .collect::<Result<_, _>>()?;
    ensure!(delivered.len() == 2, "only the good events were delivered");
    ensure!(
        delivered[0]["id"] == "e1"
            && delivered[0]["data"] == "one"
            && delivered[0]["type"] == "t.a"
    );
    ensure!(delivered[1]["id"] == "e3" && delivered[1]["subject"] == "x");

    // Unknown services are named.
    let (status, reason, body) = post(&http, &agent, "/v1/services/nope", &[], "").await?;
    ensure!(
        status == 404 && reason == "unknown-service" && body.contains("default/nope"),
        "{status} {reason} {body}"
    );
    Ok(())
}

#[tokio::test]
async fn grpc_unary_and_server_streaming_pass_through_the_agent() -> Result<()> {
    use tokio_stream::StreamExt;
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };

    let (_etcd, plane, client) = start_one("agent-grpc").await?;
    let health = weir_tests::fixtures::HealthInstance::start("shop").await?;
    let mut i = instance("default", "health", "g0", u32::from(health.port()));
    i.protocol = Protocol::Grpc as i32;
    client.register(i).await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "health", 1, SETTLE)
        .await?;

    // The agent's address, with the service named as the :authority.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", agent.ingress_addr()))?
            .origin("http://health".parse()?)
            .connect()
            .await?;
    let mut grpc = HealthClient::new(channel.clone());
    let ask = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let answer = grpc.check(ask("shop")).await?.into_inner();
    ensure!(answer.status == ServingStatus::Serving as i32);
    // The instance's own error status passes through unchanged.
    let missing = grpc
        .check(ask("absent"))
        .await
        .expect_err("unknown to the instance");
    ensure!(missing.code() == tonic::Code::NotFound, "{missing:?}");

    let mut watch = grpc.watch(ask("shop")).await?.into_inner();
    let first = tokio::time::timeout(SETTLE, watch.next())
        .await?
        .context("stream open")??;
    ensure!(first.status == ServingStatus::Serving as i32);
    health
        .set("shop", tonic_health::ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(SETTLE, watch.next())
        .await?
        .context("stream open")??;
    ensure!(second.status == ServingStatus::NotServing as i32);

    // A gRPC caller of an unknown service gets a gRPC status it can read.
    let elsewhere =
        tonic::transport::Endpoint::from_shared(format!("http://{}", agent.ingress_addr()))?
            .origin("http://nowhere".parse()?)
            .connect()
            .await?;
    let status = HealthClient::new(elsewhere)
        .check(ask(""))
        .await
        .expect_err("no such service");
    ensure!(status.code() == tonic::Code::NotFound, "{status:?}");
    ensure!(status.message().contains("default/nowhere"), "{status:?}");
    Ok(())
}

#[tokio::test]
async fn publisher_send_reaches_an_http_instance_as_a_binary_event() -> Result<()> {
    use std::collections::HashMap;

    use tonic_types::StatusExt;
    use weir_proto::{
        cloudevents::v1::{
            cloud_event::{cloud_event_attribute_value::Attr, CloudEventAttributeValue, Data},
            CloudEvent,
        },
        events::v1::{publisher_client::PublisherClient, SendRequest},
        prost_types,
    };

    let (_etcd, plane, client) = start_one("agent-publisher").await?;
    let servers = [HttpInstance::start().await?];
    servers[0].set_status("/events", 202);
    register(&client, "orders", &servers, &[]).await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "orders", 1, SETTLE)
        .await?;
    let mut publisher =
        PublisherClient::connect(format!("http://{}", agent.ingress_addr())).await?;

    let attr = |a: Attr| CloudEventAttributeValue { attr: Some(a) };
    let event = CloudEvent {
        id: "g-1".into(),
        source: "/shop/cart".into(),
        spec_version: "1.0".into(),
        r#type: "shop.order.created".into(),
        attributes: HashMap::from([
            (
                "datacontenttype".to_owned(),
                attr(Attr::CeString("application/json".into())),
            ),
            ("subject".to_owned(), attr(Attr::CeString("order 7".into()))),
            (
                "time".to_owned(),
                attr(Attr::CeTimestamp(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 0,
                })),
            ),
            (
                "traceparent".to_owned(),
                attr(Attr::CeString(
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                )),
            ),
            ("priority".to_owned(), attr(Attr::CeInteger(3))),
            ("urgent".to_owned(), attr(Attr::CeBoolean(false))),
            (
                "signature".to_owned(),
                attr(Attr::CeBytes(Bytes::from_static(b"\x00\xffhi"))),
            ),
        ]),
        data: Some(Data::TextData(r#"{"total":12}"#.into())),
    };
    let request = |service: &str, event: CloudEvent| SendRequest {
        namespace: String::new(),
        service: service.into(),
        path: "/events?x=1".into(),
        event: Some(event),
    };

    // Every attribute as a ce-* header, the data as the body; the answer
    // is the instance's.
    let answer = publisher
        .send(request("orders", event.clone()))
        .await?
        .into_inner();
    ensure!(
        answer.status == 202 && answer.instance_id == "i0",
        "{answer:?}"
    );
    let hit = servers[0]
        .hits()
        .pop()
        .context("the instance got the event")?;
    ensure!(hit.path == "/events", "path {}", hit.path);
    let expected = [
        ("ce-specversion", "1.0"),
        ("ce-id", "g-1"),
        ("ce-source", "/shop/cart"),
        ("ce-type", "shop.order.created"),
        ("content-type", "application/json"),
        ("ce-subject", "order%207"),
        ("ce-time", "2023-11-14T22:13:20Z"),
        (
            "ce-traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("ce-priority", "3"),
        ("ce-urgent", "false"),
        ("ce-signature", "AP9oaQ=="),
    ];
    for (k, v) in expected {
        ensure!(
            hit.headers.get(k).is_some_and(|h| h == v),
            "header {k} arrived as {:?}",
            hit.headers.get(k)
        );
    }
    ensure!(
        hit.body == r#"{"total":12}"#,
        "body arrived as {:?}",
        hit.body
    );

    // Proto data: the Any's value as application/protobuf.
    let mut proto = event.clone();
    proto.attributes.remove("datacontenttype");
    proto.data = Some(Data::ProtoData(prost_types::Any {
        type_url: "type.googleapis.com/shop.Order".into(),
        value: vec![8, 7],
    }));
    publisher.send(request("orders", proto)).await?;
    let hit = servers[0]
        .hits()
        .pop()
        .context("the instance got the event")?;
    ensure!(hit
        .headers
        .get("content-type")
        .is_some_and(|h| h == "application/protobuf"));
    ensure!(hit
        .headers
        .get("ce-dataschema")
        .is_some_and(|h| h == "type.googleapis.com/shop.Order"));
    ensure!(hit.body[..] == [8, 7], "{:?}", hit.body);

    // A bad event: INVALID_ARGUMENT naming the field, not delivered.
    let before = servers[0].hits().len();
    let mut bad = event.clone();
    bad.r#type.clear();
    let status = publisher
        .send(request("orders", bad))
        .await
        .expect_err("no type");
    ensure!(
        status.code() == tonic::Code::InvalidArgument && status.message().contains("event.type"),
        "{status:?}"
    );
    let fields: Vec<String> = status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    ensure!(fields == ["event.type"], "{fields:?}");
    ensure!(
        status
            .metadata()
            .get("weir-reason")
            .is_some_and(|v| v == "bad-event"),
        "{status:?}"
    );
    ensure!(
        servers[0].hits().len() == before,
        "a bad event was delivered"
    );

    // An unknown service: NOT_FOUND, naming it.
    let status = publisher
        .send(request("nope", event))
        .await
        .expect_err("unknown service");
    ensure!(
        status.code() == tonic::Code::NotFound
            && status.message().contains("default/nope")
            && status
                .metadata()
                .get("weir-reason")
                .is_some_and(|v| v == "unknown-service"),
        "{status:?}"
    );
    ensure!(
        servers[0].hits().len() == before,
        "nothing else was delivered"
    );
    Ok(())
}

#[tokio::test]
async fn publisher_send_reaches_a_grpc_instance_through_subscriber_deliver() -> Result<()> {
    use std::collections::HashMap;

    use tonic_types::{ErrorDetails, StatusExt};
    use weir_proto::{
        cloudevents::v1::{
            cloud_event::{cloud_event_attribute_value::Attr, CloudEventAttributeValue, Data},
            CloudEvent,
        },
        events::v1::{publisher_client::PublisherClient, DeliverRequest, SendRequest},
        prost_types,
    };
    use weir_tests::{fixtures::SubscriberInstance, free_port};

    let (_etcd, plane, client) = start_one("agent-deliver").await?;
    let subscriber = SubscriberInstance::start().await?;
    let mut g = instance("default", "audit", "g0", u32::from(subscriber.port()));
    g.protocol = Protocol::Grpc as i32;
    client.register(g).await?;
    // A gRPC instance nothing listens behind.
    let mut dead = instance("default", "gone", "g1", u32::from(free_port()?));
    dead.protocol = Protocol::Grpc as i32;
    client.register(dead).await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "audit", 1, SETTLE)
        .await?;
    agent
        .wait_for_endpoints("default", "gone", 1, SETTLE)
        .await?;
    let mut publisher =
        PublisherClient::connect(format!("http://{}", agent.ingress_addr())).await?;

    let attr = |a: Attr| CloudEventAttributeValue { attr: Some(a) };
    // Every attribute type, and a subject no header could carry as is.
    let event = CloudEvent {
        id: "d-1".into(),
        source: "/shop/cart".into(),
        spec_version: "1.0".into(),
        r#type: "shop.order.created".into(),
        attributes: HashMap::from([
            (
                "datacontenttype".to_owned(),
                attr(Attr::CeString("application/json".into())),
            ),
            (
                "subject".to_owned(),
                attr(Attr::CeString("order 7 \"big\" ü".into())),
            ),
            (
                "time".to_owned(),
                attr(Attr::CeTimestamp(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 250_000_000,
                })),
            ),
            (
                "dataschema".to_owned(),
                attr(Attr::CeUri("https://example.com/order".into())),
            ),
            ("origin".to_owned(), attr(Attr::CeUriRef("/carts/7".into()))),
            ("priority".to_owned(), attr(Attr::CeInteger(-3))),
            ("urgent".to_owned(), attr(Attr::CeBoolean(true))),
            (
                "signature".to_owned(),
                attr(Attr::CeBytes(Bytes::from_static(b"\x00\xffhi"))),
            ),
        ]),
        data: Some(Data::TextData(r#"{"total":12}"#.into())),
    };
    let request = |service: &str, path: &str, event: CloudEvent| SendRequest {
        namespace: String::new(),
        service: service.into(),
        path: path.into(),
        event: Some(event),
    };
    let delivered = |n: usize| -> Result<DeliverRequest> {
        let all = subscriber.deliveries();
        ensure!(all.len() == n, "{} deliveries, expected {n}", all.len());
        all.last().cloned().context("a delivery")
    };

    // Text, binary and proto data: the instance's Deliver gets the event
    // as sent, every attribute and the data intact; the caller gets 200.
    let mut binary = event.clone();
    binary.id = "d-2".into();
    binary.data = Some(Data::BinaryData(Bytes::from_static(b"\x00\x01\xfe\xff")));
    let mut proto = event.clone();
    proto.id = "d-3".into();
    proto.attributes.remove("datacontenttype");
    proto.data = Some(Data::ProtoData(prost_types::Any {
        type_url: "type.googleapis.com/shop.Order".into(),
        value: vec![8, 7, 0, 255],
    }));
    for (n, (e, path, seen_path)) in [
        (event.clone(), "/orders?x=1", "/orders?x=1"),
        (binary, "", "/"),
        (proto, "/p", "/p"),
    ]
    .into_iter()
    .enumerate()
    {
        let answer = publisher
            .send(request("audit", path, e.clone()))
            .await?
            .into_inner();
        ensure!(
            answer.status == 200
                && answer.instance_id == "g0"
                && answer.body.is_empty()
                && answer.content_type.is_empty(),
            "event {}: {answer:?}",
            e.id
        );
        let got = delivered(n + 1)?;
        ensure!(
            got.event.as_ref() == Some(&e),
            "event {} arrived as {:?}",
            e.id,
            got.event
        );
        ensure!(
            got.topic.is_empty()
                && got.subscription.is_empty()
                && got.attempt == 1
                && got.path == seen_path,
            "{got:?}"
        );
    }

    // The instance's refusal comes back as it is, marked as the instance's.
    subscriber.refuse_with(Some(tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        "queue full: 100%",
        ErrorDetails::with_retry_info(Some(Duration::from_secs(2))),
    )));
    let status = publisher
        .send(request("audit", "/", event.clone()))
        .await
        .expect_err("refused by the instance");
    let meta = |s: &tonic::Status, k: &str| {
        s.metadata()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    ensure!(
        status.code() == tonic::Code::ResourceExhausted && status.message() == "queue full: 100%",
        "{status:?}"
    );
    ensure!(
        status
            .get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay)
            == Some(Duration::from_secs(2)),
        "RetryInfo lost: {status:?}"
    );
    ensure!(
        meta(&status, "weir-reason").as_deref() == Some("instance-status")
            && meta(&status, "weir-instance").as_deref() == Some("g0"),
        "{status:?}"
    );
    delivered(4)?;
    subscriber.refuse_with(Some(tonic::Status::invalid_argument("unknown order")));
    let status = publisher
        .send(request("audit", "/", event.clone()))
        .await
        .expect_err("refused by the instance");
    ensure!(
        status.code() == tonic::Code::InvalidArgument
            && status.message() == "unknown order"
            && meta(&status, "weir-reason").as_deref() == Some("instance-status"),
        "{status:?}"
    );
    subscriber.refuse_with(None);

    // A bad event: the agent's INVALID_ARGUMENT, not delivered.
    let mut bad = event.clone();
    bad.source.clear();
    let status = publisher
        .send(request("audit", "/", bad))
        .await
        .expect_err("no source");
    ensure!(
        status.code() == tonic::Code::InvalidArgument
            && meta(&status, "weir-reason").as_deref() == Some("bad-event"),
        "{status:?}"
    );
    delivered(5)?;

    // An instance that cannot be reached: the agent's UNAVAILABLE.
    let status = publisher
        .send(request("gone", "/", event))
        .await
        .expect_err("nothing listens");
    ensure!(
        status.code() == tonic::Code::Unavailable
            && meta(&status, "weir-reason").as_deref() == Some("upstream-unavailable")
            && status.message().contains("g1"),
        "{status:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_rule_balances_the_events_it_matches_by_weight() -> Result<()> {
    use std::collections::HashMap;

    use weir_client::policy::{EventMatch, Rule};
    use weir_proto::{
        cloudevents::v1::{cloud_event::Data, CloudEvent},
        events::v1::{publisher_client::PublisherClient, SendRequest},
    };

    const HEAVY: &str = "com.example.heavy.resize";
    const LIGHT: &str = "com.example.light.ping";

    let (_etcd, plane, client) = start_one("agent-rules").await?;
    let servers = [
        HttpInstance::start().await?,
        HttpInstance::start().await?,
        HttpInstance::start().await?,
    ];
    register(&client, "orders", &servers, &[1, 1, 4]).await?;
    let heavy_rule = Rule {
        name: "heavy".into(),
        r#match: Some(EventMatch {
            type_prefix: "com.example.heavy.".into(),
            ..EventMatch::default()
        }),
        load_balancer: Some(LoadBalancer {
            algorithm: Algorithm::WeightedRoundRobin as i32,
            ..LoadBalancer::default()
        }),
        ..Rule::default()
    };
    let policy = TrafficPolicy {
        namespace: "default".into(),
        service: "orders".into(),
        load_balancer: Some(LoadBalancer {
            algorithm: Algorithm::RoundRobin as i32,
            ..LoadBalancer::default()
        }),
        rules: vec![heavy_rule],
        ..TrafficPolicy::default()
    };
    let first = client.put_policy(policy.clone(), None).await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "orders", 3, SETTLE)
        .await?;
    // The rule's only section is balancing, which the agent enforces: the
    // whole policy is applied, not "partly".
    poll_until(
        SETTLE,
        "the agent applying the policy with its rule",
        || async { Ok(client.policy_status("default", "orders").await?) },
        |s| s.applied == 1,
    )
    .await?;

    // 600 events of each type, interleaved, through every way in: binary,
    // structured, batches mixing both types, and Publisher/Send.
    let http = http();
    let path = "/v1/services/orders/events";
    let mut publisher =
        PublisherClient::connect(format!("http://{}", agent.ingress_addr())).await?;
    let structured = [(
        "content-type",
        "application/cloudevents+json; charset=utf-8",
    )];
    let batch_ct = [("content-type", "application/cloudevents-batch+json")];
    let json = |id: &str, t: &str| {
        format!(r#"{{"specversion":"1.0","id":"{id}","source":"/shop","type":"{t}"}}"#)
    };
    for n in 0..150 {
        for t in [HEAVY, LIGHT] {
            let id = format!("b-{n}-{t}");
            let binary = [
                ("ce-specversion", "1.0"),
                ("ce-id", id.as_str()),
                ("ce-source", "/shop"),
                ("ce-type", t),
            ];
            let (status, reason, _) = post(&http, &agent, path, &binary, "{}").await?;
            ensure!(status == 200, "binary {n}: {status} {reason}");
            let (status, reason, _) = post(
                &http,
                &agent,
                path,
                &structured,
                &json(&format!("s-{n}"), t),
            )
            .await?;
            ensure!(status == 200, "structured {n}: {status} {reason}");
            let answer = publisher
                .send(SendRequest {
                    namespace: String::new(),
                    service: "orders".into(),
                    path: "/events".into(),
                    event: Some(CloudEvent {
                        id: format!("p-{n}"),
                        source: "/shop".into(),
                        spec_version: "1.0".into(),
                        r#type: t.into(),
                        attributes: HashMap::new(),
                        data: Some(Data::TextData("{}".into())),
                    }),
                })
                .await?
                .into_inner();
            ensure!(answer.status == 200, "publisher {n}: {answer:?}");
        }
        let batch = format!(
            "[{},{}]",
            json(&format!("h-{n}"), HEAVY),
            json(&format!("l-{n}"), LIGHT)
        );
        let (status, _, body) = post(&http, &agent, path, &batch_ct, &batch).await?;
        ensure!(
            status == 207 && body.matches("\"status\":200").count() == 2,
            "batch {n}: {status} {body}"
        );
    }

    // What each instance got, by event type (a header in binary mode, a
    // member of the body otherwise).
    let type_of = |hit: &weir_tests::fixtures::Hit| -> String {
        match hit.headers.get("ce-type").and_then(|v| v.to_str().ok()) {
            Some(t) => t.to_owned(),
            None => serde_json::from_slice::<serde_json::Value>(&hit.body)
                .ok()
                .and_then(|v| v["type"].as_str().map(str::to_owned))
                .unwrap_or_default(),
        }
    };
    let counts = |t: &str| -> Vec<usize> {
        servers
            .iter()
            .map(|s| s.hits().iter().filter(|h| type_of(h) == t).count())
            .collect()
    };
    let heavy = counts(HEAVY);
    ensure!(
        within(heavy[0], 100.0, 0.05)
            && within(heavy[1], 100.0, 0.05)
            && within(heavy[2], 400.0, 0.05),
        "the heavy rule (WEIGHTED_ROUND_ROBIN, weights 1/1/4) spread 600 events as {heavy:?}"
    );
    let light = counts(LIGHT);
    ensure!(
        light.iter().all(|c| within(*c, 200.0, 0.05)),
        "the default (ROUND_ROBIN) spread 600 other events as {light:?}"
    );
    let plain_before: Vec<usize> = servers.iter().map(|s| s.hits().len()).collect();
    for n in 0..30 {
        // Not a CloudEvent (no ce-specversion): the default, whatever the
        // other headers say.
        let (status, reason, _) = post(&http, &agent, path, &[("ce-type", HEAVY)], "x").await?;
        ensure!(status == 200, "plain {n}: {status} {reason}");
    }
    let plain: Vec<usize> = servers
        .iter()
        .zip(&plain_before)
        .map(|(s, before)| s.hits().len() - before)
        .collect();
    ensure!(
        plain == [10, 10, 10],
        "requests that are not CloudEvents spread as {plain:?}"
    );

    // A rule with a section the agent does not enforce yet: "partly",
    // naming `rules`.
    let mut partial = policy;
    // (A rule's own delivery section: topic delivery follows the
    // service's.)
    partial.rules[0].delivery = Some(weir_client::policy::Delivery {
        max_attempts: 3,
        ..weir_client::policy::Delivery::default()
    });
    client.put_policy(partial, Some(first.version)).await?;
    let status = poll_until(
        SETTLE,
        "the agent applying the rate-limited rule in part",
        || async { Ok(client.policy_status("default", "orders").await?) },
        |s| s.current_version > first.version && s.partly == 1,
    )
    .await?;
    ensure!(
        status
            .agents
            .first()
            .is_some_and(|a| a.unenforced == ["rules"]),
        "{status:?}"
    );
    Ok(())
}
