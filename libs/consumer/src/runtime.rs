use orderflow_db::CachedDsl;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use futures::{FutureExt, StreamExt};
use orderflow_broker::lapin::message::Delivery;
use orderflow_broker::lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use orderflow_broker::lapin::types::{AMQPValue, FieldTable, LongString};
use orderflow_broker::lapin::{BasicProperties, Channel, Connection};
use orderflow_broker::{QueueSpec, Topology, header_i64, header_str};
use orderflow_db::schema::inbox;
use orderflow_db::{Conn, ErrorClass, Pool, classify};
use orderflow_envelope::{Envelope, EventSet};
use orderflow_outbox::backoff;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, error, info, info_span, warn};
use uuid::Uuid;

use crate::ConsumerError;
use crate::handler::{DEFER_LIMIT, Disposition, Handler, HandlerError, Incoming};

/// Cap of the wait between attempts at a batch while the database is down:
/// short, because the messages are held unacked and should go on soon after.
const DB_WAIT_MAX: Duration = Duration::from_secs(5);

/// Conflicts (deadlock, serialization failure, lost optimistic race) a
/// message may meet in a row before it goes to a retry tier.
const CONFLICT_RETRIES: u32 = 5;

/// How long forwards the broker did not take (e.g. a deleted retry or
/// dead-letter queue) are held before they are requeued, so that a missing
/// queue does not turn into a hot redelivery loop.
const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// Header names the runtime sets on retried and dead-lettered messages.
pub mod headers {
    /// How many times the message failed transiently so far.
    pub const ATTEMPT: &str = "x-orderflow-attempt";
    /// Why it was retried or dead-lettered.
    pub const ERROR: &str = "x-orderflow-error";
    /// The consumer that gave up.
    pub const CONSUMER: &str = "x-orderflow-consumer";
    /// The routing key it was first delivered with (the event type).
    pub const ORIGINAL_ROUTING_KEY: &str = "x-orderflow-original-routing-key";
    /// When it was dead-lettered (RFC 3339).
    pub const FAILED_AT: &str = "x-orderflow-failed-at";
    /// A fresh id per forward (retry or dead letter), by which a message the
    /// broker returns as unroutable is matched to the forward it came from.
    pub const FORWARD_ID: &str = "x-orderflow-forward-id";
}

/// One consumer's settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The broker.
    pub amqp_url: String,
    /// Names of the exchange and queues.
    pub topology: Topology,
    /// The queue to consume, its bindings and retry tiers; `spec.consumer`
    /// is also the inbox key.
    pub spec: QueueSpec,
    /// Batches (transactions) in flight at once.
    pub concurrency: usize,
    /// Most deliveries handled in one transaction.
    pub batch_size: usize,
    /// How long a batch may wait for more deliveries after its first one.
    /// Zero (the default) takes only what has already arrived, so a lone
    /// message is never delayed; under load, deliveries queue up while the
    /// batches in flight commit, and the next batch takes them together.
    pub batch_linger: Duration,
    /// While other batches of this consumer are in flight, how long a batch
    /// that is not full waits for one of them to finish (taking what
    /// arrives meanwhile) before it starts beside them. Zero starts it at
    /// once. Below saturation this keeps one transaction in flight per
    /// consumer, taking everything that queued up while the last one ran:
    /// fewer, larger transactions that do not contend with each other.
    /// Under a backlog full batches still run `concurrency` at once, and a
    /// stalled batch holds the others back only this long.
    pub batch_busy_wait: Duration,
    /// On shutdown, how long in-flight messages may take to finish before
    /// they are left to the broker to redeliver.
    pub drain_timeout: Duration,
    /// Cap of the reconnect backoff.
    pub reconnect_max: Duration,
    /// A broker session that consumed at least this long was healthy: the
    /// reconnect backoff starts short again after it ends.
    pub reconnect_reset_after: Duration,
    /// True while the consumer is subscribed to its queue (for `/ready`).
    pub connected: Arc<AtomicBool>,
    /// Longest one message's handling may take. Each statement and each lock
    /// wait of a handler's transaction is bounded by it on the server
    /// (`statement_timeout`, `lock_timeout`); a message that meets it is
    /// rolled back alone and goes through the retry tiers, then to the
    /// dead-letter queue. If the client side waits even longer (a stalled
    /// connection), the connection is thrown away and the batch goes again
    /// without that message.
    pub handler_timeout: Duration,
    /// Larger messages are dead-lettered without being parsed.
    pub max_message_bytes: usize,
    /// Woken once after every commit that handled a message, so relays
    /// publish what the handlers appended (see [`orderflow_outbox::Waker`]).
    pub waker: orderflow_outbox::Waker,
}

impl ConsumerConfig {
    /// Defaults for everything but the broker, topology and queue.
    pub fn new(amqp_url: impl Into<String>, topology: Topology, spec: QueueSpec) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            topology,
            spec,
            concurrency: 8,
            batch_size: 32,
            batch_linger: Duration::ZERO,
            batch_busy_wait: Duration::from_millis(100),
            drain_timeout: Duration::from_secs(10),
            reconnect_max: Duration::from_secs(30),
            reconnect_reset_after: Duration::from_secs(30),
            connected: Arc::new(AtomicBool::new(false)),
            handler_timeout: Duration::from_secs(30),
            max_message_bytes: 1024 * 1024,
            waker: orderflow_outbox::Waker::none(),
        }
    }

    /// Client-side bound of one message's handling: a little past the
    /// server's, so the server's timeouts (which leave the transaction
    /// usable) normally fire first.
    fn handler_guard(&self) -> Duration {
        self.handler_timeout + (self.handler_timeout / 2).min(Duration::from_secs(5))
    }
}

struct Ctx<H> {
    cfg: ConsumerConfig,
    pool: Pool,
    handler: H,
    /// When `STARVED_MANY` messages of this consumer last went alone within
    /// a second after being passed over `DEFER_LIMIT` times each (their
    /// rows always busy), or, once that happened, a message was passed over
    /// again; in ms since `epoch`, 0: never.
    contended_at: AtomicU64,
    /// Messages that went alone since `starved_since` (ms since `epoch`).
    starved_since: AtomicU64,
    starved_in_window: AtomicU64,
    epoch: Instant,
}

/// Messages going alone within `STARVED_WINDOW_MS` that make a consumer
/// contended. On 3 hot products about 50 a second went alone; spread over
/// 100 products above capacity, a few a minute.
const STARVED_MANY: u64 = 10;
const STARVED_WINDOW_MS: u64 = 1000;

/// How long a consumer counts as contended after the last sign of it.
const CONTENDED_FOR: Duration = Duration::from_secs(30);

/// Held by the batches of contended consumers in this process, one at a
/// time (see `Ctx::contended`).
static SHARED_ROWS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl<H> Ctx<H> {
    fn new(cfg: ConsumerConfig, pool: Pool, handler: H) -> Self {
        Self {
            cfg,
            pool,
            handler,
            contended_at: AtomicU64::new(0),
            starved_since: AtomicU64::new(0),
            starved_in_window: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// A message went alone: many within a second are the sign.
    fn starved(&self) {
        let now = self.now_ms();
        let window = AtomicU64::load(&self.starved_since, Ordering::Relaxed);
        if now.saturating_sub(window) > STARVED_WINDOW_MS {
            self.starved_since.store(now, Ordering::Relaxed);
            self.starved_in_window.store(1, Ordering::Relaxed);
        } else if self.starved_in_window.fetch_add(1, Ordering::Relaxed) + 1 >= STARVED_MANY {
            self.contended_now();
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX).max(1)
    }

    fn contended_now(&self) {
        self.contended_at.store(self.now_ms(), Ordering::Relaxed);
    }

    /// A sign of contention within `CONTENDED_FOR` (`contended_at`): this
    /// consumer's batches keep meeting rows that other batches hold, as on
    /// a few hot products. There every batch but one found all its rows
    /// taken, went again every few milliseconds (a transaction each time),
    /// and its messages ended up going alone, waiting for the rows: 3 hot
    /// products completed 0.41 of the spread case in one benchmark run,
    /// with twice the transactions per order. While contended, a consumer
    /// runs one batch at a time, taking everything that arrived meanwhile,
    /// and the contended consumers of the process (inventory and shipping
    /// move the same stock rows) take turns (`SHARED_ROWS`), so that their
    /// batches find their rows free. Spread over many products messages do
    /// not starve and batches run side by side: serializing them there on
    /// a lesser sign (a chunk whose rows were all busy) cost throughput.
    fn contended(&self) -> bool {
        let at = AtomicU64::load(&self.contended_at, Ordering::Relaxed);
        at != 0 && self.epoch.elapsed().saturating_sub(Duration::from_millis(at)) < CONTENDED_FOR
    }
}

/// How a broker session ended.
enum SessionEnd {
    /// Shutdown asked for.
    Stopped,
    /// Lost (connection, channel, broker): reconnect.
    Lost(Box<Lost>),
    /// The broker's topology disagrees with the configuration: retrying
    /// cannot help.
    Misconfigured(Box<ConsumerError>),
}

/// Why a broker session was lost.
#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error(transparent)]
    Broker(#[from] orderflow_broker::BrokerError),
    #[error(transparent)]
    Topology(#[from] ConsumerError),
    #[error(transparent)]
    Channel(#[from] orderflow_broker::lapin::Error),
    #[error("consumer stream: {0}")]
    Stream(#[source] orderflow_broker::lapin::Error),
    #[error("the broker cancelled the consumer")]
    Cancelled,
}

/// Runs one consumer until `shutdown` is cancelled, reconnecting to the
/// broker with backoff whenever the connection is lost (the backoff starts
/// short again after a session that was healthy for
/// [`ConsumerConfig::reconnect_reset_after`]). On shutdown it stops taking
/// messages, lets in-flight batches finish (up to the drain timeout) and
/// closes the channel, which returns anything unacked to the queue.
///
/// If the broker's queues were declared with other settings (see
/// [`prepare`]), it logs one line saying how to migrate and returns.
pub async fn run<H: Handler>(cfg: ConsumerConfig, pool: Pool, handler: H, shutdown: CancellationToken) {
    let ctx = Arc::new(Ctx::new(cfg, pool, handler));
    let consumer = ctx.cfg.spec.consumer.clone();
    crate::describe_and_register(&consumer);
    let mut waits = backoff::reconnect(ctx.cfg.reconnect_max);
    while !shutdown.is_cancelled() {
        let mut consuming_since = None;
        match session(&ctx, &shutdown, &mut consuming_since).await {
            SessionEnd::Stopped => break,
            SessionEnd::Misconfigured(e) => {
                metrics::counter!("consumer_misconfigured_total", "consumer" => consumer.clone()).increment(1);
                error!(consumer, "consumer stopped: {e}");
                return;
            }
            SessionEnd::Lost(e) => {
                metrics::counter!("consumer_reconnects_total", "consumer" => consumer.clone()).increment(1);
                // A long healthy session was not part of a flapping outage:
                // the next outage begins with a short wait again.
                if consuming_since.is_some_and(|t: Instant| t.elapsed() >= ctx.cfg.reconnect_reset_after) {
                    waits = backoff::reconnect(ctx.cfg.reconnect_max);
                }
                let wait = waits.next_wait();
                warn!(consumer, error = %e, retry_in = ?wait, "broker session ended");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
    }
    info!(consumer, "consumer stopped");
}

/// Declares the consumer's queues (and the exchange) once and reports what
/// stands in the way. A service calls it at start so that a configuration
/// the broker refuses (e.g. a changed delivery limit,
/// [`ConsumerError::ChangedQueue`]) stops it with one line saying how to
/// fix it; an unreachable broker is [`ConsumerError::Broker`], which a
/// service may ignore (the consumer connects when the broker is back).
pub async fn prepare(cfg: &ConsumerConfig) -> Result<(), ConsumerError> {
    let connection = orderflow_broker::connect(&cfg.amqp_url, &format!("declare:{}", cfg.spec.consumer)).await?;
    let declared = cfg.topology.ensure_consumer(&connection, &cfg.spec).await;
    let _ = connection.close(200, "declared".into()).await;
    if let Some(warning) = declared? {
        warn!(consumer = %cfg.spec.consumer, "{warning}");
    }
    Ok(())
}

/// [`prepare`] for a service's start: only a configuration the broker
/// refuses is an error (the service should stop, with that one line). An
/// unreachable broker, or one that does not answer within 5 s, is logged
/// and let be: intake goes on and the consumer connects when it can.
pub async fn prepare_at_start(cfg: &ConsumerConfig) -> Result<(), ConsumerError> {
    match tokio::time::timeout(Duration::from_secs(5), prepare(cfg)).await {
        Ok(Err(e)) if e.is_configuration() => Err(e),
        Ok(Err(e)) => {
            warn!(consumer = %cfg.spec.consumer, error = %e, "broker not reachable at start; the consumer connects when it is");
            Ok(())
        }
        Ok(Ok(())) => Ok(()),
        Err(_) => {
            warn!(consumer = %cfg.spec.consumer, "broker silent at start; the consumer connects when it answers");
            Ok(())
        }
    }
}

/// Declares the consumer's queues (and the exchange) without consuming,
/// retrying until the broker answers or `shutdown`. A stage that does not run
/// in this process still gets its queue, so its messages wait for it. A
/// configuration the broker refuses is logged (one line) and not retried.
pub async fn declare(cfg: &ConsumerConfig, shutdown: &CancellationToken) {
    let mut waits = backoff::reconnect(cfg.reconnect_max);
    while !shutdown.is_cancelled() {
        match prepare(cfg).await {
            Ok(()) => return,
            Err(e) if e.is_configuration() => {
                error!(consumer = %cfg.spec.consumer, "cannot declare queues: {e}");
                return;
            }
            Err(e) => {
                let wait = waits.next_wait();
                warn!(consumer = %cfg.spec.consumer, error = %e, retry_in = ?wait, "cannot declare queues yet");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
    }
}

async fn session<H: Handler>(
    ctx: &Arc<Ctx<H>>,
    shutdown: &CancellationToken,
    consuming_since: &mut Option<Instant>,
) -> SessionEnd {
    let spec = &ctx.cfg.spec;
    let name = format!("consumer:{}", spec.consumer);
    let connection = match orderflow_broker::connect(&ctx.cfg.amqp_url, &name).await {
        Ok(c) => c,
        Err(e) => return SessionEnd::Lost(Box::new(e.into())),
    };
    match ctx.cfg.topology.ensure_consumer(&connection, spec).await.map_err(ConsumerError::from) {
        Ok(None) => {}
        Ok(Some(warning)) => warn!(consumer = %spec.consumer, "{warning}"),
        Err(e) if e.is_configuration() => {
            let _ = connection.close(200, "misconfigured".into()).await;
            return SessionEnd::Misconfigured(Box::new(e));
        }
        Err(e) => return SessionEnd::Lost(Box::new(e.into())),
    }
    let opened = async {
        let channel = connection.create_channel().await?;
        let batch = ctx.cfg.batch_size.max(1);
        // Enough for every batch in flight and the next one to fill up.
        let prefetch = u16::try_from((ctx.cfg.concurrency.max(1) + 1) * batch).unwrap_or(u16::MAX);
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let forwarder = Forwarder::open(&connection).await?;
        let queue = ctx.cfg.topology.queue(&spec.consumer);
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                name.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, orderflow_broker::lapin::Error>((channel, Arc::new(forwarder), consumer))
    };
    let (channel, forwarder, mut consumer) = match opened.await {
        Ok(x) => x,
        Err(e) => return SessionEnd::Lost(Box::new(e.into())),
    };
    info!(consumer = %spec.consumer, queue = %ctx.cfg.topology.queue(&spec.consumer), "consuming");
    *consuming_since = Some(Instant::now());
    ctx.cfg.connected.store(true, Ordering::Relaxed);

    let permits = Arc::new(Semaphore::new(ctx.cfg.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let end = 'session: loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break SessionEnd::Stopped,
            },
            _ = shutdown.cancelled() => break SessionEnd::Stopped,
        };
        // Contended: the batches in flight finish first; the next takes
        // everything that arrived meanwhile (see `Ctx::contended`).
        while ctx.contended() && !tasks.is_empty() {
            tokio::select! {
                _ = tasks.join_next() => {}
                _ = shutdown.cancelled() => break 'session SessionEnd::Stopped,
            }
        }
        let first = tokio::select! {
            d = consumer.next() => d,
            _ = shutdown.cancelled() => break SessionEnd::Stopped,
        };
        let mut batch = match first {
            Some(Ok(delivery)) => vec![delivery],
            Some(Err(e)) => break SessionEnd::Lost(Box::new(Lost::Stream(e))),
            None => break SessionEnd::Lost(Box::new(Lost::Cancelled)),
        };
        // Take what has arrived meanwhile (and, with a linger, what arrives
        // shortly), up to the batch size. While other batches are in flight,
        // a batch that is not full also waits for one of them to finish
        // (taking what arrives meanwhile) rather than start a small
        // transaction beside it; see `ConsumerConfig::batch_busy_wait`.
        let now = tokio::time::Instant::now();
        let linger_until = (!ctx.cfg.batch_linger.is_zero()).then(|| now + ctx.cfg.batch_linger);
        let mut busy_until =
            (!tasks.is_empty() && !ctx.cfg.batch_busy_wait.is_zero()).then(|| now + ctx.cfg.batch_busy_wait);
        let mut ended = None;
        while batch.len() < ctx.cfg.batch_size.max(1) {
            let next = match consumer.next().now_or_never() {
                Some(next) => next,
                None => {
                    let Some(until) = linger_until.max(busy_until) else { break };
                    tokio::select! {
                        biased;
                        // One finished: from now on only what has arrived (and the linger).
                        _ = tasks.join_next(), if busy_until.is_some() => {
                            busy_until = None;
                            continue;
                        }
                        next = tokio::time::timeout_at(until, consumer.next()) => match next {
                            Ok(next) => next,
                            Err(_) => break,
                        },
                        _ = shutdown.cancelled() => break,
                    }
                }
            };
            match next {
                Some(Ok(delivery)) => batch.push(delivery),
                Some(Err(e)) => {
                    ended = Some(SessionEnd::Lost(Box::new(Lost::Stream(e))));
                    break;
                }
                None => {
                    ended = Some(SessionEnd::Lost(Box::new(Lost::Cancelled)));
                    break;
                }
            }
        }
        for delivery in &batch {
            forwarder.acks.received(delivery);
        }
        let (ctx, forwarder, shutdown) = (ctx.clone(), forwarder.clone(), shutdown.clone());
        tasks.spawn(async move {
            process_batch(&ctx, &forwarder, batch, &shutdown).await;
            drop(permit);
        });
        if let Some(end) = ended {
            break end;
        }
    };

    ctx.cfg.connected.store(false, Ordering::Relaxed);
    // Stop taking work, give in-flight batches time to finish, then close:
    // the broker requeues whatever is still unacked.
    let _ = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
    let drained =
        tokio::time::timeout(ctx.cfg.drain_timeout, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(consumer = %spec.consumer, left = tasks.len(), "drain timeout, leaving messages to redelivery");
        tasks.abort_all();
    }
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = connection.close(200, "shutdown".into()).await;
    end
}

/// One delivery of a batch, with its event decoded as `E`.
struct Item<E> {
    delivery: Delivery,
    /// Transient failures so far (from the retry header).
    attempt: i64,
    /// The decoded message; None if it was refused before handling.
    message: Option<(Envelope, E)>,
    /// The message's own span (continuing its writer's trace).
    span: Span,
    /// Conflicts met in this batch.
    conflicts: u32,
    /// Times `Handler::prepare` left it for a later transaction.
    deferrals: u32,
}

/// What becomes of a delivery once its batch has committed.
enum Verdict {
    /// Handled or a duplicate: ack it.
    Done(&'static str),
    /// Failed transiently: next retry tier (or the DLQ after the last).
    Retry(String),
    /// Failed for good: the DLQ.
    Dead(String),
}

enum Applied {
    New,
    Duplicate,
    /// Left for a later transaction by `Handler::prepare` (its rows were busy).
    Deferred,
}

/// Why a batch's transaction did not commit.
enum Failure {
    /// The database (pool, connection) is unavailable: try the batch again
    /// once it is back.
    Database(String),
    /// Message `index` overran the handler guard on the client side; its
    /// connection was thrown away with the transaction.
    Stuck { index: usize, after: Duration },
    /// The commit itself failed (no single message to blame).
    Commit(diesel::result::Error),
    /// Something failed in a batch run without savepoints that is no one
    /// message's (the batch's inbox insert, `prepare`): the transaction was
    /// rolled back, and the batch goes again with one savepoint per message.
    Fallback,
    /// Message `index` failed in a batch run without savepoints: the
    /// transaction was rolled back; the message is settled as if it had
    /// failed alone, and the rest go again.
    Failed { index: usize, error: HandlerError },
}

/// Handles a batch of deliveries: one transaction, one savepoint per
/// message, one commit; then acks, retries and dead letters. Messages that
/// must go again (conflicts, an unavailable dependency, a batch that did
/// not commit) go again in a new transaction, without the ones already
/// settled.
async fn process_batch<H: Handler>(
    ctx: &Ctx<H>,
    out: &Forwarder,
    deliveries: Vec<Delivery>,
    shutdown: &CancellationToken,
) {
    let consumer = ctx.cfg.spec.consumer.as_str();
    let started = Instant::now();
    metrics::histogram!("consumer_batch_size", "consumer" => consumer.to_owned()).record(deliveries.len() as f64);
    let mut refused = Vec::new();
    let mut items = Vec::with_capacity(deliveries.len());
    for (i, delivery) in deliveries.into_iter().enumerate() {
        let (item, verdict) = admit(ctx, delivery);
        items.push(item);
        if let Some(v) = verdict {
            refused.push((i, v));
        }
    }
    settle(ctx, out, &items, refused, started).await;
    let mut pending: Vec<usize> = (0..items.len()).filter(|&i| items[i].message.is_some()).collect();
    let mut db_waits = backoff::reconnect(DB_WAIT_MAX);
    let mut commit_conflicts = 0;
    let mut one_at_a_time = false;
    // First without savepoints (see `run_chunk`); after a failure there,
    // with one per message, so that a failing message is rolled back alone.
    let mut careful = false;
    let mut lane = None;
    while !pending.is_empty() {
        if lane.is_none() && ctx.contended() {
            tokio::select! {
                l = SHARED_ROWS.lock() => lane = Some(l),
                // Unacked: the broker redelivers them after we close.
                _ = shutdown.cancelled() => return,
            }
        }
        // A message passed over too often goes alone, waiting for its rows.
        // Holding the lane, no other batch of this process holds them: the
        // batch's messages go on together, and only a holder elsewhere (a
        // replica) makes one wait, after longer.
        let limit = if lane.is_some() { DEFER_LIMIT * 3 } else { DEFER_LIMIT };
        let starved = pending.iter().copied().find(|&i| items[i].deferrals >= limit);
        if starved.is_some() {
            ctx.starved();
            metrics::counter!("consumer_starved_total", "consumer" => consumer.to_owned()).increment(1);
        }
        let chunk: Vec<usize> = match starved {
            Some(i) => vec![i],
            None if one_at_a_time => vec![pending[0]],
            None => pending.clone(),
        };
        let (outcome, appended) = orderflow_outbox::watch_appends(orderflow_db::held::scope(transact(
            ctx,
            &items,
            &chunk,
            starved.is_none(),
            careful,
        )))
        .await;
        let outcome = match outcome {
            // Its handler ran once, as it would have in a savepoint; the
            // others in the chunk were rolled back with it and go again.
            Err(Failure::Failed { index, error }) => Ok(vec![(index, Err(error))]),
            other => other,
        };
        let pause = match outcome {
            Ok(results) => {
                let answered: HashSet<usize> = results.iter().map(|(i, _)| *i).collect();
                {
                    let applied: Vec<&H::Event> = results
                        .iter()
                        .filter(|(_, r)| matches!(r, Ok(Applied::New)))
                        .filter_map(|(i, _)| items[*i].message.as_ref().map(|(_, e)| e))
                        .collect();
                    if !applied.is_empty() {
                        // One wake-up per committed batch that gave the
                        // relays something.
                        if appended {
                            ctx.cfg.waker.wake();
                        }
                        ctx.handler.committed(&applied);
                    }
                }
                let mut verdicts = Vec::new();
                let mut again = Vec::new();
                let mut pause = None;
                for (i, result) in results {
                    let item = &mut items[i];
                    let _in_span = item.span.enter();
                    let failure = match result {
                        Ok(Applied::New) => {
                            verdicts.push((i, Verdict::Done("handled")));
                            continue;
                        }
                        Ok(Applied::Duplicate) => {
                            verdicts.push((i, Verdict::Done("duplicate")));
                            continue;
                        }
                        Ok(Applied::Deferred) => {
                            item.deferrals += 1;
                            again.push(i);
                            pause = pause.or(Some(Duration::from_millis(rand::random_range(1..10))));
                            if ctx.contended() {
                                // Still: it lasts while batches still meet.
                                ctx.contended_now();
                            }
                            metrics::counter!("consumer_deferred_total", "consumer" => consumer.to_owned())
                                .increment(1);
                            continue;
                        }
                        Err(e) => e,
                    };
                    match failure.disposition() {
                        Disposition::RetryNow if item.conflicts < CONFLICT_RETRIES => {
                            item.conflicts += 1;
                            debug!(error = %failure, conflicts = item.conflicts, "conflict, going again");
                            again.push(i);
                            pause = pause.or(Some(Duration::from_millis(rand::random_range(1..20))));
                        }
                        Disposition::RetryNow | Disposition::RetryLater => {
                            verdicts.push((i, Verdict::Retry(failure.to_string())));
                        }
                        Disposition::DeadLetter => verdicts.push((i, Verdict::Dead(failure.to_string()))),
                        Disposition::WaitForDependency | Disposition::WaitForDatabase => {
                            let wait = db_waits.next_wait();
                            warn!(error = %failure, retry_in = ?wait, "unavailable, holding message");
                            again.push(i);
                            pause = Some(wait);
                        }
                    }
                }
                settle(ctx, out, &items, verdicts, started).await;
                pending.retain(|i| !answered.contains(i) || again.contains(i));
                pause
            }
            Err(Failure::Fallback) => {
                careful = true;
                None
            }
            // Turned into its message's result above.
            Err(Failure::Failed { .. }) => None,
            Err(Failure::Database(e)) => {
                let wait = db_waits.next_wait();
                warn!(consumer, error = %e, retry_in = ?wait, held = pending.len(), "database unavailable, holding messages");
                Some(wait)
            }
            Err(Failure::Stuck { index, after }) => {
                let reason = format!("the handler took more than {after:?}; its connection was discarded");
                items[index].span.in_scope(|| warn!(%reason, "handler stuck"));
                settle(ctx, out, &items, vec![(index, Verdict::Retry(reason))], started).await;
                pending.retain(|&i| i != index);
                None
            }
            Err(Failure::Commit(e)) => match classify(&e) {
                ErrorClass::Connection => {
                    let wait = db_waits.next_wait();
                    warn!(consumer, error = %e, retry_in = ?wait, "commit failed, holding messages");
                    Some(wait)
                }
                ErrorClass::Conflict if commit_conflicts < CONFLICT_RETRIES => {
                    commit_conflicts += 1;
                    debug!(consumer, error = %e, "commit conflict, going again");
                    Some(Duration::from_millis(rand::random_range(1..20)))
                }
                _ if chunk.len() == 1 => {
                    let verdict = match classify(&e) {
                        ErrorClass::Permanent => Verdict::Dead(format!("commit failed: {e}")),
                        _ => Verdict::Retry(format!("commit failed: {e}")),
                    };
                    settle(ctx, out, &items, vec![(chunk[0], verdict)], started).await;
                    pending.retain(|&i| i != chunk[0]);
                    None
                }
                _ => {
                    // No message to blame: find it by going one at a time.
                    warn!(consumer, error = %e, "batch commit failed; handling its messages one at a time");
                    one_at_a_time = true;
                    None
                }
            },
        };
        if let Some(wait) = pause {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // Unacked: the broker redelivers them after we close.
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Reads a delivery; refuses (dead-letters) what cannot be handled.
fn admit<H: Handler>(ctx: &Ctx<H>, delivery: Delivery) -> (Item<H::Event>, Option<Verdict>) {
    let consumer = ctx.cfg.spec.consumer.as_str();
    let attempt = header_i64(&delivery.properties, headers::ATTEMPT).unwrap_or(0).max(0);
    let refuse = |delivery: Delivery, reason: String| {
        let span = info_span!("consume", consumer, routing_key = %delivery.routing_key);
        span.in_scope(|| warn!(%reason, "refusing message"));
        (Item { delivery, attempt, message: None, span, conflicts: 0, deferrals: 0 }, Some(Verdict::Dead(reason)))
    };
    if delivery.data.len() > ctx.cfg.max_message_bytes {
        let reason = format!("message too large: {} bytes (limit {})", delivery.data.len(), ctx.cfg.max_message_bytes);
        return refuse(delivery, reason);
    }
    let (env, event) =
        match Envelope::from_slice(&delivery.data).and_then(|env| H::Event::from_envelope(&env).map(|ev| (env, ev))) {
            Ok(x) => x,
            Err(e) => return refuse(delivery, e.to_string()),
        };
    #[cfg(feature = "failpoints")]
    if env.payload.get("__abort").is_some() && orderflow_outbox::failpoint("consumer-abort-on-marked-message") {
        // Fault tests: a consumer that crashes on this message every time,
        // to show the queue's delivery limit parking it.
        std::process::abort();
    }
    let span = info_span!("consume", consumer, message_id = %env.message_id, event_type = %env.event_type,
        aggregate_id = %env.aggregate_id, correlation_id = %env.correlation_id);
    // The span continues the trace of whoever wrote the message.
    orderflow_telemetry::continue_trace(&span, env.traceparent.as_deref());
    (Item { delivery, attempt, message: Some((env, event)), span, conflicts: 0, deferrals: 0 }, None)
}

/// Which message is being handled, and until when it may take.
#[derive(Default)]
struct Watch(Mutex<Option<(usize, tokio::time::Instant)>>);

impl Watch {
    fn start(&self, index: usize, guard: Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some((index, tokio::time::Instant::now() + guard));
    }

    fn stop(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Resolves with the index of a message that overran its guard.
    async fn overrun(&self, idle: Duration) -> usize {
        loop {
            let current = *self.0.lock().unwrap_or_else(|e| e.into_inner());
            match current {
                Some((index, deadline)) => {
                    tokio::time::sleep_until(deadline).await;
                    if *self.0.lock().unwrap_or_else(|e| e.into_inner()) == Some((index, deadline)) {
                        return index;
                    }
                }
                None => tokio::time::sleep(idle).await,
            }
        }
    }
}

/// Runs `chunk` of the batch in one transaction and commits it.
async fn transact<H: Handler>(
    ctx: &Ctx<H>,
    items: &[Item<H::Event>],
    chunk: &[usize],
    prepare: bool,
    careful: bool,
) -> Result<Vec<(usize, Result<Applied, HandlerError>)>, Failure> {
    let mut pooled = ctx.pool.get().await.map_err(|e| Failure::Database(e.to_string()))?;
    let guard = ctx.cfg.handler_guard();
    let watch = Watch::default();
    let outcome = {
        let mode = Mode { prepare, careful };
        let work = run_chunk(ctx, &mut pooled, items, chunk, mode, &watch, guard);
        tokio::select! {
            outcome = work => outcome,
            index = watch.overrun(Duration::from_millis(100)) => Err(Failure::Stuck { index, after: guard }),
        }
    };
    if matches!(outcome, Err(Failure::Stuck { .. } | Failure::Database(_))) {
        // Abandoned mid-way, or broken: the connection's state is unknown,
        // so it is closed rather than handed to anyone else. The server ends
        // the session (and its locks) when it notices the client is gone.
        drop(orderflow_db::PooledConn::take(pooled));
    }
    outcome
}

/// Why the batch's transaction was rolled back.
enum Abort {
    /// The database failed beneath the batch.
    Db(diesel::result::Error),
    /// No one message failed in a run without savepoints (see [`Failure::Fallback`]).
    Fallback,
    /// Message `index` failed in a run without savepoints (see [`Failure::Failed`]).
    Failed { index: usize, error: HandlerError },
}

impl From<diesel::result::Error> for Abort {
    fn from(e: diesel::result::Error) -> Self {
        Self::Db(e)
    }
}

/// In a run without savepoints, any failure but a lost connection rolls the
/// batch back to go again with savepoints.
fn fallback(e: diesel::result::Error) -> Abort {
    match classify(&e) {
        ErrorClass::Connection => Abort::Db(e),
        _ => Abort::Fallback,
    }
}

/// How a chunk of a batch is run.
#[derive(Debug, Clone, Copy)]
struct Mode {
    /// Call [`Handler::prepare`] first.
    prepare: bool,
    /// One savepoint per message (and one for `prepare`), so a failing
    /// message is rolled back alone. Without (how a batch runs first),
    /// every message's inbox row goes in with one statement, and a failing
    /// handler rolls the whole batch back: that message is settled with its
    /// failure (its handler ran once, as in a savepoint) and the rest go
    /// again, still without savepoints. Only a failure that is no one
    /// message's (the inbox insert, `prepare`) sends the batch to savepoints.
    /// Failures are rare, and the two round trips of a savepoint per message
    /// are a good part of the database's work per message.
    careful: bool,
}

async fn run_chunk<H: Handler>(
    ctx: &Ctx<H>,
    conn: &mut Conn,
    items: &[Item<H::Event>],
    chunk: &[usize],
    mode: Mode,
    watch: &Watch,
    guard: Duration,
) -> Result<Vec<(usize, Result<Applied, HandlerError>)>, Failure> {
    let limit = ctx.cfg.handler_timeout.as_millis().max(1);
    // Bounds the work on the server, so that a session never outlives its
    // handler: each statement and lock wait (the handler's timeout), a
    // client that went quiet mid-transaction, and a client that went away
    // while a statement runs (checked every second).
    // In the BEGIN's round trip, and as one statement (`set_config(..,
    // true)` is `SET LOCAL`): four `SET LOCAL`s were four statements for
    // the server to parse and run per transaction.
    let begin = format!(
        "BEGIN; SELECT set_config('statement_timeout', '{limit}', true), \
         set_config('lock_timeout', '{limit}', true), \
         set_config('idle_in_transaction_session_timeout', '{idle}', true), \
         set_config('client_connection_check_interval', '1000', true)",
        idle = guard.as_millis().max(1) * 2,
    );
    let finished = AtomicBool::new(false);
    let consumer = ctx.cfg.spec.consumer.as_str();
    let committed = orderflow_db::transaction_with::<_, Abort>(conn, &begin, async |tx| {
        let handled: Vec<usize> = chunk.iter().copied().filter(|&i| items[i].message.is_some()).collect();
        let events: Vec<&H::Event> =
            handled.iter().filter_map(|&i| items[i].message.as_ref().map(|(_, e)| e)).collect();
        // Even for one message: the shared rows are then always taken
        // first and without waiting, batch or not.
        let mut ready: HashSet<usize> = handled.iter().copied().collect();
        if mode.prepare {
            let prepared = if mode.careful {
                tx.transaction::<Vec<bool>, diesel::result::Error, _>(async |sp| ctx.handler.prepare(sp, &events).await)
                    .await
                    .map_err(Abort::Db)
            } else {
                // Without a savepoint a failure leaves the transaction
                // aborted: the batch goes again, with one.
                ctx.handler.prepare(tx, &events).await.map_err(fallback)
            };
            match prepared {
                Err(Abort::Db(e)) if classify(&e) == ErrorClass::Connection => return Err(Abort::Db(e)),
                Err(Abort::Fallback | Abort::Failed { .. }) => return Err(Abort::Fallback),
                Err(Abort::Db(e)) => debug!(consumer, error = %e, "batch preparation failed; handling without it"),
                Ok(flags) => {
                    for (&i, go) in handled.iter().zip(flags.into_iter().chain(std::iter::repeat(true))) {
                        if !go {
                            ready.remove(&i);
                        }
                    }
                }
            }
        }
        let results = if mode.careful {
            handle_careful(ctx, consumer, tx, items, chunk, &ready, watch, guard).await?
        } else {
            handle_at_once(ctx, consumer, tx, items, chunk, &ready, watch, guard).await?
        };
        finished.store(true, Ordering::Relaxed);
        Ok(results)
    })
    .await;
    match committed {
        Ok(results) => Ok(results),
        Err(Abort::Fallback) => Err(Failure::Fallback),
        Err(Abort::Failed { index, error }) => Err(Failure::Failed { index, error }),
        Err(Abort::Db(e)) if AtomicBool::load(&finished, Ordering::Relaxed) => Err(Failure::Commit(e)),
        Err(Abort::Db(e)) => Err(Failure::Database(e.to_string())),
    }
}

/// The results of a chunk's messages, by index in the batch.
type Results = Vec<(usize, Result<Applied, HandlerError>)>;

/// Each message in a savepoint of its own: a failing one is rolled back
/// alone and reported, the others go on.
#[allow(clippy::too_many_arguments)]
async fn handle_careful<H: Handler>(
    ctx: &Ctx<H>,
    consumer: &str,
    tx: &mut Conn,
    items: &[Item<H::Event>],
    chunk: &[usize],
    ready: &HashSet<usize>,
    watch: &Watch,
    guard: Duration,
) -> Result<Results, Abort> {
    let mut results = Vec::with_capacity(chunk.len());
    for &i in chunk {
        let item = &items[i];
        let Some((env, event)) = &item.message else { continue };
        if !ready.contains(&i) {
            results.push((i, Ok(Applied::Deferred)));
            continue;
        }
        watch.start(i, guard);
        let result = tx
            .transaction::<Applied, HandlerError, _>(async |sp| apply(ctx, consumer, sp, env, event).await)
            .instrument(item.span.clone())
            .await;
        watch.stop();
        match result {
            // The connection is gone: the whole batch waits for it.
            Err(HandlerError::Db(e)) if classify(&e) == ErrorClass::Connection => return Err(Abort::Db(e)),
            other => results.push((i, other)),
        }
    }
    Ok(results)
}

/// Every message's inbox row in one statement, then each new message's
/// handler, without savepoints: a failing handler rolls the batch back
/// ([`Abort::Failed`]), any other failure too ([`Abort::Fallback`]).
#[allow(clippy::too_many_arguments)]
async fn handle_at_once<H: Handler>(
    ctx: &Ctx<H>,
    consumer: &str,
    tx: &mut Conn,
    items: &[Item<H::Event>],
    chunk: &[usize],
    ready: &HashSet<usize>,
    watch: &Watch,
    guard: Duration,
) -> Result<Results, Abort> {
    let rows: Vec<_> = chunk
        .iter()
        .filter(|i| ready.contains(i))
        .filter_map(|&i| items[i].message.as_ref())
        .map(|(env, _)| {
            (inbox::consumer.eq(consumer), inbox::message_id.eq(env.message_id), inbox::event_type.eq(&env.event_type))
        })
        .collect();
    // What the handlers hold (their events, their own rows) goes in with a
    // statement per kind before the commit (a statement per row otherwise).
    // A failure there is no one message's: the batch goes again with
    // savepoints, where nothing is held.
    orderflow_db::held::start();
    // What comes back was not recorded before: new. (Two copies of one
    // message in the batch come back once; the first is handled.)
    let mut fresh: HashSet<Uuid> = if rows.is_empty() {
        HashSet::new()
    } else {
        diesel::insert_into(inbox::table)
            .values(&rows)
            .on_conflict_do_nothing()
            .returning(inbox::message_id)
            .cached()
            .get_results::<Uuid>(tx)
            .await
            .map_err(fallback)?
            .into_iter()
            .collect()
    };
    let mut results = Vec::with_capacity(chunk.len());
    for &i in chunk {
        let item = &items[i];
        let Some((envelope, event)) = &item.message else { continue };
        if !ready.contains(&i) {
            results.push((i, Ok(Applied::Deferred)));
            continue;
        }
        if !fresh.remove(&envelope.message_id) {
            results.push((i, Ok(Applied::Duplicate)));
            continue;
        }
        watch.start(i, guard);
        let result = ctx.handler.handle(tx, Incoming { envelope, event }).instrument(item.span.clone()).await;
        watch.stop();
        match result {
            Ok(()) => results.push((i, Ok(Applied::New))),
            Err(HandlerError::Db(e)) if classify(&e) == ErrorClass::Connection => return Err(Abort::Db(e)),
            Err(error) => {
                item.span.in_scope(|| debug!(%error, "failed in a batch without savepoints; the rest go again"));
                return Err(Abort::Failed { index: i, error });
            }
        }
    }
    orderflow_db::held::flush(tx).await.map_err(fallback)?;
    Ok(results)
}

/// Records the message in the inbox and runs the handler, inside the
/// message's savepoint.
async fn apply<H: Handler>(
    ctx: &Ctx<H>,
    consumer: &str,
    sp: &mut Conn,
    env: &Envelope,
    event: &H::Event,
) -> Result<Applied, HandlerError> {
    let inserted = diesel::insert_into(inbox::table)
        .values((
            inbox::consumer.eq(consumer),
            inbox::message_id.eq(env.message_id),
            inbox::event_type.eq(&env.event_type),
        ))
        .on_conflict_do_nothing()
        .cached()
        .execute(sp)
        .await?;
    if inserted == 0 {
        return Ok(Applied::Duplicate);
    }
    ctx.handler.handle(sp, Incoming { envelope: env, event }).await?;
    Ok(Applied::New)
}

fn count(consumer: &str, outcome: &'static str) {
    metrics::counter!("consumer_messages_total", "consumer" => consumer.to_owned(), "outcome" => outcome).increment(1);
}

/// The session channel's deliveries that are not settled yet, so that acks
/// are merged: one `basic.ack` with `multiple` for the settled deliveries
/// that lead the unsettled ones (a batch, as a rule, when batches finish in
/// the order they came), one each for the rest, which never wait for an
/// older batch. A `multiple` ack settles every unsettled delivery up to its
/// tag on the broker, so it is sent only when every delivery up to that tag
/// is acked or nacked already, and frames go out in the order they were
/// decided (under the lock).
#[derive(Default)]
struct Acks {
    /// Tags received and not settled yet. A plain mutex, held only to
    /// decide: taking deliveries in never waits for acks on the wire.
    unsettled: Mutex<std::collections::BTreeSet<u64>>,
    /// Held while a decision's frames go out, so that frames leave in the
    /// order they were decided.
    turn: tokio::sync::Mutex<()>,
}

impl Acks {
    /// A delivery came in (before its batch can settle it).
    fn received(&self, delivery: &Delivery) {
        if let Ok(mut unsettled) = self.unsettled.lock() {
            unsettled.insert(delivery.delivery_tag);
        }
    }

    /// Acks `deliveries`.
    async fn ack(&self, deliveries: &[&Delivery]) {
        if deliveries.is_empty() {
            return;
        }
        let _turn = self.turn.lock().await;
        let mut settled: std::collections::BTreeMap<u64, &Delivery> =
            deliveries.iter().map(|d| (d.delivery_tag, *d)).collect();
        let mut lead = None;
        if let Ok(mut guard) = self.unsettled.lock() {
            let unsettled = &mut *guard;
            while let Some(&oldest) = std::collections::BTreeSet::first(unsettled) {
                let Some(delivery) = settled.remove(&oldest) else { break };
                unsettled.pop_first();
                lead = Some(delivery);
            }
            for tag in settled.keys() {
                unsettled.remove(tag);
            }
        } else {
            // Poisoned (a panic elsewhere): no merging, one ack each.
            settled.extend(lead.take().map(|d| (d.delivery_tag, d)));
        }
        if let Some(delivery) = lead {
            ack(delivery, true).await;
        }
        for delivery in settled.values() {
            ack(delivery, false).await;
        }
    }

    /// Nacks `delivery` back into its queue.
    async fn requeue(&self, delivery: &Delivery) {
        let _turn = self.turn.lock().await;
        let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
        if let Ok(mut unsettled) = self.unsettled.lock() {
            unsettled.remove(&delivery.delivery_tag);
        }
    }
}

async fn ack(delivery: &Delivery, multiple: bool) {
    // An ack on a channel that died is lost; the broker redelivers the
    // message and the inbox recognizes it.
    if let Err(e) = delivery.ack(BasicAckOptions { multiple }).await {
        warn!(error = %e, "ack failed; the message will be redelivered and deduplicated");
    }
}

/// Carries out verdicts reached after a commit (or before any handling):
/// acks, and forwards to retry tiers and the DLQ (each original acked only
/// once its copy is confirmed, never lost in between).
async fn settle<H: Handler>(
    ctx: &Ctx<H>,
    out: &Forwarder,
    items: &[Item<H::Event>],
    verdicts: Vec<(usize, Verdict)>,
    started: Instant,
) {
    let spec = &ctx.cfg.spec;
    let consumer = spec.consumer.as_str();
    let mut forwards = Vec::new();
    let mut done = Vec::new();
    for (i, verdict) in verdicts {
        let item = &items[i];
        let _in_span = item.span.enter();
        match verdict {
            Verdict::Done(outcome) => {
                debug!(outcome, "message done");
                done.push((i, outcome));
            }
            Verdict::Retry(error) => match spec.retry_delays.get(item.attempt as usize) {
                Some(delay) => {
                    warn!(error, attempt = item.attempt + 1, ?delay, "transient failure, retrying later");
                    let target = ctx.cfg.topology.retry_queue(consumer, *delay);
                    forwards.push((i, target, annotate(&item.delivery, consumer, &error, item.attempt + 1), "retried"));
                }
                None => {
                    let reason = format!("gave up after {} attempts: {error}", item.attempt + 1);
                    error!(consumer, error = reason, "dead-lettering message");
                    let target = ctx.cfg.topology.dead_letter_queue(consumer);
                    forwards.push((
                        i,
                        target,
                        annotate(&item.delivery, consumer, &reason, item.attempt),
                        "dead_lettered",
                    ));
                }
            },
            Verdict::Dead(error) => {
                error!(consumer, error, "dead-lettering message");
                let target = ctx.cfg.topology.dead_letter_queue(consumer);
                forwards.push((i, target, annotate(&item.delivery, consumer, &error, item.attempt), "dead_lettered"));
            }
        }
    }
    out.acks.ack(&done.iter().map(|(i, _)| &items[*i].delivery).collect::<Vec<_>>()).await;
    for (_, outcome) in done {
        count(consumer, outcome);
        metrics::histogram!("consumer_handle_seconds", "consumer" => consumer.to_owned())
            .record(started.elapsed().as_secs_f64());
    }
    if forwards.is_empty() {
        return;
    }
    let sends: Vec<_> = forwards
        .iter()
        .map(|(i, target, props, _)| (items[*i].delivery.data.as_slice(), target.as_str(), props.clone()))
        .collect();
    let taken = out.publish_all(sends).await;
    let mut refused = Vec::new();
    let mut forwarded = Vec::new();
    for ((i, target, _, outcome), ok) in forwards.iter().zip(taken) {
        if ok {
            forwarded.push(&items[*i].delivery);
            count(consumer, outcome);
        } else {
            refused.push((*i, target));
        }
    }
    out.acks.ack(&forwarded).await;
    if refused.is_empty() {
        return;
    }
    warn!(consumer, count = refused.len(), queues = ?refused.iter().map(|(_, t)| t.as_str()).collect::<HashSet<_>>(),
        "the broker did not take forwarded messages (unroutable or unconfirmed); requeueing them");
    tokio::time::sleep(backoff::jitter(REQUEUE_PAUSE)).await;
    for (i, _) in refused {
        out.acks.requeue(&items[i].delivery).await;
    }
}

/// The delivery's properties plus the runtime's failure headers.
fn annotate(delivery: &Delivery, consumer: &str, error: &str, attempt: i64) -> BasicProperties {
    let mut table = delivery.properties.headers().clone().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    // Keep the first routing key across retry hops (later hops arrive with
    // the delay queue's routing key).
    let original = header_str(&delivery.properties, headers::ORIGINAL_ROUTING_KEY)
        .unwrap_or_else(|| delivery.routing_key.to_string());
    table.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(attempt));
    table.insert(headers::ERROR.into(), text(&truncate(error, 4000)));
    table.insert(headers::CONSUMER.into(), text(consumer));
    table.insert(headers::ORIGINAL_ROUTING_KEY.into(), text(&original));
    table.insert(headers::FAILED_AT.into(), text(&chrono::Utc::now().to_rfc3339()));
    delivery.properties.clone().with_headers(table).with_delivery_mode(2)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The confirm-mode channel on which retries and dead letters go out.
///
/// The client library pairs a `basic.return` with whichever confirm it
/// completes next, and the broker merges confirms (`multiple`), so with
/// several publishes in flight a return can be credited to the wrong one.
/// The forwarder therefore publishes one group at a time, tags each copy
/// with a fresh id ([`headers::FORWARD_ID`]), waits for every confirm of the
/// group, and judges each copy by the returned messages' own ids: a copy is
/// taken only if it was acked and no returned message carries its id. (The
/// broker sends a return before the ack of the same message, so by the last
/// confirm of the group every return of the group has been handed out.)
struct Forwarder {
    channel: Channel,
    turn: tokio::sync::Mutex<()>,
    /// The consuming channel's unsettled deliveries (settled here, after
    /// their forwards are confirmed, or after their batch's commit).
    acks: Acks,
}

impl Forwarder {
    async fn open(connection: &Connection) -> Result<Self, orderflow_broker::lapin::Error> {
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Self { channel, turn: tokio::sync::Mutex::new(()), acks: Acks::default() })
    }

    /// Publishes each `(body, queue, properties)` through the default
    /// exchange (mandatory); true for each copy the broker took.
    async fn publish_all(&self, sends: Vec<(&[u8], &str, BasicProperties)>) -> Vec<bool> {
        let _turn = self.turn.lock().await;
        let mut ids = Vec::with_capacity(sends.len());
        let mut confirms = Vec::with_capacity(sends.len());
        for (body, queue, props) in sends {
            let id = Uuid::new_v4().to_string();
            let mut table = props.headers().clone().unwrap_or_default();
            table.insert(headers::FORWARD_ID.into(), AMQPValue::LongString(LongString::from(id.as_str())));
            let published = self
                .channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions { mandatory: true, ..Default::default() },
                    body,
                    props.with_headers(table),
                )
                .await;
            ids.push(id);
            confirms.push(published);
        }
        let mut acked = vec![false; ids.len()];
        let mut returned = HashSet::new();
        let mut unknown_return = false;
        for (k, published) in confirms.into_iter().enumerate() {
            let confirmation = match published {
                Ok(confirm) => confirm.await,
                Err(e) => Err(e),
            };
            match confirmation {
                Ok(confirmation) => {
                    acked[k] = confirmation.is_ack();
                    if let Some(message) = confirmation.take_message() {
                        match header_str(&message.delivery.properties, headers::FORWARD_ID) {
                            Some(id) => {
                                returned.insert(id);
                            }
                            None => unknown_return = true,
                        }
                    }
                }
                Err(e) => warn!(error = %e, "forward not confirmed"),
            }
        }
        // A return we cannot place could be anyone's: none counts as taken
        // (a redelivery is a duplicate the inbox catches; a loss is not).
        ids.iter().zip(acked).map(|(id, acked)| acked && !unknown_return && !returned.contains(id)).collect()
    }
}
