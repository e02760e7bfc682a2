//! `weir-agent`: one per node, beside the node's services. It carries their
//! event traffic to the instances of the services they address, balanced
//! over the registry the control plane pushes down the node session.
//!
//! - [`config`]: flags, environment and TOML.
//! - [`session`]: the node session (registry and policies, failover,
//!   degraded mode).
//! - [`view`]: the registry view and the routes built from it.
//! - [`balance`]: balancers (round robin and smooth weighted, least request
//!   P2C, peak EWMA, consistent hash) and zone preference.
//! - [`ingress`]: the HTTP/1.1 + h2c reverse proxy, CloudEvents checks,
//!   the attempt loop (timeouts, retries).
//! - [`retry`]: outcome classes, the retry and timeout policy, the budget.
//! - [`eject`]: passive ejection on refused or dropped connections, and
//!   the TCP prober that brings an instance back.
//! - [`local`]: node-local registration (TTLs, re-registration on a new
//!   session, the node's active checks).
//! - [`reject`]: every answer the agent makes itself.
//! - [`admin`]: state, health, readiness and metrics.
//!
//! - [`persist`]: the view and policies kept under `--data-dir`.
//! - [`outbox`]: the durable outbox's storage (in progress).
//!
//! Not built yet (see `docs/agent.md`): rate limits, circuit breakers,
//! the durable outbox.

pub mod admin;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod config;
pub mod eject;
pub mod ingress;
pub mod limit;
pub mod local;
pub mod outbox;
pub mod persist;
pub mod reject;
pub mod retry;
pub mod session;
pub mod telemetry;
pub mod view;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use weir_client::{agent::Hello, Client, ClientConfig};

pub use config::Config;

/// How long requests in flight may take to finish once the agent stops.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Why the agent could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("control-plane endpoints: {0}")]
    Client(#[from] weir_client::Error),
    #[error("data dir: {0}")]
    Persist(#[from] persist::PersistError),
    #[error("the {0} task ended on its own")]
    Task(&'static str),
    #[error("outbox (--outbox-required): {0}")]
    Outbox(#[from] outbox::store::OutboxError),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    ingress_addr: SocketAddr,
    admin_addr: SocketAddr,
    registry_addr: SocketAddr,
    stop: watch::Sender<bool>,
    ingress: ingress::Workers,
    admin: JoinHandle<()>,
    registry: JoinHandle<()>,
    session: JoinHandle<()>,
    sweeper: JoinHandle<()>,
    /// Delivers what the outbox holds, when there is one.
    scheduler: Option<JoinHandle<()>>,
    local: Arc<local::Local>,
    persister: Option<(persist::Persister, JoinHandle<()>)>,
    reporter: JoinHandle<()>,
}

fn local_addr(
    what: &'static str,
    l: &TcpListener,
    asked: SocketAddr,
) -> Result<SocketAddr, AgentError> {
    l.local_addr().map_err(|source| AgentError::Bind {
        what,
        addr: asked,
        source,
    })
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind { what, addr, source })
}

impl Agent {
    /// Binds the ingress, admin and local-registry listeners and starts
    /// the node session.
    pub async fn start(config: Config) -> Result<Self, AgentError> {
        admin::prometheus();
        // Before binding anything: a data dir that cannot be used stops
        // the start with a clear error.
        let store = config
            .data_dir
            .as_deref()
            .map(|dir| persist::Store::open(dir, &config.node_id))
            .transpose()?;
        let admin_listener = bind("admin", config.admin_addr).await?;
        let registry_listener = bind("registry", config.registry_addr).await?;
        let admin_addr = local_addr("admin", &admin_listener, config.admin_addr)?;
        let registry_addr = local_addr("registry", &registry_listener, config.registry_addr)?;

        let client = Client::with_config(&config.control_plane, ClientConfig::default())?;
        let routes = Arc::new(view::Routes::default());
        let (stop, stopped) = watch::channel(false);
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let in_flight = ingress::InFlightTotal::default();
        let telemetry = telemetry::Telemetry::new(config.telemetry.clone());
        let mut broken = false;
        let outbox = match &config.data_dir {
            None => Err("topic publishing needs --data-dir: the outbox lives there".to_owned()),
            Some(dir) => {
                let options = outbox::log::Options {
                    max_bytes: config.outbox_max_bytes,
                    ..outbox::log::Options::default()
                };
                match outbox::store::Outbox::open(&dir.join("outbox"), options) {
                    Ok((o, opened)) => {
                        metrics::counter!("weir_agent_outbox_possible_duplicates_total")
                            .increment(opened.unproven as u64);
                        tracing::info!(
                            events = opened.events,
                            pending = opened.pending,
                            dead_letters = opened.dead,
                            possible_duplicates = opened.unproven,
                            torn_bytes_cut = opened.truncated,
                            "outbox opened"
                        );
                        Ok(Arc::new(o))
                    }
                    Err(e) if config.outbox_required => return Err(AgentError::Outbox(e)),
                    Err(e) => {
                        tracing::error!(error = %e,
                            "the outbox cannot be opened; publishing answers 503 until it is repaired (addressed traffic flows)");
                        broken = true;
                        Err(e.to_string())
                    }
                }
            }
        };
        let topics = Arc::new(outbox::topics::Topics::new(
            outbox,
            broken,
            routes.clone(),
            config.durable_by_default,
            config.unsubscribed,
        ));
        let ingress = {
            let (routes, in_flight) = (routes.clone(), in_flight.clone());
            let topics = topics.clone();
            let telemetry = telemetry.clone();
            let (namespace, max) = (config.namespace.clone(), config.max_event_bytes);
            ingress::Workers::start(
                config.ingress_addr,
                config.workers,
                move || {
                    ingress::Ingress::new(
                        routes.clone(),
                        namespace.clone(),
                        max,
                        in_flight.worker(),
                    )
                    .with_topics(topics.clone())
                    .with_telemetry(telemetry.clone())
                },
                stopped.clone(),
                DRAIN,
            )
            .map_err(|source| AgentError::Bind {
                what: "ingress",
                addr: config.ingress_addr,
                source,
            })?
        };
        let scheduler = topics.outbox().is_some().then(|| {
            tokio::spawn(outbox::scheduler::run(
                topics.clone(),
                ingress.runtimes().to_vec(),
                stopped.clone(),
            ))
        });
        let ingress_addr = ingress.addr();
        let (state_tx, state_rx) = watch::channel(session::SessionState::default());
        let hello = Hello {
            node_id: config.node_id.clone(),
            zone: config.zone.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ingress_address: ingress_addr.to_string(),
            ..Hello::default()
        };
        let mut view = view::View::new(routes.clone(), config.stale_grace).with_zone(&config.zone);
        let (persister, seed) = match store {
            Some(store) => {
                let seed = store.restore(&mut view);
                let persister =
                    persist::Persister::new(store, view.mirror(), state_rx.clone(), seed.as_ref());
                let writer = tokio::spawn(persister.clone().run());
                (Some((persister, writer)), seed)
            }
            None => (None, None),
        };
        let local = Arc::new(local::Local::new(
            config.node_id.clone(),
            client.clone(),
            state_rx.clone(),
        ));
        let registry_service = local::LocalRegistry::new(local.clone(), view.mirror());
        let reporter = {
            let (telemetry, local) = (telemetry.clone(), local.clone());
            tokio::spawn(telemetry::report::run(
                telemetry,
                client.clone(),
                routes.clone(),
                move || local.services(),
                stopped.clone(),
            ))
        };
        let session = tokio::spawn(session::run(
            client,
            hello,
            view,
            local.clone(),
            state_tx,
            session::Persistence {
                persister: persister.as_ref().map(|(p, _)| p.clone()),
                seed,
                topics: Some(topics.clone()),
            },
        ));
        let sweeper = {
            let local = local.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(local::SWEEP);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last = tokio::time::Instant::now();
                loop {
                    every.tick().await;
                    let now = tokio::time::Instant::now();
                    let stalled = now
                        .saturating_duration_since(last)
                        .saturating_sub(local::SWEEP);
                    last = now;
                    local.sweep(stalled).await;
                }
            })
        };

        let router = admin::router(admin::Admin {
            node_id: config.node_id.clone(),
            session: state_rx,
            routes,
            in_flight,
            topics,
        });
        let registry_stop = until(stopped.clone());
        let registry = tokio::spawn(async move {
            let server = tonic::transport::Server::builder()
                .add_service(
                    weir_proto::registry::v1::registry_server::RegistryServer::new(
                        registry_service,
                    ),
                )
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(registry_listener)
                        .with_nodelay(Some(true)),
                    registry_stop,
                );
            if let Err(e) = server.await {
                tracing::error!(error = %e, "local registry server failed");
            }
        });
        let admin_stop = until(stopped);
        let admin = tokio::spawn(async move {
            if let Err(e) = axum::serve(admin_listener, router)
                .with_graceful_shutdown(admin_stop)
                .await
            {
                tracing::error!(error = %e, "admin server failed");
            }
        });
        tracing::info!(%ingress_addr, %admin_addr, %registry_addr, node = %config.node_id, "agent started");
        Ok(Self {
            ingress_addr,
            admin_addr,
            registry_addr,
            stop,
            ingress,
            admin,
            registry,
            session,
            sweeper,
            scheduler,
            local,
            persister,
            reporter,
        })
    }

    pub fn ingress_addr(&self) -> SocketAddr {
        self.ingress_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn registry_addr(&self) -> SocketAddr {
        self.registry_addr
    }

    /// Serves until `signal`, then drains: stops accepting, lets requests
    /// in flight finish (up to [`DRAIN`]), deregisters the node's local
    /// instances (so they leave at once, not after the session TTL),
    /// closes the node session and saves the view (with `--data-dir`). A
    /// server task that ends on its own stops the agent with an error.
    pub async fn serve_until(mut self, signal: impl Future<Output = ()>) -> Result<(), AgentError> {
        let failed = tokio::select! {
            () = signal => None,
            () = self.ingress.one_ended() => Some("ingress"),
            _ = &mut self.admin => Some("admin"),
            _ = &mut self.registry => Some("registry"),
            _ = &mut self.session => Some("session"),
            _ = &mut self.sweeper => Some("sweeper"),
        };
        let _ = self.stop.send(true);
        self.ingress.all_ended().await;
        self.sweeper.abort();
        if let Some(scheduler) = &self.scheduler {
            scheduler.abort();
        }
        self.local.deregister_all().await;
        self.reporter.abort();
        self.session.abort();
        if let Some((persister, writer)) = &self.persister {
            writer.abort();
            // What changed in the last second is not lost.
            persister.flush().await;
        }
        // Long-lived streams (a service's KeepAlive, say) would hold a
        // graceful shutdown open: their instances are deregistered by now.
        for (name, task) in [("admin", &mut self.admin), ("registry", &mut self.registry)] {
            if failed != Some(name)
                && tokio::time::timeout(Duration::from_secs(1), &mut *task)
                    .await
                    .is_err()
            {
                task.abort();
            }
        }
        match failed {
            Some(task) => Err(AgentError::Task(task)),
            None => {
                tracing::info!("agent stopped");
                Ok(())
            }
        }
    }
}
