//! `make bench`, whole-system part: the order pipeline under open-loop load
//! (the `loadgen` driver), next to its ceilings measured in the same run,
//! printed as one table; writes an SVG of p50/p99 latency against the
//! offered rate.
//!
//! Everything runs on this machine's PostgreSQL and RabbitMQ, on databases
//! and a topology prefix of its own (never `make run`'s), with the release
//! binaries started as `make run` starts them (defaults, plus addresses,
//! database URLs, the prefix and the catalog):
//!
//! - ceilings: pgbench running order-service's POST transaction (order,
//!   line, outbox row, timeline row; the order RETURNING) at 16 and 64 clients; raw
//!   publish-with-confirms to a quorum queue, divided by the deliveries one
//!   order needs (counted from the services' bindings); and the broker
//!   alone carrying the pipeline's messages (publishes with confirms,
//!   deliveries with acks on the services' queues; RabbitMQ's CPU per order);
//! - intake: `POST /orders` alone (only order-service running) at 16 and 64
//!   connections, against pgbench;
//! - latency: a sweep of offered rates (p50/p99 from the scheduled POST to
//!   the first poll that sees the order final), and 200 orders/s, with
//!   where its time went from stage to stage;
//! - throughput: the highest offered rate sustained for the run's length
//!   with a bounded backlog (sampled once a second), spread over 100
//!   products, starting at the sweep's best completed rate, then 15% steps
//!   up while it holds (down until it does), at most 5 runs; then the same
//!   rate on 3 hot products;
//! - peak RSS of every process, and beside each figure whether every order
//!   ended final with stock and payments matching the confirmed orders.
//!
//! Sizes (environment): BENCH_QUICK=1 (a smoke run of a few minutes),
//! BENCH_THROUGHPUT_SECONDS (60), BENCH_STEP_SECONDS (20), BENCH_WARMUP_SECONDS
//! (5), BENCH_SWEEP_RATES ("25,50,100,150,200,250,300,400,500,700,1000"),
//! BENCH_THROUGHPUT_RATE (the first rate tried; default: the best completed
//! rate of the sweep), BENCH_INTAKE_SECONDS (15), BENCH_INTAKE_RATE (6000),
//! BENCH_PGBENCH_SECONDS (15), BENCH_CEILING_MESSAGES (50000),
//! BENCH_SVG (tests/benches/results/latency.svg), BENCH_SKIP_HOT=1,
//! BENCH_CEILINGS_ONLY=1 (the ceilings and intake, then the table).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, missing_docs)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::mem::ManuallyDrop;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};
use diesel_async::RunQueryDsl;
use orderflow_broker::QueueSpec;
use orderflow_broker::lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
use orderflow_broker::lapin::types::FieldTable;
use orderflow_broker::lapin::{Channel, Connection};
use orderflow_contracts::events::PaymentDeclined;
use orderflow_db::Pool;
use orderflow_e2e::consumer_specs_with;
use orderflow_e2e::load::Report;
use orderflow_envelope::{Envelope, Metadata};
use orderflow_testkit::{TestBroker, TestDb};
use tokio::process::{Child, Command};
use uuid::Uuid;

const WINDOW: usize = 1000;
const PRODUCTS: usize = 100;
const HOT: usize = 3;
/// The happy path of one order: every event it causes, in order.
const HAPPY_PATH: &[&str] =
    &["order.created", "inventory.reserved", "payment.authorized", "shipment.created", "order.confirmed"];

fn env_f(name: &str, default: f64) -> f64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn quick() -> bool {
    std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// A size from the environment, with a shorter default in a quick run.
fn size(name: &str, full: f64, short: f64) -> f64 {
    env_f(name, if quick() { short } else { full })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Where process logs and scratch files go: next to the bench executable.
fn work_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap().join("bench-system");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The benchmark's catalog: 100 products with (effectively) unlimited stock.
fn catalog_json() -> String {
    let items: Vec<String> = (0..PRODUCTS)
        .map(|i| {
            let cents = 500 + 37 * i as i64;
            format!(
                r#"{{"sku":"BENCH-{i:03}","name":"Bench product {i}","price":{}.{:02},"on_hand":1000000000}}"#,
                cents / 100,
                cents % 100
            )
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// Deliveries one order needs: each happy-path event once per consumer
/// bound to it (from the services' BINDINGS).
fn messages_per_order() -> (usize, usize) {
    let specs = consumer_specs_with(orderflow_broker::DEFAULT_RETRY_DELAYS);
    let deliveries =
        HAPPY_PATH.iter().map(|e| specs.iter().filter(|s| s.bindings.iter().any(|b| b == e)).count()).sum();
    (HAPPY_PATH.len(), deliveries)
}

// ---------------------------------------------------------------- processes

struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

fn spawn(name: &str, program: &str, args: &[String]) -> Proc {
    let log = std::fs::File::create(work_dir().join(format!("{name}.log"))).unwrap();
    let child = Command::new(program)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_CHILD_LOG").unwrap_or_else(|_| "warn,lapin::returned_messages=error".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    Proc { name: name.to_owned(), child }
}

async fn wait_healthy(http: &reqwest::Client, proc: &mut Proc, url: &str) {
    let started = Instant::now();
    loop {
        if matches!(http.get(url).send().await, Ok(r) if r.status().is_success()) {
            return;
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("{} exited ({status}) before answering {url}; see {}", proc.name, work_dir().display());
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{} not healthy at {url} within 60 s", proc.name);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cpu_ticks(pid: u32) -> f64 {
    stat_ticks(pid, false)
}

/// As `cpu_ticks`, with the CPU of the children the process has reaped:
/// PostgreSQL's postmaster collects the CPU of every backend that exited
/// (pgbench's connections end before it is read).
fn cpu_ticks_with_children(pid: u32) -> f64 {
    stat_ticks(pid, true)
}

fn stat_ticks(pid: u32, children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    // utime, stime; then cutime, cstime
    t(11) + t(12) + if children { t(13) + t(14) } else { 0.0 }
}

fn comm(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// CPU seconds used so far by every process called `name` (PostgreSQL's
/// backends, RabbitMQ's VM), from /proc.
fn cpu_by_name(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| comm(&pid.to_string()) == name)
        .map(cpu_ticks_with_children)
        .sum::<f64>()
        / 100.0
}

/// Busy CPU seconds of the whole machine so far, from /proc/stat.
fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return 0.0 };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    // (guest time is already counted in user time)
    let busy: f64 = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    busy / 100.0
}

fn kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------- SQL

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn one(pool: &Pool, sql: &str) -> i64 {
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query(sql).get_result::<N>(&mut conn).await.unwrap_or_else(|e| panic!("{sql}: {e}")).n
}

#[derive(QueryableByName)]
struct SkuN {
    #[diesel(sql_type = Text)]
    sku: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

async fn by_sku(pool: &Pool, sql: &str) -> BTreeMap<String, i64> {
    let mut conn = pool.get().await.unwrap();
    let rows = diesel::sql_query(sql).load::<SkuN>(&mut conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter().map(|r| (r.sku, r.n)).collect()
}

#[derive(QueryableByName)]
struct At {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = diesel::sql_types::Double)]
    t: f64,
}

async fn times(pool: &Pool, sql: &str, tag: &str) -> BTreeMap<String, f64> {
    let mut conn = pool.get().await.unwrap();
    let rows = diesel::sql_query(sql)
        .bind::<Text, _>(format!("{tag}-%"))
        .load::<At>(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.into_iter().map(|r| (r.id, r.t)).collect()
}

/// Where the time of run `tag`'s confirmed orders went: the gaps between
/// the starts of the transactions of successive stages (the POST's, then
/// inventory's, payment's, shipping's, and order-service's that confirms),
/// read from the rows each wrote (`created_at` defaults to the transaction's
/// start). Each gap is that stage's transaction, its relay hop (wake-up,
/// claim, publish, confirm) and the next consumer's wait for the message.
async fn stage_gaps(system: &System, tag: &str) -> String {
    let epoch = |col: &str| format!("extract(epoch from {col})::float8 AS t");
    let orders = &system.orders_db.pool;
    let processor = &system.processor_db.pool;
    let posted = times(
        orders,
        &format!("SELECT id, {} FROM orders WHERE status = 'confirmed' AND id LIKE $1", epoch("created_at")),
        tag,
    )
    .await;
    let confirmed = times(
        orders,
        &format!("SELECT id, {} FROM orders WHERE status = 'confirmed' AND id LIKE $1", epoch("updated_at")),
        tag,
    )
    .await;
    let mut stages = vec![("POST", posted)];
    for (name, table) in [("reserved", "reservations"), ("paid", "payments"), ("shipped", "shipments")] {
        let sql = format!("SELECT order_id AS id, {} FROM {table} WHERE order_id LIKE $1", epoch("created_at"));
        stages.push((name, times(processor, &sql, tag).await));
    }
    stages.push(("confirmed", confirmed));
    let pct = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or(f64::NAN) * 1000.0
    };
    let mut parts = Vec::new();
    for pair in stages.windows(2) {
        let ((from, a), (to, b)) = (&pair[0], &pair[1]);
        let mut gaps: Vec<f64> = a.iter().filter_map(|(id, t)| b.get(id).map(|u| u - t)).collect();
        parts.push(format!("{from} -> {to} {:.0} / {:.0}", pct(&mut gaps, 0.5), pct(&mut gaps, 0.99)));
    }
    format!("{} ms (p50 / p99)", parts.join(", "))
}

/// What must hold once the system is idle: every order final, stock moved
/// exactly by the confirmed orders, one payment and one shipment per
/// confirmed order for its total. Cumulative over the run so far.
async fn check(orders: &Pool, processor: &Pool) -> Result<String, String> {
    let pending = one(orders, "SELECT count(*) AS n FROM orders WHERE status = 'pending'").await;
    let confirmed = one(orders, "SELECT count(*) AS n FROM orders WHERE status = 'confirmed'").await;
    let not_confirmed = one(orders, "SELECT count(*) AS n FROM orders WHERE status <> 'confirmed'").await;
    let total =
        one(orders, "SELECT coalesce(sum(total_amount), 0)::bigint AS n FROM orders WHERE status = 'confirmed'").await;
    let want_shipped = by_sku(
        orders,
        "SELECT i.sku, sum(i.quantity)::bigint AS n FROM order_items i JOIN orders o ON o.id = i.order_id \
         WHERE o.status = 'confirmed' GROUP BY i.sku",
    )
    .await;
    let shipped = by_sku(processor, "SELECT sku, shipped::bigint AS n FROM products WHERE shipped > 0").await;
    let reserved = one(processor, "SELECT coalesce(sum(reserved), 0)::bigint AS n FROM products").await;
    let unbalanced =
        one(processor, "SELECT count(*) AS n FROM products WHERE on_hand + reserved + shipped <> received").await;
    let paid = one(processor, "SELECT count(*) AS n FROM payments WHERE status = 'authorized'").await;
    let paid_sum =
        one(processor, "SELECT coalesce(sum(amount), 0)::bigint AS n FROM payments WHERE status = 'authorized'").await;
    let shipments = one(processor, "SELECT count(*) AS n FROM shipments WHERE status = 'created'").await;
    let mut faults = Vec::new();
    if pending > 0 {
        faults.push(format!("{pending} orders not final"));
    }
    if shipped != want_shipped {
        let off = want_shipped.iter().filter(|(k, v)| shipped.get(*k) != Some(v)).count()
            + shipped.keys().filter(|k| !want_shipped.contains_key(*k)).count();
        faults.push(format!("stock shipped differs from the confirmed orders on {off} products"));
    }
    if reserved != 0 {
        faults.push(format!("{reserved} units still reserved"));
    }
    if unbalanced != 0 {
        faults.push(format!("{unbalanced} products out of balance"));
    }
    if paid != confirmed || paid_sum != total {
        faults.push(format!("{paid} payments for {paid_sum} cents vs {confirmed} confirmed orders for {total} cents"));
    }
    if shipments != confirmed {
        faults.push(format!("{shipments} shipments vs {confirmed} confirmed orders"));
    }
    if faults.is_empty() {
        Ok(format!("ok: {confirmed} confirmed, {not_confirmed} other, stock and payments match"))
    } else {
        Err(faults.join("; "))
    }
}

// ----------------------------------------------------------------- ceilings

fn pgbench_script() -> &'static str {
    // order-service's POST (order_service::store::create): the order
    // (RETURNING the stored row, as the service reads it back), its line,
    // the order.created outbox row and the timeline row, in one
    // transaction. Payloads of a real order's size.
    r#"\set n random(1, 9000000000000000000)
\set lane :n % 32
BEGIN;
INSERT INTO orders (id, customer_id, status, total_amount, force_fail, request_hash) VALUES ('pgb-' || :n, 'c-' || :client_id, 'pending', 4998, false, '3f79bb7b435b05321651daefd374cdc681dc06faa65e374e38337b88ca046dea') ON CONFLICT (id) DO NOTHING RETURNING id, customer_id, status, total_amount, force_fail, fail_reason, cancel_reason, tracking_number, version, request_hash, created_at, updated_at;
INSERT INTO order_items (order_id, line_no, sku, quantity, unit_price) VALUES ('pgb-' || :n, 0, 'BENCH-042', 2, 2499);
INSERT INTO outbox (message_id, event_type, schema_version, aggregate_type, aggregate_id, aggregate_version, lane, payload, headers, occurred_at) VALUES (gen_random_uuid(), 'order.created', '2.0', 'order', 'pgb-' || :n, 1, :lane, '{"order_id": "pgb-1", "customer_id": "c-1", "items": [{"sku": "BENCH-042", "quantity": 2, "price": 24.99}], "total_amount": 49.98, "force_fail": false}'::jsonb, '{"correlation_id": "0193a2b4-5c6d-7e8f-9a0b-1c2d3e4f5a6b", "causation_id": null, "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}'::jsonb, now());
INSERT INTO order_timeline (order_id, event_type, message_id, occurred_at, details) VALUES ('pgb-' || :n, 'order.created', gen_random_uuid(), now(), '{"customer_id": "c-1", "items": [{"sku": "BENCH-042", "quantity": 2, "price": 24.99}], "total_amount": 49.98, "force_fail": false}'::jsonb) ON CONFLICT (message_id) DO NOTHING;
END;
"#
}

/// pgbench's transactions per second for the POST transaction at `clients`.
async fn pgbench(db: &TestDb, clients: u32, seconds: u64) -> Result<f64, String> {
    let script = work_dir().join("post-order.pgbench");
    std::fs::write(&script, pgbench_script()).unwrap();
    let out = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-j", "2", "-h", "127.0.0.1", "-U", "postgres"])
        .args(["-c", &clients.to_string(), "-T", &seconds.to_string(), "-f"])
        .arg(&script)
        .arg(&db.name)
        .output()
        .await
        .map_err(|e| format!("pgbench not runnable ({e}): install it with `apt-get install postgresql-contrib`"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let tps = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<f64>().ok());
    match tps {
        Some(tps) if out.status.success() => Ok(tps),
        _ => Err(format!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""))),
    }
}

/// Raw publish-with-confirms to one quorum queue (as the relay bench),
/// messages per second.
async fn raw_publish(broker: &TestBroker, messages: usize) -> f64 {
    let spec = QueueSpec {
        consumer: "ceiling".into(),
        bindings: vec!["payment.declined".into()],
        retry_delays: vec![],
        delivery_limit: 5,
    };
    let (_conn, channel) = amqp(broker).await;
    broker.topology.declare_consumer(&channel, &spec).await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let envelopes: Vec<Envelope> = (0..messages)
        .map(|_| {
            let e = PaymentDeclined { order_id: Uuid::now_v7().to_string(), reason: "payment declined: limit".into() };
            Envelope::new(&e, 1, &Metadata::default()).unwrap()
        })
        .collect();
    let rate = orderflow_testkit::broker::publish_with_confirms(
        &channel,
        &broker.topology.events_exchange(),
        &envelopes,
        WINDOW,
    )
    .await;
    channel.queue_purge(broker.topology.queue("ceiling").as_str().into(), Default::default()).await.unwrap();
    rate
}

/// The broker alone carrying the pipeline's messages: every happy-path
/// event of `orders` orders published with confirms (as the relays
/// publish) to the services' own topology, and consumed with acks from
/// their quorum queues (prefetch and merged acks as the consumer runtime
/// takes them), both at once and as fast as they go. No database, no
/// handler: what the pipeline would do if PostgreSQL and the services cost
/// nothing. Returns orders/s and RabbitMQ's CPU per order in ms.
async fn broker_pipeline(broker: &TestBroker, specs: &[QueueSpec], orders: usize) -> (f64, f64) {
    use futures::StreamExt as _;
    use orderflow_broker::lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    use orderflow_contracts::Money;
    use orderflow_contracts::events::{
        InventoryReserved, LineItem, OrderConfirmed, OrderCreated, PaymentAuthorized, ShipmentCreated,
    };
    use std::sync::atomic::{AtomicUsize, Ordering};

    let (_conn, channel) = amqp(broker).await;
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for spec in specs {
        broker.topology.declare_consumer(&channel, spec).await.unwrap();
    }
    let (_, per_order) = messages_per_order();
    let expected = orders * per_order;
    let received = Arc::new(AtomicUsize::new(0));
    let mut consumers = Vec::new();
    for spec in specs {
        let (conn, ch) = amqp(broker).await;
        ch.basic_qos(256, BasicQosOptions::default()).await.unwrap();
        let stream = ch
            .basic_consume(
                broker.topology.queue(&spec.consumer).as_str().into(),
                format!("floor-{}", spec.consumer).as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let received = received.clone();
        consumers.push(tokio::spawn(async move {
            // What has arrived, up to a batch, settled with one ack.
            let mut batches = stream.ready_chunks(32);
            while let Some(batch) = batches.next().await {
                let n = batch.len();
                if let Some(Ok(last)) = batch.into_iter().last() {
                    last.acker.ack(BasicAckOptions { multiple: true }).await.unwrap();
                }
                received.fetch_add(n, Ordering::Relaxed);
            }
            drop(conn);
        }));
    }
    let meta = Metadata::default();
    let items = vec![
        LineItem { sku: "SKU-0001".into(), quantity: 2, unit_price: Money::from_minor(1999) },
        LineItem { sku: "SKU-0042".into(), quantity: 1, unit_price: Money::from_minor(4500) },
    ];
    let total = Money::from_minor(8498);
    let envelopes: Vec<Envelope> = (0..orders)
        .flat_map(|_| {
            let order_id = Uuid::now_v7().to_string();
            let customer_id = "customer-1".to_owned();
            vec![
                Envelope::new(
                    &OrderCreated {
                        order_id: order_id.clone(),
                        customer_id: customer_id.clone(),
                        items: items.clone(),
                        total_amount: total,
                        force_fail: false,
                    },
                    1,
                    &meta,
                ),
                Envelope::new(
                    &InventoryReserved {
                        order_id: order_id.clone(),
                        customer_id: customer_id.clone(),
                        items: items.clone(),
                        total_amount: total,
                        force_fail: false,
                    },
                    1,
                    &meta,
                ),
                Envelope::new(
                    &PaymentAuthorized {
                        order_id: order_id.clone(),
                        payment_id: Uuid::now_v7(),
                        amount: total,
                        customer_id: Some(customer_id.clone()),
                    },
                    1,
                    &meta,
                ),
                Envelope::new(
                    &ShipmentCreated {
                        order_id: order_id.clone(),
                        shipment_id: Uuid::now_v7(),
                        tracking_number: "TRK-0000000001".into(),
                        customer_id: Some(customer_id.clone()),
                    },
                    1,
                    &meta,
                ),
                Envelope::new(
                    &OrderConfirmed { order_id, customer_id, total_amount: total, tracking_number: None },
                    2,
                    &meta,
                ),
            ]
        })
        .map(|e| e.unwrap())
        .collect();
    let beam = cpu_by_name("beam.smp");
    let started = Instant::now();
    let nacked = publish_counting_nacks(&channel, &broker.topology.events_exchange(), &envelopes).await;
    assert!(nacked.is_empty(), "the broker nacked publishes: {nacked:?}");
    let deadline = Instant::now() + Duration::from_secs(300);
    // (`AtomicUsize::load` by name: diesel's `RunQueryDsl::load` is in scope.)
    let got = || AtomicUsize::load(&received, Ordering::Relaxed);
    while got() < expected {
        assert!(Instant::now() < deadline, "the broker delivered {} of {expected} messages in 300 s", got());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let beam = cpu_by_name("beam.smp") - beam;
    for c in consumers {
        c.abort();
    }
    (orders as f64 / elapsed, beam * 1000.0 / orders as f64)
}

/// Publishes with confirms, a window of `WINDOW`; nacked publishes by
/// event type.
async fn publish_counting_nacks(channel: &Channel, exchange: &str, envelopes: &[Envelope]) -> BTreeMap<String, u64> {
    use futures::StreamExt as _;
    use futures::stream::FuturesUnordered;
    use orderflow_broker::lapin::options::BasicPublishOptions;
    let mut nacked = BTreeMap::new();
    let mut inflight = FuturesUnordered::new();
    let mut settle = |(t, c): (String, Result<orderflow_broker::lapin::Confirmation, _>)| {
        if !c.map(|c| c.is_ack()).unwrap_or(false) {
            *nacked.entry(t).or_insert(0) += 1;
        }
    };
    for env in envelopes {
        if inflight.len() >= WINDOW
            && let Some(done) = inflight.next().await
        {
            settle(done);
        }
        let confirm = channel
            .basic_publish(
                exchange.into(),
                env.event_type.as_str().into(),
                BasicPublishOptions { mandatory: true, ..Default::default() },
                &env.to_vec(),
                orderflow_broker::properties_for(env),
            )
            .await
            .expect("publish");
        let t = env.event_type.clone();
        inflight.push(async move { (t, confirm.await) });
    }
    while let Some(done) = inflight.next().await {
        settle(done);
    }
    nacked
}

// ------------------------------------------------------------------- broker

/// A connection and channel to the test broker, each attempt bounded: a
/// broker that accepts TCP but stalls the AMQP handshake (seen on this
/// machine while RabbitMQ recovered thousands of test queues) would
/// otherwise hang the bench without a word.
async fn amqp(broker: &TestBroker) -> (Connection, Channel) {
    try_amqp(broker).await.unwrap_or_else(|| {
        panic!("RabbitMQ at {} does not complete a connection: is it up and answering?", broker.amqp_url)
    })
}

async fn try_amqp(broker: &TestBroker) -> Option<(Connection, Channel)> {
    for attempt in 1..=5 {
        match tokio::time::timeout(Duration::from_secs(10), broker.channel()).await {
            Ok(c) => return Some(c),
            Err(_) => eprintln!("  connecting to RabbitMQ did not finish in 10 s (attempt {attempt}); trying again"),
        }
    }
    None
}

/// Deletes the queues of `specs` and the broker's exchange with bounded
/// waits. The bench never lets the test kit's drop run (it is
/// `ManuallyDrop`): that drop waits without a bound for the broker, so a
/// broker that does not answer would hang the bench, even on a panic.
async fn delete_topology(broker: ManuallyDrop<TestBroker>, specs: &[QueueSpec]) {
    let Some((conn, _channel)) = try_amqp(&broker).await else {
        eprintln!("  left topology {} behind: RabbitMQ does not answer", broker.topology.prefix());
        return;
    };
    match tokio::time::timeout(Duration::from_secs(30), broker.topology.delete(&conn, specs)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("  could not delete topology {}: {e}", broker.topology.prefix()),
        Err(_) => eprintln!("  deleting topology {} did not finish in 30 s", broker.topology.prefix()),
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "bye".into())).await;
}

// ------------------------------------------------------------------- system

struct System {
    broker: ManuallyDrop<TestBroker>,
    orders_db: TestDb,
    processor_db: TestDb,
    order_url: String,
    procs: Vec<Proc>,
    /// A channel for the backlog samples (pipeline only).
    amqp: Option<(Connection, Channel)>,
}

fn bin(name: &str) -> String {
    match name {
        "order-service" => env!("CARGO_BIN_EXE_e2e-order-service").to_owned(),
        "processor-service" => env!("CARGO_BIN_EXE_e2e-processor-service").to_owned(),
        "outbox-relay" => env!("CARGO_BIN_EXE_e2e-outbox-relay").to_owned(),
        _ => env!("CARGO_BIN_EXE_loadgen").to_owned(),
    }
}

impl System {
    /// Databases and a prefix of its own; with `pipeline`, processor-service
    /// and a relay per database too, else order-service alone (intake).
    async fn start(pipeline: bool) -> Self {
        let http = reqwest::Client::new();
        let broker = ManuallyDrop::new(TestBroker::new().await);
        let orders_db = TestDb::new(Some(order_service::MIGRATIONS)).await;
        let processor_db = TestDb::new(Some(processor_service::MIGRATIONS)).await;
        let prefix = broker.topology.prefix().to_owned();
        let common = |db: &str| -> Vec<String> {
            vec!["--database-url".into(), db.into(), "--topology-prefix".into(), prefix.clone()]
        };
        let mut procs = Vec::new();
        if pipeline {
            let port = free_port();
            let mut args = common(&processor_db.url);
            args.extend(["--http-addr".into(), format!("127.0.0.1:{port}"), "--catalog".into(), catalog_json()]);
            let mut p = spawn("processor-service", &bin("processor-service"), &args);
            wait_healthy(&http, &mut p, &format!("http://127.0.0.1:{port}/health")).await;
            procs.push(p);
        }
        let port = free_port();
        let mut args = common(&orders_db.url);
        args.extend(["--http-addr".into(), format!("127.0.0.1:{port}")]);
        let mut p = spawn("order-service", &bin("order-service"), &args);
        let order_url = format!("http://127.0.0.1:{port}");
        wait_healthy(&http, &mut p, &format!("{order_url}/health")).await;
        procs.push(p);
        if pipeline {
            for (name, db) in [("relay-orders", &orders_db.url), ("relay-processor", &processor_db.url)] {
                let port = free_port();
                let mut args = vec!["run".to_owned()];
                args.extend(common(db));
                args.extend(["--relay-id".into(), name.into(), "--metrics-addr".into(), format!("127.0.0.1:{port}")]);
                let mut p = spawn(name, &bin("outbox-relay"), &args);
                wait_healthy(&http, &mut p, &format!("http://127.0.0.1:{port}/health")).await;
                procs.push(p);
            }
        }
        let amqp = if pipeline { Some(amqp(&broker).await) } else { None };
        Self { broker, orders_db, processor_db, order_url, procs, amqp }
    }

    async fn stop(self) {
        let System { procs, broker, amqp, orders_db, processor_db, .. } = self;
        for p in procs {
            p.stop().await;
        }
        drop(amqp);
        delete_topology(broker, &consumer_specs_with(orderflow_broker::DEFAULT_RETRY_DELAYS)).await;
        drop((orders_db, processor_db));
    }

    /// Total backlog: ready messages in the services' queues, unpublished
    /// outbox rows, and orders not final yet.
    async fn backlog(&self, channel: &orderflow_broker::lapin::Channel) -> (u64, i64, i64) {
        let mut queued = 0u64;
        for spec in consumer_specs_with(orderflow_broker::DEFAULT_RETRY_DELAYS) {
            let name = self.broker.topology.queue(&spec.consumer);
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            if let Ok(q) = channel.queue_declare(name.as_str().into(), passive, FieldTable::default()).await {
                queued += u64::from(q.message_count());
            }
        }
        let outbox = one(&self.orders_db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await
            + one(&self.processor_db.pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await;
        let pending = one(&self.orders_db.pool, "SELECT count(*) AS n FROM orders WHERE status = 'pending'").await;
        (queued, outbox, pending)
    }

    /// Waits until nothing is queued, unpublished or pending (deadline 10 min).
    async fn wait_idle(&self) -> Duration {
        let started = Instant::now();
        let Some((_, channel)) = &self.amqp else { return Duration::ZERO };
        while started.elapsed() < Duration::from_secs(600) {
            if self.backlog(channel).await == (0, 0, 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        started.elapsed()
    }

    async fn check(&self) -> Result<String, String> {
        check(&self.orders_db.pool, &self.processor_db.pool).await
    }
}

/// A sample of the backlog during a run, `t` seconds into the load.
#[derive(Debug, Clone, Copy)]
struct Sample {
    t: f64,
    queued: u64,
    outbox: i64,
    pending: i64,
}

/// One loadgen run with its samples and CPU.
struct Run {
    report: Report,
    samples: Vec<Sample>,
    /// CPU seconds during the run: services and relays, PostgreSQL, RabbitMQ.
    cpu: BTreeMap<String, f64>,
    machine_busy_s: f64,
    check: Result<String, String>,
    drained_s: f64,
}

#[derive(Clone)]
struct Load {
    rate: f64,
    seconds: f64,
    warmup: f64,
    products: usize,
    connections: usize,
    poll: bool,
    /// Coarser polling for long overloaded runs (throughput is the figure).
    coarse: bool,
}

async fn load(system: &System, l: &Load, tag: &str) -> Run {
    let mut args: Vec<String> = vec![
        "--url".into(),
        system.order_url.clone(),
        "--rate".into(),
        format!("{}", l.rate),
        "--duration".into(),
        format!("{}ms", (l.seconds * 1000.0) as u64),
        "--warmup".into(),
        format!("{}ms", (l.warmup * 1000.0) as u64),
        "--connections".into(),
        l.connections.to_string(),
        "--products".into(),
        l.products.to_string(),
        "--catalog".into(),
        catalog_json(),
        "--tag".into(),
        tag.into(),
        "--drain".into(),
        "600s".into(),
        "--json".into(),
    ];
    if !l.poll {
        args.push("--no-poll".into());
    }
    if l.coarse {
        args.extend(["--poll-factor".into(), "0.25".into(), "--poll-max".into(), "5s".into()]);
    }
    let names: Vec<(String, u32)> = system.procs.iter().map(|p| (p.name.clone(), p.pid())).collect();
    let cpu_now = || {
        let mut m: BTreeMap<String, f64> = names.iter().map(|(n, pid)| (n.clone(), cpu_ticks(*pid) / 100.0)).collect();
        m.insert("postgres".into(), cpu_by_name("postgres"));
        m.insert("rabbitmq".into(), cpu_by_name("beam.smp"));
        m
    };
    let cpu_before = cpu_now();
    let busy_before = machine_busy();
    // The driver waited for on a blocking thread, beside the sampler.
    let child = std::process::Command::new(bin("loadgen"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let waiter = tokio::task::spawn_blocking(move || child.wait_with_output());
    let samples = Arc::new(Mutex::new(Vec::new()));
    eprintln!("  loadgen {} started", l.rate);
    let sampler = async {
        // Sampled once a second while the load runs (intake has no pipeline).
        let Some((_, channel)) = system.amqp.as_ref().filter(|_| l.poll) else { return };
        let started = Instant::now();
        let stop_at = started + Duration::from_secs_f64(l.seconds);
        while Instant::now() < stop_at {
            let (queued, outbox, pending) = system.backlog(channel).await;
            samples.lock().unwrap().push(Sample { t: started.elapsed().as_secs_f64(), queued, outbox, pending });
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let (out, ()) = tokio::join!(waiter, sampler);
    let out = out.unwrap().unwrap();
    eprintln!("  loadgen {} done", l.rate);
    assert!(out.status.success(), "loadgen failed ({})", out.status);
    let report: Report = serde_json::from_slice(&out.stdout).expect("loadgen's JSON report");
    let cpu_after = cpu_now();
    let machine_busy_s = machine_busy() - busy_before;
    let cpu = cpu_after.iter().map(|(k, v)| (k.clone(), v - cpu_before.get(k).copied().unwrap_or(0.0))).collect();
    let drained_s = if l.poll { system.wait_idle().await.as_secs_f64() } else { 0.0 };
    let check = if l.poll { system.check().await } else { Ok("intake only".into()) };
    let samples = samples.lock().unwrap().clone();
    Run { report, samples, cpu, machine_busy_s, check, drained_s }
}

/// Growth of the pending orders over the second half of the load, per second
/// (least squares), and the largest queued + unpublished backlog.
fn backlog_trend(run: &Run) -> (f64, u64) {
    let half = run.report.duration_s / 2.0;
    let pts: Vec<(f64, f64)> = run.samples.iter().filter(|s| s.t >= half).map(|s| (s.t, s.pending as f64)).collect();
    let max = run.samples.iter().map(|s| s.queued + s.outbox.max(0) as u64).max().unwrap_or(0);
    if pts.len() < 2 {
        return (0.0, max);
    }
    let n = pts.len() as f64;
    let (mx, my) = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    (if sxx > 0.0 { sxy / sxx } else { 0.0 }, max)
}

// -------------------------------------------------------------------- chart

fn svg(points: &[(f64, f64, f64)], path: &std::path::Path, caption: &str) {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 20.0, 40.0, 60.0);
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max) * 1.05;
    let max_y = points.iter().map(|p| p.2.max(p.1)).fold(1.0, f64::max);
    // Log scale on y: latencies span milliseconds to tens of seconds.
    let (lo, hi) = (1.0f64.log10(), (max_y * 1.5).log10().max(1.0));
    let x = |v: f64| left + v / max_x * (w - left - right);
    let y = |ms: f64| top + (1.0 - (ms.max(1.0).log10() - lo) / (hi - lo)) * (h - top - bottom);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{left}" y="20" font-size="14">{caption}</text>"#);
    let mut decade: f64 = 1.0;
    while decade.log10() <= hi {
        let yy = y(decade);
        let label = if decade >= 1000.0 { format!("{} s", decade / 1000.0) } else { format!("{decade} ms") };
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            w - right,
            left - 6.0,
            yy + 4.0
        );
        decade *= 10.0;
    }
    let one_s = y(1000.0);
    let _ = writeln!(
        s,
        r##"<line x1="{left}" y1="{one_s:.1}" x2="{:.1}" y2="{one_s:.1}" stroke="#c00" stroke-dasharray="4 3"/>"##,
        w - right
    );
    // Round ticks on x, at most 10 of them.
    let tick = [5.0, 10.0, 20.0, 25.0, 50.0, 100.0, 200.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0]
        .into_iter()
        .find(|t| max_x / t <= 10.0)
        .unwrap_or(10_000.0);
    let mut t = 0.0;
    while t <= max_x {
        let xx = x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{top}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{t}</text>"##,
            h - bottom,
            h - bottom + 16.0
        );
        t += tick;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">offered orders/s (open loop); latency on a log scale</text>"#,
        (left + w - right) / 2.0,
        h - 20.0
    );
    for (i, (name, color)) in [("p50", "#1f77b4"), ("p99", "#d62728")].iter().enumerate() {
        let pts: Vec<String> =
            points.iter().map(|p| format!("{:.1},{:.1}", x(p.0), y(if i == 0 { p.1 } else { p.2 }))).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, pts.join(" "));
        for p in points {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                x(p.0),
                y(if i == 0 { p.1 } else { p.2 })
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" fill="{color}">{name}</text>"#,
            left + 10.0,
            top + 16.0 + 16.0 * i as f64
        );
    }
    let _ = writeln!(s, r##"<text x="{:.1}" y="{:.1}" fill="#c00">1 s</text>"##, w - right - 24.0, one_s - 4.0);
    s.push_str("</svg>\n");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(path, s).unwrap();
}

// --------------------------------------------------------------------- main

struct Row {
    what: String,
    measured: String,
    ceiling: String,
    goal: String,
    check: String,
}

fn row(what: impl Into<String>, measured: String, ceiling: String, goal: &str, check: &Result<String, String>) -> Row {
    let check = match check {
        Ok(s) => s.clone(),
        Err(e) => format!("FAILED: {e}"),
    };
    Row { what: what.into(), measured, ceiling, goal: goal.into(), check }
}

fn cpu_line(run: &Run) -> String {
    let mut parts: Vec<String> = run.cpu.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
    parts.push(format!("loadgen {:.1}", run.report.cpu_s));
    // Per order accepted in the run: with a bounded backlog, about the
    // orders the run's CPU carried through.
    let per_order = |s: f64| s * 1000.0 / (run.report.accepted as f64).max(1.0);
    let of = |k: &str| per_order(run.cpu.get(k).copied().unwrap_or(0.0));
    format!(
        "CPU s: {} (machine busy {:.1} s over {:.0} s wall; loadgen {:.1}% of it); per order {:.2} ms, PostgreSQL {:.2}, RabbitMQ {:.2}",
        parts.join(", "),
        run.machine_busy_s,
        run.report.wall_s,
        100.0 * run.report.cpu_s / run.machine_busy_s.max(1e-9),
        per_order(run.machine_busy_s),
        of("postgres"),
        of("rabbitmq"),
    )
}

// Multi-thread: the test kit migrates databases with diesel-async's harness, which needs it.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let warmup = size("BENCH_WARMUP_SECONDS", 5.0, 2.0);
    let step = size("BENCH_STEP_SECONDS", 20.0, 6.0);
    let throughput_s = size("BENCH_THROUGHPUT_SECONDS", 60.0, 10.0);
    let intake_s = size("BENCH_INTAKE_SECONDS", 15.0, 5.0);
    let intake_rate = size("BENCH_INTAKE_RATE", 6000.0, 6000.0);
    let pgbench_s = size("BENCH_PGBENCH_SECONDS", 15.0, 5.0) as u64;
    let ceiling_messages = size("BENCH_CEILING_MESSAGES", 50_000.0, 20_000.0) as usize;
    let rates: Vec<f64> = std::env::var("BENCH_SWEEP_RATES")
        .unwrap_or_else(
            |_| if quick() { "25,50,100".into() } else { "25,50,100,150,200,250,300,400,500,700,1000".into() },
        )
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let svg_path = std::env::var("BENCH_SVG").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches").join("results").join("latency.svg")
    });
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let (publishes, deliveries) = messages_per_order();
    println!(
        "system benchmark: {cores} cores, PostgreSQL and RabbitMQ on this machine, release binaries started as `make run` does;"
    );
    println!("  logs in {}", work_dir().display());
    let mut rows: Vec<Row> = Vec::new();
    let none: Result<String, String> = Ok(String::new());

    // Ceilings and intake, alternated so that drift hits both alike.
    let pg_db = TestDb::new(Some(order_service::MIGRATIONS)).await;
    let intake = System::start(false).await;
    let mut intake_runs = Vec::new();
    let mut pg_tx_ms = 0.0;
    for conns in [16u32, 64] {
        println!("pgbench, {conns} clients, {pgbench_s} s ...");
        let pg_cpu = cpu_by_name("postgres");
        let tps = pgbench(&pg_db, conns, pgbench_s).await;
        // PostgreSQL's CPU per transaction: the unit the pipeline's own
        // cost per order is compared with.
        let pg_ms =
            tps.as_ref().map_or(0.0, |t| (cpu_by_name("postgres") - pg_cpu) * 1000.0 / (t * pgbench_s as f64).max(1.0));
        if conns == 16 && tps.is_ok() {
            pg_tx_ms = pg_ms;
        }
        match &tps {
            Ok(t) => println!("  pgbench: {t:.0} transactions/s, PostgreSQL {pg_ms:.2} ms of CPU per transaction"),
            Err(e) => println!("  {e}"),
        }
        println!("intake, {conns} connections, {intake_s} s at {intake_rate}/s offered ...");
        let l = Load {
            rate: intake_rate,
            seconds: intake_s,
            warmup: warmup.min(intake_s / 3.0),
            products: PRODUCTS,
            connections: conns as usize,
            poll: false,
            coarse: false,
        };
        let run = load(&intake, &l, &format!("in{conns}")).await;
        println!("{}", run.report.render());
        let (ceiling, ratio) = match &tps {
            Ok(t) => (
                format!("pgbench {t:.0} tps (PostgreSQL {pg_ms:.2} ms CPU each)"),
                format!("{:.2} x", run.report.achieved_post_rate / t),
            ),
            Err(e) => (e.clone(), "n/a".into()),
        };
        rows.push(row(
            format!("intake: POST /orders alone, {conns} connections"),
            format!(
                "{:.0}/s, p50 {:.1} ms, p99 {:.1} ms ({ratio})",
                run.report.achieved_post_rate, run.report.post_service.p50_ms, run.report.post_service.p99_ms
            ),
            ceiling,
            ">= 1.0 x pgbench",
            &Ok(format!("{} accepted, errors: {:?}", run.report.accepted, run.report.post_errors)),
        ));
        intake_runs.push(run);
    }
    let intake_rss =
        intake.procs.iter().map(|p| (format!("{} (intake)", p.name), kib(p.pid(), "VmHWM:"))).collect::<Vec<_>>();
    intake.stop().await;
    drop(pg_db);

    println!("raw publish-with-confirms, {ceiling_messages} messages ...");
    let ceiling_broker = ManuallyDrop::new(TestBroker::new().await);
    let raw = raw_publish(&ceiling_broker, ceiling_messages).await;
    let ceiling_spec = QueueSpec {
        consumer: "ceiling".into(),
        bindings: vec!["payment.declined".into()],
        retry_delays: vec![],
        delivery_limit: 5,
    };
    delete_topology(ceiling_broker, &[ceiling_spec]).await;
    let per_order_ceiling = raw / deliveries as f64;
    rows.push(row(
        "broker ceiling: raw publish-with-confirms, quorum queue",
        format!("{raw:.0} msg/s"),
        format!("{per_order_ceiling:.0} orders/s ({deliveries} deliveries, {publishes} publishes per order)"),
        "",
        &none,
    ));

    let floor_orders = (ceiling_messages / publishes).max(1);
    println!("the broker alone, the pipeline's messages of {floor_orders} orders ...");
    let floor_broker = ManuallyDrop::new(TestBroker::new().await);
    let specs = consumer_specs_with(orderflow_broker::DEFAULT_RETRY_DELAYS);
    let (floor_rate, floor_cpu) = broker_pipeline(&floor_broker, &specs, floor_orders).await;
    delete_topology(floor_broker, &specs).await;
    println!("  {floor_rate:.0} orders/s, RabbitMQ {floor_cpu:.2} ms of CPU per order");
    rows.push(row(
        "the broker alone, the pipeline's messages (no database, no handlers)",
        format!("{floor_rate:.0} orders/s, RabbitMQ {floor_cpu:.2} ms of CPU per order"),
        format!("at 500 orders/s RabbitMQ alone would use {:.2} of the {cores} cores", floor_cpu * 500.0 / 1000.0),
        "",
        &none,
    ));
    if std::env::var("BENCH_CEILINGS_ONLY").is_ok_and(|v| v == "1") {
        print_table(&rows, cores);
        return;
    }

    // The pipeline.
    let system = System::start(true).await;
    // One order through, so that every connection and queue is warm.
    let warm =
        Load { rate: 5.0, seconds: 2.0, warmup: 0.0, products: PRODUCTS, connections: 16, poll: true, coarse: false };
    let w = load(&system, &warm, "warm").await;
    assert_eq!(w.report.not_final, 0, "the pipeline does not finish orders: {}", w.report.render());

    let mut points: Vec<(f64, f64, f64)> = Vec::new();
    let mut best_rate_under_1s: Option<f64> = None;
    let mut best_completed: f64 = 0.0;
    let mut at_200: Option<(Run, String)> = None;
    let mut sweep_checks = Vec::new();
    for &rate in &rates {
        println!("latency sweep: {rate}/s for {step} s ...");
        let l = Load { rate, seconds: step, warmup, products: PRODUCTS, connections: 16, poll: true, coarse: false };
        let run = load(&system, &l, &format!("sw{rate}")).await;
        println!("{}  drained in {:.1} s; {:?}", run.report.render(), run.drained_s, run.check);
        points.push((rate, run.report.e2e.p50_ms, run.report.e2e.p99_ms));
        best_completed = best_completed.max(run.report.completed_rate);
        let under = run.report.e2e.p99_ms < 1000.0 && run.report.not_final == 0;
        if under {
            best_rate_under_1s = Some(rate);
        }
        sweep_checks.push(run.check.clone());
        if (rate - 200.0).abs() < f64::EPSILON {
            at_200 = Some((run, format!("sw{rate}")));
        }
        if !under {
            break;
        }
    }
    if at_200.is_none() {
        println!("latency at 200/s for {step} s ...");
        let l =
            Load { rate: 200.0, seconds: step, warmup, products: PRODUCTS, connections: 16, poll: true, coarse: false };
        let run = load(&system, &l, "at200").await;
        println!("{}  drained in {:.1} s; {:?}", run.report.render(), run.drained_s, run.check);
        points.push((200.0, run.report.e2e.p50_ms, run.report.e2e.p99_ms));
        best_completed = best_completed.max(run.report.completed_rate);
        at_200 = Some((run, "at200".into()));
    }
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (at_200, at_200_tag) = at_200.unwrap();
    let gaps = stage_gaps(&system, &at_200_tag).await;
    println!("  at 200/s, stage to stage: {gaps}");
    rows.push(row(
        "latency at 200 orders/s offered, scheduled POST -> seen final",
        format!(
            "p50 {:.0} ms, p99 {:.0} ms, completed {:.0}/s, {} not final",
            at_200.report.e2e.p50_ms, at_200.report.e2e.p99_ms, at_200.report.completed_rate, at_200.report.not_final
        ),
        format!("resolution p99 {:.0} ms", at_200.report.resolution.p99_ms),
        "p50 <= 30 ms, p99 <= 150 ms",
        &at_200.check,
    ));
    rows.push(row(
        "  where it went: from the start of one stage's transaction to the next's",
        gaps,
        "each: the transaction, the relay, the wait for delivery".to_owned(),
        "",
        &none,
    ));
    let sweep_check = sweep_checks
        .iter()
        .find(|c| c.is_err())
        .cloned()
        .unwrap_or_else(|| sweep_checks.last().cloned().unwrap_or(Ok(String::new())));
    rows.push(row(
        "highest offered rate with p99 < 1 s (sweep)",
        best_rate_under_1s.map_or("none of the rates".to_owned(), |r| format!("{r:.0} orders/s")),
        format!(
            "rates tried: {}",
            points.iter().map(|p| format!("{:.0}: p99 {:.0} ms", p.0, p.2)).collect::<Vec<_>>().join(", ")
        ),
        "",
        &sweep_check,
    ));

    // Throughput: the highest offered rate the pipeline sustains with a
    // bounded backlog. Above capacity the backlog grows by definition (and
    // the clients' polls of it take the CPU the pipeline needs), so a single
    // run far above it measures overload, not throughput. Start at the best
    // rate the sweep completed, then 15% steps up while the backlog stays
    // bounded (down until it does), at most 5 runs (with 3, the search of
    // 2026-12-06 stopped while the backlog still held).
    let mut throughput_rate = env_f("BENCH_THROUGHPUT_RATE", (best_completed / 10.0).floor().max(5.0) * 10.0);
    let mut tries: Vec<(f64, Run)> = Vec::new();
    let mut best: Option<usize> = None;
    for attempt in 0..5 {
        println!("throughput: {throughput_rate}/s offered for {throughput_s} s on {PRODUCTS} products ...");
        let l = Load {
            rate: throughput_rate,
            seconds: throughput_s,
            warmup,
            products: PRODUCTS,
            connections: 16,
            poll: true,
            coarse: true,
        };
        let run = load(&system, &l, &format!("tp{PRODUCTS}-{attempt}")).await;
        let (slope, _) = backlog_trend(&run);
        let bounded = slope <= 0.05 * run.report.completed_rate.max(1.0);
        println!(
            "{}  drained in {:.1} s; backlog {}; {:?}",
            run.report.render(),
            run.drained_s,
            if bounded { "bounded" } else { "growing" },
            run.check
        );
        println!("  {}", cpu_line(&run));
        tries.push((throughput_rate, run));
        let i = tries.len() - 1;
        match (bounded, best) {
            (true, _) => {
                best = Some(i);
                throughput_rate = (throughput_rate * 1.15).round();
            }
            (false, Some(_)) => break,
            (false, None) => throughput_rate = (throughput_rate * 0.85).round(),
        }
    }
    // With no bounded run, the last (lowest) one is reported, marked.
    let best = best.unwrap_or(tries.len() - 1);
    let mut hot_run: Option<Run> = None;
    if std::env::var("BENCH_SKIP_HOT").map_or(true, |v| v != "1") {
        let rate = tries[best].0;
        println!("throughput: {rate}/s offered for {throughput_s} s on {HOT} products ...");
        let l = Load { rate, seconds: throughput_s, warmup, products: HOT, connections: 16, poll: true, coarse: true };
        let run = load(&system, &l, &format!("tp{HOT}")).await;
        println!("{}  drained in {:.1} s; {:?}", run.report.render(), run.drained_s, run.check);
        println!("  {}", cpu_line(&run));
        hot_run = Some(run);
    }
    let (spread_rate, spread) = &tries[best];
    let (slope, max_backlog) = backlog_trend(spread);
    let bounded = slope <= 0.05 * spread.report.completed_rate.max(1.0);
    rows.push(row(
        format!("pipeline throughput, {throughput_s:.0} s at {spread_rate:.0}/s offered, 100 products"),
        format!(
            "{:.1} orders/s completed ({:.3} of the broker ceiling; POSTs accepted {:.0}/s)",
            spread.report.completed_rate,
            spread.report.completed_rate / per_order_ceiling,
            spread.report.achieved_post_rate
        ),
        format!("{per_order_ceiling:.0} orders/s"),
        ">= 500/s",
        &spread.check,
    ));
    let per_order = |s: f64| s * 1000.0 / (spread.report.accepted as f64).max(1.0);
    let (busy_ms, pg_ms, rmq_ms) = (
        per_order(spread.machine_busy_s),
        per_order(spread.cpu.get("postgres").copied().unwrap_or(0.0)),
        per_order(spread.cpu.get("rabbitmq").copied().unwrap_or(0.0)),
    );
    rows.push(row(
        "  CPU per order in that run",
        format!(
            "{busy_ms:.2} ms: PostgreSQL {pg_ms:.2} ({:.1} x pgbench's transaction), RabbitMQ {rmq_ms:.2} ({:.1} x the broker alone), the rest {:.2}",
            pg_ms / pg_tx_ms.max(1e-9),
            rmq_ms / floor_cpu.max(1e-9),
            busy_ms - pg_ms - rmq_ms
        ),
        format!("500/s on {cores} cores leaves {:.2} ms per order", cores as f64 * 1000.0 / 500.0),
        "",
        &none,
    ));
    rows.push(row(
        "  backlog during that run",
        format!(
            "pending orders grew {slope:.1}/s over the 2nd half; max {max_backlog} messages queued + unpublished; drained in {:.0} s",
            spread.drained_s
        ),
        String::new(),
        "bounded",
        &if bounded { Ok("bounded".to_owned()) } else { Err("not bounded: the pipeline falls behind the intake".into()) },
    ));
    for (rate, run) in tries.iter().filter(|(r, _)| r > spread_rate) {
        let (slope, max_backlog) = backlog_trend(run);
        rows.push(row(
            format!("  above it: {throughput_s:.0} s at {rate:.0}/s offered"),
            format!(
                "{:.1} orders/s completed; pending grew {slope:.1}/s, max {max_backlog} messages",
                run.report.completed_rate
            ),
            String::new(),
            "",
            &run.check,
        ));
    }
    if let Some(hot) = &hot_run {
        rows.push(row(
            "hot products: every order on 3 products",
            format!(
                "{:.1} orders/s completed ({:.2} x the spread case)",
                hot.report.completed_rate,
                hot.report.completed_rate / spread.report.completed_rate.max(1e-9)
            ),
            format!("spread {:.1}/s", spread.report.completed_rate),
            ">= 0.5 x spread",
            &hot.check,
        ));
    }
    let mut rss: Vec<(String, u64)> = system.procs.iter().map(|p| (p.name.clone(), kib(p.pid(), "VmHWM:"))).collect();
    rss.extend(intake_rss);
    rss.push((
        "loadgen".into(),
        hot_run.iter().chain(tries.iter().map(|t| &t.1)).map(|r| r.report.peak_rss_kib).max().unwrap_or(0),
    ));
    let max_rss = rss.iter().map(|r| r.1).max().unwrap_or(0);
    rows.push(row(
        "peak RSS (VmHWM) per process",
        rss.iter().map(|(n, k)| format!("{n} {:.0} MiB", *k as f64 / 1024.0)).collect::<Vec<_>>().join(", "),
        String::new(),
        "<= 64 MiB",
        &if max_rss <= 64 * 1024 { Ok("within".into()) } else { Err(format!("{:.0} MiB", max_rss as f64 / 1024.0)) },
    ));
    let lg = &spread.report;
    rows.push(row(
        "load driver cost (throughput run)",
        format!(
            "{:.1}% of one core; {:.1}% of the machine's busy CPU",
            lg.cpu_share() * 100.0,
            100.0 * lg.cpu_s / spread.machine_busy_s.max(1e-9)
        ),
        String::new(),
        "far below the system",
        &none,
    ));
    let date = chrono::Utc::now().format("%Y-%m-%d");
    svg(
        &points,
        &svg_path,
        &format!("orderflow: scheduled POST to first poll that sees the order final ({cores} cores, {date})"),
    );
    system.stop().await;

    print_table(&rows, cores);
    println!("latency chart: {}", svg_path.display());
}

fn print_table(rows: &[Row], cores: usize) {
    let date = chrono::Utc::now().format("%Y-%m-%d");
    println!();
    println!("orderflow system benchmark, {date}, {cores} cores (make bench)");
    let wid = |f: &dyn Fn(&Row) -> usize| rows.iter().map(f).max().unwrap_or(0);
    let (a, b, c, d) =
        (wid(&|r| r.what.len()), wid(&|r| r.measured.len()), wid(&|r| r.ceiling.len()), wid(&|r| r.goal.len()));
    println!("| {:<a$} | {:<b$} | {:<c$} | {:<d$} | check |", "what", "measured", "ceiling / reference", "goal");
    println!("|{}|{}|{}|{}|-------|", "-".repeat(a + 2), "-".repeat(b + 2), "-".repeat(c + 2), "-".repeat(d + 2));
    for r in rows {
        println!("| {:<a$} | {:<b$} | {:<c$} | {:<d$} | {} |", r.what, r.measured, r.ceiling, r.goal, r.check);
    }
}
