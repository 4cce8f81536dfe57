//! `GET /orders/{id}?wait=N`: the answer comes when the order leaves
//! `pending` (woken by the consumer's commit or a cancel), or with the order
//! still pending once the wait is over; bad waits are refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use orderflow_e2e::{Db, Options, System, order_body};
use reqwest::StatusCode;
use serde_json::Value;

async fn long_poll(sys: &System, id: &str, wait: u64) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let r = sys.http.get(sys.order_url(&format!("/orders/{id}?wait={wait}"))).send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_answers_when_the_order_is_final_or_when_the_wait_is_over() {
    // No relay yet: orders stay pending until one starts.
    let mut sys = System::start(Options { relays_per_db: 0, ..Options::default() }).await;
    let id = sys.place(&order_body("lp", &[("SKU-1", 1, 2499)])).await;

    for bad in ["31", "-1", "soon", "1.5"] {
        let r = sys.http.get(sys.order_url(&format!("/orders/{id}?wait={bad}"))).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "wait={bad}");
        assert_eq!(r.headers()["content-type"], "application/problem+json", "wait={bad}");
    }
    let r = sys.http.get(sys.order_url("/orders/nope?wait=5")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND, "an unknown order is not waited for");

    // Still pending when the wait is over: answered as it is.
    let (status, order, took) = long_poll(&sys, &id, 1).await;
    assert_eq!((status, order["status"].as_str()), (StatusCode::OK, Some("pending")), "{order}");
    assert!(took >= Duration::from_secs(1), "answered after {took:?}, before the wait was over");

    // Confirmed by the pipeline while a long poll waits: answered then,
    // not after the 30 s wait.
    let waiting = {
        let (http, url) = (sys.http.clone(), sys.order_url(&format!("/orders/{id}?wait=30")));
        tokio::spawn(async move {
            let started = Instant::now();
            let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            (body, started.elapsed())
        })
    };
    sys.start_relay(Db::Orders).await;
    sys.start_relay(Db::Processor).await;
    let (order, took) = waiting.await.unwrap();
    assert_eq!(order["status"], "confirmed", "{order}");
    assert!(took < Duration::from_secs(29), "the long poll ran out its wait ({took:?})");

    // A final order is answered at once, whatever the wait.
    let (_, order, _) = long_poll(&sys, &id, 30).await;
    assert_eq!(order["status"], "confirmed");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_wakes_the_long_polls_of_its_order() {
    let sys = System::start(Options { relays_per_db: 0, ..Options::default() }).await;
    let id = sys.place(&order_body("lp", &[("SKU-1", 1, 2499)])).await;
    let polls: Vec<_> = (0..3)
        .map(|_| {
            let (http, url) = (sys.http.clone(), sys.order_url(&format!("/orders/{id}?wait=30")));
            tokio::spawn(async move {
                let started = Instant::now();
                let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
                (body, started.elapsed())
            })
        })
        .collect();
    let (status, cancelled) = orderflow_e2e::cancel(&sys, &id).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    for poll in polls {
        let (order, took) = poll.await.unwrap();
        assert_eq!(order["status"], "cancelled", "{order}");
        assert!(took < Duration::from_secs(29), "the long poll ran out its wait ({took:?})");
    }
    sys.stop().await;
}
