//! `describe`: the topology on the broker, per consumer: its queue,
//! bindings, delivery limit, retry tiers (delay queues) and dead-letter
//! queue, with message counts.
//!
//! Over AMQP RabbitMQ answers only "does this queue exist, how many ready
//! messages, how many consumers" (a passive declare); queue arguments and
//! bindings are reported by its management API alone, which need not be
//! enabled. So every value says where it comes from (see [`SOURCES`]): what
//! the broker reports now, the platform's naming rules (libs/broker
//! `Topology`), the consumer catalog file (`--consumers-file`), or the
//! consumer settings shared with the services (`CONSUMER_*`).

use std::fmt::Write;
use std::time::Duration;

use anyhow::Context;
use orderflow_broker::lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use orderflow_broker::lapin::types::FieldTable;
use orderflow_broker::lapin::{Connection, ExchangeKind};
use orderflow_broker::{DEAD_LETTER_DELIVERY_LIMIT, Topology};
use serde::Serialize;

use crate::cli::DescribeArgs;
use crate::output::{print, print_json};

/// What each `source` word means (also printed with `--json`, under `sources`).
pub const SOURCES: &[(&str, &str)] = &[
    ("broker", "read from RabbitMQ now by a passive declare: whether it exists, ready messages, consumers"),
    (
        "catalog",
        "the consumer catalog file (--consumers-file / RELAY_CONSUMERS_FILE; the order pipeline's is \
         contracts/consumers.json, which a test keeps equal to the services'); RabbitMQ reports bindings only \
         through its management API",
    ),
    (
        "config",
        "the consumer settings shared with the services (CONSUMER_RETRY_DELAYS, CONSUMER_DELIVERY_LIMIT, or \
         --retry-delays/--delivery-limit); RabbitMQ reports queue arguments only through its management API",
    ),
    ("platform", "a rule of the platform's topology (libs/broker): queue names and the dead-letter queues' limit"),
];

/// A queue as the broker reports it.
#[derive(Debug, Serialize)]
struct QueueState {
    name: String,
    declared: bool,
    /// Ready messages (not those delivered and unacknowledged); null if not declared.
    messages: Option<u32>,
    /// Subscribed consumers; null if not declared.
    consumers: Option<u32>,
    source: &'static str,
}

/// A value and where it comes from.
#[derive(Debug, Serialize)]
struct Sourced<T> {
    value: T,
    source: &'static str,
}

#[derive(Debug, Serialize)]
struct Exchange {
    name: String,
    kind: &'static str,
    declared: bool,
    source: &'static str,
}

#[derive(Debug, Serialize)]
struct RetryTier {
    /// The delay, as the queue name writes it (`5s`, `1500ms`).
    delay: String,
    delay_ms: u64,
    source: &'static str,
    queue: QueueState,
}

#[derive(Debug, Serialize)]
struct DeadLetterQueue {
    #[serde(flatten)]
    queue: QueueState,
    delivery_limit: Sourced<i32>,
}

#[derive(Debug, Serialize)]
struct ConsumerTopology {
    consumer: String,
    /// The service that runs it (catalog); null for a consumer outside the catalog.
    service: Option<String>,
    queue: QueueState,
    /// Routing keys (event types) bound to the queue; null when unknown.
    bindings: Sourced<Option<Vec<String>>>,
    delivery_limit: Sourced<u32>,
    retry_tiers: Vec<RetryTier>,
    dead_letter_queue: DeadLetterQueue,
}

#[derive(Debug, Serialize)]
struct Described {
    prefix: String,
    exchange: Exchange,
    consumers: Vec<ConsumerTopology>,
    sources: serde_json::Map<String, serde_json::Value>,
}

/// Asks the broker about `name` on a channel of its own (a missing queue
/// closes the channel).
async fn queue_state(conn: &Connection, name: String) -> anyhow::Result<QueueState> {
    let channel = conn.create_channel().await.context("opening a channel")?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let state = match channel.queue_declare(name.as_str().into(), passive, FieldTable::default()).await {
        Ok(q) => {
            let _ = channel.close(200, "ok".into()).await;
            QueueState {
                name,
                declared: true,
                messages: Some(q.message_count()),
                consumers: Some(q.consumer_count()),
                source: "broker",
            }
        }
        Err(_) => QueueState { name, declared: false, messages: None, consumers: None, source: "broker" },
    };
    Ok(state)
}

async fn exchange_declared(conn: &Connection, name: &str) -> anyhow::Result<bool> {
    let channel = conn.create_channel().await.context("opening a channel")?;
    let passive = ExchangeDeclareOptions { passive: true, ..Default::default() };
    let declared =
        channel.exchange_declare(name.into(), ExchangeKind::Topic, passive, FieldTable::default()).await.is_ok();
    if declared {
        let _ = channel.close(200, "ok".into()).await;
    }
    Ok(declared)
}

/// The delay as the delay queue's name writes it (`retry.5s`).
fn delay_label(topology: &Topology, delay: Duration) -> String {
    let name = topology.retry_queue("x", delay);
    name.rsplit('.').next().unwrap_or_default().to_owned()
}

/// `outbox-relay describe`.
pub async fn describe(args: DescribeArgs) -> anyhow::Result<()> {
    let conn = orderflow_broker::connect(&args.broker.amqp_url, "outbox-relay:describe").await?;
    let topology = Topology::new(args.broker.topology_prefix.clone());
    let exchange_name = topology.events_exchange();
    let exchange = Exchange {
        declared: exchange_declared(&conn, &exchange_name).await?,
        name: exchange_name,
        kind: "topic",
        source: "broker",
    };
    let mut consumers = Vec::new();
    for known in args.consumers.require()? {
        let name = &known.name;
        let mut tiers = Vec::new();
        let mut delays = args.retry_delays.clone();
        delays.dedup();
        for delay in delays {
            tiers.push(RetryTier {
                delay: delay_label(&topology, delay),
                delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                source: "config",
                queue: queue_state(&conn, topology.retry_queue(name, delay)).await?,
            });
        }
        consumers.push(ConsumerTopology {
            consumer: name.clone(),
            service: known.service.clone(),
            queue: queue_state(&conn, topology.queue(name)).await?,
            bindings: Sourced { value: known.bindings.clone(), source: "catalog" },
            delivery_limit: Sourced { value: args.delivery_limit, source: "config" },
            retry_tiers: tiers,
            dead_letter_queue: DeadLetterQueue {
                queue: queue_state(&conn, topology.dead_letter_queue(name)).await?,
                delivery_limit: Sourced { value: DEAD_LETTER_DELIVERY_LIMIT, source: "platform" },
            },
        });
    }
    let _ = conn.close(200, "bye".into()).await;
    let described = Described {
        prefix: args.broker.topology_prefix.clone(),
        exchange,
        consumers,
        sources: SOURCES.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v))).collect(),
    };
    if args.json {
        return print_json(&described);
    }
    print(&text(&described)?)
}

fn state(q: &QueueState, what: &str) -> String {
    match (q.messages, q.consumers) {
        (Some(m), Some(c)) => format!("{m} {what}, {c} consumers"),
        _ => "NOT DECLARED".into(),
    }
}

fn text(d: &Described) -> anyhow::Result<String> {
    let mut o = String::new();
    writeln!(o, "topology prefix {}", d.prefix)?;
    writeln!(
        o,
        "exchange        {} ({}) {}  [{}]",
        d.exchange.name,
        d.exchange.kind,
        if d.exchange.declared { "declared" } else { "NOT DECLARED" },
        d.exchange.source
    )?;
    for c in &d.consumers {
        writeln!(o)?;
        match &c.service {
            Some(service) => writeln!(o, "consumer {} ({service})", c.consumer)?,
            None => writeln!(o, "consumer {} (not a pipeline consumer)", c.consumer)?,
        }
        writeln!(o, "  queue          {}  {}  [broker]", c.queue.name, state(&c.queue, "ready"))?;
        match &c.bindings.value {
            Some(keys) => writeln!(o, "  bindings       {}  [{}]", keys.join(", "), c.bindings.source)?,
            None => writeln!(o, "  bindings       unknown (not in the consumer catalog file; see the management UI)")?,
        }
        writeln!(o, "  delivery limit {}  [{}]", c.delivery_limit.value, c.delivery_limit.source)?;
        if c.retry_tiers.is_empty() {
            writeln!(o, "  retry tiers    none  [config]")?;
        } else {
            writeln!(o, "  retry tiers    delays [config], queues [broker]")?;
        }
        for t in &c.retry_tiers {
            writeln!(o, "    {:<8} {}  {}", t.delay, t.queue.name, state(&t.queue, "waiting"))?;
        }
        let dlq = &c.dead_letter_queue;
        writeln!(o, "  dead letters   {}  {}  [broker]", dlq.queue.name, state(&dlq.queue, "ready"))?;
    }
    writeln!(o)?;
    writeln!(o, "sources:")?;
    for (k, v) in SOURCES {
        writeln!(o, "  [{k}] {v}")?;
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_are_labelled_like_their_queues() {
        let t = Topology::new("p");
        assert_eq!(delay_label(&t, Duration::from_secs(5)), "5s");
        assert_eq!(delay_label(&t, Duration::from_millis(1500)), "1500ms");
    }
}
