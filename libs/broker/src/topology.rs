use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::BrokerError;

/// The names of every exchange and queue, under one prefix so that tests and
/// tenants can share a broker.
///
/// - `{prefix}.events`: durable topic exchange, routing key = event type;
/// - `{prefix}.{consumer}`: the consumer's quorum queue;
/// - `{prefix}.{consumer}.retry.{n}`: delay queue of retry tier `n` (its TTL
///   dead-letters the message back to the consumer's queue);
/// - `{prefix}.{consumer}.dlq`: the consumer's dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
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
        Self { prefix: prefix.into() }
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

    /// A consumer's delay queue for retry tier `tier` (0-based).
    pub fn retry_queue(&self, consumer: &str, tier: usize) -> String {
        format!("{}.{consumer}.retry.{tier}", self.prefix)
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

    /// Declares the exchange and everything `spec` needs (idempotent).
    pub async fn declare_consumer(&self, channel: &Channel, spec: &QueueSpec) -> Result<(), BrokerError> {
        self.declare_exchange(channel).await?;
        let queue = self.queue(&spec.consumer);
        let dlq = self.dead_letter_queue(&spec.consumer);
        declare_queue(channel, &dlq, quorum()).await?;

        // Past the delivery limit the broker moves the message to the DLQ
        // itself, at least once (quorum queues' at-least-once dead-lettering
        // needs reject-publish overflow).
        let mut args = quorum();
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(spec.delivery_limit as i32));
        args.insert("x-dead-letter-exchange".into(), long(""));
        args.insert("x-dead-letter-routing-key".into(), long(&dlq));
        args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
        args.insert("x-overflow".into(), long("reject-publish"));
        declare_queue(channel, &queue, args).await?;
        for key in &spec.bindings {
            channel
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
        for (tier, delay) in spec.retry_delays.iter().enumerate() {
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), long("quorum"));
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay.as_millis() as i64));
            args.insert("x-dead-letter-exchange".into(), long(""));
            args.insert("x-dead-letter-routing-key".into(), long(&queue));
            args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
            args.insert("x-overflow".into(), long("reject-publish"));
            declare_queue(channel, &self.retry_queue(&spec.consumer, tier), args).await?;
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
            names.extend((0..spec.retry_delays.len()).map(|t| self.retry_queue(&spec.consumer, t)));
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
        .map_err(BrokerError::op(format!("declare queue {name}")))
}
