//! OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.
//!
//! The messages and the client are the `opentelemetry-proto` crate's
//! (generated from open-telemetry/opentelemetry-proto v1.10.0, with the
//! same tonic and prost as ours), so a collector gets exactly the wire
//! format it expects.
//!
//! Mapping: spans are grouped by who made them (source service and node)
//! into one `ResourceSpans` each, with resource attributes `service.name`
//! (the source's name, or `unknown`), `service.namespace` and `host.name`
//! (the agent's node), and one `ScopeSpans` named `weir-agent`. Ids, kind,
//! times, trace state and attributes pass as they are (Weir's `SpanKind`
//! is OpenTelemetry's, value for value); a string list becomes an array of
//! strings. An error is status ERROR with its message, anything else is
//! UNSET (the agent does not tell OK apart from "not judged"). A span with
//! a target service gets `peer.service` = the target's name, unless the
//! agent already set one.

use std::{collections::HashMap, sync::Arc, time::Duration};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{trace_service_client::TraceServiceClient, ExportTraceServiceRequest},
    common::v1::{any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue},
    resource::v1::Resource,
    trace::v1::{self as otlp, span::SpanKind as OtlpKind, status::StatusCode},
};
use tonic::transport::{Channel, Endpoint};
use weir_proto::telemetry::v1::{attribute, Attribute, Span, SpanKind};

use super::{http_uri, EndpointError, SendError, Sink};

/// The instrumentation scope: the agents made these spans.
const SCOPE: &str = "weir-agent";

/// An OTLP/gRPC exporter: one lazily connected channel.
#[derive(Debug)]
pub(super) struct Otlp {
    client: TraceServiceClient<Channel>,
}

impl Otlp {
    /// A client for `endpoint` (`http://host:port`). Connects on the
    /// first send and reconnects after a failure on its own; `timeout`
    /// bounds the connect and travels to the collector as `grpc-timeout`.
    pub(super) fn new(endpoint: &str, timeout: Duration) -> Result<Self, EndpointError> {
        let uri = http_uri(endpoint)?;
        let channel = Endpoint::from(uri)
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_lazy();
        Ok(Self {
            client: TraceServiceClient::new(channel),
        })
    }
}

impl Sink for Otlp {
    async fn send(&mut self, spans: &[Arc<Span>]) -> Result<u64, SendError> {
        let response = self
            .client
            .export(request(spans))
            .await
            .map_err(SendError::Grpc)?
            .into_inner();
        let Some(partial) = response.partial_success else {
            return Ok(0);
        };
        if partial.rejected_spans > 0 || !partial.error_message.is_empty() {
            tracing::warn!(
                rejected = partial.rejected_spans,
                message = %partial.error_message,
                "the OTLP collector refused some spans"
            );
        }
        Ok(u64::try_from(partial.rejected_spans).unwrap_or(0))
    }
}

/// One export request for `spans`: a `ResourceSpans` per (source service,
/// node), in the order each first appears.
pub(super) fn request(spans: &[Arc<Span>]) -> ExportTraceServiceRequest {
    let mut groups: Vec<(Resource, Vec<otlp::Span>)> = Vec::new();
    let mut index: HashMap<(&str, &str, &str), usize> = HashMap::new();
    for span in spans {
        let (namespace, name) = span
            .source
            .as_ref()
            .map_or(("", ""), |s| (s.namespace.as_str(), s.name.as_str()));
        let key = (namespace, name, span.node_id.as_str());
        let i = *index.entry(key).or_insert_with(|| {
            groups.push((resource(namespace, name, &span.node_id), Vec::new()));
            groups.len() - 1
        });
        if let Some((_, group)) = groups.get_mut(i) {
            group.push(to_otlp(span));
        }
    }
    ExportTraceServiceRequest {
        resource_spans: groups
            .into_iter()
            .map(|(resource, spans)| otlp::ResourceSpans {
                resource: Some(resource),
                scope_spans: vec![otlp::ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: SCOPE.to_owned(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// The resource of a source service on a node; empty namespace and node
/// are left out rather than sent as empty strings.
fn resource(namespace: &str, name: &str, node: &str) -> Resource {
    let name = if name.is_empty() { "unknown" } else { name };
    let mut attributes = vec![string_kv("service.name", name)];
    if !namespace.is_empty() {
        attributes.push(string_kv("service.namespace", namespace));
    }
    if !node.is_empty() {
        attributes.push(string_kv("host.name", node));
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

fn to_otlp(span: &Span) -> otlp::Span {
    let mut attributes: Vec<KeyValue> = span.attributes.iter().map(key_value).collect();
    if let Some(target) = span.target.as_ref().filter(|t| !t.name.is_empty()) {
        if !span.attributes.iter().any(|a| a.key == "peer.service") {
            attributes.push(string_kv("peer.service", &target.name));
        }
    }
    let status = if span.error {
        otlp::Status {
            code: StatusCode::Error as i32,
            message: span.status_message.clone(),
        }
    } else {
        otlp::Status::default()
    };
    otlp::Span {
        trace_id: span.trace_id.clone(),
        span_id: span.span_id.clone(),
        trace_state: span.trace_state.clone(),
        parent_span_id: span.parent_span_id.clone(),
        name: span.name.clone(),
        kind: kind(span.kind()) as i32,
        start_time_unix_nano: span.start_unix_nanos,
        end_time_unix_nano: span.end_unix_nanos,
        attributes,
        status: Some(status),
        ..Default::default()
    }
}

/// Spelled out rather than passing the number through, so a kind added to
/// either enum cannot silently mean something else.
fn kind(kind: SpanKind) -> OtlpKind {
    match kind {
        SpanKind::Unspecified => OtlpKind::Unspecified,
        SpanKind::Internal => OtlpKind::Internal,
        SpanKind::Server => OtlpKind::Server,
        SpanKind::Client => OtlpKind::Client,
        SpanKind::Producer => OtlpKind::Producer,
        SpanKind::Consumer => OtlpKind::Consumer,
    }
}

fn key_value(attribute: &Attribute) -> KeyValue {
    use any_value::Value;
    let value = attribute.value.as_ref().map(|v| match v {
        attribute::Value::StringValue(s) => Value::StringValue(s.clone()),
        attribute::Value::IntValue(i) => Value::IntValue(*i),
        attribute::Value::DoubleValue(d) => Value::DoubleValue(*d),
        attribute::Value::BoolValue(b) => Value::BoolValue(*b),
        attribute::Value::Strings(list) => Value::ArrayValue(ArrayValue {
            values: list
                .values
                .iter()
                .map(|s| AnyValue {
                    value: Some(Value::StringValue(s.clone())),
                })
                .collect(),
        }),
    });
    KeyValue {
        key: attribute.key.clone(),
        value: Some(AnyValue { value }),
        ..Default::default()
    }
}

fn string_kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}
