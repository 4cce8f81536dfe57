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
//!
//! Failures, and what each costs:
//! - A `basic.return` (unroutable) is matched to its row by the returned
//!   message's own id: the client library attaches returns to whichever
//!   confirm completes next, which with merged (`multiple`) acks is often
//!   another row's. Every confirm resolved by one broker frame is taken in
//!   before any batch is marked, so a return is never late for its row.
//! - A row that can never be a message (event type over 255 bytes, body
//!   above `max_message_bytes`, unreadable columns) is dead at once.
//! - A publish the broker refuses (it closes the channel or connection
//!   with a refusal such as `FRAME_ERROR` for a header above its
//!   `frame_max`, `PRECONDITION_FAILED` or `ACCESS_REFUSED`; a lost
//!   connection or a missing exchange is not a refusal) cannot be traced to
//!   a row while many are in flight: the open batches are rolled back, and
//!   the next `batch_size` rows are sent one at a time, each waiting for its
//!   confirm, so the refusal is charged to the row that caused it (backoff,
//!   dead after `max_attempts`) and the rows before it are published.
//! - The broker unreachable: the relay drops its database session too, so
//!   its lanes and membership go to the other relays at once, and claims
//!   nothing until the broker is back (a circuit breaker). Open
//!   transactions are rolled back at once on any failure.
//! - A stalled database connection: every query is bounded by
//!   `session_timeout` on the relay's side, and the server ends the
//!   session itself after as long without a query (`idle_session_timeout`;
//!   a healthy session rebalances every lease interval), which frees its
//!   lanes for the others even if the relay's process is frozen.
//! - Reconnect backoff grows until work succeeds again (a confirmed
//!   publish, a committed claim), not merely until a connection opens.
//!
//! [`Health`] says whether the relay is working (broker channel and
//! database session both up); `outbox-relay run` serves it on `/health`.

mod publisher;
pub mod retention;
mod store;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use orderflow_broker::{BrokerError, Topology};
use orderflow_db::{Conn, Listener};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use crate::lanes::{LANE_LOCK_CLASS, MEMBER_LOCK_CLASS};
use publisher::{Answer, Confirm, Outcome, Publisher};
pub use store::{CLAIM_SQL, WORKER_SETTINGS};

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
    /// Longest a database operation may take before the connection is taken
    /// as stalled and dropped; also how long the server keeps a session that
    /// sends nothing (`idle_session_timeout`), so a stalled relay's lanes
    /// are freed within it. At least twice `lease_interval`.
    pub session_timeout: Duration,
    /// Rows whose message body is larger are dead at once (see
    /// [`crate::Limits`]).
    pub max_message_bytes: usize,
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
            session_timeout: Duration::from_secs(30),
            max_message_bytes: crate::DEFAULT_MAX_MESSAGE_BYTES,
            retention: retention::Retention::default(),
        }
    }

    /// Checks settings that only work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.session_timeout < self.lease_interval * 2 {
            return Err(ConfigError::SessionTimeout {
                session_timeout: self.session_timeout,
                lease_interval: self.lease_interval,
            });
        }
        Ok(())
    }
}

/// A relay configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The server would end a healthy relay's session between two rebalances.
    #[error(
        "session timeout {session_timeout:?} must be at least twice the lease interval {lease_interval:?} \
         (the relay's session is ended when it sends nothing for that long): raise RELAY_SESSION_TIMEOUT \
         or lower RELAY_LEASE_INTERVAL"
    )]
    SessionTimeout {
        /// The session timeout given.
        session_timeout: Duration,
        /// The lease interval given.
        lease_interval: Duration,
    },
}

/// Whether a relay is working: it has a broker channel to publish on and a
/// database session holding its lanes. Cheap to clone; read it from a
/// health endpoint.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<HealthFlags>);

#[derive(Debug, Default)]
struct HealthFlags {
    broker: AtomicBool,
    database: AtomicBool,
}

impl Health {
    /// Connected to the broker, channel in confirm mode.
    pub fn broker(&self) -> bool {
        AtomicBool::load(&self.0.broker, Ordering::Relaxed)
    }

    /// Holding a database session (and so lanes).
    pub fn database(&self) -> bool {
        AtomicBool::load(&self.0.database, Ordering::Relaxed)
    }

    /// Both: the relay publishes its share of the outbox.
    pub fn working(&self) -> bool {
        self.broker() && self.database()
    }

    fn set_broker(&self, up: bool) {
        self.0.broker.store(up, Ordering::Relaxed);
        metrics::gauge!("outbox_relay_broker_up").set(f64::from(u8::from(up)));
    }

    fn set_database(&self, up: bool) {
        self.0.database.store(up, Ordering::Relaxed);
        metrics::gauge!("outbox_relay_database_up").set(f64::from(u8::from(up)));
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
    DbConnect(#[source] orderflow_db::DbError),
    /// A database operation did not answer within the session timeout.
    #[error("database: no answer within {0:?}, the connection is taken as stalled")]
    DbStalled(Duration),
    /// The broker failed or refused a message: reconnect to it. Rows of the
    /// open batches stay unpublished and are sent again (consumers dedupe).
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    /// A publish was not confirmed in time.
    #[error("broker: no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
}

impl RelayError {
    fn is_broker(&self) -> bool {
        matches!(self, Self::Broker(_) | Self::ConfirmTimeout(_))
    }
}

/// Runs `op` on the database, bounded by `limit`: a stalled connection
/// answers nothing, and must not hold the relay (or its lanes) forever.
async fn bounded<T, E: Into<RelayError>>(
    limit: Duration,
    op: impl Future<Output = Result<T, E>>,
) -> Result<T, RelayError> {
    match tokio::time::timeout(limit, op).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(RelayError::DbStalled(limit)),
    }
}

/// Runs the relay until `shutdown` is cancelled; see [`run_with`].
pub async fn run(cfg: RelayConfig, shutdown: CancellationToken) {
    run_with(cfg, shutdown, Health::default()).await;
}

/// Runs the relay until `shutdown` is cancelled, reporting in `health`
/// whether it works. Never returns an error for an outage: it reconnects
/// with capped exponential backoff instead, and holds no lanes and claims
/// nothing while the broker is down.
pub async fn run_with(cfg: RelayConfig, shutdown: CancellationToken, health: Health) {
    let mut db: Option<Db> = None;
    let mut broker: Option<Publisher> = None;
    let mut db_backoff = backoff::reconnect(cfg.reconnect_max);
    let mut broker_backoff = backoff::reconnect(cfg.reconnect_max);
    // Rows still to send one at a time after a refusal (see the module docs).
    let mut careful = 0usize;
    crate::describe_and_register();
    health.set_broker(false);
    health.set_database(false);
    info!(relay = %cfg.relay_id, exchange = %cfg.topology.events_exchange(), "relay starting");
    let sweeper = tokio::spawn(retention::run(cfg.database_url.clone(), cfg.retention, shutdown.child_token()));

    while !shutdown.is_cancelled() {
        // The broker first: a relay that cannot publish must not hold lanes,
        // or their share of the outbox waits for it while others could
        // publish it.
        let publisher = match broker.as_mut() {
            Some(p) => p,
            None => match Publisher::open(&cfg).await {
                Ok(p) => {
                    health.set_broker(true);
                    broker.insert(p)
                }
                Err(e) => {
                    health.set_broker(false);
                    if db.take().is_some() {
                        health.set_database(false);
                        info!(relay = %cfg.relay_id, "gave up lanes while the broker is unavailable");
                    }
                    metrics::counter!("outbox_relay_reconnects_total", "target" => "broker").increment(1);
                    let wait = broker_backoff.next_wait();
                    warn!(error = %e, retry_in = ?wait, "broker unavailable, not claiming");
                    sleep_or_shutdown(wait, &shutdown).await;
                    continue;
                }
            },
        };
        let session = match db.as_mut() {
            Some(s) => s,
            None => match Db::open(&cfg).await {
                Ok(s) => {
                    health.set_database(true);
                    db.insert(s)
                }
                Err(e) => {
                    health.set_database(false);
                    metrics::counter!("outbox_relay_reconnects_total", "target" => "database").increment(1);
                    let wait = db_backoff.next_wait();
                    warn!(error = %e, retry_in = ?wait, "database unavailable");
                    sleep_or_shutdown(wait, &shutdown).await;
                    continue;
                }
            },
        };

        let started = Instant::now();
        let result = session.pump(publisher, &cfg, &shutdown, &mut careful).await;
        // A connection that opens proves little (a broker refusing every
        // publish, a read-only database accept connections): the backoff
        // starts over only once work succeeded, or after a long healthy run.
        let progress = std::mem::take(&mut session.progress);
        let long_run = started.elapsed() >= cfg.reconnect_max;
        if progress.published || long_run {
            broker_backoff = backoff::reconnect(cfg.reconnect_max);
        }
        if progress.committed || long_run {
            db_backoff = backoff::reconnect(cfg.reconnect_max);
        }
        let Err(e) = result else { continue };
        metrics::counter!("outbox_relay_failures_total", "target" => if e.is_broker() { "broker" } else { "database" })
            .increment(1);
        // Lanes are given up with either side: without the broker they
        // would stall their share of the outbox, and the others take them.
        db = None;
        health.set_database(false);
        let wait = if e.is_broker() {
            broker = None;
            health.set_broker(false);
            broker_backoff.next_wait()
        } else {
            db_backoff.next_wait()
        };
        warn!(error = %e, retry_in = ?wait, "relay cycle failed, reconnecting");
        sleep_or_shutdown(wait, &shutdown).await;
    }
    health.set_broker(false);
    health.set_database(false);
    // The sweeper stops at its next step; a stalled connection must not
    // keep the process from exiting.
    let _ = tokio::time::timeout(cfg.session_timeout, sweeper).await;
    info!(relay = %cfg.relay_id, "relay stopped");
}

async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Which connection of the relay.
#[derive(Clone, Copy)]
enum Role {
    /// LISTEN and lane leases; queries every lease interval.
    Session,
    /// Claim transactions, idle in transaction while confirms come in.
    Worker(usize),
}

/// Opens a connection for the relay: named after it, with asynchronous
/// commit, and with server-side bounds. The relay's commits only mark rows
/// published (or delete them); if the database crashes before such a commit
/// reaches disk, the rows are published again and consumers drop the
/// duplicates, so waiting for the WAL flush would only slow every batch
/// down. The bounds make the server end a session whose relay went silent
/// (a stalled network, a frozen process), which frees its lanes and row
/// locks: the session sends a query every lease interval, a worker is idle
/// in a transaction at most the confirm timeout.
async fn connect(cfg: &RelayConfig, role: Role) -> Result<Conn, RelayError> {
    let limit = cfg.session_timeout;
    let mut conn =
        bounded(limit, async { orderflow_db::establish(&cfg.database_url).await.map_err(RelayError::DbConnect) })
            .await?;
    let ms = |d: Duration| d.as_millis().max(1);
    let (name, bounds) = match role {
        Role::Session => (String::new(), format!("SET idle_session_timeout = {}", ms(limit))),
        Role::Worker(w) => (
            format!("/w{w}"),
            format!(
                "SET idle_in_transaction_session_timeout = {}; {}",
                ms(cfg.confirm_timeout + limit),
                store::WORKER_SETTINGS
            ),
        ),
    };
    let settings = format!("SET synchronous_commit = off; SET statement_timeout = {}; {bounds}", ms(limit));
    bounded(limit, conn.batch_execute(&settings)).await?;
    bounded(
        limit,
        diesel::sql_query("SELECT set_config('application_name', $1, false)")
            .bind::<diesel::sql_types::Text, _>(format!("outbox-relay:{}{name}", cfg.relay_id))
            .execute(&mut conn),
    )
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
    Confirm(usize, (usize, Result<Answer, RelayError>)),
    Notified(Result<(), RelayError>),
    Timer,
    Shutdown,
}

/// What a pump achieved, for the reconnect backoff.
#[derive(Default)]
struct Progress {
    /// A claim transaction committed: the database works.
    committed: bool,
    /// A row was confirmed by the broker: publishing works.
    published: bool,
}

/// The relay's PostgreSQL side: the session (LISTEN, leases) and the
/// worker connections of the claim transactions.
struct Db {
    session: Listener,
    workers: Vec<Conn>,
    /// Whether each worker has a transaction open.
    in_tx: Vec<bool>,
    /// Whether each worker has marked published rows before: the mark's
    /// statement is then prepared on its connection (see [`Db::mark`]).
    marked_before: Vec<bool>,
    lanes: crate::lanes::Lanes,
    last_lease: Option<Instant>,
    progress: Progress,
    limit: Duration,
}

impl Db {
    async fn open(cfg: &RelayConfig) -> Result<Self, RelayError> {
        let limit = cfg.session_timeout;
        let session = connect(cfg, Role::Session).await?;
        let mut session =
            bounded(limit, async { Listener::on(session, NOTIFY_CHANNEL).await.map_err(RelayError::DbConnect) })
                .await?;
        let lanes = bounded(limit, crate::lanes::Lanes::join(session.conn())).await?;
        let mut workers = Vec::new();
        for w in 0..cfg.pipeline.max(1) {
            workers.push(connect(cfg, Role::Worker(w)).await?);
        }
        info!(relay = %cfg.relay_id, "database session open");
        let in_tx = vec![false; workers.len()];
        let marked_before = vec![false; workers.len()];
        Ok(Self {
            session,
            workers,
            in_tx,
            marked_before,
            lanes,
            last_lease: None,
            progress: Progress::default(),
            limit,
        })
    }

    /// Opens a claim transaction on worker `w` and claims up to `limit` rows
    /// of `lanes` in it, in one round trip: the `BEGIN` and the claim are
    /// sent together (pipelined), in that order. A failed `BEGIN` fails the
    /// claim behind it; a failed claim leaves the transaction for
    /// [`Db::pump`] to roll back, as before.
    async fn begin_and_claim(&mut self, w: usize, lanes: &[i16], limit: i64) -> Result<Vec<PendingRow>, RelayError> {
        self.in_tx[w] = true;
        let conn: &Conn = &self.workers[w];
        let begin = async { (&mut { conn }).batch_execute("BEGIN").await };
        let claim = store::claim(conn, lanes, limit);
        bounded(self.limit, async { futures::try_join!(begin, claim).map(|((), rows)| rows) }).await
    }

    async fn commit(&mut self, w: usize) -> Result<(), RelayError> {
        bounded(self.limit, self.workers[w].batch_execute("COMMIT")).await?;
        self.in_tx[w] = false;
        self.progress.committed = true;
        Ok(())
    }

    /// Claims, publishes and marks until shutdown (then drains what is in
    /// flight) or a failure. On a failure every open transaction is rolled
    /// back at once: its rows stay unpublished and are sent again, and it
    /// holds no row locks (nor the vacuum horizon) while the relay waits to
    /// reconnect.
    async fn pump(
        &mut self,
        publisher: &mut Publisher,
        cfg: &RelayConfig,
        shutdown: &CancellationToken,
        careful: &mut usize,
    ) -> Result<(), RelayError> {
        let mut open: Vec<Option<Batch>> = (0..self.workers.len()).map(|_| None).collect();
        let result = self.pump_inner(&mut open, publisher, cfg, shutdown, careful).await;
        if let Err(e) = &result {
            // A failed publish says only that the channel is gone; the
            // confirms rejected with it say why (the broker refused a
            // message, or the connection was lost).
            let refusal = publisher::refused(e) || open.iter_mut().flatten().any(|b| refusal_among(&mut b.confirms));
            if e.is_broker() && refusal && *careful == 0 {
                // The broker turned something down while many rows were in
                // flight: find the row by sending one at a time.
                *careful = usize::try_from(cfg.batch_size).unwrap_or(1).max(1);
                warn!(error = %e, rows = *careful, "broker refused a publish; sending the next rows one at a time");
            }
            open.iter_mut().for_each(|b| drop(b.take()));
            for w in 0..self.workers.len() {
                if self.in_tx[w] {
                    // Best effort: the connection is dropped next anyway,
                    // which ends the transaction on the server too.
                    let _ = bounded(self.limit, self.workers[w].batch_execute("ROLLBACK")).await;
                    self.in_tx[w] = false;
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
        careful: &mut usize,
    ) -> Result<(), RelayError> {
        let mut may_have_work = true;
        let mut next_poll = Instant::now() + cfg.poll_interval;
        loop {
            if self.last_lease.is_none_or(|t| t.elapsed() >= cfg.lease_interval) {
                bounded(self.limit, self.lanes.rebalance(self.session.conn(), &cfg.relay_id)).await?;
                self.last_lease = Some(Instant::now());
            }
            // Start a batch on a free worker while there may be work.
            if may_have_work && !shutdown.is_cancelled() {
                let idle = open.iter().all(Option::is_none);
                let free = open.iter().position(Option::is_none);
                if *careful > 0 {
                    if idle {
                        may_have_work = self.careful(publisher, cfg, careful).await? > 0;
                        continue;
                    }
                } else if let Some(w) = free {
                    let (claimed, batch) = self.start(w, publisher, cfg, &mut open[w]).await?;
                    may_have_work = claimed as i64 >= cfg.batch_size;
                    open[w] = batch;
                    continue;
                }
            }
            if shutdown.is_cancelled() && open.iter().all(Option::is_none) {
                return Ok(());
            }

            let deadline = open.iter().flatten().map(|b| b.started + publisher.confirm_timeout).min();
            // Wake for the next rebalance even when nothing else happens:
            // the session must send a query every lease interval.
            let next_lease = self.last_lease.map_or_else(Instant::now, |t| t + cfg.lease_interval);
            let wake_at =
                [Some(next_poll), Some(next_lease), deadline].into_iter().flatten().min().unwrap_or(next_lease);
            let wake = {
                let confirms = next_confirm(open);
                let session = &mut self.session;
                tokio::select! {
                    biased;
                    (w, c) = confirms => Wake::Confirm(w, c),
                    n = session.notified() => Wake::Notified(n.map_err(RelayError::DbConnect)),
                    _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake_at)) => {
                        match deadline {
                            Some(d) if Instant::now() >= d => return Err(RelayError::ConfirmTimeout(publisher.confirm_timeout)),
                            _ => Wake::Timer,
                        }
                    }
                    _ = shutdown.cancelled(), if !shutdown.is_cancelled() => Wake::Shutdown,
                }
            };
            match wake {
                Wake::Confirm(w, (i, answer)) => {
                    apply(open, w, i, answer?);
                    // Every confirm that the same broker frame resolved is
                    // ready now: take them all in before marking any batch,
                    // so that a return riding on one batch's confirm reaches
                    // its row in another batch before that one is marked.
                    while let Some((w, (i, answer))) = next_confirm(open).now_or_never() {
                        apply(open, w, i, answer?);
                    }
                    let complete: Vec<(usize, Batch)> = open
                        .iter_mut()
                        .enumerate()
                        .filter(|(_, b)| b.as_ref().is_some_and(|b| b.confirms.is_empty()))
                        .filter_map(|(w, b)| b.take().map(|b| (w, b)))
                        .collect();
                    for (w, batch) in complete {
                        // Claim again only for what the batch held back
                        // (see `store::mark`), not after every batch: that
                        // was an empty claim per batch at low rates.
                        may_have_work |= self.finish(w, batch, cfg).await?;
                    }
                }
                Wake::Notified(n) => {
                    n?;
                    may_have_work = true;
                }
                Wake::Timer => {
                    if Instant::now() >= next_poll {
                        may_have_work = true;
                        next_poll = Instant::now() + cfg.poll_interval;
                    }
                }
                Wake::Shutdown => may_have_work = false,
            }
        }
    }

    /// Opens a claim transaction on worker `w`, claims a batch and sends it.
    /// Returns how many rows were claimed, and the batch if it has sends in
    /// flight (otherwise its transaction is already closed). On an error the
    /// transaction, and in `slot` the sends so far, are left for
    /// [`Db::pump`] to inspect and roll back.
    async fn start(
        &mut self,
        w: usize,
        publisher: &Publisher,
        cfg: &RelayConfig,
        slot: &mut Option<Batch>,
    ) -> Result<(usize, Option<Batch>), RelayError> {
        let lanes = self.lanes.held();
        if lanes.is_empty() {
            return Ok((0, None));
        }
        let started = Instant::now();
        let rows = self.begin_and_claim(w, &lanes, cfg.batch_size).await?;
        if rows.is_empty() {
            self.commit(w).await?;
            return Ok((0, None));
        }
        let claimed = started.elapsed();
        let mut outcomes = vec![None; rows.len()];
        let confirms = FuturesUnordered::new();
        for (i, row) in rows.iter().enumerate() {
            match publisher.send(i, row).await {
                Ok(Ok(confirm)) => confirms.push(confirm),
                Ok(Err(outcome)) => outcomes[i] = Some(outcome),
                Err(e) => {
                    // Keep the confirms sent so far in `slot`: they say why
                    // it failed, and the transaction is rolled back with it.
                    *slot = Some(Batch { rows, outcomes, confirms, started, claimed });
                    return Err(e);
                }
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

    /// Claims up to `careful` rows and sends them one at a time, each
    /// waiting for its confirm, so that a refusal by the broker is charged
    /// to the row that caused it. What was confirmed before the refusal is
    /// marked published, and the refused row backs off (dead after the
    /// limit); then the error is returned to reconnect. Returns how many
    /// rows were claimed.
    async fn careful(
        &mut self,
        publisher: &Publisher,
        cfg: &RelayConfig,
        careful: &mut usize,
    ) -> Result<usize, RelayError> {
        let lanes = self.lanes.held();
        if lanes.is_empty() {
            return Ok(0);
        }
        let limit = i64::try_from(*careful).unwrap_or(cfg.batch_size).min(cfg.batch_size);
        let started = Instant::now();
        let rows = self.begin_and_claim(0, &lanes, limit).await?;
        if rows.is_empty() {
            self.commit(0).await?;
            *careful = 0;
            return Ok(0);
        }
        let claimed = started.elapsed();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; rows.len()];
        let mut failure = None;
        for (i, row) in rows.iter().enumerate() {
            // One confirm at a time is slow: stop at the lease interval so
            // the session keeps rebalancing (and is not ended as idle); the
            // rows not sent stay as they were, for the next batch.
            if i > 0 && started.elapsed() >= cfg.lease_interval {
                break;
            }
            let answer = match publisher.send(i, row).await {
                Ok(Err(outcome)) => {
                    outcomes[i] = Some(outcome);
                    continue;
                }
                Ok(Ok(confirm)) => match tokio::time::timeout(publisher.confirm_timeout, confirm).await {
                    Ok((_, answer)) => answer,
                    Err(_) => Err(RelayError::ConfirmTimeout(publisher.confirm_timeout)),
                },
                Err(e) => Err(e),
            };
            match answer {
                Ok(answer) => {
                    outcomes[i] = Some(if answer.acked {
                        Outcome::Published
                    } else {
                        Outcome::Failed("nacked by broker".into())
                    });
                    if let Some(ret) = answer.returned {
                        match ret.message_id.and_then(|id| rows.iter().position(|r| r.message_id == id)) {
                            Some(j) => outcomes[j] = Some(Outcome::Failed(ret.reason)),
                            None => warn!(message_id = ?ret.message_id, "a returned message matched no row in flight"),
                        }
                    }
                }
                Err(e) => {
                    if publisher::refused(&e) {
                        outcomes[i] = Some(Outcome::Failed(format!("refused by broker: {e}")));
                    }
                    failure = Some(e);
                    break;
                }
            }
        }
        let done = outcomes.iter().filter(|o| o.is_some()).count();
        *careful = careful.saturating_sub(done.max(1));
        let count = rows.len();
        let batch = Batch { rows, outcomes, confirms: FuturesUnordered::new(), started, claimed };
        self.mark(0, batch, cfg).await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    /// Marks a batch whose confirms are all in, and commits it.
    /// Returns whether a later event of a published row's aggregate is
    /// waiting (see `store::mark`).
    async fn finish(&mut self, w: usize, mut batch: Batch, cfg: &RelayConfig) -> Result<bool, RelayError> {
        // Every confirm is in, so a row without an outcome had no answer.
        for o in batch.outcomes.iter_mut().filter(|o| o.is_none()) {
            *o = Some(Outcome::Failed("no confirm".into()));
        }
        self.mark(w, batch, cfg).await
    }

    /// Records the outcomes of `batch` and commits its transaction.
    async fn mark(&mut self, w: usize, batch: Batch, cfg: &RelayConfig) -> Result<bool, RelayError> {
        #[cfg(feature = "failpoints")]
        if crate::failpoint("relay-exit-after-publish") {
            // Fault tests: die like a SIGKILL between publish and mark.
            std::process::abort();
        }
        let confirmed = batch.started.elapsed();
        let (has_next, marked) = if self.marked_before[w] && store::marks_in_one(&batch.outcomes) {
            // The mark and the COMMIT in one round trip. Only when the mark
            // is one statement already prepared on this connection: then it
            // is sent at its first poll, before the COMMIT is (a statement
            // still to prepare would let the COMMIT overtake it). If the
            // mark fails, the COMMIT behind it finds the transaction aborted
            // and rolls it back: the rows stay unpublished, as on any
            // failure, and the error is the mark's.
            let conn: &Conn = &self.workers[w];
            let mark = store::mark(conn, &batch.rows, &batch.outcomes, cfg);
            let commit = async { (&mut { conn }).batch_execute("COMMIT").await };
            let has_next =
                bounded(self.limit, async { futures::try_join!(mark, commit).map(|(has_next, ())| has_next) }).await?;
            self.in_tx[w] = false;
            self.progress.committed = true;
            (has_next, batch.started.elapsed())
        } else {
            let has_next =
                bounded(self.limit, store::mark(&self.workers[w], &batch.rows, &batch.outcomes, cfg)).await?;
            let marked = batch.started.elapsed();
            self.commit(w).await?;
            self.marked_before[w] |= batch.outcomes.contains(&Some(Outcome::Published));
            (has_next, marked)
        };
        let committed = batch.started.elapsed();
        if batch.outcomes.contains(&Some(Outcome::Published)) {
            self.progress.published = true;
        }
        debug!(rows = batch.rows.len(), claim = ?batch.claimed, confirm = ?(confirmed - batch.claimed),
            mark = ?(marked - confirmed), commit = ?(committed - marked), "batch");
        metrics::histogram!("outbox_claim_seconds").record(batch.claimed.as_secs_f64());
        metrics::histogram!("outbox_confirm_latency_seconds").record((confirmed - batch.claimed).as_secs_f64());
        metrics::histogram!("outbox_mark_seconds").record((committed - confirmed).as_secs_f64());
        record_metrics(&batch.rows, &batch.outcomes);
        Ok(has_next)
    }
}

/// Whether one of `confirms` already failed because the broker refused a
/// message (see [`publisher::refused`]).
fn refusal_among(confirms: &mut FuturesUnordered<Confirm>) -> bool {
    while let Some(Some((_, answer))) = confirms.next().now_or_never() {
        if let Err(e) = answer
            && publisher::refused(&e)
        {
            return true;
        }
    }
    false
}

/// Records the broker's answer to row `i` of batch `w`: acked or nacked,
/// unless a return already failed the row. A return that came with it is
/// credited to the row whose message id it carries, in whichever open
/// batch that row is.
fn apply(open: &mut [Option<Batch>], w: usize, i: usize, answer: Answer) {
    if let Some(batch) = open[w].as_mut()
        && batch.outcomes[i].is_none()
    {
        batch.outcomes[i] =
            Some(if answer.acked { Outcome::Published } else { Outcome::Failed("nacked by broker".into()) });
    }
    if let Some(ret) = answer.returned {
        let row = ret.message_id.and_then(|id| {
            open.iter_mut().flatten().find_map(|b| b.rows.iter().position(|r| r.message_id == id).map(|j| (b, j)))
        });
        match row {
            Some((batch, j)) => batch.outcomes[j] = Some(Outcome::Failed(ret.reason)),
            None => warn!(message_id = ?ret.message_id, "a returned message matched no row in flight"),
        }
    }
}

/// The next confirm of any open batch, with the batch's slot; never
/// resolves while nothing is in flight.
async fn next_confirm(open: &mut [Option<Batch>]) -> (usize, (usize, Result<Answer, RelayError>)) {
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

fn record_metrics(rows: &[PendingRow], outcomes: &[Option<Outcome>]) {
    metrics::histogram!("outbox_publish_batch_size").record(rows.len() as f64);
    for (row, outcome) in rows.iter().zip(outcomes) {
        let et = row.event_type.clone();
        match outcome {
            Some(Outcome::Published) => {
                metrics::counter!("outbox_published_total", "event_type" => et).increment(1);
            }
            Some(Outcome::Failed(_) | Outcome::Invalid(_)) => {
                metrics::counter!("outbox_publish_failed_total", "event_type" => et).increment(1);
            }
            None => {}
        }
    }
}
