//! The ingress runs thread-per-core: `n` worker threads, each with its own
//! single-threaded tokio runtime, its own listening socket on the ingress
//! address (`SO_REUSEPORT`: the kernel spreads connections over them) and
//! its own upstream connection pools. A request, its upstream exchange and
//! every task they wake stay on one thread: no cross-thread wake-ups, no
//! shared pool lock on the hot path. What the workers share is read-mostly:
//! the routes (a read lock per request) and a few atomic counters.
//!
//! The outbox's deliveries run on the workers too ([`Workers::runtimes`]):
//! a delivery uses the worker's own pools and is woken by publishes on the
//! same thread, instead of crossing to another runtime's threads.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::TcpSocket,
    runtime::Handle,
    sync::{mpsc, watch},
};

use super::{serve, Ingress};

/// The running workers.
#[derive(Debug)]
pub struct Workers {
    addr: SocketAddr,
    count: usize,
    /// Each worker sends its index when its thread ends.
    exits: mpsc::UnboundedReceiver<usize>,
    exited: usize,
    /// Each worker's runtime and its [`Ingress`].
    runtimes: Vec<(Handle, Arc<Ingress>)>,
}

/// One listening socket on `addr`, shareable with the other workers'.
fn listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)?.into_std()
}

/// One worker: serves `socket` until `stop`, then drains.
async fn work(
    i: usize,
    socket: std::net::TcpListener,
    ingress: Arc<Ingress>,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
) {
    match tokio::net::TcpListener::from_std(socket) {
        Ok(listener) => {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            serve(listener, ingress, stopped, drain).await;
        }
        Err(e) => tracing::error!(worker = i, error = %e, "ingress worker cannot listen"),
    }
}

impl Workers {
    /// Binds `n` sockets on `addr` (port 0: a free port, the same for all)
    /// and starts a worker on each; `make` builds each worker's
    /// [`Ingress`]. They serve until `stop` turns true, then drain for up
    /// to `drain`. Call from within a tokio runtime.
    pub fn start(
        addr: SocketAddr,
        n: usize,
        make: impl Fn() -> Ingress,
        stop: watch::Receiver<bool>,
        drain: Duration,
    ) -> io::Result<Self> {
        let n = n.max(1);
        let first = listener(addr)?;
        let addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..n {
            sockets.push(listener(addr)?);
        }
        let (tx, exits) = mpsc::unbounded_channel();
        let (started_tx, started) = std::sync::mpsc::channel();
        let mut ingresses = Vec::with_capacity(n);
        for (i, socket) in sockets.into_iter().enumerate() {
            let ingress = Arc::new(make());
            ingresses.push(ingress.clone());
            let stop = stop.clone();
            let tx = tx.clone();
            let started_tx = started_tx.clone();
            std::thread::Builder::new()
                .name(format!("weir-ingress-{i}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => {
                            let _ = started_tx.send((i, Some(runtime.handle().clone())));
                            runtime.block_on(work(i, socket, ingress, stop, drain));
                        }
                        Err(e) => {
                            let _ = started_tx.send((i, None));
                            tracing::error!(worker = i, error = %e, "ingress worker cannot start its runtime");
                        }
                    }
                    let _ = tx.send(i);
                })?;
        }
        drop(started_tx);
        // Each thread sends its runtime's handle (or `None`, when it
        // cannot start one) before anything else.
        let mut handles: Vec<Option<Handle>> = vec![None; n];
        for _ in 0..n {
            match started.recv() {
                Ok((i, handle)) => handles[i] = handle,
                Err(_) => break,
            }
        }
        let runtimes = handles
            .into_iter()
            .zip(ingresses)
            .filter_map(|(h, ingress)| Some((h?, ingress)))
            .collect();
        Ok(Self {
            addr,
            count: n,
            exits,
            exited: 0,
            runtimes,
        })
    }

    /// Each running worker's runtime and [`Ingress`], to run work that
    /// sends through the ingress's pools (the outbox's deliveries).
    pub fn runtimes(&self) -> &[(Handle, Arc<Ingress>)] {
        &self.runtimes
    }

    /// The address every worker listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resolves when a worker has ended (on its own, unless stopping).
    pub async fn one_ended(&mut self) {
        if self.exits.recv().await.is_some() {
            self.exited += 1;
        }
    }

    /// Resolves when every worker has ended.
    pub async fn all_ended(&mut self) {
        while self.exited < self.count {
            if self.exits.recv().await.is_none() {
                return;
            }
            self.exited += 1;
        }
    }
}
