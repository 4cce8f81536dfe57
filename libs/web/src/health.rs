use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix_web::{HttpResponse, web};
use diesel_async::RunQueryDsl;
use orderflow_db::Pool;
use serde::Serialize;

/// What `/ready` checks, and what `/health` and `/ready` report.
///
/// Ready means "route requests here": a service is ready while its database
/// answers. The broker is deliberately not part of it: orders are accepted
/// into the outbox while the broker is away (that is what the outbox is
/// for), and taking every replica out of a load balancer during a broker
/// outage would stop intake for nothing. Consumer (broker) state is reported
/// in the body of both endpoints and in metrics instead.
#[derive(Clone)]
pub struct Readiness {
    pool: Pool,
    consumers: Arc<Vec<(String, Arc<AtomicBool>)>>,
}

#[derive(Serialize)]
struct ReadyBody {
    ready: bool,
    database: bool,
    /// Every consumer is subscribed to its queue.
    broker: bool,
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

    fn consumers(&self) -> Vec<ConsumerState> {
        self.consumers
            .iter()
            .map(|(name, flag)| ConsumerState {
                name: name.clone(),
                connected: AtomicBool::load(flag, Ordering::Relaxed),
            })
            .collect()
    }
}

/// `GET /health`: the process is up (liveness), with its consumers'
/// broker state as details (a disconnected consumer is not a reason to
/// restart the process: it reconnects by itself).
pub async fn health(readiness: Option<web::Data<Readiness>>) -> HttpResponse {
    let consumers = readiness.map(|r| r.consumers()).unwrap_or_default();
    let broker = consumers.iter().all(|c| c.connected);
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok", "broker": broker, "consumers": consumers }))
}

/// `GET /ready`: 200 while the database answers, 503 otherwise; the body
/// also says whether each consumer is connected to the broker.
pub async fn ready(readiness: web::Data<Readiness>) -> HttpResponse {
    let database = readiness.database_ok().await;
    let consumers = readiness.consumers();
    let broker = consumers.iter().all(|c| c.connected);
    let ready = database;
    let body = ReadyBody { ready, database, broker, consumers };
    if ready { HttpResponse::Ok().json(body) } else { HttpResponse::ServiceUnavailable().json(body) }
}

/// `GET /metrics`: the process's metrics in the Prometheus text format.
pub async fn metrics() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(orderflow_telemetry::metrics().render())
}
