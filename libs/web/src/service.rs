use std::io;
use std::net::{SocketAddr, TcpListener};

use actix_web::dev::Server;
use actix_web::web;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The database is unreachable or could not be migrated.
    #[error(transparent)]
    Db(#[from] orderflow_db::DbError),
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}: {source} (is another process using it? choose another address)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// Seeding or another start-up step failed.
    #[error("{0}")]
    Other(String),
}

/// Binds `addr`, returning the listener and the port actually bound (for
/// port 0).
pub fn bind(addr: SocketAddr) -> Result<(TcpListener, u16), StartupError> {
    let listener = TcpListener::bind(addr).map_err(|source| StartupError::Bind { addr, source })?;
    let port = listener.local_addr().map_err(|source| StartupError::Bind { addr, source })?.port();
    Ok((listener, port))
}

/// `/health`, `/ready` and `/metrics`.
pub fn operational_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(crate::health))
        .route("/ready", web::get().to(crate::ready))
        .route("/metrics", web::get().to(crate::metrics));
}

/// A built service: its HTTP server and background tasks (consumers),
/// stopped together by one token.
pub struct Service {
    port: u16,
    server: Server,
    tasks: Vec<JoinHandle<()>>,
    shutdown: CancellationToken,
}

impl Service {
    /// Wraps a server started with signals disabled, and its tasks.
    pub fn new(port: u16, server: Server, tasks: Vec<JoinHandle<()>>, shutdown: CancellationToken) -> Self {
        Self { port, server, tasks, shutdown }
    }

    /// The bound HTTP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until the token is cancelled, then drains: the server
    /// finishes in-flight requests, the tasks (consumers) finish or requeue
    /// in-flight messages.
    pub async fn run_until_stopped(self) -> io::Result<()> {
        let handle = self.server.handle();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            handle.stop(true).await;
        });
        let served = self.server.await;
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        served
    }
}
