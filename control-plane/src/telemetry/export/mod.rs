//! Span export: forwards the spans agents report to external tracing
//! backends, over OTLP/gRPC (`otlp`) and as Zipkin v2 JSON (`zipkin`).
//!
//! Each configured exporter owns a bounded queue and one task that drains
//! it in batches. [`Exporters::offer`] only tries to enqueue: the span
//! report path must never wait on a backend, so a full queue drops the
//! overflow and counts it instead of pushing back. A failed send is retried
//! with a jittered exponential backoff, a few times, and then the batch is
//! dropped and counted: while one batch is being retried the queue fills
//! and later spans are dropped at the door, which is what bounds memory
//! when a backend is slow or down.
//!
//! Metrics (through the `metrics` facade, labelled `exporter="otlp"` or
//! `"zipkin"`):
//! - `weir_control_plane_exported_spans_total`: spans a backend took;
//! - `weir_control_plane_export_dropped_spans_total{reason}`: `queue_full`
//!   (offered while the queue was full), `failed` (the send failed for
//!   good, or the backend refused them), `invalid` (ids of the wrong
//!   length or all zero, which either backend would reject along with the
//!   rest of the batch);
//! - `weir_control_plane_export_failures_total`: failed send attempts,
//!   retried or not.

mod otlp;
mod zipkin;

#[cfg(test)]
mod tests;

use std::{
    error::Error as StdError,
    fmt,
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::mpsc::{self, error::TrySendError};
use weir_core::{
    backoff::{Backoff, Jitter},
    task::AbortOnDrop,
};
use weir_proto::telemetry::v1::Span;

/// Where spans go, and how much may wait on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportConfig {
    /// An OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`. `None`: no
    /// OTLP export.
    pub otlp_endpoint: Option<String>,
    /// A Zipkin v2 spans endpoint, e.g. `http://127.0.0.1:9411/api/v2/spans`.
    /// `None`: no Zipkin export.
    pub zipkin_endpoint: Option<String>,
    /// Spans per request to a backend (at least 1).
    pub batch_spans: usize,
    /// Spans queued per exporter at most (at least 1); more are dropped.
    pub queue_spans: usize,
    /// How long one send may take, connecting included.
    pub timeout: Duration,
}

impl Default for ExportConfig {
    /// No exporter; 512 spans a request (what the OpenTelemetry SDKs send
    /// by default), 8192 queued (16 requests' worth, a few seconds of a busy
    /// cluster's spans), 5 s a send.
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            zipkin_endpoint: None,
            batch_spans: 512,
            queue_spans: 8192,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The running exporters. Dropping this value stops them: spans still
/// queued or being sent are lost.
#[derive(Debug)]
pub struct Exporters {
    queues: Vec<Queue>,
}

impl Exporters {
    /// Spawns one task per configured exporter; none configured = a no-op.
    ///
    /// An endpoint that is not a valid `http://` URI is logged as an error
    /// and that exporter is left out: the control plane serves without it
    /// rather than refusing to start over a telemetry side channel. Must be
    /// called within a Tokio runtime.
    pub fn start(config: ExportConfig) -> Self {
        let batch = config.batch_spans.max(1);
        let capacity = config.queue_spans.max(1);
        let mut queues = Vec::new();
        if let Some(endpoint) = &config.otlp_endpoint {
            match otlp::Otlp::new(endpoint, config.timeout) {
                Ok(sink) => queues.push(Queue::spawn(Kind::Otlp, sink, batch, capacity, &config)),
                Err(e) => tracing::error!(error = %e, "OTLP span export is off"),
            }
        }
        if let Some(endpoint) = &config.zipkin_endpoint {
            match zipkin::Zipkin::new(endpoint, config.timeout) {
                Ok(sink) => queues.push(Queue::spawn(Kind::Zipkin, sink, batch, capacity, &config)),
                Err(e) => tracing::error!(error = %e, "Zipkin span export is off"),
            }
        }
        for q in &queues {
            tracing::info!(
                exporter = q.kind.name(),
                batch,
                queue = capacity,
                "exporting spans"
            );
        }
        Self { queues }
    }

    /// Hands spans to every exporter. Never blocks or awaits: a full queue
    /// drops the overflow and counts it.
    pub fn offer(&self, spans: &[Span]) {
        if self.queues.is_empty() {
            return;
        }
        let mut invalid = 0;
        let mut full = vec![0u64; self.queues.len()];
        let mut closed = vec![0u64; self.queues.len()];
        for span in spans {
            if !ids_valid(span) {
                invalid += 1;
                continue;
            }
            // One copy, shared by the exporters.
            let span = Arc::new(span.clone());
            for (i, q) in self.queues.iter().enumerate() {
                match q.tx.try_send(Arc::clone(&span)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => full[i] += 1,
                    // Only if the task panicked.
                    Err(TrySendError::Closed(_)) => closed[i] += 1,
                }
            }
        }
        for (i, q) in self.queues.iter().enumerate() {
            q.counts.dropped(q.kind, Reason::Invalid, invalid);
            q.counts.dropped(q.kind, Reason::QueueFull, full[i]);
            q.counts.dropped(q.kind, Reason::Failed, closed[i]);
            if full[i] > 0 {
                tracing::debug!(
                    exporter = q.kind.name(),
                    spans = full[i],
                    "export queue full; spans dropped"
                );
            }
        }
    }

    /// What one exporter counted so far (`None`: it is not running).
    #[cfg(test)]
    fn counts(&self, kind: Kind) -> Option<CountsSnapshot> {
        self.queues
            .iter()
            .find(|q| q.kind == kind)
            .map(|q| q.counts.snapshot())
    }
}

/// W3C ids as the OTLP spec requires them (and Zipkin's 16/32 hex digits
/// follow from them): a 16-byte trace id and 8-byte span id, not all
/// zero; a parent id of 8 bytes or none.
fn ids_valid(span: &Span) -> bool {
    let nonzero = |b: &[u8]| b.iter().any(|&x| x != 0);
    span.trace_id.len() == 16
        && nonzero(&span.trace_id)
        && span.span_id.len() == 8
        && nonzero(&span.span_id)
        && (span.parent_span_id.is_empty() || span.parent_span_id.len() == 8)
}

/// One exporter's queue and the task draining it.
#[derive(Debug)]
struct Queue {
    kind: Kind,
    tx: mpsc::Sender<Arc<Span>>,
    counts: Arc<Counts>,
    _task: AbortOnDrop,
}

impl Queue {
    fn spawn<S: Sink>(
        kind: Kind,
        sink: S,
        batch: usize,
        capacity: usize,
        config: &ExportConfig,
    ) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        let counts = Arc::new(Counts::default());
        let worker = Worker {
            kind,
            sink,
            batch,
            timeout: config.timeout,
            counts: Arc::clone(&counts),
        };
        Self {
            kind,
            tx,
            counts,
            _task: AbortOnDrop(tokio::spawn(worker.run(rx))),
        }
    }
}

/// Which backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Otlp,
    Zipkin,
}

impl Kind {
    /// The `exporter` label.
    fn name(self) -> &'static str {
        match self {
            Kind::Otlp => "otlp",
            Kind::Zipkin => "zipkin",
        }
    }
}

/// Why spans were dropped: the `reason` label.
#[derive(Clone, Copy, Debug)]
enum Reason {
    QueueFull,
    Failed,
    Invalid,
}

impl Reason {
    fn name(self) -> &'static str {
        match self {
            Reason::QueueFull => "queue_full",
            Reason::Failed => "failed",
            Reason::Invalid => "invalid",
        }
    }
}

/// The exporter's metrics, also kept here so tests can read them without
/// installing a global recorder.
#[derive(Debug, Default)]
struct Counts {
    exported: AtomicU64,
    queue_full: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
    failures: AtomicU64,
}

impl Counts {
    fn exported(&self, kind: Kind, n: u64) {
        if n == 0 {
            return;
        }
        self.exported.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("weir_control_plane_exported_spans_total", "exporter" => kind.name())
            .increment(n);
    }

    fn dropped(&self, kind: Kind, reason: Reason, n: u64) {
        if n == 0 {
            return;
        }
        let mine = match reason {
            Reason::QueueFull => &self.queue_full,
            Reason::Failed => &self.failed,
            Reason::Invalid => &self.invalid,
        };
        mine.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(
            "weir_control_plane_export_dropped_spans_total",
            "exporter" => kind.name(),
            "reason" => reason.name()
        )
        .increment(n);
    }

    fn failure(&self, kind: Kind) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("weir_control_plane_export_failures_total", "exporter" => kind.name())
            .increment(1);
    }

    #[cfg(test)]
    fn snapshot(&self) -> CountsSnapshot {
        CountsSnapshot {
            exported: self.exported.load(Ordering::Relaxed),
            queue_full: self.queue_full.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CountsSnapshot {
    exported: u64,
    queue_full: u64,
    failed: u64,
    invalid: u64,
    failures: u64,
}

/// A backend: sends one batch. The worker owns retries and the timeout,
/// so a sink makes exactly one attempt per call.
trait Sink: Send + 'static {
    /// Sends `spans`; `Ok(n)`: the backend took them but refused `n`.
    fn send(&mut self, spans: &[Arc<Span>]) -> impl Future<Output = Result<u64, SendError>> + Send;
}

/// Why a send failed. The messages leave their sources out: log them with
/// [`Chain`], which appends each source once.
#[derive(Debug, thiserror::Error)]
enum SendError {
    // tonic folds a transport failure into the status message
    // ("tcp connect error"), so the status has nothing more to chain.
    #[error("the collector answered {}: {}", .0.code(), .0.message())]
    Grpc(tonic::Status),
    #[error("the HTTP request failed")]
    Http(#[source] hyper_util::client::legacy::Error),
    #[error("the backend answered HTTP {status}: {body}")]
    HttpStatus {
        status: hyper::StatusCode,
        body: String,
    },
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot encode the spans as JSON")]
    Json(#[source] serde_json::Error),
    #[error("cannot build the request")]
    Request(#[source] hyper::http::Error),
}

impl SendError {
    /// Whether the same batch may succeed later: the backend was
    /// unreachable, overloaded or timed out. Anything else (a 4xx, a gRPC
    /// INVALID_ARGUMENT, an encoding bug) would fail the same way again.
    fn retryable(&self) -> bool {
        use tonic::Code;
        match self {
            // The codes the OTLP spec lists as retryable. tonic reports a
            // refused or broken connection as UNAVAILABLE.
            SendError::Grpc(status) => matches!(
                status.code(),
                Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::ResourceExhausted
                    | Code::Aborted
                    | Code::OutOfRange
                    | Code::Unavailable
                    | Code::DataLoss
            ),
            SendError::Http(_) | SendError::Timeout(_) => true,
            SendError::HttpStatus { status, .. } => {
                status.is_server_error()
                    || *status == hyper::StatusCode::TOO_MANY_REQUESTS
                    || *status == hyper::StatusCode::REQUEST_TIMEOUT
            }
            SendError::Json(_) | SendError::Request(_) => false,
        }
    }
}

/// Why an exporter cannot start.
#[derive(Debug, thiserror::Error)]
enum EndpointError {
    #[error("invalid endpoint {endpoint:?}: {source}")]
    Uri {
        endpoint: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    #[error("endpoint {endpoint:?}: only http://host:port[/path] is supported (no TLS)")]
    Unsupported { endpoint: String },
}

/// Parses an `http://` endpoint. TLS would need a TLS client (tonic's
/// `tls-*` features, hyper-rustls) the control plane does not build in;
/// collectors are usually reached on a local or mesh-internal address.
fn http_uri(endpoint: &str) -> Result<hyper::Uri, EndpointError> {
    let uri: hyper::Uri = endpoint.parse().map_err(|source| EndpointError::Uri {
        endpoint: endpoint.to_owned(),
        source,
    })?;
    if uri.scheme_str() != Some("http") || uri.authority().is_none() {
        return Err(EndpointError::Unsupported {
            endpoint: endpoint.to_owned(),
        });
    }
    Ok(uri)
}

/// Retries: 100 ms, 200 ms, 400 ms, 800 ms (each jittered into its upper
/// half), then the batch is dropped. About 1.5 s of waiting plus the
/// attempts themselves: long enough to ride out a collector restart or a
/// brief overload, short enough that a batch does not hold the queue for
/// long (spans offered meanwhile are dropped at the door, not delayed).
const RETRY_BASE: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
const MAX_ATTEMPTS: u32 = 5;

/// The task behind one exporter's queue.
struct Worker<S> {
    kind: Kind,
    sink: S,
    batch: usize,
    timeout: Duration,
    counts: Arc<Counts>,
}

impl<S: Sink> Worker<S> {
    async fn run(mut self, mut rx: mpsc::Receiver<Arc<Span>>) {
        let mut batch = Vec::with_capacity(self.batch);
        // `recv_many` returns 0 only once every sender is gone.
        while rx.recv_many(&mut batch, self.batch).await > 0 {
            self.deliver(&batch).await;
            batch.clear();
        }
    }

    /// Sends one batch, retrying what may succeed later.
    async fn deliver(&mut self, spans: &[Arc<Span>]) {
        let n = spans.len() as u64;
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX).with_jitter(Jitter::Half);
        loop {
            let result = match tokio::time::timeout(self.timeout, self.sink.send(spans)).await {
                Ok(result) => result,
                Err(_) => Err(SendError::Timeout(self.timeout)),
            };
            let error = match result {
                Ok(refused) => {
                    let refused = refused.min(n);
                    self.counts.exported(self.kind, n - refused);
                    self.counts.dropped(self.kind, Reason::Failed, refused);
                    return;
                }
                Err(e) => e,
            };
            self.counts.failure(self.kind);
            let attempts = backoff.attempt() + 1;
            if !error.retryable() || attempts >= MAX_ATTEMPTS {
                tracing::warn!(
                    exporter = self.kind.name(),
                    spans = n,
                    attempts,
                    error = %Chain(&error),
                    "span export failed; batch dropped"
                );
                self.counts.dropped(self.kind, Reason::Failed, n);
                return;
            }
            let delay = backoff.next_delay();
            tracing::debug!(
                exporter = self.kind.name(),
                spans = n,
                attempts,
                ?delay,
                error = %Chain(&error),
                "span export failed; will retry"
            );
            tokio::time::sleep(delay).await;
        }
    }
}

/// An error with its sources, for a log line: hyper's and tonic's
/// transport errors keep the useful part ("connection refused") a few
/// sources down.
struct Chain<'a>(&'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
