//! Cancellation and compensation, including cancels racing the pipeline.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::time::Duration;

use futures::future::join_all;
use orderflow_e2e::{
    DEADLINE, Db, Options, Product, System, cancel, count, eventually, eventually_some, order_body, texts, timeline,
};
use reqwest::StatusCode;
use serde_json::json;

async fn processor_state(sys: &System, table: &str, id: &str) -> Option<String> {
    let pool = sys.pool(Db::Processor);
    texts(pool, &format!("SELECT status AS t FROM {table} WHERE order_id = '{id}'")).await.into_iter().next()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_payment_releases_stock_and_charges_nothing() {
    // Only the orders relay runs: inventory reserves, but what it writes
    // (inventory.reserved) waits in the processor's outbox.
    let mut sys = System::start(Options { relays_per_db: 0, ..Options::default() }).await;
    sys.start_relay(Db::Orders).await;
    let id = sys.place(&order_body("carol", &[("SKU-1", 3, 2499)])).await;
    eventually("stock reserved", DEADLINE, || async {
        processor_state(&sys, "reservations", &id).await.as_deref() == Some("reserved")
    })
    .await;

    let (status, order) = cancel(&sys, &id).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!((order["status"].as_str(), order["version"].as_i64()), (Some("cancelled"), Some(2)));

    sys.start_relay(Db::Processor).await;
    eventually("stock released", DEADLINE, || async {
        processor_state(&sys, "reservations", &id).await.as_deref() == Some("released")
    })
    .await;
    let p = sys.product("SKU-1").await;
    assert_eq!((p["on_hand"].as_i64(), p["reserved"].as_i64()), (Some(100), Some(0)));
    // The late inventory.reserved found payment's tombstone: never charged.
    eventually("payment saw inventory.reserved", DEADLINE, || async {
        count(
            sys.pool(Db::Processor),
            "SELECT count(*) AS n FROM inbox WHERE consumer = 'payment' AND event_type = 'inventory.reserved'",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(processor_state(&sys, "payments", &id).await.as_deref(), Some("cancelled"));
    eventually("the release reaches the timeline", DEADLINE, || async {
        timeline(&sys, &id).await == ["order.created", "inventory.reserved", "order.cancelled", "inventory.released"]
    })
    .await;
    assert_eq!(sys.order(&id).await["status"], "cancelled", "later events do not change a cancelled order");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_after_payment_refunds_and_ships_nothing() {
    // Shipping is not running: paid orders wait in its queue.
    let opts = Options {
        processor_extra: vec!["--stages".into(), "inventory,payment,notification".into()],
        ..Options::default()
    };
    let mut sys = System::start(opts).await;
    let id = sys.place(&order_body("dave", &[("SKU-2", 2, 1299)])).await;
    eventually("payment authorized", DEADLINE, || async {
        processor_state(&sys, "payments", &id).await.as_deref() == Some("authorized")
    })
    .await;

    let (status, order) = cancel(&sys, &id).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    eventually("refunded and released", DEADLINE, || async {
        processor_state(&sys, "payments", &id).await.as_deref() == Some("refunded")
            && processor_state(&sys, "reservations", &id).await.as_deref() == Some("released")
    })
    .await;
    eventually("refund and release in the timeline", DEADLINE, || async {
        let steps = timeline(&sys, &id).await;
        steps.contains(&"payment.refunded".to_owned()) && steps.contains(&"inventory.released".to_owned())
    })
    .await;

    // Shipping comes back and finds the order released: no shipment.
    sys.restart_processor(&[]).await;
    eventually("shipping handled payment.authorized", DEADLINE, || async {
        count(sys.pool(Db::Processor), "SELECT count(*) AS n FROM inbox WHERE consumer = 'shipping'").await == 1
    })
    .await;
    assert_eq!(count(sys.pool(Db::Processor), "SELECT count(*) AS n FROM shipments").await, 0);
    let p = sys.product("SKU-2").await;
    assert_eq!((p["on_hand"].as_i64(), p["reserved"].as_i64(), p["shipped"].as_i64()), (Some(100), Some(0), Some(0)));
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_is_refused_after_shipment_and_after_failure_and_harmless_twice() {
    let sys = System::start(Options::default()).await;
    let shipped = sys.place(&order_body("erin", &[("SKU-1", 1, 2499)])).await;
    let failed = sys.place(&order_body("erin", &[("NOPE", 1, 100)])).await;
    let shipped_order = sys.wait_final(&shipped).await;
    assert_eq!(shipped_order["status"], "confirmed");
    assert_eq!(sys.wait_final(&failed).await["status"], "failed");

    let (status, problem) = cancel(&sys, &shipped).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("already shipped"), "{problem}");
    assert_eq!(sys.order(&shipped).await["version"], shipped_order["version"], "unchanged");
    let (status, problem) = cancel(&sys, &failed).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("already failed"), "{problem}");
    let (status, _) = cancel(&sys, "5b0e4e5c-0000-4000-8000-000000000000").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = cancel(&sys, "not%20an%20id").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    sys.stop().await;

    // Twice, with a reason, on an order the pipeline has not touched.
    let sys = System::start(Options { relays_per_db: 0, ..Options::default() }).await;
    let id = sys.place(&order_body("frank", &[("SKU-1", 1, 2499)])).await;
    let url = sys.order_url(&format!("/orders/{id}/cancel"));
    let first: serde_json::Value =
        sys.http.post(&url).json(&json!({"reason": "changed my mind"})).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (first["status"].as_str(), first["cancel_reason"].as_str()),
        (Some("cancelled"), Some("changed my mind"))
    );
    let second = sys.http.post(&url).send().await.unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    let second: serde_json::Value = second.json().await.unwrap();
    assert_eq!(second["version"], first["version"], "nothing changed the second time");
    let bad = sys.http.post(&url).json(&json!({"reason": 5})).send().await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        count(sys.pool(Db::Orders), "SELECT count(*) AS n FROM outbox WHERE event_type = 'order.cancelled'").await,
        1
    );
    sys.stop().await;
}

/// How a raced order ended, as both services see it.
#[derive(Debug)]
struct Outcome {
    order: String,
    reservation: Option<String>,
    payment: Option<String>,
    shipment: Option<String>,
}

impl Outcome {
    fn consistent(&self) -> bool {
        let (r, p, s) = (self.reservation.as_deref(), self.payment.as_deref(), self.shipment.as_deref());
        match self.order.as_str() {
            "confirmed" => r == Some("shipped") && p == Some("authorized") && s == Some("created"),
            "cancelled" => {
                matches!(r, Some("released" | "cancelled"))
                    && matches!(p, None | Some("refunded" | "cancelled"))
                    && matches!(s, None | Some("voided"))
            }
            _ => false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_racing_the_pipeline_end_consistent_and_stock_balances() {
    const ORDERS: usize = 36;
    let sys = System::start(Options { catalog: vec![Product::new("RACE", 100, 1000)], ..Options::default() }).await;
    // Each cancel is aimed at a point of the pipeline: at once, once stock is
    // reserved, once paid, once the processor has shipped (racing
    // order-service's confirmation), once confirmed, or at a random moment.
    let races = (0..ORDERS).map(|i| {
        let sys = &sys;
        async move {
            let id = sys.place(&order_body(&format!("racer{i}"), &[("RACE", 2, 100)])).await;
            let table = match i % 6 {
                1 => Some("reservations"),
                2 => Some("payments"),
                3 => Some("shipments"),
                _ => None,
            };
            if let Some(table) = table {
                eventually("the stage is reached", DEADLINE, || async {
                    processor_state(sys, table, &id).await.is_some()
                })
                .await;
            } else if i % 6 == 4 {
                sys.wait_final(&id).await;
            } else if i % 6 == 5 {
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..300))).await;
            }
            let (status, _) = cancel(sys, &id).await;
            (id, status)
        }
    });
    let results: Vec<(String, StatusCode)> = join_all(races).await;

    let outcomes: HashMap<String, Outcome> = eventually_some("every raced order ends consistent", DEADLINE, || async {
        let mut outcomes = HashMap::new();
        for (id, _) in &results {
            let outcome = Outcome {
                order: sys.order(id).await["status"].as_str().unwrap().to_owned(),
                reservation: processor_state(&sys, "reservations", id).await,
                payment: processor_state(&sys, "payments", id).await,
                shipment: processor_state(&sys, "shipments", id).await,
            };
            if !outcome.consistent() {
                return None;
            }
            outcomes.insert(id.clone(), outcome);
        }
        Some(outcomes)
    })
    .await;

    let mut confirmed: i64 = 0;
    for (id, status) in &results {
        let outcome = &outcomes[id];
        match outcome.order.as_str() {
            "cancelled" => assert_eq!(*status, StatusCode::OK, "{id}: {outcome:?}"),
            "confirmed" => {
                assert_eq!(*status, StatusCode::CONFLICT, "{id}: {outcome:?}");
                confirmed += 1;
            }
            other => panic!("{id} ended {other}"),
        }
    }
    eprintln!("{confirmed} of {ORDERS} raced orders were confirmed first");
    assert!(confirmed >= (ORDERS / 6) as i64 && confirmed < ORDERS as i64, "both outcomes occur");
    let p = sys.product("RACE").await;
    assert_eq!(p["reserved"], 0);
    assert_eq!(p["shipped"].as_i64().unwrap(), 2 * confirmed, "only confirmed orders keep their stock");
    assert_eq!(p["on_hand"].as_i64().unwrap() + p["shipped"].as_i64().unwrap(), 1000);
    let processor = sys.pool(Db::Processor);
    assert_eq!(count(processor, "SELECT count(*) AS n FROM payments WHERE status = 'authorized'").await, confirmed);
    assert_eq!(count(processor, "SELECT count(*) AS n FROM shipments WHERE status = 'created'").await, confirmed);
    let voided = count(processor, "SELECT count(*) AS n FROM shipments WHERE status = 'voided'").await;
    let refunded = count(processor, "SELECT count(*) AS n FROM payments WHERE status = 'refunded'").await;
    eprintln!("compensations: {refunded} refunds, {voided} voided shipments");
    sys.stop().await;
}
