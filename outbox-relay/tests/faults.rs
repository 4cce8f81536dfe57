//! Partial faults (issue 11): one relay cut off from the broker alone, a
//! row the broker refuses, a database that accepts connections but fails
//! queries, a half-sent batch during a broker cut, and a stalled (not
//! closed) database session. Each meets its fault for real.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use diesel::sql_types::{BigInt, Jsonb, SmallInt, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use orderflow_testkit::{FaultProxy, TestBroker, TestDb, eventually};
use uuid::Uuid;

/// Inserts `env` as an outbox row without the writer's checks, as an older
/// writer, a hand edit or another tool could have.
async fn insert_unchecked(db: &TestDb, env: &orderflow_envelope::Envelope) {
    let mut conn = db.pool.get().await.unwrap();
    diesel::sql_query(
        "INSERT INTO outbox (message_id, event_type, schema_version, aggregate_type, aggregate_id, \
             aggregate_version, lane, payload, headers, occurred_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind::<SqlUuid, _>(env.message_id)
    .bind::<Text, _>(&env.event_type)
    .bind::<Text, _>(env.schema_version.to_string())
    .bind::<Text, _>(&env.aggregate_type)
    .bind::<Text, _>(&env.aggregate_id)
    .bind::<BigInt, _>(env.aggregate_version)
    .bind::<SmallInt, _>(env.lane())
    .bind::<Jsonb, _>(&env.payload)
    .bind::<Jsonb, _>(serde_json::json!({ "correlation_id": env.correlation_id }))
    .bind::<Timestamptz, _>(env.occurred_at)
    .execute(&mut conn)
    .await
    .unwrap();
}

/// Issue 11, defect 2: a relay that reaches PostgreSQL but not RabbitMQ
/// gives up its lanes, so the other relay publishes everything, and its
/// /health says it is not working; it re-joins when the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_off_from_the_broker_alone_gives_its_lanes_away_and_reports_unhealthy() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    let queue = probe(&broker, &channel, "probe", &["#"]).await;
    let prefix = broker.topology.prefix().to_owned();
    let proxy = FaultProxy::for_url(&broker.amqp_url).await;
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let _healthy = run_relay(&db, &broker.amqp_url, &prefix, "healthy", &[]);
    let mut args = vec!["--metrics-addr", metrics.as_str()];
    args.extend(["--lease-interval", "200ms"]);
    let _cut_off = run_relay(&db, &proxy.url_through(&broker.amqp_url), &prefix, "cut-off", &args);
    eventually("two relays share the lanes", DEADLINE, || async {
        let lanes = lanes_by_relay(&db).await;
        lanes.len() == 2 && lanes.values().all(|n| *n == 16)
    })
    .await;
    eventually("the cut-off relay is healthy while it can publish", DEADLINE, || async {
        health_status(port).await == Some(200)
    })
    .await;

    proxy.cut();
    // 2,000 events over 400 aggregates, 5 versions each.
    let aggregates: Vec<Uuid> = (0..400).map(|_| Uuid::now_v7()).collect();
    for version in 1..=5 {
        write(&db.pool, aggregates.iter().map(|a| declined(*a, version)).collect()).await;
    }
    let started = Instant::now();
    eventually("every event is published by the relay that can reach the broker", Duration::from_secs(20), || async {
        unpublished(&db).await == 0
    })
    .await;
    eprintln!("published all 2,000 events {:?} after writing them", started.elapsed());
    eventually("the cut-off relay's /health is not 200", Duration::from_secs(10), || async {
        matches!(health_status(port).await, Some(s) if s != 200)
    })
    .await;
    assert_eq!(http_status(port, "/live").await, Some(200), "alive all the same: a restart would not help");
    let got = drain_until(&channel, &queue, 2000).await;
    assert_in_order(got, 400, 5);

    proxy.restore();
    eventually("the relay re-joins when the broker is back", DEADLINE, || async {
        let lanes = lanes_by_relay(&db).await;
        lanes.len() == 2 && lanes.values().all(|n| *n == 16)
    })
    .await;
    eventually("and reports healthy again", DEADLINE, || async { health_status(port).await == Some(200) }).await;
}

/// Issue 11, defect 4: a batch claimed while the broker is unreachable
/// (its sends fail half-way) does not keep its transaction, row locks and
/// vacuum horizon for the whole outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_cut_leaves_no_relay_transaction_open() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    probe(&broker, &channel, "probe", &["#"]).await;
    let prefix = broker.topology.prefix().to_owned();
    let proxy = FaultProxy::for_url(&broker.amqp_url).await;
    let _relay = run_relay(&db, &proxy.url_through(&broker.amqp_url), &prefix, "r1", &[]);
    write(&db.pool, vec![declined(Uuid::now_v7(), 1)]).await;
    eventually("the relay publishes while the broker is up", DEADLINE, || async { unpublished(&db).await == 0 }).await;

    proxy.cut();
    // Rows written during the cut wake the relay, which claims them and
    // fails to send them.
    write(&db.pool, (0..1200).map(|_| declined(Uuid::now_v7(), 1)).collect()).await;
    eventually("the relay has retried the broker 6 times", DEADLINE, || async { proxy.refused_connections() >= 6 })
        .await;
    let open = count(
        &db.pool,
        "SELECT count(*) AS n FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name LIKE 'outbox-relay:r1%' \
           AND state LIKE 'idle in transaction%' AND state_change < now() - interval '1 second'",
    )
    .await;
    assert_eq!(open, 0, "relay sessions idle in transaction for over a second during the broker cut");
    proxy.restore();
    eventually("everything is published after the cut", DEADLINE, || async { unpublished(&db).await == 0 }).await;
}

/// Issue 11, defect 3: a row the broker refuses (its headers exceed the
/// broker's frame size, and RabbitMQ closes the connection with
/// FRAME_ERROR) is charged to that row and parked dead after the limit; it
/// neither stalls the rows claimed with it nor makes the relay spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_broker_refuses_is_charged_to_that_row_and_its_neighbours_flow() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    let queue = probe(&broker, &channel, "probe", &["#"]).await;
    let prefix = broker.topology.prefix().to_owned();

    // The refused row comes first in id order, so that it is in the first
    // batch with every neighbour.
    let mut poison = declined(Uuid::now_v7(), 1);
    poison.aggregate_id = "x".repeat(140_000);
    insert_unchecked(&db, &poison).await;
    let aggregates: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
    for version in 1..=3 {
        write(&db.pool, aggregates.iter().map(|a| declined(*a, version)).collect()).await;
    }
    let relay = run_relay(&db, &broker.amqp_url, &prefix, "r1", &["--max-attempts", "3"]);
    let pid = relay.id().unwrap();
    let (cpu_start, wall_start) = (cpu_seconds(pid), Instant::now());
    eventually("the neighbours are published", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND length(aggregate_id) < 100")
            .await
            == 0
    })
    .await;
    eventually("the refused row is dead after 3 attempts", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE dead_at IS NOT NULL AND attempts = 3").await == 1
    })
    .await;
    let (cpu, wall) = (cpu_seconds(pid) - cpu_start, wall_start.elapsed().as_secs_f64());
    eprintln!("relay used {cpu:.2} s CPU in {wall:.2} s");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) AS n FROM outbox WHERE last_error LIKE '%FRAME_ERROR%' AND dead_at IS NOT NULL"
        )
        .await,
        1,
        "the broker's reason is recorded on the refused row"
    );
    let got = drain_until(&channel, &queue, 300).await;
    assert_in_order(got, 100, 3);
    assert!(cpu < 0.5 * wall.max(1.0), "the relay used {cpu:.2} s of CPU in {wall:.2} s");
}

/// Issue 11, defect 3: rows that can never be published (an event type
/// longer than AMQP's 255-byte short string, a message above the size
/// limit) are parked dead at once with the reason, without being sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_can_never_be_published_are_parked_at_once_and_the_rest_flow() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    let queue = probe(&broker, &channel, "probe", &["#"]).await;
    let prefix = broker.topology.prefix().to_owned();

    let mut long_type = declined(Uuid::now_v7(), 1);
    long_type.event_type = format!("payment.{}", "x".repeat(300));
    insert_unchecked(&db, &long_type).await;
    let mut too_big = declined(Uuid::now_v7(), 1);
    too_big.payload = serde_json::json!({ "blob": "y".repeat(100_000) });
    insert_unchecked(&db, &too_big).await;
    let aggregates: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    write(&db.pool, aggregates.iter().map(|a| declined(*a, 1)).collect()).await;

    let _relay = run_relay(&db, &broker.amqp_url, &prefix, "r1", &["--max-message-bytes", "65536"]);
    eventually("both rows are dead after one attempt", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE dead_at IS NOT NULL AND attempts = 1").await == 2
    })
    .await;
    eventually("the rest is published", DEADLINE, || async { unpublished(&db).await == 0 }).await;
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) AS n FROM outbox WHERE (last_error LIKE '%255%' AND length(event_type) > 255) \
                OR (last_error LIKE '%65536%' AND length(event_type) < 255 AND dead_at IS NOT NULL)"
        )
        .await,
        2,
        "each dead row says why"
    );
    let got = drain_until(&channel, &queue, 50).await;
    assert_eq!(got.len(), 50, "each of the others once");
}

/// Issue 11, defect 3: a database that accepts connections but fails the
/// relay's queries (here: read-only) is retried with a growing backoff,
/// not every 0-150 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_accepts_connections_but_fails_queries_is_not_retried_in_a_tight_loop() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    probe(&broker, &channel, "probe", &["#"]).await;
    let prefix = broker.topology.prefix().to_owned();
    let proxy = FaultProxy::for_url(&db.url).await;
    let relay = run_relay_at(&proxy.url_through(&db.url), &broker.amqp_url, &prefix, "r1", &[]);
    let pid = relay.id().unwrap();
    write(&db.pool, vec![declined(Uuid::now_v7(), 1)]).await;
    eventually("the relay publishes while the database is writable", DEADLINE, || async {
        unpublished(&db).await == 0
    })
    .await;
    write(&db.pool, (0..10).map(|_| declined(Uuid::now_v7(), 1)).collect()).await;

    // New sessions of this database may only read; the relay's sessions
    // are ended, so it reconnects (which works) and fails its first claim.
    let mut conn = db.pool.get().await.unwrap();
    diesel::sql_query(format!("ALTER DATABASE \"{}\" SET default_transaction_read_only = on", db.name))
        .execute(&mut conn)
        .await
        .unwrap();
    let (accepted, cpu_start, wall_start) = (proxy.accepted_connections(), cpu_seconds(pid), Instant::now());
    diesel::sql_query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name LIKE 'outbox-relay:r1%'",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    // 10 reconnects (4 connections each: the session and 3 workers). With
    // a backoff growing from 100 ms to the 1 s cap, each wait jittered to at
    // least half, that takes over 3.2 s; a relay that resets its backoff on
    // every successful connect gets there in about one second.
    eventually("the relay reconnected 10 times", DEADLINE, || async { proxy.accepted_connections() >= accepted + 40 })
        .await;
    let (cpu, wall) = (cpu_seconds(pid) - cpu_start, wall_start.elapsed().as_secs_f64());
    eprintln!("10 reconnects to a read-only database in {wall:.2} s, {cpu:.2} s CPU");
    assert!(wall > 2.5, "10 reconnects in {wall:.2} s: the relay does not back off");
    assert!(cpu < 0.25 * wall, "the relay used {cpu:.2} s of CPU in {wall:.2} s");

    diesel::sql_query(format!("ALTER DATABASE \"{}\" RESET default_transaction_read_only", db.name))
        .execute(&mut conn)
        .await
        .unwrap();
    eventually("publishing resumes once the database takes writes", DEADLINE, || async { unpublished(&db).await == 0 })
        .await;
}

/// Issue 11, defect 9: a relay whose database connection stalls (packets
/// held, nothing closed) loses its session, and with it its lanes, within
/// the session timeout; another relay takes them over and per-aggregate
/// order holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_relay_session_loses_its_lanes_within_the_session_timeout() {
    const AGGREGATES: usize = 24;
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    let queue = probe(&broker, &channel, "probe", &["#"]).await;
    let prefix = broker.topology.prefix().to_owned();
    let proxy = FaultProxy::for_url(&db.url).await;
    // The bound under test: 3 s (the default is 30 s).
    let bound = ["--session-timeout", "3s", "--confirm-timeout", "2s", "--lease-interval", "200ms"];
    let _r1 = run_relay(&db, &broker.amqp_url, &prefix, "r1", &bound);
    let _r2 = run_relay_at(&proxy.url_through(&db.url), &broker.amqp_url, &prefix, "r2", &bound);
    eventually("two relays share the lanes", DEADLINE, || async {
        let lanes = lanes_by_relay(&db).await;
        lanes.len() == 2 && lanes.values().all(|n| *n == 16)
    })
    .await;
    let aggregates: Vec<Uuid> = (0..AGGREGATES).map(|_| Uuid::now_v7()).collect();
    for version in 1..=10 {
        write(&db.pool, aggregates.iter().map(|a| declined(*a, version)).collect()).await;
    }

    proxy.stall();
    let stalled = Instant::now();
    for version in 11..=20 {
        write(&db.pool, aggregates.iter().map(|a| declined(*a, version)).collect()).await;
    }
    // The stall lasts until the end of the test: far longer than the bound.
    eventually("r1 owns every lane", Duration::from_secs(12), || async {
        let lanes = lanes_by_relay(&db).await;
        lanes.len() == 1 && lanes.get("outbox-relay:r1") == Some(&32)
    })
    .await;
    let takeover = stalled.elapsed();
    eprintln!("r1 took r2's lanes {takeover:?} after r2's database connection stalled");
    eventually("every event published while r2 stays stalled", DEADLINE, || async { unpublished(&db).await == 0 })
        .await;
    let got = drain_until(&channel, &queue, AGGREGATES * 20).await;
    assert_in_order(got, AGGREGATES, 20);
    assert!(proxy.open_connections() > 0, "r2's connections were stalled, not closed, by the proxy");
}
