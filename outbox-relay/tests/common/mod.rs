//! Helpers for tests that drive the real `outbox-relay` binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::Duration;

use diesel_async::AsyncConnection;
use orderflow_broker::QueueSpec;
use orderflow_broker::lapin::Channel;
use orderflow_broker::lapin::options::{BasicAckOptions, BasicGetOptions};
use orderflow_contracts::events::PaymentDeclined;
use orderflow_db::{Conn, Pool};
use orderflow_envelope::{Envelope, Metadata};
use orderflow_testkit::{TestBroker, TestDb};
use tokio::process::{Child, Command};
use uuid::Uuid;

pub const DEADLINE: Duration = Duration::from_secs(60);

/// `outbox-relay <args>` as a child process, killed when dropped.
pub fn spawn_relay(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("TEST_CHILD_LOG").unwrap_or_else(|_| "warn,lapin::returned_messages=error".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn outbox-relay")
}

/// `outbox-relay run` on `db` with fast test settings and `extra` flags.
pub fn run_relay(db: &TestDb, amqp_url: &str, prefix: &str, id: &str, extra: &[&str]) -> Child {
    run_relay_at(&db.url, amqp_url, prefix, id, extra)
}

/// `outbox-relay run` on the database at `database_url` (e.g. through a
/// fault proxy) with fast test settings and `extra` flags.
pub fn run_relay_at(database_url: &str, amqp_url: &str, prefix: &str, id: &str, extra: &[&str]) -> Child {
    let mut args = vec![
        "run",
        "--database-url",
        database_url,
        "--amqp-url",
        amqp_url,
        "--topology-prefix",
        prefix,
        "--relay-id",
        id,
        "--poll-interval",
        "200ms",
        "--retry-base",
        "50ms",
        "--retry-max",
        "200ms",
        "--reconnect-max",
        "1s",
    ];
    if !extra.contains(&"--metrics-addr") {
        args.extend(["--metrics-addr", "off"]);
    }
    args.extend_from_slice(extra);
    spawn_relay(&args)
}

/// Runs an operator command to completion; returns (success, stdout, stderr).
pub async fn command(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run outbox-relay");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub async fn write(pool: &Pool, events: Vec<Envelope>) {
    let mut conn = pool.get().await.unwrap();
    let conn: &mut Conn = &mut conn;
    conn.transaction::<_, diesel::result::Error, _>(async |tx| orderflow_outbox::append(tx, &events).await)
        .await
        .unwrap();
    orderflow_outbox::notify(conn).await.unwrap();
}

pub fn declined(order: Uuid, version: i64) -> Envelope {
    Envelope::new(
        &PaymentDeclined { order_id: order.to_string(), reason: format!("v{version}") },
        version,
        &Metadata::default(),
    )
    .unwrap()
}

pub use orderflow_testkit::count;

/// A queue bound to `bindings` on the test topology, named `consumer`.
pub async fn probe(broker: &TestBroker, channel: &Channel, consumer: &str, bindings: &[&str]) -> String {
    let spec = QueueSpec {
        consumer: consumer.into(),
        bindings: bindings.iter().map(|s| s.to_string()).collect(),
        retry_delays: vec![],
        delivery_limit: 5,
    };
    broker.track(&spec);
    broker.topology.declare_consumer(channel, &spec).await.unwrap();
    broker.topology.queue(consumer)
}

/// Takes every message now in `queue`.
pub async fn drain(channel: &Channel, queue: &str) -> Vec<Envelope> {
    let mut out = Vec::new();
    while let Some(msg) = channel.basic_get(queue.into(), BasicGetOptions::default()).await.unwrap() {
        out.push(Envelope::from_slice(&msg.delivery.data).unwrap());
        msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

/// CPU time (user + system) a process has used, from /proc (Linux).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // Clock ticks are 100 per second on Linux.
    ticks / 100.0
}

/// Lanes owned per relay name, from `outbox-relay status --json`.
pub async fn lanes_by_relay(db: &TestDb) -> std::collections::HashMap<String, usize> {
    let (ok, out, err) = command(&["status", "--database-url", &db.url, "--json"]).await;
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    status["relays"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap().to_owned(), r["lanes"].as_array().unwrap().len()))
        .collect()
}

/// A local port that was free a moment ago, for a child's metrics listener.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The HTTP status of `GET /health` on 127.0.0.1:`port`, or None if nothing answers.
pub async fn health_status(port: u16) -> Option<u16> {
    http_status(port, "/health").await
}

/// The HTTP status of `GET path` on 127.0.0.1:`port`, or None if nothing answers.
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Every unpublished row (rows are kept or deleted when published).
pub async fn unpublished(db: &TestDb) -> i64 {
    count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND dead_at IS NULL").await
}

/// Deduplicates `got` by message id (as a consumer would) and checks that
/// every aggregate's versions arrived complete and in order.
pub fn assert_in_order(got: Vec<Envelope>, aggregates: usize, versions: i64) {
    let mut seen = std::collections::HashSet::new();
    let mut by_aggregate: std::collections::HashMap<String, Vec<i64>> = std::collections::HashMap::new();
    for env in got {
        if seen.insert(env.message_id) {
            by_aggregate.entry(env.aggregate_id.clone()).or_default().push(env.aggregate_version);
        }
    }
    assert_eq!(by_aggregate.len(), aggregates);
    for (aggregate, v) in by_aggregate {
        assert_eq!(v, (1..=versions).collect::<Vec<_>>(), "aggregate {aggregate}");
    }
}

/// Takes messages from `queue` until `distinct` different message ids have
/// arrived (duplicates kept), within [`DEADLINE`].
pub async fn drain_until(channel: &Channel, queue: &str, distinct: usize) -> Vec<Envelope> {
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let mut pause = Duration::from_millis(10);
    loop {
        for env in drain(channel, queue).await {
            ids.insert(env.message_id);
            got.push(env);
        }
        if ids.len() >= distinct {
            return got;
        }
        assert!(started.elapsed() < DEADLINE, "{} of {distinct} messages arrived in {queue}", ids.len());
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Puts `env` into the dead-letter queue `queue` as a consumer would, with
/// `error` as the reason.
pub async fn dead_letter(channel: &orderflow_broker::lapin::Channel, queue: &str, env: &Envelope, error: &str) {
    use orderflow_broker::lapin::options::BasicPublishOptions;
    use orderflow_broker::lapin::types::{AMQPValue, FieldTable, LongString};
    let mut headers = FieldTable::default();
    headers.insert("x-orderflow-error".into(), AMQPValue::LongString(LongString::from(error)));
    headers.insert("x-orderflow-attempt".into(), AMQPValue::LongLongInt(3));
    let props = orderflow_broker::properties_for(env).with_headers(headers);
    channel
        .basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &env.to_vec(), props)
        .await
        .unwrap()
        .await
        .unwrap();
}
