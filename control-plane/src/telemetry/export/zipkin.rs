//! Zipkin v2: a JSON array of spans, POSTed to `/api/v2/spans`.
//!
//! Mapping: ids as lowercase hex (`traceId` 32 digits, `id` and `parentId`
//! 16; no `parentId` on a root); `kind` CLIENT, SERVER, PRODUCER or
//! CONSUMER, none for internal or unspecified spans (Zipkin has no
//! "internal"); `timestamp` and `duration` in microseconds, the duration
//! at least 1 (Zipkin reads 0 as "unknown"); `localEndpoint` the source
//! service (`unknown` when the agent could not name it), `remoteEndpoint`
//! the target service when there is one. Every attribute becomes a string
//! tag (a string list joined with commas), and an error adds the `error`
//! tag, Zipkin's marker of a failed span, with the status message (or
//! `true` when there is none).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Bytes, header, Request, Uri};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde::Serialize;
use weir_proto::telemetry::v1::{attribute, Span, SpanKind};

use super::{http_uri, EndpointError, SendError, Sink};

/// How much of an answer's body is read: enough for an error message.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// How much of an error answer goes into the log.
const MAX_ERROR_CHARS: usize = 200;

/// A Zipkin exporter: an HTTP/1 client with a connection pool.
#[derive(Debug)]
pub(super) struct Zipkin {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
}

impl Zipkin {
    /// A client for `endpoint` (`http://host:port/api/v2/spans`); `timeout`
    /// bounds the TCP connect.
    pub(super) fn new(endpoint: &str, timeout: Duration) -> Result<Self, EndpointError> {
        let uri = http_uri(endpoint)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self { client, uri })
    }
}

impl Sink for Zipkin {
    async fn send(&mut self, spans: &[Arc<Span>]) -> Result<u64, SendError> {
        let body: Vec<ZipkinSpan<'_>> = spans.iter().map(|s| ZipkinSpan::from(&**s)).collect();
        let body = serde_json::to_vec(&body).map_err(SendError::Json)?;
        let request = Request::post(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(SendError::Request)?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(SendError::Http)?;
        let status = response.status();
        // Read the (small) answer so the connection goes back to the pool;
        // an unreadable one only costs that connection.
        let answer = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if status.is_success() {
            return Ok(0);
        }
        Err(SendError::HttpStatus {
            status,
            body: String::from_utf8_lossy(&answer)
                .chars()
                .take(MAX_ERROR_CHARS)
                .collect(),
        })
    }
}

/// A span in Zipkin's v2 JSON model.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ZipkinSpan<'a> {
    trace_id: String,
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<String>,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    /// Left out when the agent gave no start time, rather than claiming
    /// the span ran in 1970.
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration: Option<u64>,
    local_endpoint: Endpoint<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote_endpoint: Option<Endpoint<'a>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    tags: BTreeMap<&'a str, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint<'a> {
    service_name: &'a str,
}

impl<'a> From<&'a Span> for ZipkinSpan<'a> {
    fn from(span: &'a Span) -> Self {
        let source = span
            .source
            .as_ref()
            .map(|s| s.name.as_str())
            .filter(|n| !n.is_empty())
            .unwrap_or("unknown");
        let target = span
            .target
            .as_ref()
            .map(|t| t.name.as_str())
            .filter(|n| !n.is_empty());
        let mut tags: BTreeMap<&str, String> = span
            .attributes
            .iter()
            .filter_map(|a| Some((a.key.as_str(), tag(a.value.as_ref()?))))
            .collect();
        if span.error {
            let message = if span.status_message.is_empty() {
                "true".to_owned()
            } else {
                span.status_message.clone()
            };
            tags.insert("error", message);
        }
        let timestamp = (span.start_unix_nanos > 0).then_some(span.start_unix_nanos / 1000);
        let duration = timestamp
            .map(|_| (span.end_unix_nanos.saturating_sub(span.start_unix_nanos) / 1000).max(1));
        Self {
            trace_id: hex(&span.trace_id),
            id: hex(&span.span_id),
            parent_id: (!span.parent_span_id.is_empty()).then(|| hex(&span.parent_span_id)),
            name: &span.name,
            kind: kind(span.kind()),
            timestamp,
            duration,
            local_endpoint: Endpoint {
                service_name: source,
            },
            remote_endpoint: target.map(|service_name| Endpoint { service_name }),
            tags,
        }
    }
}

fn kind(kind: SpanKind) -> Option<&'static str> {
    match kind {
        SpanKind::Client => Some("CLIENT"),
        SpanKind::Server => Some("SERVER"),
        SpanKind::Producer => Some("PRODUCER"),
        SpanKind::Consumer => Some("CONSUMER"),
        SpanKind::Internal | SpanKind::Unspecified => None,
    }
}

/// Zipkin tags are strings only.
fn tag(value: &attribute::Value) -> String {
    match value {
        attribute::Value::StringValue(s) => s.clone(),
        attribute::Value::IntValue(i) => i.to_string(),
        attribute::Value::DoubleValue(d) => d.to_string(),
        attribute::Value::BoolValue(b) => b.to_string(),
        attribute::Value::Strings(list) => list.values.join(","),
    }
}

/// Lowercase hex, as Zipkin requires.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}
