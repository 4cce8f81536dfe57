use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::BrokerError;

/// The retry tiers' delays when none are configured (`CONSUMER_RETRY_DELAYS`
/// of the services and of the relay's CLI): the tiers' queues are named by
/// them, so whoever cleans a topology up must know them.
pub const DEFAULT_RETRY_DELAYS: &str = "1s,5s,30s";

/// Delivery limit of dead-letter queues: explicit, so the broker's default
/// (20 on RabbitMQ 4.x) never applies, and practically unlimited. (-1 means
/// unlimited on 4.x only; a large positive limit means the same everywhere.)
pub const DEAD_LETTER_DELIVERY_LIMIT: i32 = i32::MAX;

/// The queue argument that sets how many nodes hold a replica of a new
/// quorum queue. It only applies when the queue is created, yet the broker
/// still compares it on every later declaration (`PRECONDITION_FAILED` if
/// it differs, "none" included: checked on RabbitMQ 3.10).
pub const QUORUM_GROUP_SIZE: &str = "x-quorum-initial-group-size";

/// The names of every exchange and queue, under one prefix so that tests and
/// tenants can share a broker.
///
/// - `{prefix}.events`: durable topic exchange, routing key = event type;
/// - `{prefix}.{consumer}`: the consumer's quorum queue;
/// - `{prefix}.{consumer}.retry.{delay}` (e.g. `retry.5s`, `retry.1500ms`):
///   the delay queue of a retry tier; its TTL dead-letters the message back
///   to the consumer's queue. Named by its delay, because a queue's TTL
///   cannot change in place: changed retry delays declare new delay queues,
///   and the old ones drain themselves into the work queue (delete them
///   once empty);
/// - `{prefix}.{consumer}.dlq`: the consumer's dead-letter queue, a quorum
///   queue with an explicit, practically unlimited delivery limit
///   ([`DEAD_LETTER_DELIVERY_LIMIT`]), so that inspecting its messages (get
///   and give back) never drops one, whatever the broker's default (RabbitMQ
///   4.x gives quorum queues a default limit of 20).
///
/// The work queue's delivery limit is an argument of the queue and cannot
/// change in place: declaring it with another limit fails with
/// [`BrokerError::Inequivalent`].
///
/// Replicas: every queue is a quorum queue. Unless
/// [`Topology::with_quorum_replicas`] says otherwise, no group size is sent
/// and the broker gives a new queue its default, `quorum_cluster_size` (3)
/// capped at the nodes in the cluster: all nodes up to three, one on a
/// single node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    quorum_replicas: Option<u16>,
}

/// What a consumer needs declared: its queue, bindings, retry tiers and the
/// delivery limit after which the broker itself dead-letters a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Consumer name, e.g. `inventory`; also the inbox's consumer key.
    pub consumer: String,
    /// Event types (routing keys) bound to the queue.
    pub bindings: Vec<String>,
    /// Delay of each retry tier, in order.
    pub retry_delays: Vec<Duration>,
    /// Deliveries before the broker dead-letters a message on its own (the
    /// backstop for a consumer that crashes on a message every time).
    pub delivery_limit: u32,
}

impl Topology {
    /// A topology whose names all start with `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into(), quorum_replicas: None }
    }

    /// New quorum queues get `replicas` members (capped by the broker at the
    /// nodes in the cluster) instead of the broker's default. Existing
    /// queues keep theirs: [`Topology::ensure_consumer`] accepts a queue
    /// created with another group size, and `rabbitmq-queues grow` /
    /// `shrink` change its members in place.
    pub fn with_quorum_replicas(mut self, replicas: Option<u16>) -> Self {
        self.quorum_replicas = replicas;
        self
    }

    /// The group size new quorum queues are declared with (`None`: the
    /// broker's default).
    pub fn quorum_replicas(&self) -> Option<u16> {
        self.quorum_replicas
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The events exchange.
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// A consumer's work queue.
    pub fn queue(&self, consumer: &str) -> String {
        format!("{}.{consumer}", self.prefix)
    }

    /// A consumer's dead-letter queue.
    pub fn dead_letter_queue(&self, consumer: &str) -> String {
        format!("{}.{consumer}.dlq", self.prefix)
    }

    /// A consumer's delay queue for retries after `delay`.
    pub fn retry_queue(&self, consumer: &str, delay: Duration) -> String {
        let ms = delay.as_millis();
        let label = if ms.is_multiple_of(1000) { format!("{}s", ms / 1000) } else { format!("{ms}ms") };
        format!("{}.{consumer}.retry.{label}", self.prefix)
    }

    /// Declares the events exchange (idempotent).
    pub async fn declare_exchange(&self, channel: &Channel) -> Result<(), BrokerError> {
        let name = self.events_exchange();
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::op(format!("declare exchange {name}")))
    }

    /// Declares the exchange and everything `spec` needs (idempotent). A
    /// queue that exists with other arguments fails with
    /// [`BrokerError::Inequivalent`] (and the broker closes `channel`).
    pub async fn declare_consumer(&self, channel: &Channel, spec: &QueueSpec) -> Result<(), BrokerError> {
        self.declare_exchange(channel).await?;
        let mut decl = Declarer { connection: None, channel: channel.clone(), replicas: self.quorum_replicas };
        let dlq = self.dead_letter_queue(&spec.consumer);
        decl.queue(&dlq, dead_letter_args()).await?;
        self.declare_work_and_retry_queues(&mut decl, spec).await
    }

    /// Like [`Topology::declare_consumer`], on channels of its own, and
    /// lenient about two things. A queue created with another quorum group
    /// size (another `AMQP_QUORUM_REPLICAS`, or before it was set) is
    /// declared again with its own: the group size only applies at
    /// creation. A dead-letter queue declared by an older version (without
    /// the explicit delivery limit) is kept and used as it is; the returned
    /// warning says how to migrate it. Anything else that differs fails
    /// with [`BrokerError::Inequivalent`].
    pub async fn ensure_consumer(
        &self,
        connection: &lapin::Connection,
        spec: &QueueSpec,
    ) -> Result<Option<String>, BrokerError> {
        let channel = connection.create_channel().await.map_err(BrokerError::op("open a channel"))?;
        self.declare_exchange(&channel).await?;
        let mut decl = Declarer { connection: Some(connection), channel, replicas: self.quorum_replicas };
        let dlq = self.dead_letter_queue(&spec.consumer);
        let mut warning = None;
        match decl.queue(&dlq, dead_letter_args()).await {
            Ok(()) => {}
            Err(BrokerError::Inequivalent { argument, existing, .. }) if argument != QUORUM_GROUP_SIZE => {
                // The broker closed that channel; the queue exists, so a
                // passive declaration on a new one succeeds.
                let channel = connection.create_channel().await.map_err(BrokerError::op("open a channel"))?;
                let passive = QueueDeclareOptions { passive: true, ..Default::default() };
                channel
                    .queue_declare(dlq.as_str().into(), passive, FieldTable::default())
                    .await
                    .map_err(BrokerError::op(format!("declare queue {dlq}")))?;
                warning = Some(format!(
                    "dead-letter queue {dlq} was declared by an older version ({argument} {existing}, not \
                     {DEAD_LETTER_DELIVERY_LIMIT}); it is used as it is, but on RabbitMQ 4.x inspecting it may drop \
                     messages: move its messages elsewhere (e.g. a shovel), delete it, and restart to redeclare it"
                ));
                decl.channel = channel;
            }
            Err(e) => return Err(e),
        }
        self.declare_work_and_retry_queues(&mut decl, spec).await?;
        let _ = decl.channel.close(200, "declared".into()).await;
        Ok(warning)
    }

    /// Declares a dead-letter queue: a durable quorum queue whose delivery
    /// limit is [`DEAD_LETTER_DELIVERY_LIMIT`], so that taking and giving
    /// back its messages (inspection) never drops them. The broker picks its
    /// replicas (see [`Topology`]).
    pub async fn declare_dead_letter_queue(channel: &Channel, name: &str) -> Result<(), BrokerError> {
        declare_queue(channel, name, dead_letter_args()).await
    }

    async fn declare_work_and_retry_queues(
        &self,
        decl: &mut Declarer<'_>,
        spec: &QueueSpec,
    ) -> Result<(), BrokerError> {
        let queue = self.queue(&spec.consumer);
        let dlq = self.dead_letter_queue(&spec.consumer);
        // Past the delivery limit the broker moves the message to the DLQ
        // itself, at least once (quorum queues' at-least-once dead-lettering
        // needs reject-publish overflow).
        let mut args = quorum();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(i32::try_from(spec.delivery_limit).unwrap_or(i32::MAX)),
        );
        args.insert("x-dead-letter-exchange".into(), long(""));
        args.insert("x-dead-letter-routing-key".into(), long(&dlq));
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
        decl.queue(&queue, args).await?;
        for key in &spec.bindings {
            decl.channel
                .queue_bind(
                    queue.as_str().into(),
                    self.events_exchange().as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(BrokerError::op(format!("bind {queue} to {key}")))?;
        }

        // A delay queue has no consumer: its TTL expires each message back
        // into the work queue through the default exchange.
        for delay in &spec.retry_delays {
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), long("quorum"));
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            args.insert("x-dead-letter-exchange".into(), long(""));
            args.insert("x-dead-letter-routing-key".into(), long(&queue));
            args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
            args.insert("x-overflow".into(), long("reject-publish"));
            decl.queue(&self.retry_queue(&spec.consumer, *delay), args).await?;
        }
        Ok(())
    }

    /// Deletes the exchange and the queues of `specs` (tests and teardown).
    /// Keeps going past a failure (a missing queue closes the channel, so
    /// each delete gets a fresh one) and reports the first.
    pub async fn delete(&self, connection: &lapin::Connection, specs: &[QueueSpec]) -> Result<(), BrokerError> {
        let mut names = Vec::new();
        for spec in specs {
            names.push(self.queue(&spec.consumer));
            names.push(self.dead_letter_queue(&spec.consumer));
            let mut delays = spec.retry_delays.clone();
            delays.dedup();
            names.extend(delays.iter().map(|d| self.retry_queue(&spec.consumer, *d)));
        }
        let mut first_error = None;
        for name in names {
            let deleted = async {
                let channel = connection.create_channel().await?;
                channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await?;
                channel.close(200, "deleted".into()).await
            };
            if let Err(e) = deleted.await {
                first_error.get_or_insert(BrokerError::Operation { op: format!("delete queue {name}"), source: e });
            }
        }
        let name = self.events_exchange();
        let deleted = async {
            let channel = connection.create_channel().await?;
            channel.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()).await
        };
        if let Err(e) = deleted.await {
            first_error.get_or_insert(BrokerError::Operation { op: format!("delete exchange {name}"), source: e });
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Declares queues on a channel, adding the topology's quorum group size;
/// with a connection, it gets over a queue created with another group size.
struct Declarer<'a> {
    /// For a fresh channel after a refusal (the broker closes the channel
    /// it refused on); `None` is strict.
    connection: Option<&'a lapin::Connection>,
    channel: Channel,
    replicas: Option<u16>,
}

impl Declarer<'_> {
    async fn queue(&mut self, name: &str, args: FieldTable) -> Result<(), BrokerError> {
        let mut wanted = args.clone();
        if let Some(n) = self.replicas {
            wanted.insert(QUORUM_GROUP_SIZE.into(), AMQPValue::LongInt(i32::from(n)));
        }
        let refusal = match declare_queue(&self.channel, name, wanted).await {
            Err(e @ BrokerError::Inequivalent { .. }) if e.argument() == Some(QUORUM_GROUP_SIZE) => e,
            done => return done,
        };
        let existing = match (&refusal, self.connection) {
            (BrokerError::Inequivalent { existing, .. }, Some(connection)) => {
                group_size(existing).map(|n| (connection, n, existing.clone()))
            }
            _ => None,
        };
        let Some((connection, existing, shown)) = existing else { return Err(refusal) };
        // The group size only applied when the queue was created; the queue
        // keeps its members, so it is declared again with its own value.
        self.channel = connection.create_channel().await.map_err(BrokerError::op("open a channel"))?;
        let mut own = args;
        if let Some(n) = existing {
            own.insert(QUORUM_GROUP_SIZE.into(), AMQPValue::LongInt(n));
        }
        tracing::info!(
            queue = name,
            group_size = %shown,
            "queue created with another quorum group size: kept (the setting applies to new queues; \
             rabbitmq-queues grow/shrink change members)"
        );
        declare_queue(&self.channel, name, own).await
    }
}

/// The group size a refusal reports: `Some(None)` for none, `Some(Some(n))`
/// for a number, `None` when it cannot be read.
fn group_size(existing: &str) -> Option<Option<i32>> {
    if existing == "none" { Some(None) } else { existing.parse().ok().map(Some) }
}

fn dead_letter_args() -> FieldTable {
    let mut args = quorum();
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(DEAD_LETTER_DELIVERY_LIMIT));
    args
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn quorum() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-queue-type"), long("quorum"));
    args
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), BrokerError> {
    channel
        .queue_declare(name.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .map(drop)
        .map_err(|source| {
            inequivalent(name, &source)
                .unwrap_or(BrokerError::Operation { op: format!("declare queue {name}"), source })
        })
}

/// Reads the broker's "inequivalent arg" refusal, e.g. `PRECONDITION_FAILED -
/// inequivalent arg 'x-delivery-limit' for queue 'q' in vhost '/': received
/// '7' but current is '5'` (other types read `received the value '7' of
/// type 'longstr' but current is none`).
fn inequivalent(queue: &str, error: &lapin::Error) -> Option<BrokerError> {
    let text = error.to_string();
    let rest = &text[text.find("inequivalent arg '")? + "inequivalent arg '".len()..];
    let argument = rest[..rest.find('\'')?].to_owned();
    // The value after `marker`: quoted (with or without "the value "), or a
    // bare word such as `none`.
    let value_after = |marker: &str| -> String {
        let Some(at) = text.find(marker) else { return "none".into() };
        let tail = text[at + marker.len()..].trim_start();
        let tail = tail.strip_prefix("the value ").unwrap_or(tail);
        match tail.strip_prefix('\'') {
            Some(quoted) => quoted.split('\'').next().unwrap_or_default().to_owned(),
            None => tail.split(|c: char| !c.is_alphanumeric()).next().unwrap_or_default().to_owned(),
        }
    };
    let wanted = value_after("received ");
    let existing = value_after("but current is ");
    Some(BrokerError::Inequivalent { queue: queue.to_owned(), argument, existing, wanted, source: error.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(text: &str) -> lapin::Error {
        lapin::Error::from(lapin::ErrorKind::ProtocolError(lapin::protocol::AMQPError::new(
            lapin::protocol::AMQPSoftError::PRECONDITIONFAILED.into(),
            text.into(),
        )))
    }

    #[test]
    fn delay_queues_are_named_by_their_delay() {
        let t = Topology::new("p");
        assert_eq!(t.retry_queue("c", Duration::from_secs(5)), "p.c.retry.5s");
        assert_eq!(t.retry_queue("c", Duration::from_millis(1500)), "p.c.retry.1500ms");
    }

    #[test]
    fn reads_both_forms_of_the_inequivalent_arg_refusal() {
        let e = refusal(
            "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in vhost '/': received '7' but current is '5'",
        );
        let Some(BrokerError::Inequivalent { argument, existing, wanted, .. }) = inequivalent("q", &e) else {
            panic!("not read")
        };
        assert_eq!((argument.as_str(), existing.as_str(), wanted.as_str()), ("x-delivery-limit", "5", "7"));
        let e = refusal(
            "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in vhost '/': received the value '2147483647' of type 'signedint' but current is none",
        );
        let Some(BrokerError::Inequivalent { existing, wanted, .. }) = inequivalent("q", &e) else {
            panic!("not read")
        };
        assert_eq!((existing.as_str(), wanted.as_str()), ("none", "2147483647"));
        assert!(inequivalent("q", &refusal("NOT_FOUND - no queue 'q'")).is_none());
    }
}
