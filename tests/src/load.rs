//! Event traffic for end-to-end tests: binary-mode CloudEvents sent to a
//! service through an agent at a fixed rate, each on its own task (a slow
//! answer never holds back the next), every answer recorded.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HttpClient},
    rt::TokioExecutor,
};

/// What the agent answered one event (status 0: no answer).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// `weir-reason`, if any.
    pub reason: String,
    /// `Retry-After`, if any.
    pub retry_after: String,
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
        let http: HttpClient<HttpConnector, Full<Bytes>> =
            HttpClient::builder(TokioExecutor::new()).build_http();
        let url = format!("http://{agent}/v1/services/{service}{path}");
        let source = source.to_owned();
        let (run, out) = (stop.clone(), answers.clone());
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            while !run.load(Ordering::Relaxed) {
                ticks.tick().await;
                let (http, out, url, source) =
                    (http.clone(), out.clone(), url.clone(), source.clone());
                tokio::spawn(async move {
                    let answer = send(&http, &url, &source).await;
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Answer>> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn send(http: &HttpClient<HttpConnector, Full<Bytes>>, url: &str, source: &str) -> Answer {
    let none = Answer {
        status: 0,
        reason: String::new(),
        retry_after: String::new(),
    };
    let Ok(request) = Request::post(url)
        .header("ce-specversion", "1.0")
        .header("ce-id", "1")
        .header("ce-source", source)
        .header("ce-type", "com.example.order")
        .body(Full::new(Bytes::from_static(b"{}")))
    else {
        return none;
    };
    let Ok(response) = http.request(request).await else {
        return none;
    };
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let answer = Answer {
        status: response.status().as_u16(),
        reason: header("weir-reason"),
        retry_after: header("retry-after"),
    };
    let _ = response.into_body().collect().await;
    answer
}
