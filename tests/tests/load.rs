//! The load driver against a real (in-process) system: its orders are
//! accepted, priced as the catalog says, and seen final by its polls.
//! A smoke test of the driver; it asserts no performance.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use orderflow_e2e::load::{self, LoadConfig, Mix, PollPolicy};
use orderflow_e2e::{DEADLINE, Options, System};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_orders_are_accepted_priced_right_and_seen_final() {
    let sys = System::start(Options::default()).await;
    let products = sys.http.get(sys.processor_url("/products")).send().await.unwrap().bytes().await.unwrap();
    let catalog = load::parse_catalog(&products).unwrap();
    let cfg = LoadConfig {
        rate: 10.0,
        duration: Duration::from_secs(2),
        warmup: Duration::ZERO,
        connections: 4,
        poll_connections: 32,
        poll: true,
        // Long polls, as loadgen makes by default.
        poll_policy: PollPolicy { long_poll: Some(Duration::from_secs(5)), ..PollPolicy::default() },
        drain: DEADLINE,
        catalog,
        mix: Mix { products: 2, lines: 2 },
        tag: "smoke".into(),
        seed: 3,
    };
    let base = sys.order_url("");
    // The driver runs on a thread of its own, as the loadgen binary does.
    let report = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(load::run(&base, cfg))
    })
    .await
    .unwrap()
    .unwrap();

    assert!(report.post_errors.is_empty(), "{}", report.render());
    assert_eq!((report.scheduled, report.accepted, report.not_sent), (20, 20, 0), "{}", report.render());
    // Every order ends confirmed: the driver's lines carry the catalog's prices.
    assert_eq!((report.confirmed, report.failed, report.not_final), (20, 0, 0), "{}", report.render());
    assert_eq!(report.e2e.count, 20);
    // The server answered each long poll when its order was final (or after
    // 5 s): a few polls per order, not one every 10 ms.
    assert!(report.polls <= 60, "{} polls for 20 orders", report.polls);
    let confirmed = orderflow_e2e::count(
        sys.pool(orderflow_e2e::Db::Orders),
        "SELECT count(*) AS n FROM orders WHERE id LIKE 'smoke-%' AND status = 'confirmed'",
    )
    .await;
    assert_eq!(confirmed, 20, "the orders the driver saw final are confirmed in the database");
    sys.stop().await;
}
