//! Orderflow on a local 3-node RabbitMQ cluster (issue 14): the test starts
//! the cluster itself (infra/local/cluster.sh, beside the shared broker) and
//! stops it afterwards, unless one was already running (`make cluster`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use orderflow_e2e::cluster::{self, ClusterRunConfig};
use orderflow_testkit::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_survive_a_killed_leader_a_stopped_node_and_a_cut_off_node() {
    let nodes = Cluster::start().await;
    let report = cluster::run(&nodes, ClusterRunConfig::default()).await;
    let rendered = report.render();
    eprintln!("{rendered}");
    // Without AMQP_QUORUM_REPLICAS the broker gives each queue every node
    // (up to 3); with it, new queues get that many.
    assert!(report.default_members.values().all(|m| *m == 3), "{rendered}");
    assert_eq!(report.members_with_two, 2, "{rendered}");
    assert!(report.accepted >= 20, "too few orders flowed:\n{rendered}");
    assert!(report.connections_per_node.iter().all(|c| *c > 0), "a node never had a client:\n{rendered}");
    assert!(report.passed(), "{rendered}");
}
