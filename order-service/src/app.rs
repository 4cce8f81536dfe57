//! Building and running order-service: database, consumer and HTTP server.

use actix_web::web;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use orderflow_web::{Readiness, Service, StartupError};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

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
        description = "Create orders and follow them to confirmed, failed or cancelled. Money is a decimal amount in major units (19.99), at most 2 decimal places, read exactly."
    ),
    components(schemas(orderflow_web::Problem, orderflow_web::FieldError))
)]
struct ApiDoc;

/// Builds order-service: creates and migrates the database, starts the
/// consumer and binds the HTTP listener. `shutdown` stops everything.
pub async fn build(cfg: Config, shutdown: CancellationToken) -> Result<Service, StartupError> {
    let pool =
        orderflow_db::open(&cfg.database_url, usize::from(cfg.db_pool_size), cfg.create_database, MIGRATIONS).await?;

    let waker = orderflow_outbox::Waker::start(&cfg.database_url, shutdown.child_token());
    let mut consumer_cfg = cfg.consumer.config(outcomes::CONSUMER, outcomes::BINDINGS);
    consumer_cfg.waker = waker.clone();
    orderflow_consumer::prepare_at_start(&consumer_cfg)
        .await
        .map_err(|e| StartupError::step("declaring the consumer's queues")(e.into()))?;
    let readiness = Readiness::new(pool.clone(), vec![(outcomes::CONSUMER.to_owned(), consumer_cfg.connected.clone())]);
    let waiters = std::sync::Arc::new(crate::waiters::Waiters::default());
    let outcomes = Outcomes::new(waiters.clone());
    let consumer = tokio::spawn(orderflow_consumer::run(consumer_cfg, pool.clone(), outcomes, shutdown.child_token()));

    let intake = crate::intake::Intake::start(
        pool.clone(),
        waker.clone(),
        usize::from(cfg.intake_writers),
        usize::from(cfg.intake_batch_max),
    );
    let state = AppState {
        pool,
        waker,
        intake,
        limits: Limits { max_items: usize::from(cfg.max_items), ..Limits::default() },
        max_body_bytes: cfg.max_body_bytes as usize,
        waiters,
    };
    let (server, port) = orderflow_web::http_server(cfg.http_addr, ApiDoc::openapi(), readiness, move |routes| {
        routes
            .app_data(web::Data::new(state.clone()))
            .service(api::create_order)
            .service(api::list_orders)
            .service(api::get_order)
            .service(api::order_events)
            .service(api::cancel_order);
    })?;
    crate::describe_and_register();
    tracing::info!(port, "order-service listening");
    Ok(Service::new(port, server, vec![consumer], shutdown))
}
