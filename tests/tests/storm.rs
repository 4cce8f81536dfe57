//! Every message delivered twice and out of order: nothing happens twice.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use futures::future::join_all;
use orderflow_e2e::invariants::{self, Expectations};
use orderflow_e2e::{Options, Product, System, cancel, order_body};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_duplicated_and_reordered_messages_changes_nothing_twice() {
    let catalog = vec![Product::new("PLENTY", 500, 1000), Product::new("SCARCE", 900, 12)];
    let initial_stock: HashMap<String, i64> = catalog.iter().map(|p| (p.sku.clone(), i64::from(p.on_hand))).collect();
    let sys =
        System::start(Options { catalog, storm: true, probe: true, decline_rate: 0.2, ..Options::default() }).await;

    let bodies: Vec<_> = (0..30)
        .map(|i| match i % 3 {
            0 => order_body(&format!("s{i}"), &[("PLENTY", 2, 500), ("SCARCE", 1, 900)]),
            _ => order_body(&format!("s{i}"), &[("PLENTY", 1, 500)]),
        })
        .collect();
    let ids = join_all(bodies.iter().map(|b| sys.place(b))).await;
    // Cancels race the storm too.
    for id in ids.iter().step_by(4) {
        cancel(&sys, id).await;
    }
    for id in &ids {
        sys.wait_final(id).await;
    }
    sys.wait_outboxes_drained().await;
    orderflow_e2e::eventually("every outcome notified", orderflow_e2e::DEADLINE, || async {
        orderflow_e2e::count(
            sys.pool(orderflow_e2e::Db::Processor),
            "SELECT count(*) AS n FROM notifications WHERE kind <> 'order_shipped'",
        )
        .await
            == 30
    })
    .await;

    let accepted: Vec<String> = ids.clone();
    let verdict = invariants::check(&sys, &Expectations { accepted, initial_stock, ..Expectations::default() }).await;
    eprintln!("{}", verdict.render());
    assert!(verdict.all_held(), "{}", verdict.render());
    sys.stop().await;
}
