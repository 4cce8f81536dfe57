//! The relay core: wait for NOTIFY or the poll interval; claim due rows of
//! the leased lanes (`FOR UPDATE SKIP LOCKED`, in id order); publish them
//! with pipelined publisher confirms and `mandatory`; mark confirmed rows
//! published, back off failed ones; commit.
//!
//! One dedicated PostgreSQL connection carries the LISTEN, the lane leases
//! and the claim transactions. Sharing it is deliberate: when a relay dies,
//! its open claim transaction is rolled back before its lane locks are
//! released, so the next owner of a lane never overtakes rows in flight.

mod lanes;
mod publisher;
pub mod retention;
mod store;

use std::time::{Duration, Instant};

use diesel_async::{AsyncConnection, RunQueryDsl};
use futures::{FutureExt, StreamExt};
use orderflow_broker::Topology;
use orderflow_db::Conn;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

pub use lanes::{LANE_LOCK_CLASS, MEMBER_LOCK_CLASS};
use publisher::{Outcome, Publisher};

use crate::writer::NOTIFY_CHANNEL;

/// How the relay behaves; see `outbox-relay run --help` for defaults.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The service database whose outbox is relayed.
    pub database_url: String,
    /// The broker.
    pub amqp_url: String,
    /// Names of the exchange to publish to.
    pub topology: Topology,
    /// Shown as the lane owner (`application_name`) and in logs.
    pub relay_id: String,
    /// Rows claimed per transaction.
    pub batch_size: i64,
    /// Claim this often even without a notification (a missed NOTIFY, rows
    /// whose backoff expired).
    pub poll_interval: Duration,
    /// How often lane leases are rebalanced.
    pub lease_interval: Duration,
    /// Failed publishes of a row before it is marked dead.
    pub max_attempts: i32,
    /// First backoff of a failed row; doubles per attempt, with jitter.
    pub retry_base: Duration,
    /// Cap of a row's backoff.
    pub retry_max: Duration,
    /// A publish not confirmed within this is a broker failure.
    pub confirm_timeout: Duration,
    /// Cap of the reconnect backoff (the circuit breaker's open time).
    pub reconnect_max: Duration,
    /// What to delete and when.
    pub retention: retention::Retention,
}

impl RelayConfig {
    /// Defaults for everything but the URLs and the topology.
    pub fn new(database_url: impl Into<String>, amqp_url: impl Into<String>, topology: Topology) -> Self {
        Self {
            database_url: database_url.into(),
            amqp_url: amqp_url.into(),
            topology,
            relay_id: format!("relay-{}", std::process::id()),
            batch_size: 500,
            poll_interval: Duration::from_millis(1000),
            lease_interval: Duration::from_millis(1000),
            max_attempts: 10,
            retry_base: Duration::from_millis(500),
            retry_max: Duration::from_secs(300),
            confirm_timeout: Duration::from_secs(30),
            reconnect_max: Duration::from_secs(30),
            retention: retention::Retention::default(),
        }
    }
}

/// Why a relay cycle stopped; each variant says which side to reconnect.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// PostgreSQL failed: drop the session (and its leases) and reconnect.
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    /// PostgreSQL could not be reached.
    #[error("database: {0}")]
    DbConnect(String),
    /// The broker failed or did not confirm in time: reconnect to it. Rows of
    /// the batch stay unpublished and are sent again (consumers dedupe).
    #[error("broker: {0}")]
    Broker(String),
}

/// Runs the relay until `shutdown` is cancelled. Never returns an error for
/// an outage: it reconnects with capped exponential backoff instead, and
/// claims nothing while the broker is down.
pub async fn run(cfg: RelayConfig, shutdown: CancellationToken) {
    let mut db: Option<DbSession> = None;
    let mut broker: Option<Publisher> = None;
    let mut db_backoff = Backoff::new(cfg.reconnect_max);
    let mut broker_backoff = Backoff::new(cfg.reconnect_max);
    info!(relay = %cfg.relay_id, exchange = %cfg.topology.events_exchange(), "relay starting");
    let sweeper = tokio::spawn(retention::run(cfg.database_url.clone(), cfg.retention, shutdown.child_token()));

    while !shutdown.is_cancelled() {
        let session = match db.as_mut() {
            Some(s) => s,
            None => match DbSession::open(&cfg).await {
                Ok(s) => {
                    db_backoff.reset();
                    db.insert(s)
                }
                Err(e) => {
                    metrics::counter!("outbox_relay_reconnects_total", "target" => "database").increment(1);
                    let wait = db_backoff.next();
                    warn!(error = %e, retry_in = ?wait, "database unavailable");
                    sleep_or_shutdown(wait, &shutdown).await;
                    continue;
                }
            },
        };
        // Circuit breaker: while the broker is down nothing is claimed; the
        // relay sleeps between reconnect attempts with growing delays.
        let publisher = match broker.as_mut() {
            Some(p) => p,
            None => match Publisher::open(&cfg).await {
                Ok(p) => {
                    broker_backoff.reset();
                    metrics::gauge!("outbox_relay_broker_up").set(1.0);
                    broker.insert(p)
                }
                Err(e) => {
                    metrics::gauge!("outbox_relay_broker_up").set(0.0);
                    metrics::counter!("outbox_relay_reconnects_total", "target" => "broker").increment(1);
                    let wait = broker_backoff.next();
                    warn!(error = %e, retry_in = ?wait, "broker unavailable, not claiming");
                    sleep_or_shutdown(wait, &shutdown).await;
                    continue;
                }
            },
        };

        match session.cycle(publisher, &cfg).await {
            // A full batch: there is probably more, claim again at once.
            Ok(n) if n as i64 >= cfg.batch_size => {}
            Ok(_) => {
                if let Err(e) = session.wait(cfg.poll_interval, &shutdown).await {
                    warn!(error = %e, "database session lost");
                    db = None;
                }
            }
            Err(RelayError::Broker(e)) => {
                warn!(error = %e, "broker failed, reconnecting");
                metrics::gauge!("outbox_relay_broker_up").set(0.0);
                broker = None;
            }
            Err(e) => {
                warn!(error = %e, "database failed, reconnecting");
                db = None;
                sleep_or_shutdown(db_backoff.next(), &shutdown).await;
            }
        }
    }
    let _ = sweeper.await;
    info!(relay = %cfg.relay_id, "relay stopped");
}

/// Capped exponential backoff with jitter for reconnects.
struct Backoff {
    current: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);

    fn new(max: Duration) -> Self {
        Self { current: Self::FIRST, max }
    }

    fn reset(&mut self) {
        self.current = Self::FIRST;
    }

    fn next(&mut self) -> Duration {
        let wait = jitter(self.current);
        self.current = (self.current * 2).min(self.max);
        wait
    }
}

/// `d` scaled by a random factor in [0.5, 1.5), so that many relays or rows
/// failing together do not retry in lockstep.
pub(crate) fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>())
}

async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// The relay's PostgreSQL session: one connection with LISTEN, the lane
/// leases and the claim transactions.
struct DbSession {
    conn: Conn,
    lanes: lanes::Lanes,
    last_lease: Option<Instant>,
}

impl DbSession {
    async fn open(cfg: &RelayConfig) -> Result<Self, RelayError> {
        let mut conn = orderflow_db::listen(&cfg.database_url, NOTIFY_CHANNEL)
            .await
            .map_err(|e| RelayError::DbConnect(e.to_string()))?;
        diesel::sql_query("SELECT set_config('application_name', $1, false)")
            .bind::<diesel::sql_types::Text, _>(format!("outbox-relay:{}", cfg.relay_id))
            .execute(&mut conn)
            .await?;
        let lanes = lanes::Lanes::join(&mut conn).await?;
        info!(relay = %cfg.relay_id, "database session open");
        Ok(Self { conn, lanes, last_lease: None })
    }

    /// Rebalances leases when due, then claims, publishes and marks one batch.
    /// Returns how many rows were claimed.
    async fn cycle(&mut self, publisher: &mut Publisher, cfg: &RelayConfig) -> Result<usize, RelayError> {
        if self.last_lease.is_none_or(|t| t.elapsed() >= cfg.lease_interval) {
            self.lanes.rebalance(&mut self.conn, &cfg.relay_id).await?;
            self.last_lease = Some(Instant::now());
        }
        let lanes = self.lanes.held();
        if lanes.is_empty() {
            return Ok(0);
        }
        let span = info_span!("relay_batch", relay = %cfg.relay_id, rows = tracing::field::Empty);
        self.conn
            .transaction::<_, RelayError, _>(async |tx| {
                let rows = store::claim(tx, &lanes, cfg.batch_size).await?;
                if rows.is_empty() {
                    return Ok(0);
                }
                tracing::Span::current().record("rows", rows.len());
                let outcomes = publisher.publish(&rows, cfg.confirm_timeout).await?;
                if crate::failpoint("relay-exit-after-publish") {
                    // Fault tests: die like a SIGKILL between publish and mark.
                    std::process::abort();
                }
                store::mark(tx, &rows, &outcomes, cfg).await?;
                record_metrics(&rows, &outcomes);
                Ok(rows.len())
            })
            .instrument(span)
            .await
    }

    /// Waits for a notification, the poll interval or shutdown; then drains
    /// notifications that piled up so one batch answers all of them.
    async fn wait(&mut self, poll: Duration, shutdown: &CancellationToken) -> Result<(), RelayError> {
        let stream = self.conn.notifications_stream();
        let mut stream = std::pin::pin!(stream);
        let got = tokio::select! {
            n = stream.next() => n,
            _ = tokio::time::sleep(poll) => return Ok(()),
            _ = shutdown.cancelled() => return Ok(()),
        };
        match got {
            Some(Ok(_)) => {
                while let Some(Some(n)) = stream.next().now_or_never() {
                    n?;
                }
                debug!("woken by notify");
                Ok(())
            }
            Some(Err(e)) => Err(e.into()),
            // The connection's task ended: the session is gone.
            None => Err(RelayError::DbConnect("notification stream closed".into())),
        }
    }
}

fn record_metrics(rows: &[crate::PendingRow], outcomes: &[Outcome]) {
    metrics::histogram!("outbox_publish_batch_size").record(rows.len() as f64);
    for (row, outcome) in rows.iter().zip(outcomes) {
        let et = row.event_type.clone();
        match outcome {
            Outcome::Published => {
                metrics::counter!("outbox_published_total", "event_type" => et).increment(1);
            }
            Outcome::Failed(_) | Outcome::Invalid(_) => {
                metrics::counter!("outbox_publish_failed_total", "event_type" => et).increment(1);
            }
            Outcome::Held => {}
        }
    }
}
