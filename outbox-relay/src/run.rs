//! `outbox-relay run`.

use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::{Context, bail};
use diesel::QueryableByName;
use diesel::sql_types::Bool;
use diesel_async::RunQueryDsl;
use orderflow_broker::Topology;
use orderflow_outbox::relay::{self, Health, RelayConfig};

use crate::cli::{BrokerTarget, RunArgs};

#[derive(QueryableByName)]
struct Exists {
    #[diesel(sql_type = Bool)]
    present: bool,
}

/// Checks the database once, so a wrong URL or an unmigrated database fails
/// at start with one line; outages after that are ridden out.
async fn preflight(url: &str) -> anyhow::Result<()> {
    let mut conn = orderflow_db::establish(url).await?;
    let found: Exists = diesel::sql_query("SELECT to_regclass('outbox') IS NOT NULL AS present")
        .get_result(&mut conn)
        .await
        .context("cannot query the database")?;
    if !found.present {
        bail!(
            "no outbox table in {}: start the service once (it runs the migrations) or point DATABASE_URL at a service database",
            orderflow_db::redact_url(url)
        );
    }
    Ok(())
}

/// `GET /health`: 200 while the relay publishes its share of the outbox
/// (broker channel and database session both up), 503 otherwise, with
/// which side is down. A relay that cannot reach the broker has given up
/// its lanes; it is alive, but not working (`/live` says only that the
/// process serves: the liveness probe, which must not restart a relay for
/// an outage a restart cannot fix).
async fn health(health: web::Data<Health>) -> HttpResponse {
    let body = serde_json::json!({
        "status": if health.working() { "ok" } else { "unavailable" },
        "broker": health.broker(),
        "database": health.database(),
    });
    if health.working() { HttpResponse::Ok().json(body) } else { HttpResponse::ServiceUnavailable().json(body) }
}

/// Runs the relay until SIGTERM or Ctrl-C.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut cfg = RelayConfig::new(
        args.target.database_url.clone(),
        args.target.amqp_url.clone(),
        Topology::new(args.target.topology_prefix.clone()),
    );
    if let Some(id) = args.relay_id {
        cfg.relay_id = id;
    }
    cfg.batch_size = args.batch_size;
    cfg.pipeline = usize::from(args.pipeline);
    cfg.poll_interval = args.poll_interval;
    cfg.lease_interval = args.lease_interval;
    cfg.max_attempts = args.max_attempts;
    cfg.retry_base = args.retry_base;
    cfg.retry_max = args.retry_max;
    cfg.confirm_timeout = args.confirm_timeout;
    cfg.reconnect_max = args.reconnect_max;
    cfg.session_timeout = args.session_timeout;
    cfg.max_message_bytes = args.max_message_bytes;
    cfg.retention = orderflow_outbox::relay::retention::Retention {
        published: args.published_retention,
        inbox: args.inbox_retention,
        interval: args.retention_interval,
        ..Default::default()
    };
    cfg.validate()?;
    preflight(&args.target.database_url).await?;
    let shutdown = orderflow_web::shutdown_signal();
    let status = Health::default();

    orderflow_telemetry::metrics();
    let server = match args.metrics_addr.0 {
        Some(addr) => {
            let (listener, port) = orderflow_web::bind(addr)?;
            let data = web::Data::new(status.clone());
            let console = crate::console::configure(crate::console::Console::new(
                args.target.database_url.clone(),
                BrokerTarget {
                    amqp_url: args.target.amqp_url.clone(),
                    topology_prefix: args.target.topology_prefix.clone(),
                },
                args.console.clone(),
            )?);
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(data.clone())
                    .route("/health", web::get().to(health))
                    .route("/live", web::get().to(orderflow_web::health))
                    .route("/metrics", web::get().to(orderflow_web::metrics))
                    .configure(console.clone())
            })
            .listen(listener)?
            .workers(1)
            .disable_signals()
            .run();
            tracing::info!(
                port,
                read_only = !args.console.is_writable(),
                "relay metrics and console (/console) listening"
            );
            Some(server)
        }
        None => None,
    };
    let handle = server.as_ref().map(|s| s.handle());
    let served = server.map(tokio::spawn);
    relay::run_with(cfg, shutdown, status).await;
    if let Some(handle) = handle {
        handle.stop(true).await;
    }
    if let Some(served) = served {
        let _ = served.await;
    }
    Ok(())
}
