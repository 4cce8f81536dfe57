use std::time::Duration;

use orderflow_broker::{QueueSpec, Topology};

use crate::ConsumerConfig;

/// Broker and consumer options shared by every service's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumerArgs {
    /// RabbitMQ URL; for a cluster, one URL per node separated by commas
    /// (a lost or refused connection moves on to the next node).
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", value_parser = orderflow_broker::AmqpUrlsParser)]
    pub amqp_url: String,
    /// Replicas of each new quorum queue (x-quorum-initial-group-size);
    /// unset, the broker's default: every node up to 3. Existing queues
    /// keep theirs (`rabbitmq-queues grow`/`shrink` change them).
    #[arg(long, env = "AMQP_QUORUM_REPLICAS", value_parser = clap::value_parser!(u16).range(1..=99))]
    pub quorum_replicas: Option<u16>,
    /// Prefix of every exchange and queue name (lets tenants or test runs share a broker).
    #[arg(long, env = "ORDERFLOW_PREFIX", default_value = "orderflow", value_parser = parse_prefix)]
    pub topology_prefix: String,
    /// Batches (transactions) each consumer runs at once.
    #[arg(long, env = "CONSUMER_CONCURRENCY", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=512))]
    pub consumer_concurrency: u16,
    /// Most messages a consumer handles in one transaction (one commit,
    /// acks after it; each message in a savepoint of its own).
    #[arg(long, env = "CONSUMER_BATCH_SIZE", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub consumer_batch_size: u16,
    /// How long a batch waits for more messages after its first; 0 takes
    /// only what has arrived, so a lone message is never delayed.
    #[arg(long, env = "CONSUMER_BATCH_LINGER", default_value = "0ms", value_parser = orderflow_telemetry::args::duration)]
    pub consumer_batch_linger: Duration,
    /// While other batches are in flight, how long a batch that is not full
    /// waits for one of them to finish before starting beside them (0: at
    /// once). Keeps transactions few and large below saturation.
    #[arg(long, env = "CONSUMER_BATCH_BUSY_WAIT", default_value = "100ms", value_parser = orderflow_telemetry::args::duration)]
    pub consumer_batch_busy_wait: Duration,
    /// Longest one message's handling may take; also the server-side
    /// statement and lock timeout of handler transactions. Past it the
    /// message goes through the retry tiers, then to the dead-letter queue.
    #[arg(long, env = "CONSUMER_HANDLER_TIMEOUT", default_value = "30s", value_parser = orderflow_telemetry::args::positive_duration)]
    pub handler_timeout: Duration,
    /// Delays of the retry tiers after a transient failure, e.g. `1s,5s,30s`.
    #[arg(long, env = "CONSUMER_RETRY_DELAYS", default_value = orderflow_broker::DEFAULT_RETRY_DELAYS, value_delimiter = ',', value_parser = orderflow_telemetry::args::positive_duration)]
    pub retry_delays: Vec<Duration>,
    /// Deliveries after which the broker dead-letters a message by itself
    /// (protects against a message that crashes its consumer every time).
    #[arg(long, env = "CONSUMER_DELIVERY_LIMIT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub delivery_limit: u32,
}

impl ConsumerArgs {
    /// The topology these options name.
    pub fn topology(&self) -> Topology {
        Topology::new(self.topology_prefix.clone()).with_quorum_replicas(self.quorum_replicas)
    }

    /// A consumer of `bindings` named `consumer` with these options.
    pub fn config(&self, consumer: &str, bindings: &[&str]) -> ConsumerConfig {
        let spec = QueueSpec {
            consumer: consumer.to_owned(),
            bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
            retry_delays: self.retry_delays.clone(),
            delivery_limit: self.delivery_limit,
        };
        let mut cfg = ConsumerConfig::new(self.amqp_url.clone(), self.topology(), spec);
        cfg.concurrency = usize::from(self.consumer_concurrency);
        cfg.batch_size = usize::from(self.consumer_batch_size);
        cfg.batch_linger = self.consumer_batch_linger;
        cfg.batch_busy_wait = self.consumer_batch_busy_wait;
        cfg.handler_timeout = self.handler_timeout;
        cfg
    }
}

/// A prefix must make valid, readable queue names.
fn parse_prefix(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        Ok(s.to_owned())
    } else {
        Err("use 1 to 64 letters, digits, '-', '_' or '.'".into())
    }
}
