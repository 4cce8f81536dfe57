//! Several relays on one database: lanes keep per-aggregate order, and a
//! killed relay's lanes move to the others.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use orderflow_testkit::{TestBroker, TestDb, eventually};
use uuid::Uuid;

const AGGREGATES: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_one_killed_and_restarted_repeatedly_lose_nothing_and_keep_order() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    let queue = probe(&broker, &channel, "probe", &["#"]).await;
    let prefix = broker.topology.prefix().to_owned();
    let amqp = broker.amqp_url.clone();
    let mut relays: Vec<_> = (1..=3).map(|i| run_relay(&db, &amqp, &prefix, &format!("r{i}"), &[])).collect();
    eventually("three relays share the 32 lanes", DEADLINE, || async {
        let lanes = lanes_by_relay(&db).await;
        lanes.len() == 3 && lanes.values().sum::<usize>() == 32 && lanes.values().all(|n| *n >= 10)
    })
    .await;

    // A writer: events for many aggregates, versions counting up, while
    // relay r1 is killed and restarted again and again.
    let aggregates: Vec<Uuid> = (0..AGGREGATES).map(|_| Uuid::now_v7()).collect();
    let writer = {
        let (pool, aggregates) = (db.pool.clone(), aggregates.clone());
        tokio::spawn(async move {
            for version in 1..=30 {
                write(&pool, aggregates.iter().map(|a| declined(*a, version)).collect()).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let mut takeovers = Vec::new();
    for round in 0..4 {
        let victim = relays.remove(0);
        let mut victim = victim;
        victim.kill().await.unwrap();
        let killed = Instant::now();
        eventually("the survivors own every lane within 5 s", Duration::from_secs(5), || async {
            let lanes = lanes_by_relay(&db).await;
            lanes.len() == 2 && lanes.values().sum::<usize>() == 32
        })
        .await;
        takeovers.push(killed.elapsed());
        relays.push(run_relay(&db, &amqp, &prefix, &format!("r{}", round + 4), &[]));
        eventually("the new relay gets its share", DEADLINE, || async {
            let lanes = lanes_by_relay(&db).await;
            lanes.len() == 3 && lanes.values().sum::<usize>() == 32 && lanes.values().all(|n| *n >= 10)
        })
        .await;
    }
    writer.await.unwrap();
    eprintln!("lane takeovers after SIGKILL: {takeovers:?}");

    eventually("every row published", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await == 0
    })
    .await;
    let got = std::cell::RefCell::new(Vec::new());
    let expected = AGGREGATES * 30;
    eventually("every event delivered", DEADLINE, || async {
        let new = drain(&channel, &queue).await;
        got.borrow_mut().extend(new);
        got.borrow().iter().map(|e| e.message_id).collect::<HashSet<_>>().len() == expected
    })
    .await;
    // Killed relays may have published without marking: those events come
    // again, and a consumer drops them by message id. What it keeps must be
    // each aggregate's events, all of them, in the order written.
    let mut seen = HashSet::new();
    let mut versions: HashMap<String, Vec<i64>> = HashMap::new();
    for env in got.into_inner() {
        if seen.insert(env.message_id) {
            versions.entry(env.aggregate_id.clone()).or_default().push(env.aggregate_version);
        }
    }
    assert_eq!(versions.len(), AGGREGATES);
    for (aggregate, v) in versions {
        assert_eq!(v, (1..=30).collect::<Vec<_>>(), "aggregate {aggregate}");
    }
}
