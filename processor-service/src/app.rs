//! Building and running processor-service: database, catalog, the stage
//! consumers, the notification dispatcher and the HTTP server.

use actix_web::web;
use diesel_migrations::{EmbeddedMigrations, embed_migrations};
use orderflow_web::auth::BearerScheme;
use orderflow_web::{Readiness, Service, StartupError};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use crate::api::{self, AppState};
use std::sync::Arc;

use crate::config::{Config, Stage};
use crate::inventory::{self, Inventory};
use crate::notification::{self, CircuitBreaker, Dispatcher, Notifications, WebhookConfig};
use crate::payment::{self, PaymentRules, Payments};
use crate::shipping::{self, Shipping};

/// processor-service's own migrations (the platform's run first).
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

#[derive(OpenApi)]
#[openapi(
    info(
        title = "orderflow processor-service",
        description = "Products and stock of the inventory stage. Money is a decimal amount in major units (19.99), at most 2 decimal places, read exactly."
    ),
    components(schemas(orderflow_web::Problem, orderflow_web::FieldError)),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

/// Builds processor-service: creates and migrates the database, seeds the
/// catalog, starts the stage consumers and binds the HTTP listener.
pub async fn build(cfg: Config, shutdown: CancellationToken) -> Result<Service, StartupError> {
    let pool =
        orderflow_db::open(&cfg.database_url, usize::from(cfg.db_pool_size), cfg.create_database, MIGRATIONS).await?;
    {
        let mut conn = pool.get().await.map_err(|e| StartupError::step("connecting to the database")(e.into()))?;
        let added = crate::catalog::seed(&mut conn, &cfg.catalog.0)
            .await
            .map_err(|e| StartupError::step("seeding the catalog")(e.into()))?;
        tracing::info!(added, catalog = cfg.catalog.0.len(), "catalog seeded");
    }

    let rules = PaymentRules {
        blocked_skus: cfg.payment_blocked_skus.iter().filter(|s| !s.is_empty()).cloned().collect(),
        amount_limit: cfg.payment_amount_limit,
        decline_rate: cfg.payment_decline_rate,
        decline_seed: cfg.payment_decline_seed,
    };
    let breaker = Arc::new(CircuitBreaker::new(cfg.notify_breaker_threshold, cfg.notify_breaker_cooldown));
    // The notification stage wakes the dispatcher of this process.
    let recorded = Arc::new(tokio::sync::Notify::new());
    let waker = orderflow_outbox::Waker::start(&cfg.database_url, shutdown.child_token());
    let mut tasks = Vec::new();
    let mut connected = Vec::new();
    for stage in [Stage::Inventory, Stage::Payment, Stage::Shipping, Stage::Notification] {
        let (consumer, bindings) = match stage {
            Stage::Inventory => (inventory::CONSUMER, inventory::BINDINGS),
            Stage::Payment => (payment::CONSUMER, payment::BINDINGS),
            Stage::Shipping => (shipping::CONSUMER, shipping::BINDINGS),
            Stage::Notification => (notification::CONSUMER, notification::BINDINGS),
        };
        let mut consumer_cfg = cfg.consumer.config(consumer, bindings);
        consumer_cfg.waker = waker.clone();
        orderflow_consumer::prepare_at_start(&consumer_cfg)
            .await
            .map_err(|e| StartupError::step("declaring the consumers' queues")(e.into()))?;
        let token = shutdown.child_token();
        if !cfg.stages.contains(&stage) {
            tasks.push(tokio::spawn(async move { orderflow_consumer::declare(&consumer_cfg, &token).await }));
            continue;
        }
        connected.push((consumer.to_owned(), consumer_cfg.connected.clone()));
        let pool = pool.clone();
        tasks.push(match stage {
            Stage::Inventory => tokio::spawn(orderflow_consumer::run(consumer_cfg, pool, Inventory, token)),
            Stage::Payment => {
                tokio::spawn(orderflow_consumer::run(consumer_cfg, pool, Payments { rules: rules.clone() }, token))
            }
            Stage::Shipping => tokio::spawn(orderflow_consumer::run(consumer_cfg, pool, Shipping, token)),
            Stage::Notification => {
                let handler = Notifications::new(recorded.clone());
                tokio::spawn(orderflow_consumer::run(consumer_cfg, pool, handler, token))
            }
        });
    }
    if cfg.stages.contains(&Stage::Notification) {
        match &cfg.notify_webhook_url {
            Some(url) => {
                let webhook = WebhookConfig {
                    url: url.clone(),
                    timeout: cfg.notify_webhook_timeout,
                    quick_retries: usize::from(cfg.notify_quick_retries),
                    retry_base: cfg.notify_retry_base,
                    retry_max: cfg.notify_retry_max,
                    max_attempts: cfg.notify_max_attempts,
                    breaker_threshold: cfg.notify_breaker_threshold,
                    breaker_cooldown: cfg.notify_breaker_cooldown,
                    poll_interval: cfg.notify_poll_interval,
                };
                let dispatcher = Dispatcher::new(pool.clone(), recorded.clone(), webhook, breaker.clone())
                    .map_err(|e| StartupError::step("building the webhook client")(e.into()))?;
                tasks.push(tokio::spawn(dispatcher.run(shutdown.child_token())));
            }
            None => tracing::warn!("NOTIFY_WEBHOOK_URL is not set: notifications are recorded but not delivered"),
        }
    }
    let readiness = Readiness::new(pool.clone(), connected);

    let admin = orderflow_web::AdminToken::new(cfg.admin_token.clone());
    if !admin.is_set() {
        tracing::warn!(
            "ADMIN_TOKEN is not set: POST /products and PUT /products/{{sku}}/stock are open to anyone who can \
             reach this port (fine for local use; set ADMIN_TOKEN anywhere else)"
        );
    }
    let state = AppState {
        pool,
        max_body_bytes: cfg.max_body_bytes as usize,
        breaker,
        webhook_url: cfg.notify_webhook_url.clone(),
        admin,
    };
    let (server, port) = orderflow_web::http_server(cfg.http_addr, ApiDoc::openapi(), readiness, move |routes| {
        routes
            .app_data(web::Data::new(state.clone()))
            .service(api::list_products)
            .service(api::create_product)
            .service(api::get_product)
            .service(api::set_stock)
            .service(api::list_notifications)
            .service(api::webhook_status);
    })?;
    crate::describe_and_register();
    tracing::info!(port, "processor-service listening");
    Ok(Service::new(port, server, tasks, shutdown))
}
