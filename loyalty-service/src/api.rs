//! The read side over HTTP: a customer's balance and grants.

use actix_web::{HttpResponse, get, web};
use chrono::{DateTime, Utc};
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Nullable, Text, Timestamptz};
use diesel_async::RunQueryDsl;
use orderflow_db::Pool;
use orderflow_web::{ApiError, Problem};
use serde::Serialize;
use utoipa::ToSchema;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The service's database.
    pub pool: Pool,
}

/// A customer's points.
#[derive(Debug, Serialize, ToSchema)]
pub struct Balance {
    /// The customer.
    pub customer_id: String,
    /// Points now.
    pub balance: i64,
    /// Grants, newest first (at most 100).
    pub grants: Vec<Grant>,
}

/// What one order earned.
#[derive(Debug, Serialize, ToSchema, QueryableByName)]
pub struct Grant {
    /// The order.
    #[diesel(sql_type = Text)]
    pub order_id: String,
    /// Points earned (0 for an order cancelled before its confirmation).
    #[diesel(sql_type = BigInt)]
    pub points: i64,
    /// When they were granted.
    #[diesel(sql_type = Timestamptz)]
    pub granted_at: DateTime<Utc>,
    /// When they were taken back, if the order was cancelled.
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    balance: i64,
}

/// A customer's balance and grants.
#[utoipa::path(
    params(("id" = String, Path, description = "The customer id")),
    responses(
        (status = 200, description = "The balance", body = Balance),
        (status = 404, description = "No points ever", body = Problem, content_type = "application/problem+json"),
    )
)]
#[get("/customers/{id}/points", name = "GET /customers/{id}/points")]
pub async fn customer_points(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let id = id.into_inner();
    let mut conn = state.pool.get().await?;
    // One snapshot for both reads: a grant committed between them would
    // show without its balance change.
    let (account, grants) = conn
        .build_transaction()
        .repeatable_read()
        .read_only()
        .run::<_, diesel::result::Error, _>(async |tx| {
            let account: Vec<Row> = diesel::sql_query("SELECT balance FROM accounts WHERE customer_id = $1")
                .bind::<Text, _>(&id)
                .load(tx)
                .await?;
            let grants: Vec<Grant> = diesel::sql_query(
                "SELECT order_id, points, granted_at, revoked_at FROM grants \
                 WHERE customer_id = $1 ORDER BY granted_at DESC, order_id LIMIT 100",
            )
            .bind::<Text, _>(&id)
            .load(tx)
            .await?;
            Ok((account, grants))
        })
        .await?;
    let Some(account) = account.into_iter().next() else {
        return Err(Problem::not_found(format!("customer {id} has no points")).into());
    };
    Ok(HttpResponse::Ok().json(Balance { customer_id: id, balance: account.balance, grants }))
}
