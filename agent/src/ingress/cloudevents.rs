//! CloudEvents over HTTP (spec 1.0, HTTP protocol binding): which mode a
//! request is in, and whether an event carries the required attributes
//! (`specversion` 1.0, `id`, `source`, `type`). A bad event is a
//! [`Rejection`] naming the attribute. Policy rules match an event's `type`
//! and `source`: [`binary_type_and_source`] reads them from the headers,
//! [`type_and_source`] from a parsed event.

use std::borrow::Cow;

use http::{header::CONTENT_TYPE, HeaderMap};
use serde_json::{Map, Value};

use crate::reject::{Reason, Rejection};

/// How a request carries its event(s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Attributes in `ce-*` headers, the data as the body.
    Binary,
    /// One JSON event as the body (`application/cloudevents+json`).
    Structured,
    /// A JSON array of events (`application/cloudevents-batch+json`).
    Batch,
    /// Not a CloudEvent: proxied as it is (gRPC, plain HTTP).
    Plain,
}

/// The mode of a request, from its headers.
pub fn mode(headers: &HeaderMap) -> Mode {
    if let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        let media = ct.split(';').next().unwrap_or("").trim();
        if media.eq_ignore_ascii_case("application/cloudevents-batch+json") {
            return Mode::Batch;
        }
        if media.eq_ignore_ascii_case("application/cloudevents+json") {
            return Mode::Structured;
        }
    }
    if headers.contains_key("ce-specversion") {
        Mode::Binary
    } else {
        Mode::Plain
    }
}

fn bad(detail: String) -> Rejection {
    Rejection::new(Reason::BadEvent, detail)
}

/// Checks one attribute's value, as read from a header or a JSON member.
fn check(name: &str, value: Option<&str>, origin: &str) -> Result<(), Rejection> {
    match value {
        None => Err(bad(format!("{origin}{name} is required"))),
        Some("") => Err(bad(format!("{origin}{name} must not be empty"))),
        Some(v) if name == "specversion" && v != "1.0" => {
            Err(bad(format!("{origin}{name} must be \"1.0\" (got {v:?})")))
        }
        Some(_) => Ok(()),
    }
}

/// The required attributes, in the order they are checked.
const REQUIRED: [&str; 4] = ["specversion", "id", "source", "type"];
/// Their headers in binary mode, in the same order (no formatting per
/// request).
const REQUIRED_HEADERS: [&str; 4] = ["ce-specversion", "ce-id", "ce-source", "ce-type"];

/// A binary-mode event: the required `ce-*` headers.
pub fn check_binary(headers: &HeaderMap) -> Result<(), Rejection> {
    for (name, header) in REQUIRED.into_iter().zip(REQUIRED_HEADERS) {
        let value = match headers.get(header) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| bad(format!("header {header} must be printable ASCII")))?,
            ),
        };
        check(name, value, "header ce-")?;
    }
    Ok(())
}

/// A binary-mode event's `type` and `source` (`ce-type`, `ce-source`),
/// percent-decoded as the HTTP binding says. Borrowed from the headers
/// unless a value holds a `%`. Empty when a header is missing or not
/// printable ASCII (which [`check_binary`] refuses first).
pub fn binary_type_and_source(headers: &HeaderMap) -> (Cow<'_, str>, Cow<'_, str>) {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map_or(Cow::Borrowed(""), percent_decoded)
    };
    (get("ce-type"), get("ce-source"))
}

/// A parsed (structured or batch) event's `type` and `source`; empty when
/// absent or not a string (which [`check_structured`] refuses first).
pub fn type_and_source(event: &Map<String, Value>) -> (&str, &str) {
    let get = |name: &str| event.get(name).and_then(Value::as_str).unwrap_or("");
    (get("type"), get("source"))
}

/// `value` with `%XX` sequences decoded (CloudEvents HTTP binding,
/// 3.1.3.2). A `%` not followed by two hex digits stays as it is; bytes
/// that do not make UTF-8 become U+FFFD.
pub fn percent_decoded(value: &str) -> Cow<'_, str> {
    if !value.contains('%') {
        return Cow::Borrowed(value);
    }
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = (bytes[i] == b'%')
            .then(|| Some((hex(*bytes.get(i + 1)?)?, hex(*bytes.get(i + 2)?)?)))
            .flatten();
        match digits {
            Some((hi, lo)) => {
                // Two hex digits: at most 0xff.
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// A structured event's JSON object.
pub fn check_structured(event: &Map<String, Value>) -> Result<(), Rejection> {
    for name in REQUIRED {
        let value = match event.get(name) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(_) => return Err(bad(format!("attribute {name} must be a string"))),
        };
        check(name, value, "attribute ")?;
    }
    Ok(())
}

/// Parses a structured-mode body.
pub fn parse_structured(body: &[u8]) -> Result<Map<String, Value>, Rejection> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(event)) => {
            check_structured(&event)?;
            Ok(event)
        }
        Ok(_) => Err(bad("a structured event must be a JSON object".into())),
        Err(e) => Err(bad(format!("the event is not valid JSON: {e}"))),
    }
}

/// One entry of a batch: its `id` (whatever it is, `null` when absent),
/// and the event or why it is refused.
pub type BatchEntry = (Value, Result<Map<String, Value>, Rejection>);

/// Parses a batch body into its events, each checked on its own: a bad
/// event does not fail the batch.
pub fn parse_batch(body: &[u8]) -> Result<Vec<BatchEntry>, Rejection> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(events)) => Ok(events
            .into_iter()
            .map(|v| match v {
                Value::Object(event) => (
                    event.get("id").cloned().unwrap_or(Value::Null),
                    check_structured(&event).map(|()| event),
                ),
                _ => (
                    Value::Null,
                    Err(bad("a batch entry must be a JSON object".into())),
                ),
            })
            .collect()),
        Ok(_) => Err(bad("a batch must be a JSON array of events".into())),
        Err(e) => Err(bad(format!("the batch is not valid JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        crate::ingress::test_headers(pairs)
    }

    #[test]
    fn modes_come_from_content_type_then_ce_headers() {
        assert_eq!(
            mode(&headers(&[(
                "content-type",
                "application/cloudevents+json; charset=utf-8"
            )])),
            Mode::Structured
        );
        assert_eq!(
            mode(&headers(&[(
                "content-type",
                "application/cloudevents-batch+json"
            )])),
            Mode::Batch
        );
        assert_eq!(
            mode(&headers(&[
                ("content-type", "application/json"),
                ("ce-specversion", "1.0")
            ])),
            Mode::Binary
        );
        assert_eq!(
            mode(&headers(&[("content-type", "application/grpc")])),
            Mode::Plain
        );
    }

    #[test]
    fn binary_events_name_the_missing_or_bad_attribute() {
        let ok = [
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
        ];
        assert!(check_binary(&headers(&ok)).is_ok());
        let e = check_binary(&headers(&ok[..3])).expect_err("no type");
        assert_eq!(e.reason, Reason::BadEvent);
        assert_eq!(e.detail, "header ce-type is required");
        let e = check_binary(&headers(&[
            ("ce-specversion", "0.3"),
            ("ce-id", "1"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
        ]))
        .expect_err("old version");
        assert!(
            e.detail.contains("specversion must be \"1.0\""),
            "{}",
            e.detail
        );
    }

    #[test]
    fn structured_events_are_checked_member_by_member() {
        let ok = br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"x":1}}"#;
        assert!(parse_structured(ok).is_ok());
        let e = parse_structured(br#"{"specversion":"1.0","id":"1","type":"t"}"#)
            .expect_err("no source");
        assert_eq!(e.detail, "attribute source is required");
        let e = parse_structured(br#"{"specversion":"1.0","id":7,"source":"/s","type":"t"}"#)
            .expect_err("id");
        assert_eq!(e.detail, "attribute id must be a string");
        assert!(parse_structured(b"[1]").is_err());
        assert!(parse_structured(b"{")
            .expect_err("json")
            .detail
            .contains("not valid JSON"));
    }

    #[test]
    fn type_and_source_come_from_headers_decoded_or_from_the_event() {
        let h = headers(&[
            ("ce-type", "com.example.heavy.job"),
            ("ce-source", "/shop%20cart/%C3%BC%2"),
        ]);
        let (t, s) = binary_type_and_source(&h);
        assert!(matches!(t, Cow::Borrowed("com.example.heavy.job")), "{t:?}");
        assert_eq!(s, "/shop cart/ü%2", "decoded; a short escape kept");
        assert_eq!(
            binary_type_and_source(&headers(&[])),
            ("".into(), "".into())
        );

        let event = parse_structured(br#"{"specversion":"1.0","id":"1","source":"/s","type":"t"}"#)
            .expect("good");
        assert_eq!(type_and_source(&event), ("t", "/s"));
    }

    #[test]
    fn a_batch_reports_each_event_on_its_own() {
        let body = br#"[{"specversion":"1.0","id":"1","source":"/s","type":"t"},
                        {"specversion":"1.0","id":"2","source":"/s"},
                        5]"#;
        let events = parse_batch(body).expect("an array");
        assert_eq!(events.len(), 3);
        assert!(events[0].1.is_ok());
        assert_eq!(events[1].0, "2", "a refused event keeps its id");
        assert_eq!(
            events[1].1.as_ref().expect_err("no type").detail,
            "attribute type is required"
        );
        assert!(events[2].1.is_err());
        assert!(parse_batch(b"{}").is_err());
    }
}
