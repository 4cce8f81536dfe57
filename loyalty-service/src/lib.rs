//! loyalty-service: the example of a service built on the orderflow
//! platform alone. Copy it to start your own.
//!
//! Customers earn one point per whole unit of money of each confirmed order
//! (`order.confirmed`) and lose them when the order is cancelled
//! (`order.cancelled`). Every change of a balance publishes an event of the
//! service's own (`points.granted`, `points.revoked`) through the outbox.
//!
//! Read it in this order; each file is one step of adopting the platform:
//!
//! 1. [`events`]: the events the service writes (each a
//!    [`orderflow_envelope::DomainEvent`]) and the ones it reads (an
//!    [`orderflow_envelope::EventSet`] of the pipeline's `order.confirmed`
//!    and `order.cancelled`, from the `orderflow-contracts` crate).
//! 2. `migrations/`: the service's own tables. The platform's (`outbox`,
//!    `inbox`) are created by [`orderflow_db::open`] before them.
//! 3. [`points`]: the consumer. [`points::Points`] implements
//!    [`orderflow_consumer::Handler`]: the runtime records each message in
//!    the inbox and calls it in the same transaction, so the balance, the
//!    grant and the outgoing event commit together, once per message, even
//!    when the broker delivers it twice.
//! 4. [`api`]: a read model over HTTP (`GET /customers/{id}/points`), with
//!    problem+json errors from `orderflow-web`.
//! 5. [`app`]: start-up: open and migrate the database, declare the queue,
//!    start the consumer and the HTTP server, wake the relay after commits.
//! 6. [`config`]: flags with environment variables and defaults that work
//!    with `make run`; a bad value fails at start with one line.
//!
//! A relay (`outbox-relay run --database-url <this service's database>`)
//! runs beside it and publishes its outbox; `make run` starts one.

pub mod api;
pub mod app;
pub mod config;
pub mod events;
pub mod points;

pub use app::{MIGRATIONS, build};
pub use config::Config;

/// Entry point of the `loyalty-service` binary: parses the configuration,
/// serves until SIGTERM or Ctrl-C, then drains.
pub fn main() -> std::process::ExitCode {
    let cfg = <Config as clap::Parser>::parse();
    let log = cfg.log.clone();
    orderflow_web::run("loyalty-service", &log, move |shutdown| build(cfg, shutdown))
}
