//! Trace context on the wire: W3C `traceparent` / `tracestate`, and B3
//! (single `b3` header or the `X-B3-*` ones) accepted on the way in.
//!
//! The agent always sends W3C `traceparent` on: the caller's `tracestate`
//! travels unchanged with the request's other headers.

use http::{HeaderMap, HeaderValue};

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// The caller's span, as its headers name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// The caller sampled it (W3C flag 01, B3 `1` or `d`).
    pub sampled: bool,
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn unhex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// `N` bytes from exactly `2N` hex digits; `None` when not hex, or all
/// zeros (an invalid id in both W3C and B3).
fn id<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        out[i] = unhex(pair[0])? << 4 | unhex(pair[1])?;
    }
    (out != [0u8; N]).then_some(out)
}

/// Lowercase hex of `bytes` into `out` (twice as long).
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 15)];
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// A W3C `traceparent` value: `version-traceid-parentid-flags`. Versions
/// above 00 are read as 00 (as the spec asks, ignoring what follows);
/// version ff and malformed values are not.
pub fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    if value.len() < 55 || (value.len() > 55 && value[55] != b'-') {
        return None;
    }
    let version = unhex(value[0])? << 4 | unhex(value[1])?;
    if version == 0xff || (version == 0 && value.len() != 55) {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let flags = unhex(value[53])? << 4 | unhex(value[54])?;
    Some(Parent {
        trace_id: id(&value[3..35])?,
        span_id: id(&value[36..52])?,
        sampled: flags & 1 == 1,
    })
}

/// A B3 trace id: 32 hex digits, or 16 (the high half is zeros).
fn b3_trace_id(hex: &[u8]) -> Option<TraceId> {
    match hex.len() {
        32 => id(hex),
        16 => {
            let low: [u8; 8] = id(hex)?;
            let mut t = [0u8; 16];
            t[8..].copy_from_slice(&low);
            Some(t)
        }
        _ => None,
    }
}

fn b3_sampled(flag: &[u8]) -> bool {
    matches!(flag, b"1" | b"d" | b"true")
}

/// B3 single header: `traceid-spanid[-sampled[-parentspanid]]`.
fn parse_b3_single(value: &[u8]) -> Option<Parent> {
    let mut parts = value.split(|c| *c == b'-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = id(parts.next()?)?;
    let sampled = parts.next().is_some_and(b3_sampled);
    Some(Parent {
        trace_id,
        span_id,
        sampled,
    })
}

/// The caller's context: `traceparent` first, then B3. `None` without
/// one (or a malformed one: the agent starts a trace).
pub fn extract(headers: &HeaderMap) -> Option<Parent> {
    if let Some(v) = headers.get("traceparent") {
        return parse_traceparent(v.as_bytes());
    }
    if let Some(v) = headers.get("b3") {
        return parse_b3_single(v.as_bytes());
    }
    let trace = headers.get("x-b3-traceid")?;
    let span = headers.get("x-b3-spanid")?;
    Some(Parent {
        trace_id: b3_trace_id(trace.as_bytes())?,
        span_id: id(span.as_bytes())?,
        sampled: headers
            .get("x-b3-sampled")
            .is_some_and(|v| b3_sampled(v.as_bytes()))
            || headers.get("x-b3-flags").is_some_and(|v| v == "1"),
    })
}

/// `traceparent` for a span of `trace_id` with id `span_id`.
pub fn traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> HeaderValue {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    hex_into(trace_id, &mut out[3..35]);
    hex_into(span_id, &mut out[36..52]);
    if sampled {
        out[54] = b'1';
    }
    match HeaderValue::from_bytes(&out) {
        Ok(v) => v,
        Err(_) => unreachable!("hex digits and dashes are a valid header value"),
    }
}

/// A random, non-zero span id.
pub fn new_span_id() -> SpanId {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A random, non-zero trace id.
pub fn new_trace_id() -> TraceId {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_ignored() {
        let p = parse_traceparent(TP.as_bytes()).expect("valid");
        assert!(p.sampled);
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert_eq!(traceparent(&p.trace_id, &p.span_id, true), TP);
        let unsampled = traceparent(&p.trace_id, &p.span_id, false);
        assert!(
            !parse_traceparent(unsampled.as_bytes())
                .expect("valid")
                .sampled
        );
        // A later version with more fields is read as 00.
        let later = format!("01{}-extra", &TP[2..]);
        assert_eq!(parse_traceparent(later.as_bytes()), Some(p));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn b3_single_and_multi_headers_are_accepted() {
        let mut h = HeaderMap::new();
        h.insert(
            "b3",
            HeaderValue::from_static(
                "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
            ),
        );
        let p = extract(&h).expect("b3");
        assert_eq!(hex(&p.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(hex(&p.span_id), "e457b5a2e4d86bd1");
        assert!(p.sampled);
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", HeaderValue::from_static("a3ce929d0e0e4736"));
        h.insert("x-b3-spanid", HeaderValue::from_static("00f067aa0ba902b7"));
        h.insert("x-b3-sampled", HeaderValue::from_static("0"));
        let p = extract(&h).expect("b3 multi");
        assert_eq!(hex(&p.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert!(!p.sampled);
        // traceparent wins over B3.
        h.insert("traceparent", HeaderValue::from_static(TP));
        assert!(extract(&h).expect("w3c").sampled);
        assert_eq!(extract(&HeaderMap::new()), None);
    }

    #[test]
    fn new_ids_are_not_zero() {
        assert_ne!(new_span_id(), [0; 8]);
        assert_ne!(new_trace_id(), [0; 16]);
        assert_ne!(new_span_id(), new_span_id());
    }
}
