//! order-service's HTTP contract: idempotent creation and bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::join_all;
use orderflow_e2e::{Db, Options, System, count, order_body};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

async fn orders_and_outbox(sys: &System) -> (i64, i64) {
    let pool = sys.pool(Db::Orders);
    (count(pool, "SELECT count(*) AS n FROM orders").await, count(pool, "SELECT count(*) AS n FROM outbox").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_order_posted_twice_and_concurrently_is_stored_once() {
    let sys = System::start(Options::default()).await;
    let id = Uuid::new_v4();
    let mut body = order_body("bob", &[("SKU-1", 1, 2499)]);
    body["order_id"] = json!(id);

    let answers = join_all((0..10).map(|_| sys.post_order(&body))).await;
    for (status, order) in &answers {
        assert_eq!(*status, StatusCode::CREATED, "{order}");
        assert_eq!(order["order_id"], json!(id));
        assert_eq!(order["total_amount"].to_string(), "24.99");
    }
    let (status, again) = sys.post_order(&body).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(again["order_id"], json!(id));

    let pool = sys.pool(Db::Orders);
    assert_eq!(count(pool, "SELECT count(*) AS n FROM orders").await, 1);
    assert_eq!(count(pool, &format!("SELECT count(*) AS n FROM outbox WHERE aggregate_id = '{id}'")).await, 1);

    let mut different = body.clone();
    different["items"][0]["quantity"] = json!(2);
    let r = sys.http.post(sys.order_url("/orders")).json(&different).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let problem: Value = r.json().await.unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("different body"), "{problem}");
    assert_eq!(count(pool, "SELECT count(*) AS n FROM outbox").await, 1, "a conflict writes nothing");
    sys.stop().await;
}

/// Sends `body` with `content_type` and checks a problem+json answer of
/// `status` naming `field`.
async fn rejected(sys: &System, content_type: &str, body: Vec<u8>, status: StatusCode, field: Option<&str>) {
    let r = sys
        .http
        .post(sys.order_url("/orders"))
        .header("content-type", content_type)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned();
    assert_eq!(r.status(), status, "for {shown}");
    assert_eq!(r.headers()["content-type"], "application/problem+json", "for {shown}");
    let problem: Value = r.json().await.unwrap();
    assert_eq!(problem["status"], status.as_u16());
    if let Some(field) = field {
        let fields: Vec<&str> =
            problem["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
        assert!(fields.contains(&field), "{field} in {fields:?} for {shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_request_is_a_problem_and_writes_nothing() {
    let sys = System::start(Options::default()).await;
    let json = "application/json";
    let item = json!({"sku": "SKU-1", "quantity": 1, "price": 1.0});
    let cases: Vec<(Value, &str)> = vec![
        (json!({"items": [item]}), "customer_id"),
        (json!({"customer_id": "c"}), "items"),
        (json!({"customer_id": "  ", "items": [item]}), "customer_id"),
        (json!({"customer_id": 7, "items": [item]}), "customer_id"),
        (json!({"customer_id": "c", "items": []}), "items"),
        (json!({"customer_id": "c", "items": "SKU-1"}), "items"),
        (json!({"customer_id": "c", "items": [{"sku": "SKU-1", "quantity": 0, "price": 1}]}), "items[0].quantity"),
        (json!({"customer_id": "c", "items": [{"sku": "SKU-1", "quantity": -3, "price": 1}]}), "items[0].quantity"),
        (json!({"customer_id": "c", "items": [{"sku": "SKU-1", "quantity": "two", "price": 1}]}), "items[0].quantity"),
        (json!({"customer_id": "c", "items": [{"sku": "SKU-1", "quantity": 1, "price": 19.999}]}), "items[0].price"),
        (json!({"customer_id": "c", "items": [{"sku": "SKU-1", "quantity": 1, "price": "19.999"}]}), "items[0].price"),
        (json!({"customer_id": "c", "items": [{"sku": "SKU-1", "quantity": 1, "price": "abc"}]}), "items[0].price"),
        (
            json!({"customer_id": "c", "items": [{"sku": "SKU-1", "quantity": 1, "price": 1000000.01}]}),
            "items[0].price",
        ),
        (json!({"customer_id": "c", "items": [{"sku": "SKU-1", "quantity": 1, "price": -1}]}), "items[0].price"),
        (json!({"customer_id": "c", "items": [{"sku": "SKU-1", "quantity": 1}]}), "items[0].price"),
        (json!({"customer_id": "c", "items": [{"sku": "bad sku!", "quantity": 1, "price": 1}]}), "items[0].sku"),
        (json!({"customer_id": "c", "items": [item, item]}), "items[1].sku"),
        (json!({"customer_id": "c", "items": [item], "forcefail": true}), "forcefail"),
        (json!({"customer_id": "c", "items": [item], "order_id": "not an id"}), "order_id"),
        (json!({"customer_id": "c", "items": [item], "order_id": "x".repeat(65)}), "order_id"),
        (json!({"customer_id": "c", "items": [item], "order_id": ""}), "order_id"),
        (json!({"customer_id": "c", "items": [item], "order_id": 42}), "order_id"),
        (json!({"customer_id": "c", "items": [item], "force_fail": "yes"}), "force_fail"),
        (
            json!({"customer_id": "c", "items": [{"sku": "SKU-1", "quantity": 1, "price": 9_223_372_036_854_775_807_i64}]}),
            "items[0].price",
        ),
    ];
    for (body, field) in cases {
        rejected(&sys, json, body.to_string().into_bytes(), StatusCode::BAD_REQUEST, Some(field)).await;
    }
    let too_many: Vec<Value> = (0..101).map(|i| json!({"sku": format!("S{i}"), "quantity": 1, "price": 1})).collect();
    rejected(
        &sys,
        json,
        json!({"customer_id": "c", "items": too_many}).to_string().into_bytes(),
        StatusCode::BAD_REQUEST,
        Some("items"),
    )
    .await;
    rejected(&sys, json, b"{\"customer_id\": ".to_vec(), StatusCode::BAD_REQUEST, Some("customer_id")).await;
    rejected(&sys, json, b"{nope".to_vec(), StatusCode::BAD_REQUEST, Some("body")).await;
    rejected(&sys, json, b"[]".to_vec(), StatusCode::BAD_REQUEST, Some("body")).await;
    rejected(&sys, json, vec![], StatusCode::BAD_REQUEST, Some("body")).await;
    rejected(
        &sys,
        "text/plain",
        order_body("c", &[("SKU-1", 1, 1)]).to_string().into_bytes(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        None,
    )
    .await;
    let huge = json!({"customer_id": "x".repeat(70_000), "items": [item]}).to_string().into_bytes();
    rejected(&sys, json, huge, StatusCode::PAYLOAD_TOO_LARGE, None).await;

    for url in
        ["/orders/not%20an%20id", "/orders?limit=0", "/orders?limit=abc", "/orders?status=lost", "/orders?cursor=zzz"]
    {
        let r = sys.http.get(sys.order_url(url)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{url}");
        assert_eq!(r.headers()["content-type"], "application/problem+json", "{url}");
    }
    let r = sys.http.get(sys.order_url(&format!("/orders/{}", Uuid::new_v4()))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = sys.http.get(sys.order_url("/no/such/route")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(r.headers()["content-type"], "application/problem+json");

    assert_eq!(orders_and_outbox(&sys).await, (0, 0), "nothing written");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_list_by_status_and_customer_with_cursor_pages() {
    let sys = System::start(Options::default()).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(sys.place(&order_body(if i % 2 == 0 { "even" } else { "odd" }, &[("SKU-1", 1, 2499)])).await);
    }
    let failed = sys.place(&order_body("odd", &[("NOPE", 1, 100)])).await;
    for id in ids.iter().chain([&failed]) {
        sys.wait_final(id).await;
    }

    let mut seen = Vec::new();
    let mut url = sys.order_url("/orders?limit=2");
    loop {
        let page = sys.get_json(&url).await;
        seen.extend(page["items"].as_array().unwrap().iter().map(|o| o["order_id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(c) => url = sys.order_url(&format!("/orders?limit=2&cursor={c}")),
            None => break,
        }
    }
    let mut expected: Vec<String> = ids.iter().chain([&failed]).cloned().collect();
    expected.reverse();
    assert_eq!(seen, expected, "every order once, newest first");

    let evens = sys.get_json(&sys.order_url("/orders?customer_id=even")).await;
    assert_eq!(evens["items"].as_array().unwrap().len(), 3);
    let failed_page = sys.get_json(&sys.order_url("/orders?status=failed")).await;
    let failed_ids: Vec<&str> =
        failed_page["items"].as_array().unwrap().iter().map(|o| o["order_id"].as_str().unwrap()).collect();
    assert_eq!(failed_ids, [failed.as_str()]);
    let odd_confirmed = sys.get_json(&sys.order_url("/orders?customer_id=odd&status=confirmed")).await;
    assert_eq!(odd_confirmed["items"].as_array().unwrap().len(), 2);
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn product_writes_need_the_admin_token_when_one_is_set() {
    let extra = vec!["--admin-token".to_owned(), "s3cret".to_owned()];
    let sys = System::start(Options { processor_extra: extra, ..Options::default() }).await;
    let product = json!({"sku": "SKU-9", "name": "Grinder", "price": 89.99, "on_hand": 20});
    let post = |auth: Option<&str>| {
        let mut r = sys.http.post(sys.processor_url("/products")).json(&product);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    for auth in [None, Some("Bearer wrong"), Some("Basic czNjcmV0"), Some("Bearer ")] {
        let r = post(auth).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{auth:?}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(problem["status"], 401, "{problem}");
    }
    let r = sys.http.put(sys.processor_url("/products/SKU-1/stock")).json(&json!({"on_hand": 5})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(sys.product("SKU-1").await["on_hand"], 100, "nothing changed");
    assert!(sys.http.get(sys.processor_url("/products/SKU-9")).send().await.unwrap().status() == StatusCode::NOT_FOUND);

    let r = post(Some("Bearer s3cret")).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = sys
        .http
        .put(sys.processor_url("/products/SKU-9/stock"))
        .header("authorization", "Bearer s3cret")
        .json(&json!({"on_hand": 35}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Reads stay open; the contract names the scheme.
    assert_eq!(sys.product("SKU-9").await["on_hand"], 35);
    let doc = sys.get_json(&sys.processor_url("/openapi.json")).await;
    assert_eq!(doc["components"]["securitySchemes"]["admin_token"]["scheme"], "bearer", "{}", doc["components"]);
    assert_eq!(doc["paths"]["/products"]["post"]["security"][0]["admin_token"], json!([]));
    sys.stop().await;
}
