//! The relay core: wait for NOTIFY or the poll interval; claim due rows of
//! the leased lanes (`FOR UPDATE SKIP LOCKED`, in id order); publish them
//! with pipelined publisher confirms and `mandatory`; mark confirmed rows
//! published, back off failed ones; commit.
//!
//! Several claim transactions run at once, each on its own worker
//! connection: while one batch waits for its confirms, another is claimed
//! and sent, and a new event is claimed as soon as its NOTIFY arrives. The
//! session connection holds the LISTEN and the lane leases. Only the head of
//! each aggregate's queue is claimable, so overlapping batches, relays, or a
//! dead relay's transaction that is still open never reorder an aggregate.

mod lanes;
mod publisher;
pub mod retention;
mod store;

use std::time::{Duration, Instant};

use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use orderflow_broker::Topology;
use orderflow_db::Conn;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use lanes::{LANE_LOCK_CLASS, MEMBER_LOCK_CLASS};
use publisher::{Confirm, Outcome, Publisher};

use crate::writer::NOTIFY_CHANNEL;
use crate::{PendingRow, backoff};

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
    /// Claim transactions in flight at once (one worker connection each).
    pub pipeline: usize,
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
            pipeline: 3,
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
    let mut db: Option<Db> = None;
    let mut broker: Option<Publisher> = None;
    let mut db_backoff = backoff::reconnect(cfg.reconnect_max);
    let mut broker_backoff = backoff::reconnect(cfg.reconnect_max);
    info!(relay = %cfg.relay_id, exchange = %cfg.topology.events_exchange(), "relay starting");
    let sweeper = tokio::spawn(retention::run(cfg.database_url.clone(), cfg.retention, shutdown.child_token()));

    while !shutdown.is_cancelled() {
        let session = match db.as_mut() {
            Some(s) => s,
            None => match Db::open(&cfg).await {
                Ok(s) => {
                    db_backoff = backoff::reconnect(cfg.reconnect_max);
                    db.insert(s)
                }
                Err(e) => {
                    metrics::counter!("outbox_relay_reconnects_total", "target" => "database").increment(1);
                    let wait = db_backoff.next_wait();
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
                    broker_backoff = backoff::reconnect(cfg.reconnect_max);
                    metrics::gauge!("outbox_relay_broker_up").set(1.0);
                    broker.insert(p)
                }
                Err(e) => {
                    metrics::gauge!("outbox_relay_broker_up").set(0.0);
                    metrics::counter!("outbox_relay_reconnects_total", "target" => "broker").increment(1);
                    let wait = broker_backoff.next_wait();
                    warn!(error = %e, retry_in = ?wait, "broker unavailable, not claiming");
                    sleep_or_shutdown(wait, &shutdown).await;
                    continue;
                }
            },
        };

        match session.pump(publisher, &cfg, &shutdown).await {
            Ok(()) => {}
            Err(RelayError::Broker(e)) => {
                warn!(error = %e, "broker failed, reconnecting");
                metrics::gauge!("outbox_relay_broker_up").set(0.0);
                broker = None;
            }
            Err(e) => {
                warn!(error = %e, "database failed, reconnecting");
                db = None;
                sleep_or_shutdown(db_backoff.next_wait(), &shutdown).await;
            }
        }
    }
    let _ = sweeper.await;
    info!(relay = %cfg.relay_id, "relay stopped");
}

async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Opens a connection for the relay: named after it, and with asynchronous
/// commit. The relay's commits only mark rows published (or delete them); if
/// the database crashes before such a commit reaches disk, the rows are
/// published again and consumers drop the duplicates, so waiting for the WAL
/// flush would only slow every batch down.
async fn connect(cfg: &RelayConfig, role: &str) -> Result<Conn, RelayError> {
    let mut conn =
        orderflow_db::establish(&cfg.database_url).await.map_err(|e| RelayError::DbConnect(e.to_string()))?;
    conn.batch_execute("SET synchronous_commit = off").await?;
    diesel::sql_query("SELECT set_config('application_name', $1, false)")
        .bind::<diesel::sql_types::Text, _>(format!("outbox-relay:{}{role}", cfg.relay_id))
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// A claimed batch: its transaction is open on its worker connection until
/// every confirm is in and the rows are marked.
struct Batch {
    rows: Vec<PendingRow>,
    outcomes: Vec<Option<Outcome>>,
    confirms: FuturesUnordered<Confirm>,
    started: Instant,
    claimed: Duration,
}

/// What woke the pump.
enum Wake {
    Confirm(usize, (usize, Result<Outcome, String>)),
    Notified(Result<(), RelayError>),
    Timer,
    Shutdown,
}

/// The relay's PostgreSQL side: the session (LISTEN, leases) and the
/// worker connections of the claim transactions.
struct Db {
    session: Conn,
    workers: Vec<Conn>,
    lanes: lanes::Lanes,
    last_lease: Option<Instant>,
}

impl Db {
    async fn open(cfg: &RelayConfig) -> Result<Self, RelayError> {
        let mut session = connect(cfg, "").await?;
        diesel::sql_query(format!("LISTEN {NOTIFY_CHANNEL}")).execute(&mut session).await?;
        let lanes = lanes::Lanes::join(&mut session).await?;
        let mut workers = Vec::new();
        for w in 0..cfg.pipeline.max(1) {
            workers.push(connect(cfg, &format!("/w{w}")).await?);
        }
        info!(relay = %cfg.relay_id, "database session open");
        Ok(Self { session, workers, lanes, last_lease: None })
    }

    /// Claims, publishes and marks until shutdown (then drains what is in
    /// flight) or a failure. On a broker failure the open transactions are
    /// rolled back: their rows stay unpublished and are sent again.
    async fn pump(
        &mut self,
        publisher: &mut Publisher,
        cfg: &RelayConfig,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let mut open: Vec<Option<Batch>> = (0..self.workers.len()).map(|_| None).collect();
        let result = self.pump_inner(&mut open, publisher, cfg, shutdown).await;
        if let Err(RelayError::Broker(_)) = &result {
            for (worker, batch) in self.workers.iter_mut().zip(open.iter_mut()) {
                if batch.take().is_some() {
                    worker.batch_execute("ROLLBACK").await?;
                }
            }
        }
        result
    }

    async fn pump_inner(
        &mut self,
        open: &mut [Option<Batch>],
        publisher: &mut Publisher,
        cfg: &RelayConfig,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let mut may_have_work = true;
        loop {
            if self.last_lease.is_none_or(|t| t.elapsed() >= cfg.lease_interval) {
                self.lanes.rebalance(&mut self.session, &cfg.relay_id).await?;
                self.last_lease = Some(Instant::now());
            }
            // Start a batch on a free worker while there may be work.
            if may_have_work && !shutdown.is_cancelled() {
                let free = open.iter().position(Option::is_none);
                if let Some(w) = free {
                    let (claimed, batch) = self.start(w, publisher, cfg).await?;
                    may_have_work = claimed as i64 >= cfg.batch_size;
                    open[w] = batch;
                    continue;
                }
            }
            if shutdown.is_cancelled() && open.iter().all(Option::is_none) {
                return Ok(());
            }

            let deadline = open.iter().flatten().map(|b| b.started + publisher.confirm_timeout).min();
            let poll = if open.iter().all(Option::is_none) { cfg.poll_interval } else { cfg.lease_interval };
            let wake_at = deadline.map_or(Instant::now() + poll, |d| d.min(Instant::now() + poll));
            let wake = {
                let confirms = next_confirm(open);
                let session = &mut self.session;
                tokio::select! {
                    biased;
                    (w, c) = confirms => Wake::Confirm(w, c),
                    n = notified(session) => Wake::Notified(n),
                    _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake_at)) => {
                        match deadline {
                            Some(d) if Instant::now() >= d => return Err(RelayError::Broker(format!("no publisher confirm within {:?}", publisher.confirm_timeout))),
                            _ => Wake::Timer,
                        }
                    }
                    _ = shutdown.cancelled(), if !shutdown.is_cancelled() => Wake::Shutdown,
                }
            };
            match wake {
                Wake::Confirm(w, (i, outcome)) => {
                    let Some(batch) = open[w].as_mut() else { continue };
                    batch.outcomes[i] = Some(outcome.map_err(RelayError::Broker)?);
                    if batch.confirms.is_empty() {
                        if let Some(batch) = open[w].take() {
                            self.finish(w, batch, cfg).await?;
                        }
                        may_have_work = true;
                    }
                }
                Wake::Notified(n) => {
                    n?;
                    may_have_work = true;
                }
                Wake::Timer => may_have_work = true,
                Wake::Shutdown => may_have_work = false,
            }
        }
    }

    /// Opens a claim transaction on worker `w`, claims a batch and sends it.
    /// Returns how many rows were claimed, and the batch if it has sends in
    /// flight (otherwise its transaction is already closed).
    async fn start(
        &mut self,
        w: usize,
        publisher: &Publisher,
        cfg: &RelayConfig,
    ) -> Result<(usize, Option<Batch>), RelayError> {
        let lanes = self.lanes.held();
        if lanes.is_empty() {
            return Ok((0, None));
        }
        let started = Instant::now();
        let conn = &mut self.workers[w];
        conn.batch_execute("BEGIN").await?;
        let rows = store::claim(conn, &lanes, cfg.batch_size).await?;
        if rows.is_empty() {
            conn.batch_execute("COMMIT").await?;
            return Ok((0, None));
        }
        let claimed = started.elapsed();
        let mut outcomes = vec![None; rows.len()];
        let confirms = FuturesUnordered::new();
        for (i, row) in rows.iter().enumerate() {
            match publisher.send(i, row).await? {
                Ok(confirm) => confirms.push(confirm),
                Err(outcome) => outcomes[i] = Some(outcome),
            }
        }
        let count = rows.len();
        let batch = Batch { rows, outcomes, confirms, started, claimed };
        if batch.confirms.is_empty() {
            // Nothing was sendable: mark the invalid rows right away.
            self.finish(w, batch, cfg).await?;
            return Ok((count, None));
        }
        Ok((count, Some(batch)))
    }

    /// Marks a batch whose confirms are all in, and commits it.
    async fn finish(&mut self, w: usize, batch: Batch, cfg: &RelayConfig) -> Result<(), RelayError> {
        if crate::failpoint("relay-exit-after-publish") {
            // Fault tests: die like a SIGKILL between publish and mark.
            std::process::abort();
        }
        let confirmed = batch.started.elapsed();
        let outcomes: Vec<Outcome> =
            batch.outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Failed("no confirm".into()))).collect();
        let conn = &mut self.workers[w];
        store::mark(conn, &batch.rows, &outcomes, cfg).await?;
        let marked = batch.started.elapsed();
        conn.batch_execute("COMMIT").await?;
        let committed = batch.started.elapsed();
        debug!(rows = batch.rows.len(), claim = ?batch.claimed, confirm = ?(confirmed - batch.claimed),
            mark = ?(marked - confirmed), commit = ?(committed - marked), "batch");
        metrics::histogram!("outbox_claim_seconds").record(batch.claimed.as_secs_f64());
        metrics::histogram!("outbox_confirm_latency_seconds").record((confirmed - batch.claimed).as_secs_f64());
        metrics::histogram!("outbox_mark_seconds").record((committed - confirmed).as_secs_f64());
        record_metrics(&batch.rows, &outcomes);
        Ok(())
    }
}

/// The next confirm of any open batch, with the batch's slot; never
/// resolves while nothing is in flight.
async fn next_confirm(open: &mut [Option<Batch>]) -> (usize, (usize, Result<Outcome, String>)) {
    let pending: FuturesUnordered<_> = open
        .iter_mut()
        .enumerate()
        .filter_map(|(w, b)| b.as_mut().filter(|b| !b.confirms.is_empty()).map(|b| (w, b)))
        .map(|(w, b)| async move { (w, b.confirms.next().await) })
        .collect();
    let mut pending = std::pin::pin!(pending.filter_map(|(w, c)| async move { c.map(|c| (w, c)) }));
    match pending.next().await {
        Some(next) => next,
        None => std::future::pending().await,
    }
}

/// Waits for a notification, then drains those that piled up so one claim
/// answers all of them.
async fn notified(session: &mut Conn) -> Result<(), RelayError> {
    let stream = session.notifications_stream();
    let mut stream = std::pin::pin!(stream);
    match stream.next().await {
        Some(Ok(_)) => {
            while let Some(Some(n)) = stream.next().now_or_never() {
                n?;
            }
            Ok(())
        }
        Some(Err(e)) => Err(e.into()),
        // The connection's task ended: the session is gone.
        None => Err(RelayError::DbConnect("notification stream closed".into())),
    }
}

fn record_metrics(rows: &[PendingRow], outcomes: &[Outcome]) {
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
        }
    }
}
