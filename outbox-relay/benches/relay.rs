//! `make bench`, relay part. Measured in one run, on this machine's
//! PostgreSQL and RabbitMQ, and printed as figures and ratios:
//!
//! 1. ceiling: raw publish-with-confirms of the same messages to the same
//!    kind of queue (quorum) on the same broker, by a small lapin publisher
//!    keeping a window of unconfirmed messages in flight;
//! 2. drain: the relay (release binary, default settings) publishing a
//!    backlog of the same number of outbox rows; ratio = drain / ceiling;
//!    (by default published rows are deleted; also measured with rows kept);
//! 3. latency at a steady rate (default 1,000 events/s, one event per
//!    transaction from 4 writers, each waking the relays after its commit
//!    through an `orderflow_outbox::Waker`, as the services do): from each
//!    writer's commit to the message's delivery at a consumer, next to the
//!    floor of a raw publisher at the same rate (publish to delivery);
//! 4. the relay's peak memory (VmHWM).
//!
//! Sizes: BENCH_ROWS (100000), BENCH_ROUNDS (3), BENCH_RATE (1000 per
//! second), BENCH_SECONDS (10). BENCH_RELAY_ARGS adds relay flags.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, missing_docs)]

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use diesel_async::{AsyncConnection, RunQueryDsl};
use futures::StreamExt;
use hdrhistogram::Histogram;
use orderflow_broker::lapin::Channel;
use orderflow_broker::lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use orderflow_broker::lapin::types::FieldTable;
use orderflow_broker::{QueueSpec, properties_for};
use orderflow_contracts::events::PaymentDeclined;
use orderflow_db::{Conn, Pool};
use orderflow_envelope::{Envelope, Metadata};
use orderflow_outbox::Waker;
use orderflow_testkit::{TestBroker, TestDb};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WINDOW: usize = 1000;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn event() -> Envelope {
    let e = PaymentDeclined {
        order_id: Uuid::now_v7().to_string(),
        reason: "payment declined: amount 120000 exceeds the limit of 100000".into(),
    };
    Envelope::new(&e, 1, &Metadata::default()).unwrap()
}

async fn raw_ceiling(broker: &TestBroker, envelopes: &[Envelope]) -> f64 {
    let (_conn, channel) = broker.channel().await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    orderflow_testkit::broker::publish_with_confirms(&channel, &broker.topology.events_exchange(), envelopes, WINDOW)
        .await
}

async fn append(pool: &Pool, events: &[Envelope]) {
    let mut conn = pool.get().await.unwrap();
    let conn: &mut Conn = &mut conn;
    conn.transaction::<_, diesel::result::Error, _>(async |tx| orderflow_outbox::append(tx, events).await)
        .await
        .unwrap();
}

/// Whether some row is unpublished (stops at the first it finds).
async fn unpublished(pool: &Pool) -> i64 {
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query("SELECT count(*) AS n FROM (SELECT 1 FROM outbox WHERE published_at IS NULL LIMIT 1) AS one")
        .get_result::<N>(&mut conn)
        .await
        .unwrap()
        .n
}

/// Waits until every row is published: first until the queue holds them
/// all (a passive declare: nothing for PostgreSQL to do), then until the
/// last marks are committed. Counting the unpublished rows every few
/// milliseconds instead kept one PostgreSQL backend busy beside the relay
/// (a `count(*)` over the backlog took 15 ms) and took a third of the
/// drain's database CPU.
async fn wait_drained(pool: &Pool, channel: &Channel, queue: &str, rows: usize, deadline: Duration) {
    let started = Instant::now();
    loop {
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .unwrap();
        if q.message_count() as usize >= rows {
            break;
        }
        assert!(started.elapsed() < deadline, "the relay did not drain within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_marked(pool, deadline.saturating_sub(started.elapsed())).await;
}

/// Waits until no row is unpublished.
async fn wait_marked(pool: &Pool, deadline: Duration) {
    let started = Instant::now();
    while unpublished(pool).await > 0 {
        assert!(started.elapsed() < deadline, "the relay did not drain within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn relay(db: &TestDb, broker: &TestBroker, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args([
            "run",
            "--database-url",
            &db.url,
            "--amqp-url",
            &broker.amqp_url,
            "--topology-prefix",
            broker.topology.prefix(),
            "--metrics-addr",
            "off",
        ])
        .args(extra)
        .args(std::env::var("BENCH_RELAY_ARGS").unwrap_or_default().split_whitespace())
        .env("RUST_LOG", std::env::var("BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn peak_memory_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// What a drain measured.
struct Drained {
    rate: f64,
    cpu_ms_per_1k: f64,
    peak_kib: Option<u64>,
}

/// Fills the outbox with `envelopes`, starts a relay with `extra` flags and
/// times the drain.
async fn drain(db: &TestDb, broker: &TestBroker, envelopes: &[Envelope], extra: &[&str], queue: &str) -> Drained {
    {
        let mut conn = db.pool.get().await.unwrap();
        diesel::sql_query("TRUNCATE outbox").execute(&mut conn).await.unwrap();
    }
    for chunk in envelopes.chunks(1000) {
        append(&db.pool, chunk).await;
    }
    let started = Instant::now();
    let mut child = relay(db, broker, extra);
    let pid = child.id().unwrap_or(0);
    let (_conn, channel) = broker.channel().await;
    wait_drained(&db.pool, &channel, queue, envelopes.len(), Duration::from_secs(600)).await;
    let rate = envelopes.len() as f64 / started.elapsed().as_secs_f64();
    let cpu_ms_per_1k = cpu_seconds(pid) * 1000.0 / (envelopes.len() as f64 / 1000.0);
    let peak_kib = peak_memory_kib(pid);
    let _ = child.kill().await;
    Drained { rate, cpu_ms_per_1k, peak_kib }
}

/// Receipt times of the messages arriving on `queue`, by message id.
async fn receiver(
    broker: &TestBroker,
    queue: &str,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<HashMap<Uuid, SystemTime>>>) {
    let received = Arc::new(Mutex::new(HashMap::new()));
    let (conn, channel) = broker.channel().await;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let sink = received.clone();
    let task = tokio::spawn(async move {
        let _keep = (conn, channel);
        while let Some(Ok(d)) = consumer.next().await {
            let at = SystemTime::now();
            if let Some(id) = d.properties.message_id().as_ref().and_then(|m| m.as_str().parse().ok()) {
                sink.lock().unwrap().insert(id, at);
            }
        }
    });
    (task, received)
}

fn histogram(sent: &HashMap<Uuid, SystemTime>, received: &HashMap<Uuid, SystemTime>) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    for (id, at) in sent {
        let got = received.get(id).expect("every message arrives");
        let micros = got.duration_since(*at).map(|d| d.as_micros() as u64).unwrap_or(1).clamp(1, 60_000_000);
        h.record(micros).unwrap();
    }
    h
}

async fn wait_received(received: &Mutex<HashMap<Uuid, SystemTime>>, n: usize) {
    let started = Instant::now();
    while received.lock().unwrap().len() < n {
        assert!(started.elapsed() < Duration::from_secs(120), "messages missing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `rate` single-event transactions per second from 4 writers for
/// `seconds`, as the relay's writers do: each wakes the relays after its
/// commit through `waker`. Returns each event's commit time.
async fn write_load(pool: Pool, waker: Waker, rate: u64, seconds: u64) -> HashMap<Uuid, SystemTime> {
    let writers = 4u64;
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let (pool, waker) = (pool.clone(), waker.clone());
            tokio::spawn(async move {
                let mut commits = Vec::new();
                let mut tick = tokio::time::interval(Duration::from_secs_f64(writers as f64 / rate as f64));
                for _ in 0..rate * seconds / writers {
                    tick.tick().await;
                    let env = event();
                    append(&pool, std::slice::from_ref(&env)).await;
                    commits.push((env.message_id, SystemTime::now()));
                    waker.wake();
                }
                commits
            })
        })
        .collect();
    let mut sent = HashMap::new();
    for t in tasks {
        sent.extend(t.await.unwrap());
    }
    sent
}

/// Latency floor: a raw publisher at `rate`, publish to delivery; with
/// `load`, while the same database write load as the relay's runs (into
/// another database, so nothing relays it).
async fn raw_latency(
    broker: &TestBroker,
    queue: &str,
    rate: u64,
    seconds: u64,
    load: Option<&TestDb>,
) -> Histogram<u64> {
    let stop = CancellationToken::new();
    let load =
        load.map(|db| tokio::spawn(write_load(db.pool.clone(), Waker::start(&db.url, stop.clone()), rate, seconds)));
    let (task, received) = receiver(broker, queue).await;
    let (_conn, channel) = broker.channel().await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let exchange = broker.topology.events_exchange();
    let mut sent = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut confirms = Vec::new();
    for _ in 0..rate * seconds {
        tick.tick().await;
        let env = event();
        sent.insert(env.message_id, SystemTime::now());
        let options = BasicPublishOptions { mandatory: true, ..Default::default() };
        confirms.push(
            channel
                .basic_publish(
                    exchange.as_str().into(),
                    env.event_type.as_str().into(),
                    options,
                    &env.to_vec(),
                    properties_for(&env),
                )
                .await
                .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    wait_received(&received, sent.len()).await;
    task.abort();
    if let Some(load) = load {
        load.await.unwrap();
    }
    stop.cancel();
    let received = received.lock().unwrap().clone();
    histogram(&sent, &received)
}

/// The relay's latency: writers commit one event per transaction at `rate`
/// (4 writers); measured from each commit to the delivery at a consumer.
async fn relay_latency(
    db: &TestDb,
    broker: &TestBroker,
    queue: &str,
    rate: u64,
    seconds: u64,
) -> (Histogram<u64>, Option<u64>) {
    {
        // Start from a clean table (the drains left dead rows behind), as a
        // relay that has been keeping up sees it.
        let mut conn = db.pool.get().await.unwrap();
        diesel::sql_query("TRUNCATE outbox").execute(&mut conn).await.unwrap();
    }
    let (task, received) = receiver(broker, queue).await;
    let mut child = relay(db, broker, &[]);
    let stop = CancellationToken::new();
    let waker = Waker::start(&db.url, stop.clone());
    // Let the relay connect and take its lanes before the clock starts.
    append(&db.pool, &[event()]).await;
    waker.wake();
    wait_marked(&db.pool, Duration::from_secs(30)).await;
    wait_received(&received, 1).await;
    received.lock().unwrap().clear();
    let sent = write_load(db.pool.clone(), waker, rate, seconds).await;
    wait_received(&received, sent.len()).await;
    stop.cancel();
    let peak = child.id().and_then(peak_memory_kib);
    let _ = child.kill().await;
    task.abort();
    let received = received.lock().unwrap().clone();
    (histogram(&sent, &received), peak)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn list(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ")
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rows = env_or("BENCH_ROWS", 100_000) as usize;
    let rate = env_or("BENCH_RATE", 1000);
    let seconds = env_or("BENCH_SECONDS", 10);
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let spec = QueueSpec {
        consumer: "bench".into(),
        bindings: vec!["payment.declined".into()],
        retry_delays: vec![],
        delivery_limit: 5,
    };
    broker.track(&spec);
    let (_conn, channel) = broker.channel().await;
    broker.topology.declare_consumer(&channel, &spec).await.unwrap();
    let queue = broker.topology.queue("bench");
    let purge = || async { channel.queue_purge(queue.as_str().into(), QueuePurgeOptions::default()).await.unwrap() };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("relay benchmark: {rows} rows, quorum queue, {cores} cores, PostgreSQL and RabbitMQ on this machine");

    let rounds = env_or("BENCH_ROUNDS", 3).max(1) as usize;
    let envelopes: Vec<Envelope> = (0..rows).map(|_| event()).collect();
    // The broker's throughput drifts from run to run: ceiling and relay are
    // measured alternately, and medians are reported.
    let (mut ceilings, mut deleted, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        ceilings.push(raw_ceiling(&broker, &envelopes).await);
        purge().await;
        deleted.push(drain(&db, &broker, &envelopes, &[], &queue).await);
        purge().await;
        kept.push(drain(&db, &broker, &envelopes, &["--published-retention", "1h"], &queue).await);
        purge().await;
    }
    let load_db = TestDb::new(None).await;
    let floor_idle = raw_latency(&broker, &queue, rate, seconds, None).await;
    let floor_loaded = raw_latency(&broker, &queue, rate, seconds, Some(&load_db)).await;
    let (latency, peak_steady) = relay_latency(&db, &broker, &queue, rate, seconds).await;
    let ceiling = median(ceilings.clone());
    let ratios = |d: &[Drained]| median(d.iter().zip(&ceilings).map(|(d, c)| d.rate / c).collect());

    println!();
    println!("drain of a {rows}-row backlog, median of {rounds} alternating rounds (events/s)");
    println!("  raw publish-with-confirms (ceiling, window {WINDOW})  {ceiling:>8.0}   rounds: {}", list(&ceilings));
    for (name, runs) in [
        ("outbox-relay, default (rows deleted when published)", &deleted),
        ("outbox-relay, --published-retention 1h (rows kept)", &kept),
    ] {
        println!(
            "  {name:<52}  {:>8.0}   ratio {:.2}   relay CPU {:.0} ms per 1k events   rounds: {}",
            median(runs.iter().map(|d| d.rate).collect()),
            ratios(runs),
            median(runs.iter().map(|d| d.cpu_ms_per_1k).collect()),
            list(&runs.iter().map(|d| d.rate).collect::<Vec<_>>())
        );
    }
    println!("  (goal: ratio >= 0.80 for the default)");
    println!("latency at {rate} events/s for {seconds} s, to delivery at a consumer (ms)");
    println!("                                      p50      p90      p99      max");
    for (name, h) in [
        ("raw publish, idle database", &floor_idle),
        ("raw publish, same write load", &floor_loaded),
        ("outbox-relay, from commit", &latency),
    ] {
        println!(
            "  {name:<32} {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}",
            ms(h, 0.50),
            ms(h, 0.90),
            ms(h, 0.99),
            h.max() as f64 / 1000.0
        );
    }
    println!("  (goal: p50 <= 2 ms, p99 <= 10 ms from commit to confirm; delivery comes a little after the confirm)");
    let mib = |k: Option<u64>| k.map_or("n/a".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    let peak_drain = deleted.iter().filter_map(|d| d.peak_kib).max();
    println!("relay peak memory (VmHWM): {} draining, {} at steady rate", mib(peak_drain), mib(peak_steady));
}
