use orderflow_broker::BrokerError;

/// Why a consumer cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// A queue on the broker was declared with other settings than this
    /// consumer's, and a queue's arguments cannot change in place. The
    /// message is one line: the queue, the setting, and how to migrate.
    #[error(
        "queue {queue} exists with {argument} = {existing} but this consumer declares {wanted}{setting}: \
         a queue's arguments cannot change in place; {how}"
    )]
    ChangedQueue {
        /// The queue.
        queue: String,
        /// The AMQP argument that differs, e.g. `x-delivery-limit`.
        argument: String,
        /// Its value on the broker.
        existing: String,
        /// The value this consumer declares.
        wanted: String,
        /// The option that sets it, e.g. ` (CONSUMER_DELIVERY_LIMIT)`.
        setting: &'static str,
        /// How to get going again.
        how: String,
        /// The broker's refusal.
        #[source]
        source: BrokerError,
    },
    /// The broker could not be reached or an operation on it failed.
    #[error(transparent)]
    Broker(BrokerError),
}

impl From<BrokerError> for ConsumerError {
    fn from(e: BrokerError) -> Self {
        let BrokerError::Inequivalent { queue, argument, existing, wanted, .. } = &e else {
            return Self::Broker(e);
        };
        let (queue, argument, existing, wanted) = (queue.clone(), argument.clone(), existing.clone(), wanted.clone());
        let (setting, how) = match argument.as_str() {
            "x-delivery-limit" => (
                " (CONSUMER_DELIVERY_LIMIT)",
                format!(
                    "either set CONSUMER_DELIVERY_LIMIT={existing} again, or migrate: stop every consumer of \
                     {queue}, let it drain (or move its messages away), delete it (`rabbitmqctl delete_queue \
                     {queue}`) and start the consumers with the new limit, which declare it afresh"
                ),
            ),
            _ => (
                "",
                format!(
                    "it was declared by another orderflow version or by hand: stop every consumer of {queue}, \
                     let it drain (or move its messages away), delete it (`rabbitmqctl delete_queue {queue}`) \
                     and start again"
                ),
            ),
        };
        Self::ChangedQueue { queue, argument, existing, wanted, setting, how, source: e }
    }
}

impl ConsumerError {
    /// True if retrying cannot help: the configuration must change first.
    pub fn is_configuration(&self) -> bool {
        matches!(self, Self::ChangedQueue { .. } | Self::Broker(BrokerError::Address(_)))
    }
}
