//! Waking relays after commit, without a NOTIFY in the writer's transaction.
//!
//! PostgreSQL takes one server-wide lock to commit any transaction that
//! issued `NOTIFY`, so a `pg_notify` inside every writer's transaction
//! serializes all those commits. Writers therefore append without notifying
//! and call [`Waker::wake`] once their transaction has committed. A single
//! task per process turns any number of wake-ups into at most one `NOTIFY`
//! at a time, on a connection of its own, outside every writer's commit.
//!
//! A wake-up lost on the way (the process dies after its commit, the
//! waker's connection is down) only delays publishing until the relay's
//! next poll, which is the safety net for exactly that.

use std::sync::Arc;
use std::time::Duration;

use diesel::sql_types::Text;
use diesel_async::{RunQueryDsl, SimpleAsyncConnection};
use orderflow_db::CachedDsl;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::writer::NOTIFY_CHANNEL;

/// Longest one `NOTIFY` may take before its connection is replaced.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// A cheap, cloneable handle that wakes the relays of one database.
#[derive(Clone, Default)]
pub struct Waker {
    wanted: Option<Arc<Notify>>,
}

impl std::fmt::Debug for Waker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waker").field("active", &self.wanted.is_some()).finish()
    }
}

impl Waker {
    /// Starts the waking task for the database at `database_url`; it stops
    /// when `shutdown` is cancelled. Needs a running tokio runtime.
    pub fn start(database_url: &str, shutdown: CancellationToken) -> Self {
        let wanted = Arc::new(Notify::new());
        tokio::spawn(notifier(database_url.to_owned(), wanted.clone(), shutdown));
        Self { wanted: Some(wanted) }
    }

    /// A waker that wakes nobody: relays find the rows at their next poll.
    pub fn none() -> Self {
        Self { wanted: None }
    }

    /// Asks for a `NOTIFY` soon. Call it after a transaction that appended
    /// outbox rows has committed. Never blocks; wake-ups that arrive while
    /// one is being sent are folded into the next one.
    pub fn wake(&self) {
        if let Some(wanted) = &self.wanted {
            wanted.notify_one();
        }
    }
}

async fn notifier(url: String, wanted: Arc<Notify>, shutdown: CancellationToken) {
    let mut conn = None;
    loop {
        tokio::select! {
            _ = wanted.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        if conn.is_none() {
            match orderflow_db::establish(&url).await {
                Ok(mut c) => {
                    // A NOTIFY's transaction gets a transaction id and, with
                    // synchronous commit, waits for its own WAL flush. It
                    // changes no data; a wake-up lost in a crash costs at most
                    // a relay poll interval, so it need not wait.
                    if let Err(e) = c.batch_execute("SET synchronous_commit = off").await {
                        debug!(error = %e, "waker cannot set up its connection; relays will poll");
                        sleep_or_shutdown(Duration::from_millis(500), &shutdown).await;
                        continue;
                    }
                    conn = Some(c)
                }
                Err(e) => {
                    // The relays' poll picks the rows up meanwhile.
                    debug!(error = %e, "waker cannot connect; relays will poll");
                    sleep_or_shutdown(Duration::from_millis(500), &shutdown).await;
                    continue;
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            // Bounded: a stalled connection must not stop every later wake-up.
            match tokio::time::timeout(SEND_TIMEOUT, notify(c)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    debug!(error = %e, "waker lost its connection; relays will poll");
                    conn = None;
                }
                Err(_) => {
                    debug!("waker's NOTIFY stalled; reconnecting, relays will poll");
                    conn = None;
                }
            }
        }
    }
}

/// Sends one wake-up on `conn` now (in its own transaction if none is open).
/// Tests and tools that append rows without a [`Waker`] use it after commit.
pub async fn notify(conn: &mut orderflow_db::Conn) -> diesel::QueryResult<()> {
    diesel::sql_query("SELECT pg_notify($1, '')").bind::<Text, _>(NOTIFY_CHANNEL).cached().execute(conn).await.map(drop)
}

async fn sleep_or_shutdown(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.cancelled() => {}
    }
}
