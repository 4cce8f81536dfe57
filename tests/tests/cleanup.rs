//! A test system leaves nothing on the shared broker: every queue the
//! services declared (work, retry tiers, dead letters) goes with it. Idle
//! quorum queues left behind by each run are Raft members the broker keeps
//! ticking; a CI broker that collected a few hundred ran the pipeline at
//! half its speed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use orderflow_broker::lapin::options::QueueDeclareOptions;
use orderflow_broker::lapin::types::FieldTable;
use orderflow_e2e::{Options, System, consumer_specs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_system_leaves_none_of_its_queues_on_the_broker() {
    let sys = System::start(Options { relays_per_db: 0, ..Options::default() }).await;
    let topology = sys.topology().clone();
    let url = sys.broker.amqp_url.clone();
    let mut names = Vec::new();
    for spec in consumer_specs() {
        names.push(topology.queue(&spec.consumer));
        names.push(topology.dead_letter_queue(&spec.consumer));
        names.extend(spec.retry_delays.iter().map(|d| topology.retry_queue(&spec.consumer, *d)));
    }
    let conn = orderflow_broker::connect(&url, "cleanup-probe").await.unwrap();
    let exists = async |name: &str| {
        let channel = conn.create_channel().await.unwrap();
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        // A missing queue closes the channel with NOT_FOUND.
        channel.queue_declare(name.into(), passive, FieldTable::default()).await.is_ok()
    };
    for name in &names {
        assert!(exists(name.as_str()).await, "{name} was declared by the services");
    }
    sys.stop().await;
    let mut left = Vec::new();
    for name in &names {
        if exists(name.as_str()).await {
            left.push(name.clone());
        }
    }
    assert!(left.is_empty(), "left on the broker: {left:?}");
}
