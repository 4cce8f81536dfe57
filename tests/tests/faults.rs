//! Faults the pipeline must survive without losing or doubling anything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::future::join_all;
use orderflow_e2e::{DEADLINE, Db, Options, System, count, eventually, order_body};
use orderflow_testkit::eventually_some;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_between_publish_and_mark_republishes_and_consumers_drop_the_duplicates() {
    // No relay on the orders database yet: the orders wait in the outbox.
    let mut sys = System::start(Options { relays_per_db: 0, ..Options::default() }).await;
    sys.start_relay(Db::Processor).await;
    let bodies: Vec<_> = (0..5).map(|i| order_body(&format!("c{i}"), &[("SKU-1", 2, 2499)])).collect();
    let ids = join_all(bodies.iter().map(|b| sys.place(b))).await;
    let pool = &sys.pool(Db::Orders).clone();
    assert_eq!(count(pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await, 5);

    // This relay publishes the batch, gets the confirms, and dies before it
    // marks the rows published.
    let env = [("ORDERFLOW_FAILPOINTS".to_owned(), "relay-exit-after-publish".to_owned())];
    sys.start_relay_with(Db::Orders, true, &env).await;
    let mut doomed = sys.take_relay(sys.relays.len() - 1);
    assert!(doomed.exited_within(DEADLINE).await, "the failpoint relay died");
    assert_eq!(
        count(pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await,
        5,
        "nothing was marked published"
    );
    // The consumers saw the first copies: inventory reserved each order once.
    let processor = &sys.pool(Db::Processor).clone();
    eventually("inventory handled the first copies", DEADLINE, || async {
        count(
            processor,
            "SELECT count(*) AS n FROM inbox WHERE consumer = 'inventory' AND event_type = 'order.created'",
        )
        .await
            == 5
    })
    .await;

    // A healthy relay publishes the same rows again.
    sys.start_relay(Db::Orders).await;
    for id in &ids {
        let order = sys.wait_final(id).await;
        assert_eq!(order["status"], "confirmed", "{order}");
    }
    eventually("the orders' order.created rows marked published", DEADLINE, || async {
        count(pool, "SELECT count(*) AS n FROM outbox WHERE event_type = 'order.created' AND published_at IS NULL")
            .await
            == 0
    })
    .await;
    assert_eq!(
        count(
            processor,
            "SELECT count(*) AS n FROM inbox WHERE consumer = 'inventory' AND event_type = 'order.created'"
        )
        .await,
        5,
        "the second copies were recognized as duplicates"
    );
    let p = sys.product("SKU-1").await;
    assert_eq!(
        (p["on_hand"].as_i64(), p["reserved"].as_i64(), p["shipped"].as_i64()),
        (Some(90), Some(0), Some(10)),
        "stock taken once per order"
    );
    assert_eq!(
        count(processor, "SELECT count(*) AS n FROM payments WHERE status = 'authorized'").await,
        5,
        "charged once each"
    );
    assert_eq!(count(processor, "SELECT count(*) AS n FROM shipments").await, 5, "shipped once each");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_written_while_the_broker_is_unreachable_are_published_when_it_returns() {
    let sys = System::start(Options { broker_proxy: true, ..Options::default() }).await;
    let proxy = sys.amqp_proxy.as_ref().unwrap();
    let warmup = sys.place(&order_body("early", &[("SKU-2", 1, 1299)])).await;
    assert_eq!(sys.wait_final(&warmup).await["status"], "confirmed");

    proxy.cut();
    // Orders are still accepted: they wait in the outbox.
    let bodies: Vec<_> = (0..10).map(|i| order_body(&format!("late{i}"), &[("SKU-2", 1, 1299)])).collect();
    let ids = join_all(bodies.iter().map(|b| sys.place(b))).await;
    let pool = sys.pool(Db::Orders);
    let waiting = "SELECT count(*) AS n FROM outbox WHERE event_type = 'order.created' AND published_at IS NULL";
    assert_eq!(count(pool, waiting).await, 10);
    // Stay down until relays and consumers have tried to reconnect a few
    // times each (5 clients: 2 relays, 3+1 consumers).
    eventually("clients retried while the broker was down", DEADLINE, || async { proxy.refused_connections() >= 10 })
        .await;
    assert_eq!(count(pool, waiting).await, 10, "nothing published while down");
    // Intake stays in service: ready means "route requests here", and that
    // needs the database, not the broker. The broker state is in the details.
    for url in [sys.order_url("/ready"), sys.processor_url("/ready")] {
        let body = eventually_some("consumers see the broker gone", DEADLINE, || async {
            let r = sys.http.get(&url).send().await.ok()?;
            let status = r.status();
            let body: serde_json::Value = r.json().await.ok()?;
            let consumers = body["consumers"].as_array()?;
            let gone = !consumers.is_empty() && consumers.iter().all(|c| c["connected"] == false);
            gone.then_some((status, body))
        })
        .await;
        assert_eq!(body.0, reqwest::StatusCode::OK, "{url}: {}", body.1);
        assert_eq!((body.1["ready"].as_bool(), body.1["database"].as_bool()), (Some(true), Some(true)), "{}", body.1);
    }
    let health = sys.get_json(&sys.order_url("/health")).await;
    assert_eq!(health["broker"], false, "{health}");
    for id in &ids {
        assert_eq!(sys.order(id).await["status"], "pending");
    }

    proxy.restore();
    for id in &ids {
        assert_eq!(sys.wait_final(id).await["status"], "confirmed");
    }
    assert_eq!(count(pool, waiting).await, 0);
    let p = sys.product("SKU-2").await;
    assert_eq!((p["shipped"].as_i64(), p["reserved"].as_i64()), (Some(11), Some(0)), "every order once");
    sys.stop().await;
}
