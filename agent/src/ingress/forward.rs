//! Sending a request to an instance: pooled connections (HTTP/1.1 for
//! HTTP endpoints, HTTP/2 for gRPC ones), hop-by-hop headers removed both
//! ways, bodies streamed.

use std::time::Duration;

use http::{
    header::{self, HeaderName},
    uri::{PathAndQuery, Scheme},
    HeaderMap, HeaderValue, Request, Response, Uri, Version,
};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};

use super::h1::{H1Error, H1Pool};
use crate::{
    balance::{Endpoint, Protocol},
    body::Body,
    reject::{Reason, Rejection},
    retry::Class,
};

/// An attempt that got no answer: how it failed (`None`: not the
/// instance's doing, such as the caller's body breaking off, so neither
/// retried nor held against the instance), and the agent's answer if it
/// is the last.
#[derive(Debug)]
pub struct Failed {
    pub class: Option<Class>,
    pub rejection: Rejection,
}

impl From<Failed> for Rejection {
    fn from(f: Failed) -> Self {
        f.rejection
    }
}

impl From<Rejection> for Failed {
    fn from(rejection: Rejection) -> Self {
        Self {
            class: None,
            rejection,
        }
    }
}

/// How an HTTP/1.1 exchange failed.
fn h1_class(e: &H1Error) -> Option<Class> {
    match e {
        H1Error::Connect(..) | H1Error::ConnectTimeout(_) => Some(Class::ConnectFailure),
        H1Error::Write(_)
        | H1Error::Read(_)
        | H1Error::Closed
        | H1Error::Truncated
        | H1Error::Protocol(_) => Some(Class::Reset),
        H1Error::RequestBody(_) | H1Error::BodyTooLong => None,
    }
}

/// How an HTTP/2 exchange failed: no connection, or a broken one.
fn h2_class(e: &hyper_util::client::legacy::Error) -> Option<Class> {
    if e.is_connect() {
        return Some(Class::ConnectFailure);
    }
    // The caller's own body breaking off is not the instance's doing.
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<crate::body::BodyError>() {
            return None;
        }
        source = s.source();
    }
    Some(Class::Reset)
}

/// Connection pools to instances (one set per ingress worker).
#[derive(Debug, Clone)]
pub struct Upstreams {
    http1: std::sync::Arc<H1Pool>,
    h2: Client<HttpConnector, Body>,
}

fn connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    // Small requests must not wait for Nagle.
    c.set_nodelay(true);
    c.set_connect_timeout(Some(Duration::from_secs(2)));
    c.enforce_http(true);
    c
}

impl Default for Upstreams {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstreams {
    pub fn new() -> Self {
        let http1 = std::sync::Arc::default();
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector());
        Self { http1, h2 }
    }

    /// Sends `request` to `endpoint`, with its path replaced by `rewrite`
    /// when given. `grpc`: the caller speaks gRPC (HTTP/2 either way).
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        mut request: Request<Body>,
        rewrite: Option<PathAndQuery>,
        grpc: bool,
    ) -> Result<Response<Body>, Failed> {
        let h2 = grpc || endpoint.protocol == Protocol::Grpc;
        let path = match rewrite {
            Some(p) => p,
            None => request
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        };
        if h2 {
            strip_hop_by_hop(request.headers_mut(), grpc);
        } else if request.headers().contains_key(header::CONNECTION) {
            // The HTTP/1.1 client leaves out the fixed hop-by-hop fields
            // as it writes the head; the ones Connection names go here.
            strip_hop_by_hop(request.headers_mut(), false);
        }
        let response: Result<Response<Body>, (Option<Class>, String)> = if h2 {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(endpoint.authority.clone());
            parts.path_and_query = Some(path);
            *request.uri_mut() = Uri::from_parts(parts).map_err(|e| {
                Rejection::new(
                    Reason::UpstreamUnavailable,
                    format!("bad upstream address: {e}"),
                )
            })?;
            *request.version_mut() = Version::HTTP_2;
            // The authority travels as :authority.
            request.headers_mut().remove(header::HOST);
            self.h2
                .request(request)
                .await
                .map(|r| r.map(Body::Stream))
                .map_err(|e| (h2_class(&e), e.to_string()))
        } else {
            // Origin-form on a connection of our own; the caller's Host
            // stays (the instance may route on it), else the instance's.
            *request.uri_mut() = Uri::from(path);
            *request.version_mut() = Version::HTTP_11;
            if !request.headers().contains_key(header::HOST) {
                if let Ok(host) = HeaderValue::from_str(endpoint.authority.as_str()) {
                    request.headers_mut().insert(header::HOST, host);
                }
            }
            self.http1
                .send(&endpoint.authority, request)
                .await
                .map_err(|e| (h1_class(&e), e.to_string()))
        };
        match response {
            Ok(mut response) => {
                // The HTTP/1.1 client kept them out of its answers already.
                if h2 {
                    strip_hop_by_hop(response.headers_mut(), grpc);
                }
                Ok(response)
            }
            Err((class, e)) => {
                tracing::debug!(endpoint = %endpoint.authority, error = %e, "upstream request failed");
                Err(Failed {
                    class,
                    rejection: Rejection::new(
                        Reason::UpstreamUnavailable,
                        format!(
                            "instance {} at {} failed: {e}",
                            endpoint.id, endpoint.authority
                        ),
                    ),
                })
            }
        }
    }
}

/// Removes the headers that belong to one connection (RFC 9110 7.6.1),
/// and those `Connection` names. `te: trailers` stays for gRPC.
fn strip_hop_by_hop(headers: &mut HeaderMap, grpc: bool) {
    // Most requests carry none of these: look before touching the map.
    if let Some(connection) = headers.remove(header::CONNECTION) {
        if let Ok(names) = connection.to_str() {
            for name in names.split(',') {
                if let Ok(name) = HeaderName::from_bytes(name.trim().as_bytes()) {
                    headers.remove(name);
                }
            }
        }
    }
    for name in ["keep-alive", "proxy-connection", "upgrade"] {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if !grpc && headers.contains_key(header::TE) {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_the_rest_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("ce-id", HeaderValue::from_static("7"));
        let mut grpc = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert_eq!(h["ce-id"], "7");
        strip_hop_by_hop(&mut grpc, true);
        assert_eq!(grpc["te"], "trailers");
    }
}
