//! Delivers recorded notifications to the webhook.
//!
//! Each round leases a few due notifications (their `next_attempt_at` moves
//! past the time one attempt can take, so a crashed dispatcher's lease simply
//! expires), POSTs them a few at a time, each with a few quick retries
//! (backon: exponential, with jitter), and records the outcome: delivered,
//! or the next attempt with a longer, jittered backoff.
//!
//! Several replicas may run dispatchers on one database. A lease covers one
//! attempt, not a whole round: right before its call, each notification's
//! lease is renewed on the condition that it is still the one this round
//! took (`next_attempt_at` unchanged). A notification whose lease ran out
//! while earlier ones were slow, and which another replica took meanwhile,
//! is skipped, so the webhook never gets it twice from two replicas. A circuit breaker stops calls while the webhook is down
//! and probes it once per cooldown. Nothing is ever dropped: after
//! `max_attempts` a notification is marked `failed` and still retried at the
//! longest backoff.

use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Double};
use diesel_async::RunQueryDsl;
use futures::StreamExt;
use orderflow_db::Pool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{CircuitBreaker, Notification};
use crate::schema::notifications;

/// How notifications are delivered.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Where to POST them.
    pub url: String,
    /// Timeout of one call.
    pub timeout: Duration,
    /// Quick retries within one attempt.
    pub quick_retries: usize,
    /// First backoff between attempts; doubles per attempt, with jitter.
    pub retry_base: Duration,
    /// Longest backoff between attempts.
    pub retry_max: Duration,
    /// Attempts after which a notification is marked failed (and still retried).
    pub max_attempts: i32,
    /// Consecutive failed calls that open the breaker.
    pub breaker_threshold: u32,
    /// How long the breaker stays open before a probe.
    pub breaker_cooldown: Duration,
    /// Look for due notifications this often even without a wake-up (those
    /// another process recorded, retries that came due).
    pub poll_interval: Duration,
}

/// The delivery loop; see the module docs.
pub struct Dispatcher {
    pool: Pool,
    /// Woken when this process records a notification.
    recorded: Arc<Notify>,
    client: reqwest::Client,
    cfg: WebhookConfig,
    breaker: Arc<CircuitBreaker>,
}

/// Why a dispatcher round or one delivery's bookkeeping failed; the round
/// is tried again at the next poll or wake-up.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// No database connection could be had.
    #[error("database pool: {0}")]
    Pool(#[from] orderflow_db::PoolError),
    /// A query failed.
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    /// The HTTP client could not be built.
    #[error("webhook client: {0}")]
    Client(#[source] reqwest::Error),
}

#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("webhook answered {0}")]
    Status(reqwest::StatusCode),
    #[error("webhook unreachable: {0}")]
    Transport(#[source] reqwest::Error),
    #[error("circuit breaker open")]
    Open,
}

const BATCH: i64 = 20;
/// Calls in flight at once within a round.
const IN_FLIGHT: usize = 4;
/// Longest wait between two quick retries (see [`Dispatcher::deliver`]).
const QUICK_RETRY_MAX_DELAY: Duration = Duration::from_secs(2);

impl Dispatcher {
    /// A dispatcher for `cfg`, woken by `recorded` (see
    /// [`super::Notifications::new`]), sharing `breaker` (for status reports).
    pub fn new(
        pool: Pool,
        recorded: Arc<Notify>,
        cfg: WebhookConfig,
        breaker: Arc<CircuitBreaker>,
    ) -> Result<Self, DispatchError> {
        let client = reqwest::Client::builder().timeout(cfg.timeout).build().map_err(DispatchError::Client)?;
        Ok(Self { pool, recorded, client, cfg, breaker })
    }

    /// Delivers until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(url = %self.cfg.url, "notification dispatcher started");
        while !shutdown.is_cancelled() {
            let more = match self.round().await {
                Ok(more) => more,
                Err(e) => {
                    tracing::warn!(error = %e, "notification round failed");
                    false
                }
            };
            if more {
                continue;
            }
            // Sleep until a new notification, the poll interval, or the
            // breaker's next probe, whichever comes first.
            let wait = match self.breaker.try_acquire_peek() {
                Some(open_for) => open_for.min(self.cfg.poll_interval),
                None => self.cfg.poll_interval,
            };
            tokio::select! {
                _ = self.recorded.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        tracing::info!("notification dispatcher stopped");
    }

    /// One round: lease due notifications and try each. True if the batch
    /// was full (there may be more).
    async fn round(&self) -> Result<bool, DispatchError> {
        if self.breaker.try_acquire_peek().is_some() {
            return Ok(false);
        }
        let lease = self.lease();
        let mut conn = self.pool.get().await?;
        let due: Vec<Notification> = diesel::sql_query(
            "UPDATE notifications SET next_attempt_at = now() + make_interval(secs => $1) \
             WHERE id IN (SELECT id FROM notifications \
                          WHERE status <> 'delivered' AND next_attempt_at <= now() \
                          ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING *",
        )
        .bind::<Double, _>(lease.as_secs_f64())
        .bind::<BigInt, _>(BATCH)
        .load(&mut conn)
        .await?;
        drop(conn);
        let full = due.len() as i64 == BATCH;
        let results: Vec<Result<(), DispatchError>> =
            futures::stream::iter(due).map(|n| self.attempt(n, lease)).buffer_unordered(IN_FLIGHT).collect().await;
        results.into_iter().collect::<Result<(), DispatchError>>()?;
        Ok(full)
    }

    /// The longest one attempt can take: every call timing out, plus the
    /// longest waits between quick retries, plus a margin.
    fn lease(&self) -> Duration {
        let calls = self.cfg.quick_retries as u32 + 1;
        self.cfg.timeout * calls + QUICK_RETRY_MAX_DELAY * (calls - 1) + Duration::from_secs(5)
    }

    /// Renews `n`'s lease if this round still holds it (nobody took it since
    /// it was leased at `n.next_attempt_at`); false if it was lost.
    async fn renew(
        &self,
        conn: &mut orderflow_db::Conn,
        n: &Notification,
        lease: Duration,
    ) -> Result<bool, DispatchError> {
        let renewed = diesel::sql_query(
            "UPDATE notifications SET next_attempt_at = clock_timestamp() + make_interval(secs => $3) \
             WHERE id = $1 AND next_attempt_at = $2 AND status <> 'delivered'",
        )
        .bind::<diesel::sql_types::Uuid, _>(n.id)
        .bind::<diesel::sql_types::Timestamptz, _>(n.next_attempt_at)
        .bind::<Double, _>(lease.as_secs_f64())
        .execute(conn)
        .await?;
        Ok(renewed == 1)
    }

    /// One attempt at `n`, if its lease still holds, and its outcome.
    async fn attempt(&self, n: Notification, lease: Duration) -> Result<(), DispatchError> {
        let mut conn = self.pool.get().await?;
        if !self.renew(&mut conn, &n, lease).await? {
            tracing::debug!(id = %n.id, "lease lost to another dispatcher; skipping");
            metrics::counter!("notifications_lease_lost_total").increment(1);
            return Ok(());
        }
        {
            match self.deliver(&n).await {
                Ok(()) => {
                    diesel::update(notifications::table.find(n.id))
                        .set((
                            notifications::status.eq("delivered"),
                            notifications::attempts.eq(n.attempts + 1),
                            notifications::delivered_at.eq(diesel::dsl::now),
                            notifications::last_error.eq(None::<String>),
                        ))
                        .execute(&mut conn)
                        .await?;
                    metrics::counter!("notifications_delivered_total").increment(1);
                }
                Err(CallError::Open) => {
                    // Not an attempt: try again when the breaker lets us.
                    let wait = self.breaker.try_acquire_peek().unwrap_or(self.cfg.breaker_cooldown);
                    reschedule(&mut conn, n.id, wait).await?;
                }
                Err(e) => {
                    let attempts = n.attempts + 1;
                    let retry = (attempts - 1).max(0).unsigned_abs();
                    let backoff = orderflow_outbox::backoff::nth(retry, self.cfg.retry_base, self.cfg.retry_max);
                    let status = if attempts >= self.cfg.max_attempts { "failed" } else { "pending" };
                    tracing::warn!(id = %n.id, attempts, retry_in = ?backoff, error = %e, "notification not delivered");
                    diesel::update(notifications::table.find(n.id))
                        .set((
                            notifications::status.eq(status),
                            notifications::attempts.eq(attempts),
                            notifications::last_error.eq(e.to_string()),
                        ))
                        .execute(&mut conn)
                        .await?;
                    reschedule(&mut conn, n.id, backoff).await?;
                    metrics::counter!("notifications_failed_attempts_total").increment(1);
                }
            }
        }
        Ok(())
    }

    /// One attempt: a call plus quick retries, each asking the breaker first.
    async fn deliver(&self, n: &Notification) -> Result<(), CallError> {
        let retry = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(QUICK_RETRY_MAX_DELAY)
            .with_max_times(self.cfg.quick_retries)
            .with_jitter();
        (|| self.call(n)).retry(retry).when(|e| !matches!(e, CallError::Open)).await
    }

    async fn call(&self, n: &Notification) -> Result<(), CallError> {
        self.breaker.try_acquire().map_err(|_| CallError::Open)?;
        metrics::counter!("notification_webhook_calls_total").increment(1);
        let mut request = self.client.post(&self.cfg.url).header("Idempotency-Key", n.id.to_string());
        if let Some(traceparent) = &n.traceparent {
            request = request.header("traceparent", traceparent);
        }
        let sent = request
            .json(&serde_json::json!({
                "id": n.id,
                "order_id": n.order_id,
                "customer_id": n.customer_id,
                "kind": n.kind,
                "text": n.text,
                "created_at": n.created_at,
            }))
            .send()
            .await;
        let result = match sent {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(CallError::Status(r.status())),
            Err(e) => Err(CallError::Transport(e)),
        };
        match &result {
            Ok(()) => self.breaker.on_success(),
            Err(_) => self.breaker.on_failure(),
        }
        result
    }
}

async fn reschedule(conn: &mut orderflow_db::Conn, id: Uuid, wait: Duration) -> Result<(), DispatchError> {
    diesel::sql_query("UPDATE notifications SET next_attempt_at = now() + make_interval(secs => $2) WHERE id = $1")
        .bind::<diesel::sql_types::Uuid, _>(id)
        .bind::<Double, _>(wait.as_secs_f64())
        .execute(conn)
        .await?;
    Ok(())
}
