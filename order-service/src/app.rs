//! Building and running order-service: database, consumer and HTTP server.

use actix_web::{App, HttpServer, web};
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use orderflow_web::{Readiness, Service, StartupError};
use tokio_util::sync::CancellationToken;
use tracing_actix_web::TracingLogger;
use utoipa::OpenApi;
use utoipa_actix_web::AppExt;
use utoipa_swagger_ui::SwaggerUi;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::domain::Limits;
use crate::outcomes::{self, Outcomes};

/// order-service's own migrations (the platform's run first).
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

#[derive(OpenApi)]
#[openapi(
    info(
        title = "orderflow order-service",
        description = "Create orders and follow them to confirmed, failed or cancelled. Money is in integer minor units (cents)."
    ),
    components(schemas(orderflow_web::Problem, orderflow_web::FieldError))
)]
struct ApiDoc;

/// Builds order-service: creates and migrates the database, starts the
/// consumer and binds the HTTP listener. `shutdown` stops everything.
pub async fn build(cfg: Config, shutdown: CancellationToken) -> Result<Service, StartupError> {
    if cfg.create_database {
        orderflow_db::ensure_database(&cfg.database_url).await?;
    }
    let pool = orderflow_db::connect(&cfg.database_url, usize::from(cfg.db_pool_size)).await?;
    orderflow_db::migrate(&pool, Some(MIGRATIONS)).await?;

    let consumer_cfg = cfg.consumer.config(outcomes::CONSUMER, outcomes::BINDINGS);
    let readiness = Readiness::new(pool.clone(), vec![(outcomes::CONSUMER.to_owned(), consumer_cfg.connected.clone())]);
    let consumer = tokio::spawn(orderflow_consumer::run(consumer_cfg, pool.clone(), Outcomes, shutdown.child_token()));

    let state = AppState {
        pool,
        limits: Limits { max_items: usize::from(cfg.max_items), ..Limits::default() },
        max_body_bytes: cfg.max_body_bytes as usize,
    };
    let (listener, port) = orderflow_web::bind(cfg.http_addr)?;
    orderflow_telemetry::metrics();
    let server = HttpServer::new(move || {
        let (app, openapi) = App::new()
            .into_utoipa_app()
            .openapi(ApiDoc::openapi())
            .map(|app| {
                app.wrap(actix_web::middleware::from_fn(orderflow_web::http_metrics))
                    .wrap(TracingLogger::<orderflow_web::TraceContextRootSpan>::new())
            })
            .app_data(web::Data::new(state.clone()))
            .app_data(web::Data::new(readiness.clone()))
            .map(|app| app.configure(orderflow_web::extractor_errors))
            .service(api::create_order)
            .service(api::list_orders)
            .service(api::get_order)
            .service(api::order_events)
            .service(api::cancel_order)
            .split_for_parts();
        app.configure(orderflow_web::operational_routes)
            .service(SwaggerUi::new("/swagger-ui/{_:.*}").url("/openapi.json", openapi))
            .default_service(web::to(orderflow_web::not_found_fallback))
    })
    .listen(listener)
    .map_err(|source| StartupError::Bind { addr: cfg.http_addr, source })?
    .disable_signals()
    .shutdown_timeout(10)
    .run();
    tracing::info!(port, "order-service listening");
    Ok(Service::new(port, server, vec![consumer], shutdown))
}
