//! The HTTP API of processor-service: products and stock.

use actix_web::{HttpRequest, HttpResponse, get, post, put, web};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;
use orderflow_db::Pool;
use orderflow_web::{ApiError, Problem, json_body};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use std::sync::Arc;

use serde::Serialize;

use crate::catalog::{self, NewProduct, valid_sku};
use crate::notification::{self, BreakerState, CircuitBreaker, Notification};
use crate::schema::products;
use crate::store::Product;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct AppState {
    /// Database pool.
    pub pool: Pool,
    /// Maximum request body size, bytes.
    pub max_body_bytes: usize,
    /// The webhook's circuit breaker.
    pub breaker: Arc<CircuitBreaker>,
    /// The webhook, if configured.
    pub webhook_url: Option<String>,
    /// What the write endpoints (products, stock) require.
    pub admin: orderflow_web::AdminToken,
}

/// A SKU from the path, checked before any query: a SKU that breaks the
/// rules cannot exist (and PostgreSQL refuses a NUL in a text).
fn path_sku(sku: &str) -> Result<&str, Problem> {
    if valid_sku(sku) {
        Ok(sku)
    } else {
        Err(Problem::invalid("path.sku", "must be 1 to 64 characters of letters, digits, '.', '_' or '-'"))
    }
}

/// All products, by SKU.
#[utoipa::path(
    tag = "products",
    responses(
        (status = 200, description = "Every product", body = Vec<Product>),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
// The names declare the methods to `orderflow_web::not_found_fallback` (405s).
#[get("/products", name = "GET /products")]
pub async fn list_products(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let mut conn = state.pool.get().await?;
    let all: Vec<Product> = products::table.order(products::sku).select(Product::as_select()).load(&mut conn).await?;
    Ok(HttpResponse::Ok().json(all))
}

/// One product.
#[utoipa::path(
    tag = "products",
    params(("sku" = String, Path, description = "Product SKU", pattern = r"^[A-Za-z0-9._-]{1,64}$")),
    responses(
        (status = 200, description = "The product", body = Product),
        (status = 400, description = "Not a SKU", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such product", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/products/{sku}", name = "GET /products/{sku}")]
pub async fn get_product(sku: web::Path<String>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let sku = path_sku(&sku)?;
    let mut conn = state.pool.get().await?;
    let product: Option<Product> =
        products::table.find(sku).select(Product::as_select()).first(&mut conn).await.optional()?;
    let product = product.ok_or_else(|| Problem::not_found(format!("no product {sku}")))?;
    Ok(HttpResponse::Ok().json(product))
}

/// Add a product.
#[utoipa::path(
    tag = "products",
    security(("admin_token" = [])),
    request_body(content = NewProduct, content_type = "application/json"),
    responses(
        (status = 201, description = "Added", body = Product),
        (status = 400, description = "Invalid product; `errors` names each field", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "A token is configured and the request lacks it", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The SKU exists", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
#[post("/products", name = "POST /products")]
pub async fn create_product(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.admin.check(&req)?;
    let new: NewProduct = json_body(&req, payload, state.max_body_bytes).await?;
    let errors = new.check("");
    if !errors.is_empty() {
        return Err(Problem::validation(errors).into());
    }
    let mut conn = state.pool.get().await?;
    if !catalog::insert(&mut conn, &new).await? {
        return Err(Problem::conflict(format!(
            "product {} exists; change its stock with PUT /products/{}/stock",
            new.sku, new.sku
        ))
        .into());
    }
    let product: Product = products::table.find(&new.sku).select(Product::as_select()).first(&mut conn).await?;
    Ok(HttpResponse::Created().json(product))
}

/// `PUT /products/{sku}/stock` body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStock {
    /// The new number of units on hand (a stock count), 0 to 1000000000.
    /// Reserved and shipped units are not touched; `received` moves by the
    /// difference.
    #[serde(deserialize_with = "orderflow_web::integer::i32")]
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub on_hand: i32,
}

/// Set the units on hand of a product (a stock count or a delivery).
#[utoipa::path(
    tag = "products",
    params(("sku" = String, Path, description = "Product SKU", pattern = r"^[A-Za-z0-9._-]{1,64}$")),
    security(("admin_token" = [])),
    request_body(content = SetStock, content_type = "application/json"),
    responses(
        (status = 200, description = "The product with its new stock", body = Product),
        (status = 400, description = "Not a SKU, or an invalid body; `errors` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "A token is configured and the request lacks it", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such product", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
#[put("/products/{sku}/stock", name = "PUT /products/{sku}/stock")]
pub async fn set_stock(
    req: HttpRequest,
    sku: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.admin.check(&req)?;
    let sku = path_sku(&sku)?;
    let body: SetStock = json_body(&req, payload, state.max_body_bytes).await?;
    if !(0..=1_000_000_000).contains(&body.on_hand) {
        return Err(Problem::invalid("on_hand", "must be between 0 and 1000000000").into());
    }
    let mut conn = state.pool.get().await?;
    // One statement: the row lock makes it safe against concurrent
    // reservations, and `received` keeps the buckets balanced.
    let updated: Option<Product> = diesel::update(products::table.find(sku))
        .set((
            products::received
                .eq(products::received - products::on_hand.cast::<diesel::sql_types::BigInt>()
                    + i64::from(body.on_hand)),
            products::on_hand.eq(body.on_hand),
            products::updated_at.eq(diesel::dsl::now),
        ))
        .returning(Product::as_returning())
        .get_result(&mut conn)
        .await
        .optional()?;
    let product = updated.ok_or_else(|| Problem::not_found(format!("no product {sku}")))?;
    Ok(HttpResponse::Ok().json(product))
}

/// Filters of `GET /notifications`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct NotificationParams {
    /// Only this order's notifications.
    #[param(pattern = r"^[A-Za-z0-9._:-]{1,64}$")]
    pub order_id: Option<String>,
    /// At most this many, newest first (1 to 500, default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

/// Notifications recorded for customers, newest first.
#[utoipa::path(
    tag = "notifications",
    params(NotificationParams),
    responses(
        (status = 200, description = "The notifications, newest first", body = Vec<Notification>),
        (status = 400, description = "Invalid order id or limit; `errors` names it", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/notifications", name = "GET /notifications")]
pub async fn list_notifications(
    params: web::Query<NotificationParams>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let limit = params.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(Problem::invalid("query.limit", "must be between 1 and 500").into());
    }
    if params.order_id.as_deref().is_some_and(|id| !orderflow_web::schema::valid_id(id)) {
        return Err(Problem::invalid(
            "query.order_id",
            "an order id is 1 to 64 characters of letters, digits, '.', '_', ':' or '-'",
        )
        .into());
    }
    let mut conn = state.pool.get().await?;
    Ok(HttpResponse::Ok().json(notification::list(&mut conn, params.order_id.as_deref(), limit).await?))
}

/// Delivery state of the notification webhook.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookStatus {
    /// Whether a webhook is configured.
    pub configured: bool,
    /// Circuit breaker state.
    pub breaker: BreakerState,
    /// Notifications not delivered yet.
    pub undelivered: i64,
}

/// Webhook delivery status: the circuit breaker and the backlog.
#[utoipa::path(
    tag = "notifications",
    responses(
        (status = 200, description = "The breaker and the backlog", body = WebhookStatus),
        (status = 503, description = "Database unavailable", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/notifications/webhook", name = "GET /notifications/webhook")]
pub async fn webhook_status(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    use crate::schema::notifications;
    let mut conn = state.pool.get().await?;
    let undelivered: i64 =
        notifications::table.filter(notifications::status.ne("delivered")).count().get_result(&mut conn).await?;
    Ok(HttpResponse::Ok().json(WebhookStatus {
        configured: state.webhook_url.is_some(),
        breaker: state.breaker.state(),
        undelivered,
    }))
}
