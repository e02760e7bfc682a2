//! The ingress runs thread-per-core: `n` worker threads, each with its own
//! single-threaded tokio runtime, its own listening socket on the ingress
//! address (`SO_REUSEPORT`: the kernel spreads connections over them) and
//! its own upstream connection pools. A request, its upstream exchange and
//! every task they wake stay on one thread: no cross-thread wake-ups, no
//! shared pool lock on the hot path. What the workers share is read-mostly:
//! the routes (a read lock per request) and a few atomic counters.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::TcpSocket,
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
        for (i, socket) in sockets.into_iter().enumerate() {
            let ingress = Arc::new(make());
            let mut stop = stop.clone();
            let tx = tx.clone();
            std::thread::Builder::new()
                .name(format!("weir-ingress-{i}"))
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime.block_on(async move {
                            match tokio::net::TcpListener::from_std(socket) {
                                Ok(listener) => {
                                    let stopped = async move {
                                        let _ = stop.wait_for(|s| *s).await;
                                    };
                                    serve(listener, ingress, stopped, drain).await;
                                }
                                Err(e) => {
                                    tracing::error!(worker = i, error = %e, "ingress worker cannot listen")
                                }
                            }
                        }),
                        Err(e) => {
                            tracing::error!(worker = i, error = %e, "ingress worker cannot start its runtime")
                        }
                    }
                    let _ = tx.send(i);
                })?;
        }
        Ok(Self {
            addr,
            count: n,
            exits,
            exited: 0,
        })
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
