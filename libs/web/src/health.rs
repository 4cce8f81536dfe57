use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::{HttpResponse, web};
use diesel_async::RunQueryDsl;
use orderflow_db::Pool;
use serde::Serialize;

/// What `/ready` checks: the database answers and every consumer is
/// connected to the broker.
#[derive(Clone)]
pub struct Readiness {
    pool: Pool,
    consumers: Arc<Vec<(String, Arc<AtomicBool>)>>,
}

#[derive(Serialize)]
struct ReadyBody {
    ready: bool,
    database: bool,
    consumers: Vec<ConsumerState>,
}

#[derive(Serialize)]
struct ConsumerState {
    name: String,
    connected: bool,
}

impl Readiness {
    /// Readiness over `pool` and the named consumer flags.
    pub fn new(pool: Pool, consumers: Vec<(String, Arc<AtomicBool>)>) -> Self {
        Self { pool, consumers: Arc::new(consumers) }
    }

    async fn database_ok(&self) -> bool {
        let check = async {
            let mut conn = self.pool.get().await.ok()?;
            diesel::sql_query("SELECT 1").execute(&mut conn).await.ok()
        };
        matches!(tokio::time::timeout(Duration::from_secs(2), check).await, Ok(Some(_)))
    }
}

/// `GET /health`: the process is up (liveness).
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// `GET /ready`: 200 when the database answers and every consumer is
/// connected, 503 otherwise, with what is down.
pub async fn ready(readiness: web::Data<Readiness>) -> HttpResponse {
    let database = readiness.database_ok().await;
    let consumers: Vec<ConsumerState> = readiness
        .consumers
        .iter()
        .map(|(name, flag)| ConsumerState { name: name.clone(), connected: AtomicBool::load(flag, Ordering::Relaxed) })
        .collect();
    let ready = database && consumers.iter().all(|c| c.connected);
    let body = ReadyBody { ready, database, consumers };
    if ready { HttpResponse::Ok().json(body) } else { HttpResponse::ServiceUnavailable().json(body) }
}

/// `GET /metrics`: the process's metrics in the Prometheus text format.
pub async fn metrics() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(orderflow_telemetry::metrics().render())
}
