//! The consumer runtime that runs every orderflow consumer.
//!
//! Deliveries are handled in batches: a batch takes the deliveries that have
//! arrived (up to [`ConsumerConfig::batch_size`], waiting at most
//! [`ConsumerConfig::batch_linger`], zero by default, so a lone message is
//! never delayed), and up to [`ConsumerConfig::concurrency`] batches run at
//! once; while others are in flight, a batch that is not full first waits
//! (up to [`ConsumerConfig::batch_busy_wait`]) for one of them to finish, so
//! below saturation one larger transaction runs at a time.
//! Per batch: decode every envelope and typed event (undecodable, unknown
//! type or unknown major version: dead-letter at once with the reason);
//! begin ONE transaction, with server-side statement and lock timeouts;
//! insert every message's `(consumer, message_id)` into `inbox` with one
//! statement — what does not come back is a duplicate (also a second copy
//! in the same batch): skip; then, in delivery order, run the handler of
//! each new message, which changes domain rows and appends outbox rows.
//! Then ONE commit (`synchronous_commit` stays on), one relay wake-up (if
//! a handler appended outbox rows: `orderflow_outbox::watch_appends`),
//! [`Handler::committed`], and only then the acks (merged where they can be) and
//! the failed messages' forwards.
//!
//! That first run has no savepoints (each costs two round trips per
//! message). If a message fails in it, the transaction is rolled back and
//! the batch goes again with a savepoint per message: the inbox row and the
//! handler of each message inside its own, so a message that fails is
//! rolled back to its savepoint alone and the others commit.
//!
//! Failures:
//! - database unreachable (or the commit's connection lost): the batch is
//!   kept (unacked) and handled again with backoff until the database is
//!   back, without spending retry tiers: an outage is nobody's message's
//!   fault;
//! - conflict (serialization failure, deadlock between concurrent batches,
//!   lost optimistic race): the message goes again in a new transaction
//!   after the batch commits (by then the batch it raced has usually
//!   committed), a few times, then is treated as transient;
//! - timeout: each statement and lock wait is bounded on the server by
//!   [`ConsumerConfig::handler_timeout`] (`statement_timeout`,
//!   `lock_timeout`; a session whose client went away or went quiet is
//!   ended too), so a handler waiting on a row locked elsewhere never leaves
//!   a session behind; the timed-out message is transient. A handler that
//!   overruns on the client side as well gets its connection thrown away:
//!   it is transient, the rest of its batch goes again without it;
//! - transient: republished to the next retry tier's delay queue (TTL, then
//!   back to the work queue); after the last tier, dead-lettered;
//! - permanent: dead-lettered at once.
//!
//! Duplicates are caught by the inbox wherever they come from: the same
//! message twice in a batch, in two batches, or redelivered after a broker
//! connection died between a commit and its acks.
//!
//! Dead-lettered messages go to the queue's DLQ with headers saying why
//! (`x-orderflow-error`, `-attempt`, `-consumer`, `-original-routing-key`,
//! `-failed-at`). A retry or dead-letter publish is confirmed by the broker
//! before the original is acked, so nothing is lost in between; a copy the
//! broker returns as unroutable is recognized by its own id (never by the
//! client library's pairing of returns with confirms), and its original is
//! requeued after a pause.
//!
//! The broker topology is declared at connect ([`prepare`] does it once at
//! start): delay queues are named by their delay, so changed retry delays
//! need no migration; a changed delivery limit cannot be applied to an
//! existing queue, and the consumer stops with one line saying how to
//! migrate ([`ConsumerError::ChangedQueue`]) instead of retrying forever.
//! After a broker session that stayed healthy for
//! [`ConsumerConfig::reconnect_reset_after`], the reconnect backoff starts
//! short again.
//!
//! Errors follow the platform's error policy (`orderflow_db::error`).
//!
//! # Adopting it
//!
//! A handler names the events it decodes and changes its rows in the
//! transaction it is given; the runtime does the rest (inbox, batching,
//! retries, dead letters, acks after commit). `loyalty-service` is a
//! complete service built this way.
//!
//! ```no_run
//! use orderflow_consumer::{ConsumerArgs, Handler, HandlerError, Incoming};
//! use orderflow_db::Conn;
//! use orderflow_envelope::{DomainEvent, SchemaVersion};
//! use serde::{Deserialize, Serialize};
//! use tokio_util::sync::CancellationToken;
//!
//! /// An event some other service publishes.
//! #[derive(Debug, Serialize, Deserialize)]
//! struct OrderConfirmed {
//!     order_id: String,
//!     customer_id: String,
//! }
//!
//! impl DomainEvent for OrderConfirmed {
//!     const EVENT_TYPE: &'static str = "order.confirmed";
//!     const AGGREGATE_TYPE: &'static str = "order";
//!     const SCHEMA_VERSION: SchemaVersion = SchemaVersion::new(2, 0);
//!     fn aggregate_id(&self) -> String {
//!         self.order_id.clone()
//!     }
//! }
//!
//! struct Welcome;
//!
//! impl Handler for Welcome {
//!     // One event type; a sum type implementing `EventSet` takes several.
//!     type Event = OrderConfirmed;
//!
//!     async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, OrderConfirmed>) -> Result<(), HandlerError> {
//!         use diesel_async::RunQueryDsl;
//!         // Runs once per message: the inbox row commits with this insert.
//!         diesel::sql_query("INSERT INTO welcomed (customer_id) VALUES ($1) ON CONFLICT DO NOTHING")
//!             .bind::<diesel::sql_types::Text, _>(&msg.event.customer_id)
//!             .execute(conn)
//!             .await?;
//!         Ok(())
//!     }
//! }
//!
//! # async fn start(args: ConsumerArgs, pool: orderflow_db::Pool) -> Result<(), orderflow_consumer::ConsumerError> {
//! // `args` are the CONSUMER_* and AMQP_URL flags (flatten ConsumerArgs into your clap config).
//! let cfg = args.config("welcome", &[OrderConfirmed::EVENT_TYPE]);
//! orderflow_consumer::prepare_at_start(&cfg).await?; // declares the queue, retry tiers, DLQ
//! tokio::spawn(orderflow_consumer::run(cfg, pool, Welcome, CancellationToken::new()));
//! # Ok(()) }
//! ```

mod args;
mod error;
mod handler;
mod registration;
mod runtime;

pub use args::ConsumerArgs;
pub use error::ConsumerError;
pub use handler::{DEFER_LIMIT, Handler, HandlerError, Incoming};
pub use registration::{OUTCOMES, describe_and_register};
pub use runtime::{ConsumerConfig, declare, headers, prepare, prepare_at_start, run};
