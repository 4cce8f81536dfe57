//! A short chaos run in `make test`; `make chaos` runs a long one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use orderflow_e2e::chaos::{self, ChaosConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_survive_killed_processes_and_cut_connections() {
    let report = chaos::run(ChaosConfig::default()).await;
    let rendered = report.render();
    eprintln!("{rendered}");
    assert!(report.injected.len() >= 5, "too few faults injected:\n{rendered}");
    assert!(report.passed(), "{rendered}");
}
