//! Group commit for `POST /orders`: requests that arrive while a write is
//! in progress are written together, in one transaction with one statement
//! per table ([`store::create_many`]), and each is answered after that
//! commit. Under load a commit (one WAL flush, one BEGIN/COMMIT, four
//! statements) is shared by many orders; alone, an order is written at once
//! as before, with nothing waited for.
//!
//! Nothing is traded for it: no request is answered before its order is
//! durable (`synchronous_commit` stays on), and an order that cannot be
//! written never takes its batch down with it: a batch that fails is written
//! again one order per transaction, so each request gets its own answer.

use std::sync::Arc;

use orderflow_db::{ErrorClass, Pool, classify};
use orderflow_envelope::Metadata;
use orderflow_web::{ApiError, Problem};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::domain::NewOrder;
use crate::store::{self, Created};

struct Job {
    order: NewOrder,
    meta: Metadata,
    reply: oneshot::Sender<Result<Created, ApiError>>,
}

/// Handle to the intake writers; cheap to clone. The writers stop when the
/// last handle is dropped (after the HTTP server has drained).
#[derive(Clone)]
pub struct Intake {
    jobs: mpsc::Sender<Job>,
}

impl Intake {
    /// Starts `writers` writer tasks, each writing up to `max_batch` orders
    /// per transaction, waking the relay after each commit that wrote one.
    pub fn start(pool: Pool, waker: orderflow_outbox::Waker, writers: usize, max_batch: usize) -> Self {
        let writers = writers.max(1);
        let max_batch = max_batch.max(1);
        // Room for one batch per writer waiting: more backs up into the
        // HTTP handlers (and their clients) rather than into memory.
        let (jobs, rx) = mpsc::channel(writers * max_batch);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers {
            tokio::spawn(writer(pool.clone(), waker.clone(), rx.clone(), max_batch));
        }
        Self { jobs }
    }

    /// Requests waiting for a writer.
    pub fn queued(&self) -> usize {
        self.jobs.max_capacity() - self.jobs.capacity()
    }

    /// Stores `order` (or finds it stored before) and answers once it is
    /// committed.
    pub async fn create(&self, order: NewOrder, meta: Metadata) -> Result<Created, ApiError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || Problem::unavailable("the service is stopping; retry shortly");
        self.jobs.send(Job { order, meta, reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn writer(pool: Pool, waker: orderflow_outbox::Waker, jobs: Arc<Mutex<mpsc::Receiver<Job>>>, max_batch: usize) {
    loop {
        let batch = {
            let mut rx = jobs.lock().await;
            let Some(job) = rx.recv().await else { return };
            let mut batch = vec![job];
            // No linger: only what is already waiting joins the batch, so a
            // lone request is never delayed.
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        metrics::histogram!("order_intake_batch_size").record(batch.len() as f64);
        write(&pool, &waker, batch).await;
    }
}

/// Writes a batch in one transaction; if that fails for a reason other
/// than an unreachable database, writes each order in its own transaction
/// so that each request gets its own answer.
async fn write(pool: &Pool, waker: &orderflow_outbox::Waker, batch: Vec<Job>) {
    let mut conn = match pool.get().await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(error = %e, orders = batch.len(), "no database connection for the intake");
            for job in batch {
                let _ = job.reply.send(Err(Problem::unavailable("the database is unavailable; retry shortly").into()));
            }
            return;
        }
    };
    if batch.len() > 1 {
        match transaction(&mut conn, &batch).await {
            Ok(results) => {
                answer(waker, batch, results);
                return;
            }
            Err(e) if classify(&e) != ErrorClass::Permanent => {
                // The database went away: every order of the batch would
                // meet the same; each client retries with its order id.
                tracing::warn!(error = %e, orders = batch.len(), "intake batch failed, database unavailable");
                for job in batch {
                    let _ =
                        job.reply.send(Err(Problem::unavailable("the database is unavailable; retry shortly").into()));
                }
                return;
            }
            Err(e) => {
                metrics::counter!("order_intake_batch_retried_total").increment(1);
                tracing::debug!(error = %e, orders = batch.len(), "intake batch failed, writing one order at a time");
            }
        }
    }
    for job in batch {
        let result = transaction(&mut conn, std::slice::from_ref(&job)).await;
        match result {
            Ok(mut results) if results.len() == 1 => answer(waker, vec![job], vec![results.remove(0)]),
            Ok(_) => {
                let _ = job.reply.send(Err(ApiError::Db(diesel::result::Error::NotFound)));
            }
            Err(e) => {
                let _ = job.reply.send(Err(e.into()));
            }
        }
    }
}

async fn transaction(conn: &mut orderflow_db::Conn, batch: &[Job]) -> diesel::QueryResult<Vec<Created>> {
    use diesel_async::AsyncConnection;
    let orders: Vec<(&NewOrder, &Metadata)> = batch.iter().map(|j| (&j.order, &j.meta)).collect();
    conn.transaction::<_, diesel::result::Error, _>(async |tx| store::create_many(tx, &orders).await).await
}

/// Wakes the relay if anything was written (after the commit), then
/// answers every request of the batch.
fn answer(waker: &orderflow_outbox::Waker, batch: Vec<Job>, results: Vec<Created>) {
    if results.iter().any(|r| matches!(r, Created::New(_))) {
        waker.wake();
    }
    for (job, result) in batch.into_iter().zip(results) {
        if let Created::New(o) = &result {
            tracing::info!(order_id = %o.row.id, total = o.row.total_amount, "order accepted");
        }
        let _ = job.reply.send(Ok(result));
    }
}
