//! A CloudEvent published over HTTP as the outbox keeps it: the protobuf
//! `io.cloudevents.v1.CloudEvent`, from binary mode ([`from_binary`]) or
//! from a structured (or batch) event's JSON ([`from_structured`]). The
//! outbox delivers it with `Publisher`'s conversions back to binary mode
//! or to `Subscriber/Deliver`, so an event goes out as it came in:
//! - binary mode: every `ce-` header but the four required ones is an
//!   extension or optional attribute, kept as a string (percent-decoded,
//!   as the HTTP binding says); `Content-Type` is `datacontenttype`; the
//!   body is the data, as bytes;
//! - structured mode: strings stay strings, `true`/`false` are booleans,
//!   integers that fit 32 bits are integers (the CloudEvents type system),
//!   anything else is kept as its JSON text; `data` is kept as JSON text
//!   (a string as it is), `data_base64` as the bytes it encodes.
//!
//! Checks are the ingress's ([`cloudevents::check_binary`],
//! [`cloudevents::check_structured`]): a bad event is a `bad-event`
//! rejection naming the attribute.

use std::collections::HashMap;

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap};
use serde_json::{Map, Value};
use weir_proto::cloudevents::v1::{
    cloud_event::{cloud_event_attribute_value::Attr, CloudEventAttributeValue, Data},
    CloudEvent,
};

use crate::{
    ingress::cloudevents,
    reject::{Reason, Rejection},
};

fn string(value: String) -> CloudEventAttributeValue {
    CloudEventAttributeValue {
        attr: Some(Attr::CeString(value)),
    }
}

fn bad(detail: String) -> Rejection {
    Rejection::new(Reason::BadEvent, detail)
}

/// The event of a binary-mode request: its `ce-` headers and body.
pub fn from_binary(headers: &HeaderMap, body: Bytes) -> Result<CloudEvent, Rejection> {
    cloudevents::check_binary(headers)?;
    let mut event = CloudEvent::default();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let text = value
            .to_str()
            .map_err(|_| bad(format!("header {name} must be printable ASCII")))?;
        let text = cloudevents::percent_decoded(text).into_owned();
        match attribute {
            "id" => event.id = text,
            "source" => event.source = text,
            "specversion" => event.spec_version = text,
            "type" => event.r#type = text,
            "" => return Err(bad("a header named \"ce-\" names no attribute".into())),
            other => {
                event.attributes.insert(other.to_owned(), string(text));
            }
        }
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct
            .to_str()
            .map_err(|_| bad("header content-type must be printable ASCII".into()))?;
        event
            .attributes
            .insert("datacontenttype".into(), string(ct.to_owned()));
    }
    if !body.is_empty() {
        event.data = Some(Data::BinaryData(body));
    }
    Ok(event)
}

/// The event of a structured request (or one event of a batch).
pub fn from_structured(json: &Map<String, Value>) -> Result<CloudEvent, Rejection> {
    cloudevents::check_structured(json)?;
    let text = |name: &str| -> String {
        json.get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let mut attributes = HashMap::new();
    let mut data = None;
    for (name, value) in json {
        match name.as_str() {
            "id" | "source" | "specversion" | "type" => {}
            "data" => {
                data = Some(Data::TextData(match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                }));
            }
            "data_base64" => {
                let encoded = value
                    .as_str()
                    .ok_or_else(|| bad("data_base64 must be a string".into()))?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|e| bad(format!("data_base64 is not base64: {e}")))?;
                data = Some(Data::BinaryData(Bytes::from(bytes)));
            }
            _ => {
                let attr = match value {
                    Value::Null => continue,
                    Value::String(s) => Attr::CeString(s.clone()),
                    Value::Bool(b) => Attr::CeBoolean(*b),
                    Value::Number(n) => match n.as_i64().and_then(|i| i32::try_from(i).ok()) {
                        Some(i) => Attr::CeInteger(i),
                        None => Attr::CeString(n.to_string()),
                    },
                    other => Attr::CeString(other.to_string()),
                };
                attributes.insert(name.clone(), CloudEventAttributeValue { attr: Some(attr) });
            }
        }
    }
    Ok(CloudEvent {
        id: text("id"),
        source: text("source"),
        spec_version: text("specversion"),
        r#type: text("type"),
        attributes,
        data,
    })
}

/// The value of attribute `name` as a string, if it is one (a partition
/// key, a subject).
pub fn attribute<'e>(event: &'e CloudEvent, name: &str) -> Option<&'e str> {
    match event.attributes.get(name)?.attr.as_ref()? {
        Attr::CeString(s) | Attr::CeUri(s) | Attr::CeUriRef(s) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::ingress::publisher::binary_request;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        crate::ingress::test_headers(pairs)
    }

    #[test]
    fn binary_mode_round_trips_through_publishers_conversion() {
        let h = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "o-1"),
            ("ce-source", "/shop"),
            ("ce-type", "com.shop.order.created"),
            ("ce-subject", "order%207"),
            ("ce-partitionkey", "customer-9"),
            ("content-type", "application/json"),
            ("x-other", "not an attribute"),
        ]);
        let body = Bytes::from_static(br#"{"total":12}"#);
        let event = from_binary(&h, body.clone()).expect("an event");
        assert_eq!(
            (
                event.id.as_str(),
                event.source.as_str(),
                event.r#type.as_str()
            ),
            ("o-1", "/shop", "com.shop.order.created")
        );
        assert_eq!(attribute(&event, "subject"), Some("order 7"), "decoded");
        assert_eq!(attribute(&event, "partitionkey"), Some("customer-9"));
        assert_eq!(
            attribute(&event, "datacontenttype"),
            Some("application/json")
        );
        assert_eq!(event.attributes.len(), 3);
        assert_eq!(event.data, Some(Data::BinaryData(body.clone())));
        // What a subscriber gets back: the same headers and body.
        let (out, out_body) = binary_request(event).expect("converts");
        assert_eq!(out_body, body);
        for name in [
            "ce-id",
            "ce-source",
            "ce-type",
            "ce-partitionkey",
            "content-type",
        ] {
            assert_eq!(out.get(name), h.get(name), "{name}");
        }
        assert_eq!(out["ce-subject"], "order%207", "encoded again");
    }

    #[test]
    fn structured_mode_keeps_types_and_data() {
        let json = cloudevents::parse_structured(
            br#"{"specversion":"1.0","id":"s-1","source":"/s","type":"t",
                 "subject":"x","urgent":true,"priority":-3,"big":12345678901,
                 "tags":["a"],"data":{"total":12},"datacontenttype":"application/json"}"#,
        )
        .expect("parses");
        let event = from_structured(&json).expect("an event");
        assert_eq!(event.id, "s-1");
        let attr = |n: &str| event.attributes[n].attr.clone();
        assert_eq!(attr("urgent"), Some(Attr::CeBoolean(true)));
        assert_eq!(attr("priority"), Some(Attr::CeInteger(-3)));
        assert_eq!(attr("big"), Some(Attr::CeString("12345678901".into())));
        assert_eq!(attr("tags"), Some(Attr::CeString(r#"["a"]"#.into())));
        assert_eq!(event.data, Some(Data::TextData(r#"{"total":12}"#.into())));
        let b64 = cloudevents::parse_structured(
            br#"{"specversion":"1.0","id":"s-2","source":"/s","type":"t","data_base64":"AP9oaQ=="}"#,
        )
        .expect("parses");
        let event = from_structured(&b64).expect("an event");
        assert_eq!(
            event.data,
            Some(Data::BinaryData(Bytes::from_static(b"\x00\xffhi")))
        );
    }

    #[test]
    fn bad_events_name_what_is_wrong() {
        let missing = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "/s"),
        ]);
        let e = from_binary(&missing, Bytes::new()).expect_err("no type");
        assert_eq!(e.reason, Reason::BadEvent);
        assert!(e.detail.contains("type"), "{e}");
        let json = cloudevents::parse_structured(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"%%%"}"#,
        )
        .expect("parses");
        let e = from_structured(&json).expect_err("bad base64");
        assert!(e.detail.contains("data_base64"), "{e}");
    }
}
