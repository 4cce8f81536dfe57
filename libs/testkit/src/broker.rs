//! A test broker (its own topology prefix, queues deleted at the end) and
//! the raw publish-with-confirms loop benchmarks measure ceilings with.

use std::sync::Mutex;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use orderflow_broker::lapin::options::BasicPublishOptions;
use orderflow_broker::lapin::{Channel, Connection};
use orderflow_broker::{QueueSpec, Topology, properties_for};
use orderflow_envelope::Envelope;

use crate::infra;

/// A topology prefix of its own for one test. Queues of the specs passed to
/// [`TestBroker::track`] (or [`TestBroker::track_in`]) and their topologies'
/// events exchanges are deleted on drop.
pub struct TestBroker {
    /// The broker URL.
    pub amqp_url: String,
    /// The test's topology (prefix `t<random>`).
    pub topology: Topology,
    tracked: Mutex<Vec<(Topology, QueueSpec)>>,
}

impl TestBroker {
    /// A fresh prefix on the test broker.
    pub async fn new() -> Self {
        crate::init_tracing();
        let infra = infra().await;
        let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        Self { amqp_url: infra.amqp_url.clone(), topology: Topology::new(prefix), tracked: Mutex::new(Vec::new()) }
    }

    /// A fresh prefix on the broker at `amqp_url` (e.g. a test's own
    /// cluster: several addresses, comma-separated).
    pub fn on(amqp_url: impl Into<String>) -> Self {
        crate::init_tracing();
        let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        Self { amqp_url: amqp_url.into(), topology: Topology::new(prefix), tracked: Mutex::new(Vec::new()) }
    }

    /// Deletes the queues of `spec` when the test ends.
    pub fn track(&self, spec: &QueueSpec) {
        self.track_in(&self.topology, spec);
    }

    /// Deletes the queues of `spec` under another topology (e.g. one derived
    /// from the test's prefix) when the test ends.
    pub fn track_in(&self, topology: &Topology, spec: &QueueSpec) {
        let mut tracked = self.tracked.lock().unwrap_or_else(|e| e.into_inner());
        let entry = (topology.clone(), spec.clone());
        if !tracked.contains(&entry) {
            tracked.push(entry);
        }
    }

    /// A connection and a channel on the test broker.
    pub async fn channel(&self) -> (Connection, Channel) {
        let conn = orderflow_broker::connect(&self.amqp_url, "test").await.expect("connect to test RabbitMQ");
        let channel = conn.create_channel().await.expect("channel");
        (conn, channel)
    }

    /// Publishes `env` on `channel` to the test's events exchange, routed by
    /// its event type, as a service's relay would.
    pub async fn publish(&self, channel: &Channel, env: &Envelope) {
        channel
            .basic_publish(
                self.topology.events_exchange().as_str().into(),
                env.event_type.as_str().into(),
                BasicPublishOptions::default(),
                &env.to_vec(),
                properties_for(env),
            )
            .await
            .expect("publish to test RabbitMQ")
            .await
            .expect("publisher confirm");
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let tracked = std::mem::take(&mut *self.tracked.lock().unwrap_or_else(|e| e.into_inner()));
        let mut by_topology: Vec<(Topology, Vec<QueueSpec>)> = vec![(self.topology.clone(), Vec::new())];
        for (topology, spec) in tracked {
            match by_topology.iter_mut().find(|(t, _)| *t == topology) {
                Some((_, specs)) => specs.push(spec),
                None => by_topology.push((topology, vec![spec])),
            }
        }
        let url = self.amqp_url.clone();
        let cleaner = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let conn = orderflow_broker::connect(&url, "test-cleanup").await.map_err(std::io::Error::other)?;
                let mut result = Ok(());
                for (topology, specs) in &by_topology {
                    let deleted = topology.delete(&conn, specs).await;
                    if result.is_ok() {
                        result = deleted;
                    }
                }
                let _ = conn.close(200, "bye".into()).await;
                result.map_err(std::io::Error::other)
            })
        });
        if let Ok(Err(e)) = cleaner.join() {
            eprintln!("could not delete all of test topology {}: {e}", self.topology.prefix());
        }
    }
}

/// Publishes `envelopes` to `exchange` on `channel` (already in confirm
/// mode), persistent and `mandatory`, with up to `window` confirms in flight,
/// and returns the rate in messages per second: the broker's ceiling that
/// benchmarks compare the relay and the pipeline with. Panics on a nack.
pub async fn publish_with_confirms(channel: &Channel, exchange: &str, envelopes: &[Envelope], window: usize) -> f64 {
    let started = Instant::now();
    let mut inflight: FuturesUnordered<orderflow_broker::lapin::PublisherConfirm> = FuturesUnordered::new();
    for env in envelopes {
        if inflight.len() >= window {
            inflight.next().await.expect("a confirm in flight").expect("confirm");
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                env.event_type.as_str().into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &env.to_vec(),
                properties_for(env),
            )
            .await
            .expect("publish");
        inflight.push(confirm);
    }
    while let Some(c) = inflight.next().await {
        assert!(c.expect("confirm").is_ack(), "the broker nacked a message");
    }
    envelopes.len() as f64 / started.elapsed().as_secs_f64()
}
