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
    /// A start-up step (declaring queues, seeding the catalog, building a
    /// client) failed; the message says which and why.
    #[error("{step}: {source}")]
    Step {
        /// What was being done.
        step: &'static str,
        /// Why it failed.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StartupError {
    /// A failed start-up `step`, keeping its error as the source.
    pub fn step(step: &'static str) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> Self {
        move |source| Self::Step { step, source }
    }
}

/// Binds `addr`, returning the listener and the port actually bound (for
/// port 0).
pub fn bind(addr: SocketAddr) -> Result<(TcpListener, u16), StartupError> {
    let listener = TcpListener::bind(addr).map_err(|source| StartupError::Bind { addr, source })?;
    let port = listener.local_addr().map_err(|source| StartupError::Bind { addr, source })?.port();
    Ok((listener, port))
}

/// Builds a service's HTTP server on `addr`: request spans continuing the
/// caller's trace, request metrics, problem+json extractor errors, the
/// routes `routes` registers (documented in `doc`), `/health`, `/ready`,
/// `/metrics`, `/openapi.json` with Swagger UI at `/swagger-ui/`, and
/// problem+json 404/405 for the rest. Signals are left to the caller (see
/// [`Service`]). Returns the server and the port bound.
pub fn http_server<F>(
    addr: SocketAddr,
    doc: utoipa::openapi::OpenApi,
    readiness: crate::Readiness,
    routes: F,
) -> Result<(Server, u16), StartupError>
where
    F: Fn(&mut utoipa_actix_web::service_config::ServiceConfig) + Clone + Send + 'static,
{
    use actix_web::{App, HttpServer};
    use utoipa_actix_web::AppExt;

    let (listener, port) = bind(addr)?;
    crate::describe_and_register();
    let server = HttpServer::new(move || {
        let (app, openapi) = App::new()
            .into_utoipa_app()
            .openapi(doc.clone())
            .map(|app| {
                app.wrap(actix_web::middleware::from_fn(crate::http_metrics))
                    .wrap(tracing_actix_web::TracingLogger::<crate::TraceContextRootSpan>::new())
            })
            .app_data(web::Data::new(readiness.clone()))
            .map(|app| app.configure(crate::extractor_errors))
            .configure(routes.clone())
            .split_for_parts();
        app.configure(operational_routes)
            .service(utoipa_swagger_ui::SwaggerUi::new("/swagger-ui/{_:.*}").url("/openapi.json", openapi))
            .default_service(web::to(crate::not_found_fallback))
    })
    .listen(listener)
    .map_err(|source| StartupError::Bind { addr, source })?
    .disable_signals()
    .shutdown_timeout(10)
    .run();
    Ok((server, port))
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

/// The whole `main` of a service binary: logs and traces, the runtime, a
/// shutdown token for SIGTERM and Ctrl-C, `build`, then serve until stopped
/// and drain. A start-up failure is one line on stderr and a non-zero exit.
pub fn run<F, Fut>(name: &str, log: &orderflow_telemetry::LogArgs, build: F) -> std::process::ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<Service, StartupError>>,
{
    use std::process::ExitCode;

    let _telemetry = match orderflow_telemetry::init(log, orderflow_telemetry::LogTo::Stdout, name) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let service = match build(crate::shutdown_signal()).await {
            Ok(service) => service,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                eprintln!("{name}: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        match service.run_until_stopped().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("server failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
