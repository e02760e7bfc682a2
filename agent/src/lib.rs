//! `weir-agent`: one per node, beside the node's services. It carries their
//! event traffic to the instances of the services they address, balanced
//! over the registry the control plane pushes down the node session.
//!
//! - [`config`]: flags, environment and TOML.
//! - [`session`]: the node session (registry and policies, failover,
//!   degraded mode).
//! - [`view`]: the registry view and the routes built from it.
//! - [`balance`]: balancers ([`balance::RoundRobin`], smooth weighted).
//! - [`ingress`]: the HTTP/1.1 + h2c reverse proxy, CloudEvents checks.
//! - [`reject`]: every answer the agent makes itself.
//! - [`admin`]: state, health, readiness and metrics.
//!
//! Not built yet (see `docs/agent.md`): node-local registration, policy
//! enforcement (timeouts, retries, rate limits, breakers), persistence of
//! the view, the durable outbox.

pub mod admin;
pub mod balance;
pub mod body;
pub mod config;
pub mod ingress;
pub mod reject;
pub mod session;
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
    #[error("the {0} task ended on its own")]
    Task(&'static str),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    ingress_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    ingress: JoinHandle<()>,
    admin: JoinHandle<()>,
    session: JoinHandle<()>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, AgentError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Bind { what, addr, source })
}

impl Agent {
    /// Binds the ingress and admin listeners and starts the node session.
    pub async fn start(config: Config) -> Result<Self, AgentError> {
        admin::prometheus();
        let ingress_listener = bind("ingress", config.ingress_addr).await?;
        let admin_listener = bind("admin", config.admin_addr).await?;
        let ingress_addr = ingress_listener
            .local_addr()
            .map_err(|source| AgentError::Bind {
                what: "ingress",
                addr: config.ingress_addr,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| AgentError::Bind {
                what: "admin",
                addr: config.admin_addr,
                source,
            })?;

        let client = Client::with_config(&config.control_plane, ClientConfig::default())?;
        let routes = Arc::new(view::Routes::default());
        let (state_tx, state_rx) = watch::channel(session::SessionState::default());
        let hello = Hello {
            node_id: config.node_id.clone(),
            zone: config.zone.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ingress_address: ingress_addr.to_string(),
            ..Hello::default()
        };
        let session = tokio::spawn(session::run(
            client,
            hello,
            view::View::new(routes.clone()),
            state_tx,
        ));

        let ingress = Arc::new(ingress::Ingress::new(
            routes,
            config.namespace.clone(),
            config.max_event_bytes,
        ));
        let (stop, stopped) = watch::channel(false);
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let ingress_task = tokio::spawn(ingress::serve(
            ingress_listener,
            ingress.clone(),
            until(stopped.clone()),
            DRAIN,
        ));
        let router = admin::router(admin::Admin {
            node_id: config.node_id.clone(),
            session: state_rx,
            ingress,
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
        tracing::info!(%ingress_addr, %admin_addr, node = %config.node_id, "agent started");
        Ok(Self {
            ingress_addr,
            admin_addr,
            stop,
            ingress: ingress_task,
            admin,
            session,
        })
    }

    pub fn ingress_addr(&self) -> SocketAddr {
        self.ingress_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Serves until `signal`, then drains: stops accepting, lets requests
    /// in flight finish (up to [`DRAIN`]) and closes the node session. A
    /// server task that ends on its own stops the agent with an error.
    pub async fn serve_until(mut self, signal: impl Future<Output = ()>) -> Result<(), AgentError> {
        let failed = tokio::select! {
            () = signal => None,
            _ = &mut self.ingress => Some("ingress"),
            _ = &mut self.admin => Some("admin"),
            _ = &mut self.session => Some("session"),
        };
        let _ = self.stop.send(true);
        if failed != Some("ingress") {
            let _ = (&mut self.ingress).await;
        }
        self.session.abort();
        if failed != Some("admin") {
            let _ = (&mut self.admin).await;
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
