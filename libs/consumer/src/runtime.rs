use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use futures::StreamExt;
use orderflow_broker::lapin::message::Delivery;
use orderflow_broker::lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use orderflow_broker::lapin::types::{AMQPValue, FieldTable, LongString};
use orderflow_broker::lapin::{BasicProperties, Channel, Confirmation};
use orderflow_broker::{QueueSpec, Topology, header_i64};
use orderflow_db::schema::inbox;
use orderflow_db::{Conn, Pool};
use orderflow_envelope::Envelope;
use orderflow_envelope::events::Event;
use orderflow_outbox::backoff;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::handler::{Disposition, Handler, HandlerError, Incoming};

/// Cap of the wait between attempts at a message while the database is down:
/// short, because the message is held unacked and should go on soon after.
const DB_WAIT_MAX: Duration = Duration::from_secs(5);

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
    /// Messages in flight at once.
    pub concurrency: usize,
    /// On shutdown, how long in-flight messages may take to finish before
    /// they are left to the broker to redeliver.
    pub drain_timeout: Duration,
    /// Cap of the reconnect backoff.
    pub reconnect_max: Duration,
    /// True while the consumer is subscribed to its queue (for `/ready`).
    pub connected: Arc<AtomicBool>,
    /// Longest a handler's transaction may take. Past it the connection is
    /// thrown away (it may be stalled) and the message handled again.
    pub handler_timeout: Duration,
    /// Larger messages are dead-lettered without being parsed.
    pub max_message_bytes: usize,
    /// Woken after every commit that handled a message, so relays publish
    /// what the handler appended (see [`orderflow_outbox::Waker`]).
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
            drain_timeout: Duration::from_secs(10),
            reconnect_max: Duration::from_secs(30),
            connected: Arc::new(AtomicBool::new(false)),
            handler_timeout: Duration::from_secs(30),
            max_message_bytes: 1024 * 1024,
            waker: orderflow_outbox::Waker::none(),
        }
    }
}

struct Ctx<H> {
    cfg: ConsumerConfig,
    pool: Pool,
    handler: H,
}

/// Runs one consumer until `shutdown` is cancelled, reconnecting to the
/// broker with backoff whenever the connection is lost. On shutdown it stops
/// taking messages, lets in-flight ones finish (up to the drain timeout) and
/// closes the channel, which returns anything unacked to the queue.
pub async fn run<H: Handler>(cfg: ConsumerConfig, pool: Pool, handler: H, shutdown: CancellationToken) {
    let ctx = Arc::new(Ctx { cfg, pool, handler });
    let mut waits = backoff::reconnect(ctx.cfg.reconnect_max);
    while !shutdown.is_cancelled() {
        match session(&ctx, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                metrics::counter!("consumer_reconnects_total", "consumer" => ctx.cfg.spec.consumer.clone())
                    .increment(1);
                let wait = waits.next_wait();
                warn!(consumer = %ctx.cfg.spec.consumer, error = %e, retry_in = ?wait, "broker session ended");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
    }
    info!(consumer = %ctx.cfg.spec.consumer, "consumer stopped");
}

/// Declares the consumer's queues (and the exchange) without consuming,
/// retrying until the broker answers or `shutdown`. A stage that does not run
/// in this process still gets its queue, so its messages wait for it.
pub async fn declare(cfg: &ConsumerConfig, shutdown: &CancellationToken) {
    let mut waits = backoff::reconnect(cfg.reconnect_max);
    while !shutdown.is_cancelled() {
        let attempt = async {
            let connection = orderflow_broker::connect(&cfg.amqp_url, &format!("declare:{}", cfg.spec.consumer))
                .await
                .map_err(|e| e.to_string())?;
            let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
            cfg.topology.declare_consumer(&channel, &cfg.spec).await.map_err(|e| e.to_string())?;
            let _ = connection.close(200, "declared".into()).await;
            Ok::<_, String>(())
        };
        match attempt.await {
            Ok(()) => return,
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

async fn session<H: Handler>(ctx: &Arc<Ctx<H>>, shutdown: &CancellationToken) -> Result<(), String> {
    let spec = &ctx.cfg.spec;
    let name = format!("consumer:{}", spec.consumer);
    let connection = orderflow_broker::connect(&ctx.cfg.amqp_url, &name).await.map_err(|e| e.to_string())?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    ctx.cfg.topology.declare_consumer(&channel, spec).await.map_err(|e| e.to_string())?;
    let prefetch = u16::try_from(ctx.cfg.concurrency.max(1) * 2).unwrap_or(u16::MAX);
    channel.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(|e| e.to_string())?;
    // Retries and dead letters go out on their own confirm-mode channel.
    let out = connection.create_channel().await.map_err(|e| e.to_string())?;
    out.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
    let out = Arc::new(out);
    let queue = ctx.cfg.topology.queue(&spec.consumer);
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            name.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    info!(consumer = %spec.consumer, %queue, "consuming");
    ctx.cfg.connected.store(true, Ordering::Relaxed);

    let permits = Arc::new(Semaphore::new(ctx.cfg.concurrency.max(1)));
    let mut tasks = JoinSet::new();
    let result = loop {
        while tasks.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break Ok(()),
            },
            _ = shutdown.cancelled() => break Ok(()),
        };
        let delivery = tokio::select! {
            d = consumer.next() => d,
            _ = shutdown.cancelled() => break Ok(()),
        };
        match delivery {
            Some(Ok(delivery)) => {
                let (ctx, out, shutdown) = (ctx.clone(), out.clone(), shutdown.clone());
                tasks.spawn(async move {
                    process(&ctx, &out, delivery, &shutdown).await;
                    drop(permit);
                });
            }
            Some(Err(e)) => break Err(format!("consumer stream: {e}")),
            None => break Err("consumer cancelled".into()),
        }
    };

    ctx.cfg.connected.store(false, Ordering::Relaxed);
    // Stop taking work, give in-flight messages time to finish, then close:
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
    result
}

enum Applied {
    New,
    Duplicate,
}

/// Records the message in the inbox and runs the handler, in one
/// transaction, within the handler timeout.
async fn handle_once<H: Handler>(ctx: &Ctx<H>, env: &Envelope, event: &Event) -> Result<Applied, HandlerError> {
    let mut pooled = ctx.pool.get().await.map_err(|e| HandlerError::Unavailable(e.to_string()))?;
    let timeout = ctx.cfg.handler_timeout;
    match tokio::time::timeout(timeout, transact(ctx, &mut pooled, env, event)).await {
        Ok(result) => result,
        Err(_) => {
            // The transaction was abandoned mid-way on a connection that may
            // be stalled: never hand it to anyone else.
            drop(orderflow_db::PooledConn::take(pooled));
            Err(HandlerError::Unavailable(format!("the handler's transaction took more than {timeout:?}")))
        }
    }
}

async fn transact<H: Handler>(
    ctx: &Ctx<H>,
    conn: &mut Conn,
    env: &Envelope,
    event: &Event,
) -> Result<Applied, HandlerError> {
    let consumer = ctx.cfg.spec.consumer.as_str();
    conn.transaction::<_, HandlerError, _>(async |tx| {
        let inserted = diesel::insert_into(inbox::table)
            .values((
                inbox::consumer.eq(consumer),
                inbox::message_id.eq(env.message_id),
                inbox::event_type.eq(&env.event_type),
            ))
            .on_conflict_do_nothing()
            .execute(tx)
            .await?;
        if inserted == 0 {
            return Ok(Applied::Duplicate);
        }
        ctx.handler.handle(tx, Incoming { envelope: env, event }).await?;
        Ok(Applied::New)
    })
    .await
}

async fn process<H: Handler>(ctx: &Ctx<H>, out: &Channel, delivery: Delivery, shutdown: &CancellationToken) {
    let consumer = ctx.cfg.spec.consumer.as_str();
    let attempt = header_i64(&delivery.properties, headers::ATTEMPT).unwrap_or(0).max(0);
    if delivery.data.len() > ctx.cfg.max_message_bytes {
        let reason = format!("message too large: {} bytes (limit {})", delivery.data.len(), ctx.cfg.max_message_bytes);
        warn!(consumer, %reason, "rejecting message");
        dead_letter(ctx, out, &delivery, &reason, attempt).await;
        return;
    }
    let decoded = Envelope::from_slice(&delivery.data).and_then(|env| Event::decode(&env).map(|ev| (env, ev)));
    let (env, event) = match decoded {
        Ok(x) => x,
        Err(e) => {
            warn!(consumer, error = %e, routing_key = %delivery.routing_key, "undecodable message");
            dead_letter(ctx, out, &delivery, &e.to_string(), attempt).await;
            return;
        }
    };
    if env.payload.get("__abort").is_some() && orderflow_outbox::failpoint("consumer-abort-on-marked-message") {
        // Fault tests: a consumer that crashes on this message every time,
        // to show the queue's delivery limit parking it.
        std::process::abort();
    }
    let span = info_span!("consume", consumer, message_id = %env.message_id, event_type = %env.event_type,
        order_id = %env.aggregate_id, correlation_id = %env.correlation_id);
    // The span continues the trace of whoever wrote the message.
    orderflow_telemetry::continue_trace(&span, env.traceparent.as_deref());
    async {
        let started = Instant::now();
        let mut conflicts = 0;
        let mut db_waits = backoff::reconnect(DB_WAIT_MAX);
        loop {
            let failure = match handle_once(ctx, &env, &event).await {
                Ok(applied) => {
                    let outcome = match applied {
                        Applied::New => {
                            ctx.cfg.waker.wake();
                            "handled"
                        }
                        Applied::Duplicate => "duplicate",
                    };
                    debug!(outcome, "message done");
                    ack(&delivery).await;
                    count(consumer, outcome);
                    metrics::histogram!("consumer_handle_seconds", "consumer" => consumer.to_owned())
                        .record(started.elapsed().as_secs_f64());
                    return;
                }
                Err(e) => e,
            };
            match failure.disposition() {
                Disposition::WaitForDatabase => {
                    let wait = db_waits.next_wait();
                    warn!(error = %failure, retry_in = ?wait, "database unavailable, holding message");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        // Unacked: the broker redelivers it after we close.
                        _ = shutdown.cancelled() => return,
                    }
                }
                Disposition::RetryNow if conflicts < 5 => {
                    conflicts += 1;
                    debug!(error = %failure, conflicts, "conflict, retrying");
                    tokio::time::sleep(Duration::from_millis(rand::random_range(1..20))).await;
                }
                Disposition::RetryNow | Disposition::RetryLater => {
                    retry_later(ctx, out, &delivery, &failure.to_string(), attempt).await;
                    return;
                }
                Disposition::DeadLetter => {
                    dead_letter(ctx, out, &delivery, &failure.to_string(), attempt).await;
                    return;
                }
            }
        }
    }
    .instrument(span)
    .await
}

fn count(consumer: &str, outcome: &'static str) {
    metrics::counter!("consumer_messages_total", "consumer" => consumer.to_owned(), "outcome" => outcome).increment(1);
}

async fn ack(delivery: &Delivery) {
    // An ack on a channel that died is lost; the broker redelivers the
    // message and the inbox recognizes it.
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        warn!(error = %e, "ack failed; the message will be redelivered and deduplicated");
    }
}

async fn retry_later<H: Handler>(ctx: &Ctx<H>, out: &Channel, delivery: &Delivery, error: &str, attempt: i64) {
    let spec = &ctx.cfg.spec;
    let tier = attempt as usize;
    if tier >= spec.retry_delays.len() {
        let reason = format!("gave up after {} attempts: {error}", attempt + 1);
        dead_letter(ctx, out, delivery, &reason, attempt).await;
        return;
    }
    let target = ctx.cfg.topology.retry_queue(&spec.consumer, tier);
    warn!(error, attempt = attempt + 1, delay = ?spec.retry_delays[tier], "transient failure, retrying later");
    let props = annotate(delivery, &spec.consumer, error, attempt + 1);
    forward(out, delivery, &target, props).await;
    count(&spec.consumer, "retried");
}

async fn dead_letter<H: Handler>(ctx: &Ctx<H>, out: &Channel, delivery: &Delivery, error: &str, attempt: i64) {
    let spec = &ctx.cfg.spec;
    let target = ctx.cfg.topology.dead_letter_queue(&spec.consumer);
    error!(consumer = %spec.consumer, error, dlq = %target, "dead-lettering message");
    let props = annotate(delivery, &spec.consumer, error, attempt);
    forward(out, delivery, &target, props).await;
    count(&spec.consumer, "dead_lettered");
}

/// The delivery's properties plus the runtime's failure headers.
fn annotate(delivery: &Delivery, consumer: &str, error: &str, attempt: i64) -> BasicProperties {
    let mut table = delivery.properties.headers().clone().unwrap_or_default();
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    // Keep the first routing key across retry hops (later hops arrive with
    // the delay queue's routing key).
    let original = orderflow_broker::header_str(&delivery.properties, headers::ORIGINAL_ROUTING_KEY)
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

/// Publishes a copy of the delivery to `queue` and, once the broker has
/// confirmed it, acks the original. If the copy is not confirmed the
/// original is requeued instead: the message is never lost in between.
async fn forward(out: &Channel, delivery: &Delivery, queue: &str, props: BasicProperties) {
    let confirmed = async {
        let confirm = out
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &delivery.data,
                props,
            )
            .await?
            .await?;
        Ok::<_, orderflow_broker::lapin::Error>(matches!(confirm, Confirmation::Ack(None)))
    }
    .await;
    match confirmed {
        Ok(true) => ack(delivery).await,
        other => {
            warn!(?other, %queue, "could not forward message, requeueing it");
            let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
        }
    }
}
