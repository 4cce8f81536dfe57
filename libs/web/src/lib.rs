//! HTTP plumbing shared by orderflow services.
//!
//! - [`Problem`]: RFC 9457 `application/problem+json` bodies, naming each
//!   field at fault, and [`ApiError`], every handler's error;
//! - [`json_body`]: reads a bounded body and deserializes it strictly, so a
//!   bad field is reported by its path (`items[0].quantity`);
//! - [`integer`]: integer body fields that also take whole numbers spelled
//!   `2.0`, as JSON Schema's `integer` does;
//! - [`auth`]: bearer tokens ([`AdminToken`]) for write endpoints;
//! - [`schema`]: OpenAPI schemas of money amounts and client-chosen ids;
//! - [`extractor_errors`]: path and query extractors answering problem+json;
//! - [`not_found_fallback`]: 404 for unknown paths, 405 with `Allow` for a
//!   known path under another method;
//! - [`health`], [`ready`] and [`metrics()`]: liveness, readiness and
//!   Prometheus endpoints;
//! - [`TraceContextRootSpan`] and [`http_metrics`]: request spans that
//!   continue the caller's trace, and request metrics by route;
//! - [`Service`]: a server and its consumers, run and drained together;
//! - [`shutdown_signal`]: a token cancelled on SIGINT or SIGTERM.
//!
//! Errors follow the platform's error policy (`orderflow_db::error`). A
//! service's `main` is [`run`] around a `build` function that returns a
//! [`Service`] (`loyalty-service/src/app.rs` is a complete one):
//!
//! ```no_run
//! use orderflow_web::{Readiness, Service, StartupError};
//! use tokio_util::sync::CancellationToken;
//!
//! #[derive(utoipa::OpenApi)]
//! #[openapi(info(title = "my-service"))]
//! struct ApiDoc;
//!
//! async fn build(pool: orderflow_db::Pool, shutdown: CancellationToken) -> Result<Service, StartupError> {
//!     use utoipa::OpenApi;
//!     let readiness = Readiness::new(pool, vec![]);
//!     let addr = "127.0.0.1:8080".parse().expect("an address");
//!     let (server, port) = orderflow_web::http_server(addr, ApiDoc::openapi(), readiness, |_routes| {})?;
//!     Ok(Service::new(port, server, vec![], shutdown))
//! }
//! ```

pub mod auth;
mod body;
mod error;
mod health;
pub mod integer;
mod observe;
mod problem;
mod registration;
pub mod schema;
mod service;

pub use auth::AdminToken;
pub use body::json_body;
pub use error::ApiError;
pub use health::{Readiness, health, metrics, ready};
pub use observe::{TraceContextRootSpan, http_metrics};
pub use problem::{FieldError, Problem, extractor_errors, not_found_fallback};
pub use registration::describe_and_register;
pub use service::{Service, StartupError, bind, http_server, operational_routes, run};

use tokio_util::sync::CancellationToken;

/// A token cancelled when the process gets SIGINT (Ctrl-C) or SIGTERM.
pub fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}
