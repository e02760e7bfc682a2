//! Event traffic for end-to-end tests: binary-mode CloudEvents sent to a
//! service through an agent, one at a time ([`event`]) or at a fixed rate
//! ([`Load`], each on its own task: a slow answer never holds back the
//! next), every answer recorded.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HttpClient},
    rt::TokioExecutor,
};

/// A plain HTTP client for the agent's ingress.
pub type Http = HttpClient<HttpConnector, Full<Bytes>>;

pub fn http() -> Http {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

/// What the agent answered one event (status 0: no answer).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// `weir-reason`, if any.
    pub reason: String,
    /// `Retry-After`, if any.
    pub retry_after: String,
    /// `weir-limit`, if any.
    pub limit: String,
    /// When the answer came.
    pub at: Instant,
    /// How long it took.
    pub took: Duration,
}

/// One event to the agent's ingress.
#[derive(Debug, Clone)]
pub struct Event<'a> {
    pub agent: SocketAddr,
    pub service: &'a str,
    /// Below the service: `/v1/services/{service}{path}`.
    pub path: &'a str,
    pub source: &'a str,
    pub event_type: &'a str,
}

/// Sends `e` once and waits for the whole answer.
pub async fn event(http: &Http, e: &Event<'_>) -> Answer {
    let sent = Instant::now();
    let none = |sent: Instant| Answer {
        status: 0,
        reason: String::new(),
        retry_after: String::new(),
        limit: String::new(),
        at: Instant::now(),
        took: sent.elapsed(),
    };
    let Ok(request) = Request::post(format!(
        "http://{}/v1/services/{}{}",
        e.agent, e.service, e.path
    ))
    .header("ce-specversion", "1.0")
    .header("ce-id", "1")
    .header("ce-source", e.source)
    .header("ce-type", e.event_type)
    .body(Full::new(Bytes::from_static(b"{}"))) else {
        return none(sent);
    };
    let Ok(response) = http.request(request).await else {
        return none(sent);
    };
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut answer = Answer {
        status: response.status().as_u16(),
        reason: header("weir-reason"),
        retry_after: header("retry-after"),
        limit: header("weir-limit"),
        at: sent,
        took: Duration::ZERO,
    };
    let _ = response.into_body().collect().await;
    answer.at = Instant::now();
    answer.took = sent.elapsed();
    answer
}

/// Events sent until dropped.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
}

impl Load {
    /// Sends `rate` events per second to `POST /v1/services/{service}{path}`
    /// on the agent at `agent`, with `ce-source: source`.
    pub fn start(agent: SocketAddr, service: &str, path: &str, source: &str, rate: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let http = http();
        let (service, path, source) = (
            Arc::<str>::from(service),
            Arc::<str>::from(path),
            Arc::<str>::from(source),
        );
        let (run, out) = (stop.clone(), answers.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            while !run.load(Ordering::Relaxed) {
                ticks.tick().await;
                let (http, out) = (http.clone(), out.clone());
                let (service, path, source) = (service.clone(), path.clone(), source.clone());
                tokio::spawn(async move {
                    let e = Event {
                        agent,
                        service: &service,
                        path: &path,
                        source: &source,
                        event_type: "com.example.order",
                    };
                    let answer = event(&http, &e).await;
                    out.lock().unwrap_or_else(|p| p.into_inner()).push(answer);
                });
            }
        });
        Self { stop, answers }
    }

    /// Forgets the answers so far.
    pub fn reset(&self) {
        self.lock().clear();
    }

    /// The answers since the start or the last reset.
    pub fn answers(&self) -> Vec<Answer> {
        self.lock().clone()
    }

    /// How many answers had `status`.
    pub fn count(&self, status: u16) -> usize {
        self.lock().iter().filter(|a| a.status == status).count()
    }

    /// Waits up to `within` until at least `n` answers came since the
    /// start or the last reset; returns them.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Result<Vec<Answer>> {
        crate::poll_until(
            within,
            &format!("{n} answers to the load"),
            || async { Ok(self.answers()) },
            |a| a.len() >= n,
        )
        .await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Answer>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
