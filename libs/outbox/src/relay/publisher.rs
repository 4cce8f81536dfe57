use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::future::join_all;
use orderflow_broker::lapin::Confirmation;
use orderflow_broker::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use orderflow_broker::lapin::{Channel, Connection};
use orderflow_broker::properties_for;

use super::{RelayConfig, RelayError};
use crate::PendingRow;

/// What happened to one claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Confirmed by the broker: mark published.
    Published,
    /// Nacked or returned: back off, dead after the maximum attempts.
    Failed(String),
    /// The row cannot become a message at all: dead at once.
    Invalid(String),
    /// Not sent because an earlier event of its aggregate failed in this
    /// batch: left as it is, to go after that one.
    Held,
}

/// A confirm-mode channel on its own connection.
pub(crate) struct Publisher {
    // Kept so the connection lives as long as the channel.
    _connection: Connection,
    channel: Channel,
    exchange: String,
}

impl Publisher {
    pub(crate) async fn open(cfg: &RelayConfig) -> Result<Self, RelayError> {
        let connection = orderflow_broker::connect(&cfg.amqp_url, &format!("outbox-relay:{}", cfg.relay_id))
            .await
            .map_err(|e| RelayError::Broker(e.to_string()))?;
        let channel = connection.create_channel().await.map_err(|e| RelayError::Broker(e.to_string()))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| RelayError::Broker(e.to_string()))?;
        cfg.topology.declare_exchange(&channel).await.map_err(|e| RelayError::Broker(e.to_string()))?;
        Ok(Self { _connection: connection, channel, exchange: cfg.topology.events_exchange() })
    }

    /// Publishes `rows` (in id order) and returns one outcome per row.
    ///
    /// Rows go out in waves: wave k holds the k-th row of each aggregate in
    /// the batch. Within a wave every publish is pipelined and the confirms
    /// are awaited together; the next wave starts only when the previous one
    /// is confirmed. So a later event of an aggregate is never sent before
    /// the earlier one is confirmed, and if the earlier one fails the later
    /// ones are held back: per-aggregate order survives nacks and returns.
    /// With distinct aggregates (the common case) a batch is a single wave.
    pub(crate) async fn publish(&mut self, rows: &[PendingRow], timeout: Duration) -> Result<Vec<Outcome>, RelayError> {
        let mut outcomes = vec![Outcome::Held; rows.len()];
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let waves: Vec<usize> = rows
            .iter()
            .map(|r| {
                let k = seen.entry(r.aggregate_id.as_str()).or_insert(0);
                *k += 1;
                *k - 1
            })
            .collect();
        let wave_count = waves.iter().copied().max().map_or(0, |m| m + 1);
        let mut failed: HashSet<&str> = HashSet::new();

        for wave in 0..wave_count {
            let mut pending = Vec::new();
            for (i, row) in rows.iter().enumerate() {
                if waves[i] != wave || failed.contains(row.aggregate_id.as_str()) {
                    continue;
                }
                let env = match row.envelope() {
                    Ok(env) => env,
                    Err(reason) => {
                        outcomes[i] = Outcome::Invalid(reason);
                        failed.insert(&row.aggregate_id);
                        continue;
                    }
                };
                let confirm = self
                    .channel
                    .basic_publish(
                        self.exchange.as_str().into(),
                        env.event_type.as_str().into(),
                        BasicPublishOptions { mandatory: true, ..Default::default() },
                        &env.to_vec(),
                        properties_for(&env),
                    )
                    .await
                    .map_err(|e| RelayError::Broker(format!("publish: {e}")))?;
                pending.push((i, confirm));
            }
            let started = Instant::now();
            let (indices, confirms): (Vec<_>, Vec<_>) = pending.into_iter().unzip();
            let results = tokio::time::timeout(timeout, join_all(confirms))
                .await
                .map_err(|_| RelayError::Broker(format!("no publisher confirm within {timeout:?}")))?;
            metrics::histogram!("outbox_confirm_latency_seconds").record(started.elapsed().as_secs_f64());
            for (i, result) in indices.into_iter().zip(results) {
                let confirmation = result.map_err(|e| RelayError::Broker(format!("confirm: {e}")))?;
                outcomes[i] = match confirmation {
                    Confirmation::Ack(None) | Confirmation::NotRequested => Outcome::Published,
                    Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret)) => Outcome::Failed(format!(
                        "returned by broker: {} {} (no queue bound for routing key {:?}?)",
                        ret.reply_code, ret.reply_text, rows[i].event_type
                    )),
                    Confirmation::Nack(None) => Outcome::Failed("nacked by broker".into()),
                };
                if outcomes[i] != Outcome::Published {
                    failed.insert(&rows[i].aggregate_id);
                }
            }
        }
        Ok(outcomes)
    }
}
