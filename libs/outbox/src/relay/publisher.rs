use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use orderflow_broker::lapin::message::BasicReturnMessage;
use orderflow_broker::lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use orderflow_broker::lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use orderflow_broker::lapin::{Channel, Confirmation, Connection, ErrorKind};
use orderflow_broker::{BrokerError, properties_for};
use uuid::Uuid;

use super::{RelayConfig, RelayError};
use crate::{Limits, PendingRow};

/// What happened to one claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Confirmed by the broker: mark published.
    Published,
    /// Nacked, returned or refused: back off, dead after the maximum attempts.
    Failed(String),
    /// The row cannot become a message at all: dead at once.
    Invalid(String),
}

/// A message the broker handed back (`basic.return`): unroutable.
#[derive(Debug)]
pub(crate) struct Returned {
    /// The returned message's own id: the row it belongs to. The client
    /// library attaches a return to whichever confirm completes next, which
    /// with merged (`multiple`) acks is often another message's.
    pub(crate) message_id: Option<Uuid>,
    pub(crate) reason: String,
}

impl From<BasicReturnMessage> for Returned {
    fn from(ret: BasicReturnMessage) -> Self {
        Self {
            message_id: ret.delivery.properties.message_id().as_ref().and_then(|m| m.as_str().parse().ok()),
            reason: format!(
                "returned by broker: {} {} (no queue bound for routing key {:?}?)",
                ret.reply_code,
                ret.reply_text,
                ret.delivery.routing_key.as_str()
            ),
        }
    }
}

/// The broker's answer to one publish.
#[derive(Debug)]
pub(crate) struct Answer {
    /// Acked (true) or nacked.
    pub(crate) acked: bool,
    /// A return that arrived with this confirm: about *some* message in
    /// flight, identified by its message id, not necessarily this one.
    pub(crate) returned: Option<Returned>,
}

/// The broker's answer for row `usize` of a batch.
pub(crate) type Confirm = BoxFuture<'static, (usize, Result<Answer, RelayError>)>;

fn broker(op: &'static str) -> impl FnOnce(orderflow_broker::lapin::Error) -> RelayError {
    move |e| RelayError::Broker(BrokerError::op(op)(e))
}

/// True when the broker (or the client, serializing it) turned down the
/// message just sent, rather than being unreachable: the row is at fault,
/// not the broker. An exchange that is gone (404) or a lost connection is
/// the broker's problem and is never charged to a row.
pub(crate) fn refused(e: &RelayError) -> bool {
    let RelayError::Broker(BrokerError::Operation { source, .. }) = e else { return false };
    match source.kind() {
        ErrorKind::SerialisationError(_) => true,
        ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(
                AMQPSoftError::PRECONDITIONFAILED | AMQPSoftError::ACCESSREFUSED | AMQPSoftError::CONTENTTOOLARGE
            ) | AMQPErrorKind::Hard(
                AMQPHardError::FRAMEERROR
                    | AMQPHardError::SYNTAXERROR
                    | AMQPHardError::COMMANDINVALID
                    | AMQPHardError::UNEXPECTEDFRAME
                    | AMQPHardError::NOTIMPLEMENTED
            )
        ),
        _ => false,
    }
}

/// A confirm-mode channel on its own connection.
pub(crate) struct Publisher {
    // Kept so the connection lives as long as the channel.
    _connection: Connection,
    channel: Channel,
    exchange: String,
    limits: Limits,
    pub(crate) confirm_timeout: Duration,
}

impl Publisher {
    pub(crate) async fn open(cfg: &RelayConfig) -> Result<Self, RelayError> {
        let connection = orderflow_broker::connect(&cfg.amqp_url, &format!("outbox-relay:{}", cfg.relay_id)).await?;
        let channel = connection.create_channel().await.map_err(broker("create channel"))?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(broker("confirm select"))?;
        cfg.topology.declare_exchange(&channel).await?;
        Ok(Self {
            _connection: connection,
            channel,
            exchange: cfg.topology.events_exchange(),
            limits: Limits { max_message_bytes: cfg.max_message_bytes },
            confirm_timeout: cfg.confirm_timeout,
        })
    }

    /// Sends row `index` (persistent, `mandatory`) without waiting for the
    /// broker: the returned future resolves with its answer, so many sends
    /// are in flight at once. `Err` is an outcome known without the broker
    /// (a row that can never be a message); a failed send is a broker
    /// failure.
    pub(crate) async fn send(&self, index: usize, row: &PendingRow) -> Result<Result<Confirm, Outcome>, RelayError> {
        let env = match row.envelope() {
            Ok(env) => env,
            Err(reason) => return Ok(Err(Outcome::Invalid(reason))),
        };
        // Never hand the client what it cannot encode (an over-long short
        // string) or the broker what it must refuse.
        let body = match self.limits.sendable(&env) {
            Ok(body) => body,
            Err(refused) => return Ok(Err(Outcome::Invalid(refused.to_string()))),
        };
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                env.event_type.as_str().into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &body,
                properties_for(&env),
            )
            .await
            .map_err(broker("publish"))?;
        Ok(Ok(confirm
            .map(move |result| {
                let answer = result.map_err(broker("publisher confirm")).map(|c| match c {
                    Confirmation::Ack(ret) => Answer { acked: true, returned: ret.map(Returned::from) },
                    Confirmation::Nack(ret) => Answer { acked: false, returned: ret.map(Returned::from) },
                    Confirmation::NotRequested => Answer { acked: true, returned: None },
                });
                (index, answer)
            })
            .boxed()))
    }
}
