//! Which service a request is for: `/v1/services/{service}[/{path}]`
//! (namespace from the `weir-namespace` header or the agent's default), or
//! a `Host` / `:authority` that names a service (`orders`, `orders.shop`).

use http::{header::HOST, uri::PathAndQuery, HeaderMap, Uri};

use crate::reject::{Reason, Rejection};

/// The `weir-namespace` header.
pub const WEIR_NAMESPACE: &str = "weir-namespace";
const PREFIX: &str = "/v1/services/";

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub service: &'a str,
    /// The path (and query) to send upstream, when it differs from the
    /// request's (the `/v1/services/{service}` prefix removed).
    pub rewrite: Option<PathAndQuery>,
}

/// Finds the target of a request.
pub fn resolve<'a>(
    uri: &'a Uri,
    headers: &'a HeaderMap,
    default_namespace: &'a str,
) -> Result<Target<'a>, Rejection> {
    if let Some(rest) = uri.path().strip_prefix(PREFIX) {
        let (service, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if service.is_empty() {
            return Err(Rejection::new(
                Reason::NoTarget,
                "the path names no service: use /v1/services/{service}[/{path}]",
            ));
        }
        let namespace = match headers.get(WEIR_NAMESPACE) {
            Some(v) => v.to_str().map_err(|_| {
                Rejection::new(
                    Reason::NoTarget,
                    "header weir-namespace must be printable ASCII",
                )
            })?,
            None => default_namespace,
        };
        let rewritten = match uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        };
        let rewrite = PathAndQuery::try_from(rewritten).map_err(|_| {
            Rejection::new(
                Reason::NoTarget,
                "the path after the service is not a valid path",
            )
        })?;
        return Ok(Target {
            namespace,
            service,
            rewrite: Some(rewrite),
        });
    }
    let host = match uri.authority() {
        Some(a) => a.host(),
        None => match headers.get(HOST).and_then(|h| h.to_str().ok()) {
            Some(h) => strip_port(h),
            None => {
                return Err(Rejection::new(
                    Reason::NoTarget,
                    "no service named: POST /v1/services/{service}[/{path}], or a Host naming a service",
                ))
            }
        },
    };
    let (service, namespace) = match host.split_once('.') {
        Some((svc, rest)) => (svc, rest.split('.').next().unwrap_or(rest)),
        None => (host, default_namespace),
    };
    Ok(Target {
        namespace,
        service,
        rewrite: None,
    })
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // An IPv6 literal never names a service; keep it whole.
        return host;
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn target(
        uri: &str,
        host: Option<&'static str>,
        ns: Option<&'static str>,
    ) -> Result<(String, String, Option<String>), Rejection> {
        let uri: Uri = uri.parse().expect("uri");
        let mut h = HeaderMap::new();
        if let Some(host) = host {
            h.insert(HOST, HeaderValue::from_static(host));
        }
        if let Some(ns) = ns {
            h.insert(WEIR_NAMESPACE, HeaderValue::from_static(ns));
        }
        resolve(&uri, &h, "default").map(|t| {
            (
                t.namespace.to_owned(),
                t.service.to_owned(),
                t.rewrite.map(|p| p.to_string()),
            )
        })
    }

    #[test]
    fn the_path_form_names_the_service_and_rewrites_the_path() {
        assert_eq!(
            target("/v1/services/orders", None, None).expect("ok"),
            ("default".into(), "orders".into(), Some("/".into()))
        );
        assert_eq!(
            target(
                "/v1/services/orders/a/b?x=1",
                Some("agent:7080"),
                Some("shop")
            )
            .expect("ok"),
            ("shop".into(), "orders".into(), Some("/a/b?x=1".into()))
        );
        assert_eq!(
            target("/v1/services/", None, None)
                .expect_err("none")
                .reason,
            Reason::NoTarget
        );
    }

    #[test]
    fn the_host_form_names_service_and_namespace() {
        assert_eq!(
            target("/x", Some("orders"), None).expect("ok"),
            ("default".into(), "orders".into(), None)
        );
        assert_eq!(
            target("/x", Some("orders.shop:8080"), None).expect("ok"),
            ("shop".into(), "orders".into(), None)
        );
        assert_eq!(
            target("http://billing.shop.svc/x", None, None).expect("ok"),
            ("shop".into(), "billing".into(), None)
        );
        assert_eq!(
            target("/x", None, None).expect_err("none").reason,
            Reason::NoTarget
        );
    }
}
