//! Building and running loyalty-service: database, consumer, HTTP server.

use actix_web::web;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use orderflow_web::{Readiness, Service, StartupError};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::events::Input;
use crate::points::{CONSUMER, Points};

/// loyalty-service's own migrations (the platform's run first).
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

#[derive(OpenApi)]
#[openapi(
    info(title = "orderflow loyalty-service", description = "Loyalty points earned by confirmed orders."),
    components(schemas(orderflow_web::Problem, orderflow_web::FieldError))
)]
struct ApiDoc;

/// Builds loyalty-service: creates and migrates its database, declares and
/// starts its consumer, binds the HTTP listener. `shutdown` stops it all.
pub async fn build(cfg: Config, shutdown: CancellationToken) -> Result<Service, StartupError> {
    // 1. The database: created if asked, the platform's tables (outbox,
    //    inbox) then ours.
    let pool =
        orderflow_db::open(&cfg.database_url, usize::from(cfg.db_pool_size), cfg.create_database, MIGRATIONS).await?;

    // 2. The consumer: its queue with retry tiers and a dead-letter queue,
    //    declared before anything else so a misconfigured broker stops the
    //    start with one line. The waker tells the relay, after each commit,
    //    that the outbox has rows (the relay's poll is the safety net).
    let waker = orderflow_outbox::Waker::start(&cfg.database_url, shutdown.child_token());
    let mut consumer_cfg = cfg.consumer.config(CONSUMER, Input::BINDINGS);
    consumer_cfg.waker = waker;
    orderflow_consumer::prepare_at_start(&consumer_cfg)
        .await
        .map_err(|e| StartupError::step("declaring the consumer's queues")(e.into()))?;
    let readiness = Readiness::new(pool.clone(), vec![(CONSUMER.to_owned(), consumer_cfg.connected.clone())]);
    let consumer = tokio::spawn(orderflow_consumer::run(consumer_cfg, pool.clone(), Points, shutdown.child_token()));

    // 3. HTTP: our routes plus /health, /ready, /metrics and the OpenAPI.
    let state = AppState { pool };
    let (server, port) = orderflow_web::http_server(cfg.http_addr, ApiDoc::openapi(), readiness, move |routes| {
        routes.app_data(web::Data::new(state.clone())).service(api::customer_points);
    })?;
    orderflow_consumer::describe_and_register(CONSUMER);
    orderflow_outbox::describe_and_register();
    metrics::describe_counter!("loyalty_points_granted_total", "Points granted to customers");
    tracing::info!(port, "loyalty-service listening");
    Ok(Service::new(port, server, vec![consumer], shutdown))
}
