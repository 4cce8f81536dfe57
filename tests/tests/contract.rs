//! The contract the clients of the Python service that orderflow replaces
//! already speak: their own string order ids, decimal prices in major units
//! sent as JSON floats, totals as exact sums, and the catalog (not the
//! caller) deciding what an order costs. Bodies are sent as raw JSON text,
//! exactly as those clients write them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use orderflow_e2e::{Db, Options, Product, System, count};
use reqwest::StatusCode;
use serde_json::Value;

fn catalog() -> Vec<Product> {
    vec![
        Product::new("laptop", 120_000, 10),
        Product::new("mouse", 2_500, 100),
        Product::new("dime", 10, 100),
        Product::new("twenty", 20, 100),
    ]
}

/// POSTs `body` verbatim; returns the status, the raw answer and it parsed.
async fn post(sys: &System, path: &str, body: &str) -> (StatusCode, String, Value) {
    let r = sys
        .http
        .post(sys.order_url(path))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, text, value)
}

async fn get(sys: &System, path: &str) -> (StatusCode, String, Value) {
    let r = sys.http.get(sys.order_url(path)).send().await.unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    let value = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, text, value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_clients_requests_work_unchanged() {
    let sys = System::start(Options { catalog: catalog(), ..Options::default() }).await;

    let (status, _, _) = get(&sys, "/health").await;
    assert_eq!(status, StatusCode::OK);

    let body = r#"{"order_id": "ord-001", "customer_id": "cust-123",
                   "items": [{"sku": "laptop", "quantity": 1, "price": 1200.0},
                             {"sku": "mouse", "quantity": 2, "price": 25.0}]}"#;
    let (status, text, order) = post(&sys, "/orders", body).await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    assert_eq!(order["order_id"], "ord-001");
    assert_eq!(order["customer_id"], "cust-123");
    assert_eq!(order["status"], "pending");
    assert_eq!(order["version"], 1);
    // 1200.0 + 2 x 25.0, exact, written with two decimals.
    assert!(text.contains(r#""total_amount":1250.00"#), "{text}");
    assert!(text.contains(r#""price":1200.00"#) && text.contains(r#""price":25.00"#), "{text}");
    assert_eq!(order["fail_reason"], Value::Null);

    // The same body again: the stored order, nothing new written.
    let (status, _, again) = post(&sys, "/orders", body).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!((again["order_id"].as_str(), again["version"].as_i64()), (Some("ord-001"), Some(1)));
    let orders = sys.pool(Db::Orders);
    assert_eq!(count(orders, "SELECT count(*) AS n FROM orders WHERE id = 'ord-001'").await, 1);
    let created =
        "SELECT count(*) AS n FROM order_timeline WHERE order_id = 'ord-001' AND event_type = 'order.created'";
    assert_eq!(count(orders, created).await, 1, "one order.created");

    let (status, _, fetched) = get(&sys, "/orders/ord-001").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched["order_id"], "ord-001");
    assert_eq!(fetched["total_amount"].to_string(), "1250.00");

    let order = sys.wait_final("ord-001").await;
    assert_eq!(order["status"], "confirmed", "{order}");
    assert_eq!(order["total_amount"].to_string(), "1250.00");
    assert_eq!(order["version"], 2);
    // Charged exactly the verified total, in cents.
    let processor = sys.pool(Db::Processor);
    assert_eq!(
        count(processor, "SELECT amount AS n FROM payments WHERE order_id = 'ord-001' AND status = 'authorized'").await,
        125_000
    );
    let (status, _, timeline) = get(&sys, "/orders/ord-001/events").await;
    assert_eq!(status, StatusCode::OK);
    assert!(timeline.as_array().unwrap().iter().any(|e| e["event_type"] == "payment.authorized"), "{timeline}");

    // Other id shapes: digits only, and a UUID; a string price too.
    for (id, price) in [("123", r#""25.00""#), ("0190f5c2-6e7b-7cc3-8f5e-1a2b3c4d5e6f", "25")] {
        let body = format!(
            r#"{{"order_id": "{id}", "customer_id": "c", "items": [{{"sku": "mouse", "quantity": 1, "price": {price}}}]}}"#
        );
        let (status, text, _) = post(&sys, "/orders", &body).await;
        assert_eq!(status, StatusCode::CREATED, "{text}");
        let (status, _, _) = post(&sys, &format!("/orders/{id}/cancel"), "").await;
        assert_eq!(status, StatusCode::OK, "cancel {id}");
    }

    // No order_id: the server makes one (a UUIDv7).
    let (status, text, made) =
        post(&sys, "/orders", r#"{"customer_id": "c", "items": [{"sku": "mouse", "quantity": 1, "price": 25.0}]}"#)
            .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    let id = made["order_id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);

    // Errors: an empty order, an unknown id, a third decimal place.
    let (status, _, problem) = post(&sys, "/orders", r#"{"customer_id": "c", "items": []}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(problem["detail"].as_str().is_some_and(|d| !d.is_empty()), "{problem}");
    let (status, _, _) = get(&sys, "/orders/ord-unknown").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, problem) = post(
        &sys,
        "/orders",
        r#"{"order_id": "ord-002", "customer_id": "c", "items": [{"sku": "mouse", "quantity": 1, "price": 19.999}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["errors"][0]["field"], "items[0].price", "{problem}");
    assert!(problem["errors"][0]["message"].as_str().unwrap().contains("at most 2 decimal places"), "{problem}");
    assert_eq!(count(orders, "SELECT count(*) AS n FROM orders WHERE id = 'ord-002'").await, 0);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_prices_the_order_and_sums_are_exact() {
    let sys = System::start(Options { catalog: catalog(), ..Options::default() }).await;

    // 0.1 + 0.2 is 0.30, not 0.30000000000000004.
    let (status, text, _) = post(
        &sys,
        "/orders",
        r#"{"order_id": "sum-1", "customer_id": "c",
            "items": [{"sku": "dime", "quantity": 1, "price": 0.1}, {"sku": "twenty", "quantity": 1, "price": 0.2}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");
    assert!(text.contains(r#""total_amount":0.30"#), "{text}");

    // A tampered price: the laptop for 1.00.
    let (status, text, _) = post(
        &sys,
        "/orders",
        r#"{"order_id": "cheat-1", "customer_id": "mallory",
            "items": [{"sku": "laptop", "quantity": 1, "price": 1.0}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{text}");

    let sum = sys.wait_final("sum-1").await;
    assert_eq!(sum["status"], "confirmed", "{sum}");
    let processor = sys.pool(Db::Processor);
    assert_eq!(count(processor, "SELECT amount AS n FROM payments WHERE order_id = 'sum-1'").await, 30);

    let cheat = sys.wait_final("cheat-1").await;
    assert_eq!(cheat["status"], "failed", "{cheat}");
    let reason = cheat["fail_reason"].as_str().unwrap();
    assert!(reason.contains("laptop") && reason.contains("1.00") && reason.contains("1200.00"), "{reason}");
    // Nothing reserved, nothing charged.
    assert_eq!(count(processor, "SELECT count(*) AS n FROM payments WHERE order_id = 'cheat-1'").await, 0);
    let laptop = sys.product("laptop").await;
    assert_eq!((laptop["on_hand"].as_i64(), laptop["reserved"].as_i64()), (Some(10), Some(0)), "{laptop}");
    assert_eq!(laptop["price"].to_string(), "1200.00");
    sys.stop().await;
}
