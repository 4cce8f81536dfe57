//! Building and running processor-service: database, catalog, the three
//! stage consumers and the HTTP server.

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
use crate::inventory::{self, Inventory};
use crate::payment::{self, PaymentRules, Payments};
use crate::shipping::{self, Shipping};

/// processor-service's own migrations (the platform's run first).
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

#[derive(OpenApi)]
#[openapi(
    info(
        title = "orderflow processor-service",
        description = "Products and stock of the inventory stage. Money is in integer minor units (cents)."
    ),
    components(schemas(orderflow_web::Problem, orderflow_web::FieldError))
)]
struct ApiDoc;

/// Builds processor-service: creates and migrates the database, seeds the
/// catalog, starts the stage consumers and binds the HTTP listener.
pub async fn build(cfg: Config, shutdown: CancellationToken) -> Result<Service, StartupError> {
    if cfg.create_database {
        orderflow_db::ensure_database(&cfg.database_url).await?;
    }
    let pool = orderflow_db::connect(&cfg.database_url, usize::from(cfg.db_pool_size)).await?;
    orderflow_db::migrate(&pool, Some(MIGRATIONS)).await?;
    {
        let mut conn = pool.get().await.map_err(|e| StartupError::Other(format!("database: {e}")))?;
        let added = crate::catalog::seed(&mut conn, &cfg.catalog.0)
            .await
            .map_err(|e| StartupError::Other(format!("seeding the catalog: {e}")))?;
        tracing::info!(added, catalog = cfg.catalog.0.len(), "catalog seeded");
    }

    let rules = PaymentRules {
        blocked_skus: cfg.payment_blocked_skus.iter().filter(|s| !s.is_empty()).cloned().collect(),
        amount_limit: cfg.payment_amount_limit,
        decline_rate: cfg.payment_decline_rate,
        decline_seed: cfg.payment_decline_seed,
    };
    let inventory_cfg = cfg.consumer.config(inventory::CONSUMER, inventory::BINDINGS);
    let payment_cfg = cfg.consumer.config(payment::CONSUMER, payment::BINDINGS);
    let shipping_cfg = cfg.consumer.config(shipping::CONSUMER, shipping::BINDINGS);
    let readiness = Readiness::new(
        pool.clone(),
        [&inventory_cfg, &payment_cfg, &shipping_cfg]
            .iter()
            .map(|c| (c.spec.consumer.clone(), c.connected.clone()))
            .collect(),
    );
    let tasks = vec![
        tokio::spawn(orderflow_consumer::run(inventory_cfg, pool.clone(), Inventory, shutdown.child_token())),
        tokio::spawn(orderflow_consumer::run(payment_cfg, pool.clone(), Payments { rules }, shutdown.child_token())),
        tokio::spawn(orderflow_consumer::run(shipping_cfg, pool.clone(), Shipping, shutdown.child_token())),
    ];

    let state = AppState { pool, max_body_bytes: cfg.max_body_bytes as usize };
    let (listener, port) = orderflow_web::bind(cfg.http_addr)?;
    orderflow_telemetry::metrics();
    let server = HttpServer::new(move || {
        let (app, openapi) = App::new()
            .into_utoipa_app()
            .openapi(ApiDoc::openapi())
            .map(|app| app.wrap(TracingLogger::default()))
            .app_data(web::Data::new(state.clone()))
            .app_data(web::Data::new(readiness.clone()))
            .map(|app| app.configure(orderflow_web::extractor_errors))
            .service(api::list_products)
            .service(api::create_product)
            .service(api::get_product)
            .service(api::set_stock)
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
    tracing::info!(port, "processor-service listening");
    Ok(Service::new(port, server, tasks, shutdown))
}
