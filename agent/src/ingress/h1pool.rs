//! HTTP/1.1 connections to instances, one pool per ingress worker.
//!
//! hyper-util's pooled client costs, per request, a pool checkout through
//! a shared lock and a spawned task that hands the connection back once the
//! response ends. Here each worker keeps its own idle connections per
//! `host:port` (a lock nobody else takes): a request takes a connection
//! that is ready, or opens one, and puts it back as soon as the response
//! head arrives; it is taken again once its body was read through
//! (`SendRequest::is_ready`). A request that a pooled connection could not
//! even start (the instance closed it meanwhile) goes once more on a fresh
//! connection; nothing was sent, so that is safe for any method.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use http::{uri::Authority, Request, Response};
use hyper::{
    body::Incoming,
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::Body;

/// Idle connections kept per instance and worker.
const MAX_IDLE: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request did not get a response.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connect {0}: {1}")]
    Connect(Authority, std::io::Error),
    #[error("connect {0}: timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(Authority),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

#[derive(Debug, Default)]
pub struct H1Pool {
    idle: Mutex<HashMap<Authority, Vec<SendRequest<Body>>>>,
}

impl H1Pool {
    /// A ready connection to `authority`, if one is idle. Closed ones are
    /// dropped; busy ones (a response body still being read) stay.
    fn checkout(&self, authority: &Authority) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(authority)?;
        conns.retain(|c| !c.is_closed());
        let ready = conns.iter().rposition(SendRequest::is_ready)?;
        Some(conns.swap_remove(ready))
    }

    fn checkin(&self, authority: &Authority, conn: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.entry(authority.clone()).or_default();
        if conns.len() < MAX_IDLE {
            conns.push(conn);
        }
    }

    async fn connect(authority: &Authority) -> Result<SendRequest<Body>, H1Error> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority.as_str()))
            .await
            .map_err(|_| H1Error::ConnectTimeout(authority.clone()))?
            .map_err(|e| H1Error::Connect(authority.clone(), e))?;
        // Small requests must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends `request` (origin-form URI, `Host` set) to `authority`.
    pub async fn send(
        &self,
        authority: &Authority,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, H1Error> {
        let request = match self.checkout(authority) {
            Some(mut conn) => match conn.try_send_request(request).await {
                Ok(response) => {
                    self.checkin(authority, conn);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection went away in between.
                    Some(request) => request,
                    None => return Err(e.into_error().into()),
                },
            },
            None => request,
        };
        let mut conn = Self::connect(authority).await?;
        let response = conn.send_request(request).await?;
        self.checkin(authority, conn);
        Ok(response)
    }
}
