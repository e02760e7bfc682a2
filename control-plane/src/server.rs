//! Wires a replica together: store, hub, gRPC services, HTTP probes.

use std::{future::Future, net::SocketAddr, sync::Arc};

use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use weir_core::validate::MAX_REQUEST_BYTES;
use weir_proto::{
    agent::v1::agent_session_service_server::AgentSessionServiceServer,
    policy::v1::policy_service_server::PolicyServiceServer,
    registry::v1::registry_server::RegistryServer,
};

use crate::{
    checks::Checks,
    config::{Config, StoreConfig},
    hub::{Hub, HubConfig, HubTask},
    keys::Keys,
    policy::service::PolicyServiceImpl,
    registry::RegistryService,
    session::SessionService,
    store::{EmbeddedStore, EmbeddedStoreConfig, EtcdStore, EtcdStoreConfig, Store, StoreError},
};

/// Largest policy write accepted (a policy is at most 256 KiB encoded).
const MAX_POLICY_REQUEST_BYTES: usize = 512 * 1024;

/// How long a graceful shutdown waits for open gRPC calls.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server failed: {0}")]
    Http(#[source] std::io::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server task panicked or was cancelled: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A running replica.
#[derive(Debug)]
pub struct ControlPlane {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    store_kind: &'static str,
    shutdown: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
    checks: Checks,
    _hub_task: HubTask,
}

#[derive(Clone, Debug)]
struct HttpState {
    hub: Hub,
    store_kind: &'static str,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, Json<serde_json_shim::Ready>) {
    let ready = s.hub.is_ready();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(serde_json_shim::Ready {
            ready,
            store: s.store_kind,
            revision: s.hub.revision(),
        }),
    )
}

mod serde_json_shim {
    #[derive(Debug, serde::Serialize)]
    pub struct Ready {
        pub ready: bool,
        pub store: &'static str,
        pub revision: u64,
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
        let keys = Keys::new(&config.etcd_prefix);
        let store_kind = store.kind();
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

        let checks = Checks::start(
            store.clone(),
            keys.clone(),
            hub.clone(),
            config.replica_id.clone(),
            format!("grpc={grpc_addr}").into_bytes(),
            std::time::Duration::from_secs(u64::from(config.replica_ttl_seconds)),
        )
        .await?;
        let (shutdown, _) = watch::channel(false);
        let policies = PolicyServiceServer::new(PolicyServiceImpl::new(
            store.clone(),
            hub.clone(),
            keys.clone(),
        ))
        .max_decoding_message_size(MAX_POLICY_REQUEST_BYTES);
        let sessions = AgentSessionServiceServer::new(SessionService::new(
            store.clone(),
            hub.clone(),
            keys.clone(),
            config.replica_id.clone(),
        ))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
        let registry = RegistryServer::new(RegistryService::new(store, hub.clone(), keys))
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let (health, health_service) = tonic_health::server::health_reporter();
        {
            // Serving once the cache has loaded; NOT_SERVING while draining.
            let hub = hub.clone();
            let mut stop = shutdown.subscribe();
            tokio::spawn(async move {
                let mut revisions = tokio::time::interval(std::time::Duration::from_millis(50));
                while !hub.is_ready() {
                    revisions.tick().await;
                }
                health
                    .set_serving::<RegistryServer<RegistryService>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::Serving)
                    .await;
                let _ = stop.wait_for(|s| *s).await;
                health
                    .set_not_serving::<RegistryServer<RegistryService>>()
                    .await;
                health
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
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
        let grpc = tokio::spawn(
            tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
                .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
                .add_service(registry)
                .add_service(policies)
                .add_service(sessions)
                .add_service(health_service)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                // TCP_NODELAY on every accepted connection: without it small
                // answers wait for the client's delayed ACK (~40 ms).
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(grpc_listener)
                        .with_nodelay(Some(true)),
                    async move {
                        let _ = stop.wait_for(|s| *s).await;
                    },
                ),
        );
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(HttpState {
                hub: hub.clone(),
                store_kind,
            });
        let mut stop = shutdown.subscribe();
        let http = tokio::spawn(async move {
            axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
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
            _hub_task: hub_task,
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
    /// open calls finish, ends watch streams.
    pub async fn serve_until(self, signal: impl Future<Output = ()>) -> Result<(), ServeError> {
        signal.await;
        self.shutdown().await
    }

    /// Graceful shutdown.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        tracing::info!("control plane shutting down");
        self.shutdown.send_replace(true);
        self.checks.stop().await;
        // Watch streams end with the hub; KeepAlive streams end when their
        // callers go, which a drain cannot wait for forever.
        drop(self._hub_task);
        let mut grpc = self.grpc;
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut grpc).await {
            Ok(joined) => joined??,
            Err(_) => {
                tracing::warn!(timeout = ?DRAIN_TIMEOUT, "gRPC drain timed out; closing remaining streams");
                grpc.abort();
            }
        }
        self.http.await?.map_err(ServeError::Http)?;
        Ok(())
    }
}
