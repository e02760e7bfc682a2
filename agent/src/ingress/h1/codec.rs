//! HTTP/1.1 on the wire, client side: a request head written into a
//! buffer, a response head parsed out of one (httparse), and the response
//! body's framing: a length, chunked, or until the connection closes
//! (RFC 9112 6.3). Pure functions over buffers; the connection handling
//! is in the parent module.

use std::{io::Write as _, mem::MaybeUninit};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};

/// The most header fields a response head may have (hyper's default too).
const MAX_HEADERS: usize = 100;
/// The longest response head, and the longest chunk-size line.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_CHUNK_LINE: usize = 1024;

/// What an instance sent that is not HTTP/1.1 we can relay.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("bad response head: {0}")]
    Head(&'static str),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    #[error("bad content-length")]
    ContentLength,
    #[error("bad chunked encoding: {0}")]
    Chunked(&'static str),
    #[error("the instance switched protocols (101), which the agent does not relay")]
    Upgrade,
}

/// How a request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// `content-length: n`; 0 is written only when `explicit_zero`.
    Length { n: u64, explicit_zero: bool },
    /// `transfer-encoding: chunked`.
    Chunked,
}

/// Appends `method path HTTP/1.1`, `headers` (but its framing fields) and
/// the framing field, then the blank line.
pub fn encode_request_head(
    buf: &mut Vec<u8>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    framing: RequestFraming,
) {
    buf.extend_from_slice(method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(path.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        // Our framing replaces the caller's; fields of the caller's
        // connection stay with it (the names its Connection field lists
        // were removed before, see `forward`).
        if name == header::CONTENT_LENGTH || hop_by_hop(name) {
            continue;
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::Length {
            n: 0,
            explicit_zero: false,
        } => {}
        RequestFraming::Length { n, .. } => {
            // Writing into a Vec cannot fail.
            let _ = write!(buf, "content-length: {n}\r\n");
        }
        RequestFraming::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    buf.extend_from_slice(b"\r\n");
}

/// A field that belongs to one connection (RFC 9110 7.6.1), `te` included
/// (HTTP/1.1 instances get no trailers from the agent's requests).
pub fn hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::TE
        || name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Removes from `headers` the fields the Connection fields name.
fn strip_listed(head: &[u8], ranges: &[[u32; 4]], headers: &mut HeaderMap) {
    for &[n0, n1, v0, v1] in ranges {
        if !head[n0 as usize..n1 as usize].eq_ignore_ascii_case(b"connection") {
            continue;
        }
        for token in head[v0 as usize..v1 as usize].split(|b| *b == b',') {
            if let Ok(name) = HeaderName::from_bytes(token.trim_ascii()) {
                headers.remove(name);
            }
        }
    }
}

/// Appends one chunk's size line (the data and its CRLF follow).
pub fn encode_chunk_size(buf: &mut Vec<u8>, len: usize) {
    let _ = write!(buf, "{len:x}\r\n");
}

/// Appends the last chunk and the trailer section.
pub fn encode_last_chunk(buf: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    buf.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
}

/// How the response body ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseFraming {
    /// `n` bytes (0: no body).
    Length(u64),
    Chunked(Chunked),
    /// Until the instance closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: ResponseFraming,
    /// The connection may carry another request once the body is read.
    pub keep_alive: bool,
}

/// Parses a final response head off the front of `buf`, skipping interim
/// (1xx) ones. `None`: the head is not complete yet.
pub fn parse_response_head(
    buf: &mut BytesMut,
    request_method: &Method,
) -> Result<Option<ResponseHead>, ProtocolError> {
    loop {
        let Some(head) = parse_one(buf, request_method)? else {
            return Ok(None);
        };
        match head.status.as_u16() {
            101 => return Err(ProtocolError::Upgrade),
            100..=199 => continue,
            _ => return Ok(Some(head)),
        }
    }
}

fn parse_one(buf: &mut BytesMut, method: &Method) -> Result<Option<ResponseHead>, ProtocolError> {
    // Byte ranges of each field in `buf`, taken while httparse borrows it.
    // (A head is at most MAX_HEAD_BYTES, far below u32::MAX.)
    let mut ranges = [[0u32; 4]; MAX_HEADERS];
    let (len, code, minor, count) = {
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(ProtocolError::HeadTooLarge)
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ProtocolError::Head("too many fields"))
            }
            Err(_) => return Err(ProtocolError::Head("not HTTP/1.x")),
        };
        let base = buf.as_ptr() as usize;
        let count = response.headers.len();
        for (range, field) in ranges.iter_mut().zip(response.headers.iter()) {
            let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
            let (name, value) = (at(field.name.as_bytes()), at(field.value));
            *range = [
                name,
                name + field.name.len() as u32,
                value,
                value + field.value.len() as u32,
            ];
        }
        let code = response.code.ok_or(ProtocolError::Head("no status"))?;
        let minor = response.version.ok_or(ProtocolError::Head("no version"))?;
        (len, code, minor, count)
    };
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| ProtocolError::Head("bad status"))?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(count);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut encoded = false;
    let mut close = minor == 0;
    // Names the Connection field lists beyond close/keep-alive (rare).
    let mut listed = false;
    for &[n0, n1, v0, v1] in &ranges[..count] {
        let name = HeaderName::from_bytes(&head[n0 as usize..n1 as usize])
            .map_err(|_| ProtocolError::Head("bad field name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0 as usize..v1 as usize))
            .map_err(|_| ProtocolError::Head("bad field value"))?;
        if name == header::CONTENT_LENGTH {
            let n = parse_length(value.as_bytes())?;
            if length.is_some_and(|l| l != n) {
                return Err(ProtocolError::ContentLength);
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            encoded = true;
            // Only the last coding decides (RFC 9112 6.3).
            chunked = value
                .as_bytes()
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    close &= minor != 0;
                } else if !token.is_empty() {
                    listed = true;
                }
            }
        }
        // The fields of this connection stay here (RFC 9110 7.6.1);
        // content-length stays: the body is relayed as it is.
        if !hop_by_hop(&name) {
            headers.append(name, value);
        }
    }
    if listed {
        strip_listed(&head, &ranges[..count], &mut headers);
    }
    let bodyless = method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodyless {
        ResponseFraming::Length(0)
    } else if encoded {
        if chunked {
            ResponseFraming::Chunked(Chunked::default())
        } else {
            ResponseFraming::Close
        }
    } else {
        match length {
            Some(n) => ResponseFraming::Length(n),
            None => ResponseFraming::Close,
        }
    };
    let keep_alive = !close && framing != ResponseFraming::Close;
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

fn parse_length(v: &[u8]) -> Result<u64, ProtocolError> {
    // A list of equal values is allowed (RFC 9110 8.6).
    let mut found: Option<u64> = None;
    for part in v.split(|b| *b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return Err(ProtocolError::ContentLength);
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        if found.is_some_and(|f| f != n) {
            return Err(ProtocolError::ContentLength);
        }
        found = Some(n);
    }
    found.ok_or(ProtocolError::ContentLength)
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// `n` bytes of chunk data left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then a blank line.
    Trailers,
    Done,
}

/// What the decoder took from the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The body ended, with these trailer fields (often none).
    End(Option<HeaderMap>),
    /// The buffer holds no complete next piece.
    NeedMore,
}

impl Chunked {
    /// Takes the next piece of the body off the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        loop {
            match self {
                Chunked::Size => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    // Chunk extensions (after ';') are ignored.
                    let digits = line[..]
                        .split(|b| *b == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    if digits.is_empty() || digits.len() > 15 {
                        return Err(ProtocolError::Chunked("bad chunk size"));
                    }
                    let mut n = 0u64;
                    for d in digits {
                        let v = (*d as char)
                            .to_digit(16)
                            .ok_or(ProtocolError::Chunked("bad chunk size"))?;
                        n = n * 16 + u64::from(v);
                    }
                    *self = if n == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(n)
                    };
                }
                Chunked::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Chunked::DataEnd;
                    }
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                Chunked::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ProtocolError::Chunked("no CRLF after chunk data"));
                    }
                    buf.advance(2);
                    *self = Chunked::Size;
                }
                Chunked::Trailers => {
                    // A blank line at once: no trailers (the usual case).
                    if buf.len() >= 2 && &buf[..2] == b"\r\n" {
                        buf.advance(2);
                        *self = Chunked::Done;
                        return Ok(Decoded::End(None));
                    }
                    let mut fields = [httparse::EMPTY_HEADER; 32];
                    let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut map = HeaderMap::with_capacity(fields.len());
                            for f in fields.iter() {
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| ProtocolError::Chunked("bad trailer name"))?;
                                let value = HeaderValue::from_bytes(f.value)
                                    .map_err(|_| ProtocolError::Chunked("bad trailer value"))?;
                                map.append(name, value);
                            }
                            (len, map)
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                            return Err(ProtocolError::Chunked("trailers too large"))
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                        Err(_) => return Err(ProtocolError::Chunked("bad trailers")),
                    };
                    buf.advance(len);
                    *self = Chunked::Done;
                    return Ok(Decoded::End(Some(trailers)));
                }
                Chunked::Done => return Ok(Decoded::End(None)),
            }
        }
    }
}

/// Takes one CRLF-terminated line (without the CRLF) off `buf`.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, ProtocolError> {
    match buf.iter().position(|b| *b == b'\n') {
        Some(i) if i > 0 && buf[i - 1] == b'\r' => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i - 1);
            Ok(Some(line))
        }
        Some(_) => Err(ProtocolError::Chunked("bare LF")),
        None if buf.len() > max => Err(ProtocolError::Chunked("chunk-size line too long")),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str, method: &Method) -> Result<Option<ResponseHead>, ProtocolError> {
        let mut buf = BytesMut::from(text);
        parse_response_head(&mut buf, method)
    }

    #[test]
    fn the_request_head_carries_our_framing_only() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("orders"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        headers.insert("ce-id", HeaderValue::from_static("7"));
        let mut buf = Vec::new();
        encode_request_head(
            &mut buf,
            &Method::POST,
            "/a?b=1",
            &headers,
            RequestFraming::Length {
                n: 5,
                explicit_zero: false,
            },
        );
        assert_eq!(
            String::from_utf8(buf).expect("ascii"),
            "POST /a?b=1 HTTP/1.1\r\nhost: orders\r\nce-id: 7\r\ncontent-length: 5\r\n\r\n"
        );

        let mut buf = Vec::new();
        encode_request_head(
            &mut buf,
            &Method::GET,
            "/",
            &HeaderMap::new(),
            RequestFraming::Length {
                n: 0,
                explicit_zero: false,
            },
        );
        assert_eq!(buf, b"GET / HTTP/1.1\r\n\r\n");

        let mut buf = Vec::new();
        encode_request_head(
            &mut buf,
            &Method::POST,
            "/",
            &HeaderMap::new(),
            RequestFraming::Chunked,
        );
        assert_eq!(
            buf,
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn a_head_parses_with_its_framing() {
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\nabc",
            &Method::POST,
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.framing, ResponseFraming::Length(3));
        assert!(h.keep_alive);
        assert_eq!(h.headers["x-a"], "b");

        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            &Method::GET,
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(h.framing, ResponseFraming::Chunked(Chunked::Size));

        // No length: until close, and the connection is not reused.
        let h = head("HTTP/1.1 200 OK\r\n\r\n", &Method::GET)
            .expect("valid")
            .expect("complete");
        assert_eq!(h.framing, ResponseFraming::Close);
        assert!(!h.keep_alive);

        // HEAD and 204 have no body whatever the length says.
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
            &Method::HEAD,
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(h.framing, ResponseFraming::Length(0));
        let h = head("HTTP/1.1 204 No Content\r\n\r\n", &Method::POST)
            .expect("valid")
            .expect("complete");
        assert_eq!(h.framing, ResponseFraming::Length(0));
        assert!(h.keep_alive);

        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            &Method::GET,
        )
        .expect("valid")
        .expect("complete");
        assert!(!h.keep_alive);
        let h = head(
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n",
            &Method::GET,
        )
        .expect("valid")
        .expect("complete");
        assert!(h.keep_alive);
    }

    #[test]
    fn fields_of_one_connection_stay_on_it_both_ways() {
        let h = head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nKeep-Alive: timeout=5\r\n\
             X-Private: 1\r\nUpgrade: h2c\r\nContent-Length: 0\r\nX-Kept: 2\r\n\r\n",
            &Method::GET,
        )
        .expect("valid")
        .expect("complete");
        let mut names: Vec<_> = h.headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-kept"]);
        assert!(h.keep_alive);

        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("x-kept", "1"),
        ] {
            headers.insert(k, HeaderValue::from_static(v));
        }
        let mut buf = Vec::new();
        encode_request_head(
            &mut buf,
            &Method::GET,
            "/",
            &headers,
            RequestFraming::Length {
                n: 0,
                explicit_zero: false,
            },
        );
        assert_eq!(buf, b"GET / HTTP/1.1\r\nx-kept: 1\r\n\r\n");
    }

    #[test]
    fn interim_responses_are_skipped_and_partial_heads_wait() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        );
        let h = parse_response_head(&mut buf, &Method::POST)
            .expect("valid")
            .expect("complete");
        assert_eq!(h.status, StatusCode::CREATED);
        assert!(buf.is_empty());

        assert!(head("HTTP/1.1 200 OK\r\nContent-Le", &Method::GET)
            .expect("valid")
            .is_none());
    }

    #[test]
    fn bad_heads_are_errors() {
        assert_eq!(
            head("SSH-2.0-OpenSSH\r\n\r\n", &Method::GET).err(),
            Some(ProtocolError::Head("not HTTP/1.x"))
        );
        assert_eq!(
            head(
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                &Method::GET
            )
            .err(),
            Some(ProtocolError::ContentLength)
        );
        assert_eq!(
            head(
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                &Method::GET
            )
            .err(),
            Some(ProtocolError::ContentLength)
        );
        assert_eq!(
            head("HTTP/1.1 101 Switching Protocols\r\n\r\n", &Method::GET).err(),
            Some(ProtocolError::Upgrade)
        );
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD_BYTES + 1));
        assert_eq!(
            head(&huge, &Method::GET).err(),
            Some(ProtocolError::HeadTooLarge)
        );
        // Equal repeated lengths are one length.
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\n",
            &Method::GET,
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(h.framing, ResponseFraming::Length(2));
    }

    fn decode_all(input: &[&str]) -> Result<(Vec<u8>, Option<HeaderMap>), ProtocolError> {
        let mut state = Chunked::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut pieces = input.iter();
        loop {
            match state.decode(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::End(t) => return Ok((out, t)),
                Decoded::NeedMore => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p.as_bytes()),
                    None => return Err(ProtocolError::Chunked("test input ended")),
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let whole = "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        for split in 1..whole.len() {
            let (a, b) = whole.split_at(split);
            let (data, trailers) = decode_all(&[a, b]).expect("valid");
            assert_eq!(data, b"hello world", "split at {split}");
            assert!(trailers.is_none());
        }
        let (data, trailers) =
            decode_all(&["A\r\n0123456789\r\n0\r\ngrpc-status: 0\r\n\r\n"]).expect("valid");
        assert_eq!(data, b"0123456789");
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
    }

    #[test]
    fn bad_chunked_bodies_are_errors() {
        assert!(decode_all(&["zz\r\n"]).is_err());
        assert!(decode_all(&["3\r\nabcX\r\n"]).is_err());
        assert!(decode_all(&["3\nabc"]).is_err());
        assert!(decode_all(&[&"1".repeat(2000)]).is_err());
        assert!(decode_all(&["ffffffffffffffff\r\n"]).is_err());
    }
}
