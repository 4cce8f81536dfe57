//! The broker goes away and comes back: the relay waits without spinning,
//! loses nothing and resumes by itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Instant;

use common::*;
use orderflow_testkit::{FaultProxy, TestBroker, TestDb, eventually};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_means_no_busy_loop_no_loss_and_publishing_resumes() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    let queue = probe(&broker, &channel, "probe", &["#"]).await;
    let proxy = FaultProxy::for_url(&broker.amqp_url).await;
    let prefix = broker.topology.prefix().to_owned();
    let relay = run_relay(&db, &proxy.url_through(&broker.amqp_url), &prefix, "r1", &[]);
    let pid = relay.id().unwrap();

    let before: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    write(&db.pool, before.iter().map(|a| declined(*a, 1)).collect()).await;
    eventually("published while the broker is up", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await == 0
    })
    .await;

    proxy.cut();
    let during: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    write(&db.pool, during.iter().map(|a| declined(*a, 1)).collect()).await;
    // Down until the relay has tried to reconnect 8 times. Its backoff
    // (100 ms doubling to the 1 s cap, each wait jittered to at least half)
    // makes that take over 2.25 s; a relay spinning on errors would get
    // there in milliseconds.
    let cpu_start = cpu_seconds(pid);
    let wall_start = Instant::now();
    eventually("the relay retried 8 times", DEADLINE, || async { proxy.refused_connections() >= 8 }).await;
    let (cpu, wall) = (cpu_seconds(pid) - cpu_start, wall_start.elapsed().as_secs_f64());
    eprintln!("while down: {cpu:.2} s CPU over {wall:.2} s, {} reconnect attempts", proxy.refused_connections());
    assert!(wall > 1.5, "8 attempts in {wall:.2} s: the relay does not back off");
    assert!(cpu < 0.25 * wall, "the relay used {cpu:.2} s of CPU in {wall:.2} s while the broker was down");
    assert_eq!(
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await,
        50,
        "nothing marked published while the broker was down"
    );

    proxy.restore();
    eventually("publishing resumes by itself", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await == 0
    })
    .await;
    let got = std::cell::RefCell::new(HashSet::new());
    eventually("all 60 events delivered", DEADLINE, || async {
        let new = drain(&channel, &queue).await;
        got.borrow_mut().extend(new.into_iter().map(|e| e.aggregate_id));
        got.borrow().len() == 60
    })
    .await;
    drop(relay);
}
