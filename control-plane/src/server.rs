//! Wires a replica together: store, hub, gRPC services, HTTP probes.

use std::{fmt, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    extract::{RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use tokio::{
    net::TcpListener,
    sync::watch,
    task::{JoinError, JoinHandle},
};
use weir_core::validate::MAX_REQUEST_BYTES;
use weir_proto::{
    agent::v1::{
        agent_session_service_server::AgentSessionServiceServer, agents_server::AgentsServer,
    },
    policy::v1::policy_service_server::PolicyServiceServer,
    registry::v1::registry_server::RegistryServer,
};

use crate::{
    agents::{AgentsApi, LocalStreams, SessionService, Sweeper, MAX_SESSION_MESSAGE_BYTES},
    checks::Checks,
    config::{Config, StoreConfig},
    hub::{Hub, HubConfig, HubTask},
    keys::Keys,
    policy::PolicyServiceImpl,
    readiness::{Readiness, StoreProbe, PROBE_EVERY, PROBE_TIMEOUT},
    registry::RegistryService,
    store::{
        BoundedStore, EmbeddedStore, EmbeddedStoreConfig, EtcdStore, EtcdStoreConfig, Store,
        StoreError,
    },
};

/// Largest policy write accepted (a policy is at most 256 KiB encoded).
const MAX_POLICY_REQUEST_BYTES: usize = 512 * 1024;

/// How long a graceful shutdown waits for open gRPC calls.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one store call made for a request may take (see
/// [`BoundedStore`]).
pub const STORE_CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A task a replica cannot serve without.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerTask {
    Grpc,
    Http,
    /// The hub's store watch, which feeds every read and watch.
    Hub,
}

impl fmt::Display for ServerTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerTask::Grpc => "gRPC server",
            ServerTask::Http => "HTTP server",
            ServerTask::Hub => "store watch (hub)",
        })
    }
}

/// How a [`ServerTask`] ended.
#[derive(Debug, thiserror::Error)]
pub enum TaskEnd {
    #[error("it stopped although no shutdown was asked")]
    Returned,
    #[error("{0}")]
    Grpc(#[source] tonic::transport::Error),
    #[error("{0}")]
    Http(#[source] std::io::Error),
    #[error("it panicked or was cancelled: {0}")]
    Join(#[source] tokio::task::JoinError),
}

/// Why a replica could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot connect to the store: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A server task failed, while serving or while draining.
    #[error("the {task} task failed: {end}")]
    Task {
        task: ServerTask,
        #[source]
        end: TaskEnd,
    },
}

type ServerHandle = JoinHandle<Result<(), TaskEnd>>;

/// A running replica.
#[derive(Debug)]
pub struct ControlPlane {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    store_kind: &'static str,
    shutdown: watch::Sender<bool>,
    grpc: ServerHandle,
    http: ServerHandle,
    checks: Checks,
    hub_task: HubTask,
    _probe: StoreProbe,
    _sweeper: Sweeper,
    _outliers: crate::outliers::OutlierJudge,
    _quota: crate::quota::QuotaAllocator,
    _telemetry_upkeep: weir_core::task::AbortOnDrop,
}

#[derive(Clone, Debug)]
struct HttpState {
    hub: Hub,
    checker: Arc<weir_core::health::checker::Checker>,
    readiness: Readiness,
    store_kind: &'static str,
}

async fn metrics_text(State(state): State<HttpState>) -> String {
    crate::metrics::render(&state.hub, &state.checker)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// `/readyz`: 200 when every check passes, else 503. `?verbose` lists the
/// checks as kube-apiserver does; otherwise a short JSON object.
async fn readyz(State(s): State<HttpState>, RawQuery(query): RawQuery) -> Response {
    let ready = s.readiness.is_ready();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let verbose = query.as_deref().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.split('=').next() == Some("verbose"))
    });
    if verbose {
        return (code, s.readiness.verbose()).into_response();
    }
    let checks = s
        .readiness
        .checks()
        .iter()
        .map(|c| {
            let state = c
                .failure
                .map_or_else(|| "ok".to_owned(), |r| format!("failed: {r}"));
            (c.name, state)
        })
        .collect();
    (
        code,
        Json(serde_json_shim::Ready {
            ready,
            store: s.store_kind,
            revision: s.hub.revision(),
            checks,
        }),
    )
        .into_response()
}

mod serde_json_shim {
    #[derive(Debug, serde::Serialize)]
    pub struct Ready {
        pub ready: bool,
        pub store: &'static str,
        pub revision: u64,
        /// Check name -> "ok" or "failed: <short reason>".
        pub checks: std::collections::BTreeMap<&'static str, String>,
    }
}

/// Sets the overall and the registry's `grpc.health.v1` status.
async fn set_serving(health: &tonic_health::server::HealthReporter, serving: bool) {
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    // The overall status first: a caller that saw the registry SERVING
    // then finds the server SERVING too.
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <RegistryServer<RegistryService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

/// How a server task's join ended, for a task that was not asked to stop.
fn ended(joined: Result<Result<(), TaskEnd>, JoinError>) -> TaskEnd {
    match joined {
        Ok(Ok(())) => TaskEnd::Returned,
        Ok(Err(end)) => end,
        Err(e) => TaskEnd::Join(e),
    }
}

/// Opens the configured store.
pub async fn open_store(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config {
        StoreConfig::Embedded => Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default())),
        StoreConfig::Etcd { endpoints } => {
            Arc::new(EtcdStore::connect(EtcdStoreConfig::new(endpoints.clone())).await?)
        }
    })
}

impl ControlPlane {
    /// Connects to the store, binds both listeners and starts serving.
    pub async fn start(config: Config) -> Result<Self, ServeError> {
        let store = open_store(&config.store).await?;
        Self::start_with_store(config, store).await
    }

    /// Starts on an already opened store (tests share one embedded store
    /// between replicas this way).
    pub async fn start_with_store(
        config: Config,
        store: Arc<dyn Store>,
    ) -> Result<Self, ServeError> {
        weir_core::prometheus::handle();
        let keys = Keys::new(&config.etcd_prefix);
        let store_kind = store.kind();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::Layered::wrap(store, crate::metrics::Timed));
        let (hub, hub_task) = Hub::start(
            store.clone(),
            keys.clone(),
            HubConfig {
                protection_threshold_percent: config.protection_threshold_percent,
                ..HubConfig::default()
            },
        );

        let grpc_listener = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: config.grpc_addr,
                source,
            })?;
        let http_listener = TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: config.http_addr,
                source,
            })?;
        let grpc_addr = grpc_listener
            .local_addr()
            .map_err(|source| ServeError::Bind {
                addr: config.grpc_addr,
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| ServeError::Bind {
                addr: config.http_addr,
                source,
            })?;

        // Where the other replicas reach this one (AskAgent forwarding).
        let advertise_addr = config
            .advertise_addr
            .clone()
            .unwrap_or_else(|| grpc_addr.to_string());
        let checks = Checks::start(
            store.clone(),
            keys.clone(),
            hub.clone(),
            config.replica_id.clone(),
            format!("grpc={advertise_addr}").into_bytes(),
            std::time::Duration::from_secs(u64::from(config.replica_ttl_seconds)),
        )
        .await?;
        let outliers = crate::outliers::OutlierJudge::start(
            store.clone(),
            keys.clone(),
            hub.clone(),
            config.replica_id.clone(),
            config.outlier_quorum,
        );
        let (shutdown, _) = watch::channel(false);
        // The background probe reads the store directly; calls made for a
        // request go through the bound.
        let (probe, store_check) = StoreProbe::start(
            store.clone(),
            keys.root().to_owned(),
            PROBE_EVERY,
            PROBE_TIMEOUT,
        );
        let readiness = Readiness::new(store_check, hub.clone());
        let store: Arc<dyn Store> = Arc::new(BoundedStore::new(store, STORE_CALL_TIMEOUT));
        let policies = PolicyServiceServer::new(PolicyServiceImpl::new(
            store.clone(),
            hub.clone(),
            keys.clone(),
        ))
        .max_decoding_message_size(MAX_POLICY_REQUEST_BYTES);
        let streams = LocalStreams::default();
        let sessions = AgentSessionServiceServer::new(SessionService::new(
            store.clone(),
            hub.clone(),
            keys.clone(),
            config.replica_id.clone(),
            advertise_addr,
            streams.clone(),
        ))
        .max_decoding_message_size(MAX_SESSION_MESSAGE_BYTES);
        let quota = crate::quota::QuotaAllocator::start(
            store.clone(),
            keys.clone(),
            hub.clone(),
            streams.clone(),
            config.replica_id.clone(),
        );
        let agents = AgentsServer::new(AgentsApi::new(
            hub.clone(),
            streams,
            config.replica_id.clone(),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let sweeper = Sweeper::start(
            store.clone(),
            keys.clone(),
            hub.clone(),
            config.replica_id.clone(),
            config.agent_retention,
        );
        let registry = RegistryServer::new(RegistryService::new(store, hub.clone(), keys))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let telemetry_state = crate::telemetry::service::TelemetryState::new(
            hub.clone(),
            config.replica_id.clone(),
            config.traces,
            crate::telemetry::export::Exporters::start(config.export.clone()),
        );
        let telemetry = weir_proto::telemetry::v1::telemetry_server::TelemetryServer::new(
            crate::telemetry::service::TelemetryService::new(telemetry_state.clone()),
        )
        .max_decoding_message_size(crate::telemetry::service::MAX_BATCH_BYTES);
        let telemetry_upkeep = {
            let (state, hub, checker) = (telemetry_state.clone(), hub.clone(), checks.checker());
            weir_core::task::AbortOnDrop(tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(10));
                loop {
                    every.tick().await;
                    state.expire();
                    crate::metrics::refresh(&hub, &checker);
                }
            }))
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        {
            // SERVING exactly when /readyz passes (store reachable, cache
            // loaded); NOT_SERVING while draining. Reading the checks costs
            // no store call.
            let readiness = readiness.clone();
            let mut stop = shutdown.subscribe();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(100));
                let mut serving = None;
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => break,
                        _ = every.tick() => {}
                    }
                    let ready = readiness.is_ready();
                    if serving != Some(ready) {
                        set_serving(&health, ready).await;
                        serving = Some(ready);
                    }
                }
                set_serving(&health, false).await;
            });
        }
        // Both reflection versions: grpcurl and most tools still ask v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(weir_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let mut stop = shutdown.subscribe();
        let grpc_server = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
            .add_service(registry)
            .add_service(policies)
            .add_service(sessions)
            .add_service(agents)
            .add_service(telemetry)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            // TCP_NODELAY on every accepted connection: without it small
            // answers wait for the client's delayed ACK (~40 ms).
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            );
        let grpc = tokio::spawn(async move { grpc_server.await.map_err(TaskEnd::Grpc) });
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .with_state(HttpState {
                hub: hub.clone(),
                checker: checks.checker(),
                readiness,
                store_kind,
            })
            .merge(crate::telemetry::http::routes(telemetry_state));
        let mut stop = shutdown.subscribe();
        let http = tokio::spawn(async move {
            axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
                .map_err(TaskEnd::Http)
        });
        tracing::info!(grpc = %grpc_addr, http = %http_addr, store = store_kind, "control plane listening");
        Ok(Self {
            grpc_addr,
            http_addr,
            store_kind,
            shutdown,
            grpc,
            http,
            checks,
            hub_task,
            _probe: probe,
            _sweeper: sweeper,
            _outliers: outliers,
            _quota: quota,
            _telemetry_upkeep: telemetry_upkeep,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn store_kind(&self) -> &'static str {
        self.store_kind
    }

    /// Instances whose checks this replica runs now.
    pub fn checking(&self) -> usize {
        self.checks.checking()
    }

    /// Serves until `signal` completes, then drains: stops accepting, lets
    /// open calls finish, ends watch streams. Ends early, with
    /// [`ServeError::Task`], if the gRPC server, the HTTP server or the
    /// hub's store watch ends by itself: a replica missing one of them must
    /// exit (and be restarted), not linger until SIGTERM.
    pub async fn serve_until(mut self, signal: impl Future<Output = ()>) -> Result<(), ServeError> {
        let died = tokio::select! {
            () = signal => None,
            joined = &mut self.grpc => Some((ServerTask::Grpc, ended(joined))),
            joined = &mut self.http => Some((ServerTask::Http, ended(joined))),
            joined = self.hub_task.ended() => {
                Some((ServerTask::Hub, joined.map_or_else(TaskEnd::Join, |()| TaskEnd::Returned)))
            }
        };
        let Some((task, end)) = died else {
            return self.drain(None).await;
        };
        tracing::error!(task = %task, error = %end, "a server task ended; stopping the replica");
        if let Err(e) = self.drain(Some(task)).await {
            tracing::warn!(error = %e, "draining after the failure failed too");
        }
        Err(ServeError::Task { task, end })
    }

    /// Graceful shutdown.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.drain(None).await
    }

    /// Stops every task; `dead` has already ended (its handle is spent).
    async fn drain(self, dead: Option<ServerTask>) -> Result<(), ServeError> {
        tracing::info!("control plane shutting down");
        self.shutdown.send_replace(true);
        self.checks.stop().await;
        // Watch streams end with the hub; KeepAlive streams end when their
        // callers go, which a drain cannot wait for forever.
        drop(self.hub_task);
        drop(self._probe);
        drop(self._sweeper);
        let mut result = Ok(());
        for (task, mut handle) in [(ServerTask::Grpc, self.grpc), (ServerTask::Http, self.http)] {
            if dead == Some(task) {
                continue;
            }
            match tokio::time::timeout(DRAIN_TIMEOUT, &mut handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(joined) => {
                    if result.is_ok() {
                        result = Err(ServeError::Task {
                            task,
                            end: ended(joined),
                        });
                    }
                }
                Err(_) => {
                    tracing::warn!(%task, timeout = ?DRAIN_TIMEOUT, "drain timed out; closing what is left");
                    handle.abort();
                }
            }
        }
        result
    }

    /// Test seam: replaces a server task by `with`, as if the task had
    /// become `with` (e.g. one that fails at once).
    #[cfg(test)]
    fn replace_task(
        &mut self,
        task: ServerTask,
        with: impl Future<Output = Result<(), TaskEnd>> + Send + 'static,
    ) {
        let slot = match task {
            ServerTask::Grpc => &mut self.grpc,
            ServerTask::Http => &mut self.http,
            ServerTask::Hub => panic!("the hub's task belongs to the hub"),
        };
        slot.abort();
        *slot = tokio::spawn(with);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn replica() -> ControlPlane {
        let config = Config {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            store: StoreConfig::Embedded,
            ..Config::default()
        };
        ControlPlane::start(config).await.expect("replica starts")
    }

    /// serve_until with a signal that never comes, bounded.
    async fn serve(plane: ControlPlane) -> Result<(), ServeError> {
        tokio::time::timeout(
            Duration::from_secs(20),
            plane.serve_until(std::future::pending()),
        )
        .await
        .expect("serve_until ended without a signal")
    }

    #[tokio::test]
    async fn a_grpc_task_that_dies_ends_serve_until_with_an_error() {
        let mut plane = replica().await;
        plane.replace_task(ServerTask::Grpc, async { panic!("injected gRPC failure") });
        let err = serve(plane)
            .await
            .expect_err("a dead gRPC task is an error");
        assert!(
            matches!(
                &err,
                ServeError::Task {
                    task: ServerTask::Grpc,
                    end: TaskEnd::Join(j),
                } if j.is_panic()
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("gRPC server"), "{err}");
    }

    #[tokio::test]
    async fn an_http_task_that_returns_or_fails_ends_serve_until_with_an_error() {
        let mut plane = replica().await;
        plane.replace_task(ServerTask::Http, async { Ok(()) });
        let err = serve(plane).await.expect_err("a returned HTTP task");
        assert!(
            matches!(
                err,
                ServeError::Task {
                    task: ServerTask::Http,
                    end: TaskEnd::Returned,
                }
            ),
            "{err:?}"
        );

        let mut plane = replica().await;
        plane.replace_task(ServerTask::Http, async {
            Err(TaskEnd::Http(std::io::Error::other(
                "injected accept failure",
            )))
        });
        let err = serve(plane).await.expect_err("a failed HTTP task");
        assert!(
            matches!(
                err,
                ServeError::Task {
                    task: ServerTask::Http,
                    end: TaskEnd::Http(_),
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn the_signal_drains_cleanly() {
        let plane = replica().await;
        let grpc = plane.grpc_addr();
        tokio::time::timeout(Duration::from_secs(20), plane.serve_until(async {}))
            .await
            .expect("drains in time")
            .expect("a clean drain");
        // The listener is closed after the drain.
        assert!(tokio::net::TcpStream::connect(grpc).await.is_err());
    }
}
