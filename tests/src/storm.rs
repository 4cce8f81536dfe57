//! A storm: every message the relays publish is delivered to the services
//! twice, each copy after its own random delay, so copies and messages
//! overtake each other. The relays publish to a raw exchange; the storm
//! consumes it and republishes to the services' exchange.

use std::time::Duration;

use futures::StreamExt;
use orderflow_broker::QueueSpec;
use orderflow_broker::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use orderflow_broker::lapin::types::FieldTable;
use orderflow_broker::{Topology, lapin};
use orderflow_testkit::TestBroker;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The running shuffler.
pub struct Storm {
    token: CancellationToken,
    task: JoinHandle<()>,
}

/// Longest extra delay of a copy.
const MAX_DELAY_MS: u64 = 400;

impl Storm {
    /// Starts shuffling from `raw` (where relays publish) to `target`.
    pub async fn start(broker: &TestBroker, raw: &Topology, target: &Topology) -> Self {
        let tap = QueueSpec {
            consumer: "storm".into(),
            bindings: vec!["#".into()],
            retry_delays: vec![],
            delivery_limit: 1000,
        };
        broker.track_in(raw, &tap);
        let (conn, channel) = broker.channel().await;
        raw.declare_consumer(&channel, &tap).await.unwrap();
        target.declare_exchange(&channel).await.unwrap();
        let out = conn.create_channel().await.unwrap();
        out.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let mut consumer = channel
            .basic_consume(
                raw.queue("storm").as_str().into(),
                "storm".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let exchange = target.events_exchange();
        let token = CancellationToken::new();
        let stop = token.clone();
        let task = tokio::spawn(async move {
            let _keep = (conn, channel);
            let out = std::sync::Arc::new(out);
            loop {
                let delivery = tokio::select! {
                    d = consumer.next() => d,
                    _ = stop.cancelled() => break,
                };
                let Some(Ok(delivery)) = delivery else { break };
                for _ in 0..2 {
                    let (out, exchange) = (out.clone(), exchange.clone());
                    let (key, data, props) =
                        (delivery.routing_key.clone(), delivery.data.clone(), delivery.properties.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(rand::random_range(0..MAX_DELAY_MS))).await;
                        republish(&out, &exchange, key.as_str(), &data, props).await;
                    });
                }
                // Acked once both copies are scheduled; the storm is a test
                // fixture, not a durability boundary.
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        Self { token, task }
    }

    /// Stops shuffling (copies already scheduled still go out).
    pub async fn stop(self) {
        self.token.cancel();
        let _ = self.task.await;
    }

    /// Stops at once (from a destructor).
    pub fn abort(&self) {
        self.task.abort();
    }
}

async fn republish(out: &lapin::Channel, exchange: &str, key: &str, data: &[u8], props: lapin::BasicProperties) {
    if let Ok(confirm) =
        out.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), data, props).await
    {
        let _ = confirm.await;
    }
}
