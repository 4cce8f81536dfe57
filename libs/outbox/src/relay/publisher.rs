use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use orderflow_broker::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use orderflow_broker::lapin::{Channel, Confirmation, Connection};
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
}

/// The broker's answer for row `usize` of a batch.
pub(crate) type Confirm = BoxFuture<'static, (usize, Result<Outcome, String>)>;

/// A confirm-mode channel on its own connection.
pub(crate) struct Publisher {
    // Kept so the connection lives as long as the channel.
    _connection: Connection,
    channel: Channel,
    exchange: String,
    pub(crate) confirm_timeout: Duration,
}

impl Publisher {
    pub(crate) async fn open(cfg: &RelayConfig) -> Result<Self, RelayError> {
        let broker = |e: &dyn std::fmt::Display| RelayError::Broker(e.to_string());
        let connection = orderflow_broker::connect(&cfg.amqp_url, &format!("outbox-relay:{}", cfg.relay_id))
            .await
            .map_err(|e| broker(&e))?;
        let channel = connection.create_channel().await.map_err(|e| broker(&e))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| broker(&e))?;
        cfg.topology.declare_exchange(&channel).await.map_err(|e| broker(&e))?;
        Ok(Self {
            _connection: connection,
            channel,
            exchange: cfg.topology.events_exchange(),
            confirm_timeout: cfg.confirm_timeout,
        })
    }

    /// Sends row `index` (persistent, `mandatory`) without waiting for the
    /// broker: the returned future resolves with its outcome, so many sends
    /// are in flight at once. `Err` is an outcome known without the broker
    /// (a row that cannot be an envelope); a failed send is a broker failure.
    pub(crate) async fn send(&self, index: usize, row: &PendingRow) -> Result<Result<Confirm, Outcome>, RelayError> {
        let env = match row.envelope() {
            Ok(env) => env,
            Err(reason) => return Ok(Err(Outcome::Invalid(reason))),
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
        let event_type = row.event_type.clone();
        Ok(Ok(confirm
            .map(move |result| {
                let outcome = result.map_err(|e| format!("confirm: {e}")).map(|c| match c {
                    Confirmation::Ack(None) | Confirmation::NotRequested => Outcome::Published,
                    Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret)) => Outcome::Failed(format!(
                        "returned by broker: {} {} (no queue bound for routing key {event_type:?}?)",
                        ret.reply_code, ret.reply_text
                    )),
                    Confirmation::Nack(None) => Outcome::Failed("nacked by broker".into()),
                });
                (index, outcome)
            })
            .boxed()))
    }
}
