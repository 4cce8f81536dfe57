//! The order pipeline end to end: outcomes, reasons, stock.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::join_all;
use orderflow_e2e::{DEADLINE, Options, Product, System, cents, eventually, money, order_body};
use serde_json::{Value, json};

fn assert_balanced(p: &Value) {
    let (on_hand, reserved, shipped, received) = (
        p["on_hand"].as_i64().unwrap(),
        p["reserved"].as_i64().unwrap(),
        p["shipped"].as_i64().unwrap(),
        p["received"].as_i64().unwrap(),
    );
    assert!(on_hand >= 0 && reserved >= 0 && shipped >= 0, "{p}");
    assert_eq!(on_hand + reserved + shipped, received, "bookkeeping of {p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_confirmed_with_the_exact_total_and_a_tracking_number() {
    let sys = System::start(Options::default()).await;
    let id = sys.place(&order_body("alice", &[("SKU-1", 2, 2499), ("SKU-2", 3, 1299)])).await;
    let order = sys.wait_final(&id).await;

    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(cents(&order["total_amount"]), 2 * 2499 + 3 * 1299);
    assert_eq!(order["total_amount"].to_string(), "88.95", "money is written with 2 decimals");
    assert_eq!(order["version"], 2, "created, then confirmed");
    assert_eq!(order["fail_reason"], Value::Null);
    let tracking = order["tracking_number"].as_str().expect("a tracking number");
    assert!(tracking.starts_with("OF") && tracking.len() == 16, "{tracking}");

    let beans = sys.product("SKU-1").await;
    assert_eq!(
        (beans["on_hand"].as_i64(), beans["reserved"].as_i64(), beans["shipped"].as_i64()),
        (Some(98), Some(0), Some(2))
    );
    assert_balanced(&beans);
    assert_balanced(&sys.product("SKU-2").await);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rejection_ends_failed_with_its_reason_and_declines_give_stock_back() {
    let sys = System::start(Options {
        catalog: vec![
            Product::new("SKU-1", 1000, 10),
            Product::new("BANNED", 100, 10),
            Product::new("PRICEY", 10_000, 10),
        ],
        blocked_skus: vec!["BANNED".into()],
        amount_limit: 50_000,
        ..Options::default()
    })
    .await;
    let cases: Vec<(Value, &str)> = vec![
        (order_body("c1", &[("SKU-1", 11, 1000)]), "insufficient stock for SKU-1: requested 11, available "),
        (order_body("c2", &[("NOPE", 1, 1000)]), "unknown SKU NOPE"),
        (
            json!({"customer_id": "c3", "items": [{"sku": "SKU-1", "quantity": 2, "price": money(1000)}], "force_fail": true}),
            "force_fail",
        ),
        (order_body("c4", &[("SKU-1", 1, 1000), ("BANNED", 1, 100)]), "SKU BANNED is blocked"),
        (order_body("c5", &[("PRICEY", 6, 10_000)]), "amount 600.00 exceeds the limit of 500.00"),
        (order_body("c6", &[("SKU-1", 1, 1)]), "price mismatch for SKU-1: order says 0.01, catalog says 10.00"),
    ];
    let mut ids = Vec::new();
    for (body, _) in &cases {
        ids.push(sys.place(body).await);
    }
    for (id, (_, reason)) in ids.iter().zip(&cases) {
        let order = sys.wait_final(id).await;
        assert_eq!(order["status"], "failed", "{order}");
        let got = order["fail_reason"].as_str().unwrap();
        assert!(got.contains(reason), "expected {reason:?} in {got:?}");
    }

    // The three payment declines had stock reserved; it all comes back.
    eventually("declined orders' stock released", DEADLINE, || async {
        let p = sys.product("SKU-1").await;
        p["on_hand"] == 10 && p["reserved"] == 0 && sys.product("PRICEY").await["on_hand"] == 10
    })
    .await;
    let p = sys.product("SKU-1").await;
    assert_eq!(p["shipped"], 0);
    assert_balanced(&p);
    assert_eq!(sys.product("BANNED").await["on_hand"], 10);

    let timeline = sys.get_json(&sys.order_url(&format!("/orders/{}/events", ids[3]))).await;
    let steps: Vec<&str> = timeline.as_array().unwrap().iter().map(|e| e["event_type"].as_str().unwrap()).collect();
    for step in ["order.created", "inventory.reserved", "payment.declined", "order.failed"] {
        assert!(steps.contains(&step), "{step} in {steps:?}");
    }
    eventually("the release shows in the timeline", DEADLINE, || async {
        let timeline = sys.get_json(&sys.order_url(&format!("/orders/{}/events", ids[3]))).await;
        timeline.as_array().unwrap().iter().any(|e| e["event_type"] == "inventory.released")
    })
    .await;
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_orders_for_fifty_units_sell_exactly_fifty() {
    let sys = System::start(Options { catalog: vec![Product::new("LIMITED", 500, 50)], ..Options::default() }).await;
    let body = order_body("crowd", &[("LIMITED", 1, 500)]);
    let posts = (0..200).map(|_| sys.place(&body));
    let ids = join_all(posts).await;

    let finals = join_all(ids.iter().map(|id| sys.wait_final(id))).await;
    let confirmed = finals.iter().filter(|o| o["status"] == "confirmed").count();
    let failed: Vec<&Value> = finals.iter().filter(|o| o["status"] == "failed").collect();
    assert_eq!(confirmed, 50);
    assert_eq!(failed.len(), 150);
    assert!(failed.iter().all(|o| o["fail_reason"].as_str().unwrap().contains("insufficient stock for LIMITED")));

    let p = sys.product("LIMITED").await;
    assert_eq!((p["on_hand"].as_i64(), p["reserved"].as_i64(), p["shipped"].as_i64()), (Some(0), Some(0), Some(50)));
    assert_balanced(&p);
    sys.stop().await;
}
