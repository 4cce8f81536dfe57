//! The end-to-end harness: a whole orderflow system per test, on its own
//! databases and topology prefix.
//!
//! Services and relays run either in the test process (fast, the default)
//! or as real processes of the same programs (for SIGKILL and failpoints).
//! The broker can be put behind a [`FaultProxy`] to cut it on command.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::TcpListener;
use std::process::Stdio;
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use diesel_async::RunQueryDsl;
use orderflow_broker::{QueueSpec, Topology};
use orderflow_db::Pool;
use orderflow_outbox::relay::{self, RelayConfig};
use orderflow_testkit::{FaultProxy, TestBroker, TestDb};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use orderflow_testkit::{eventually, eventually_some};

mod webhook;
pub use webhook::WebhookSink;

/// Generous: 2 shared cores can be slow; passing tests return early.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// Retry tiers used by the services under test (short, so tests are quick).
pub const RETRY_DELAYS: &str = "200ms,500ms,1s";

/// A product of the test catalog.
#[derive(Debug, Clone)]
pub struct Product {
    pub sku: String,
    pub price: i64,
    pub on_hand: i32,
}

impl Product {
    pub fn new(sku: &str, price: i64, on_hand: i32) -> Self {
        Self { sku: sku.into(), price, on_hand }
    }
}

/// How to start a [`System`].
#[derive(Debug, Clone)]
pub struct Options {
    pub catalog: Vec<Product>,
    pub blocked_skus: Vec<String>,
    pub amount_limit: i64,
    pub decline_rate: f64,
    /// Run order-service and processor-service as processes.
    pub services_as_processes: bool,
    /// Relays per service database.
    pub relays_per_db: usize,
    /// Run relays as processes.
    pub relays_as_processes: bool,
    /// Route every broker connection through a [`FaultProxy`].
    pub broker_proxy: bool,
    /// Environment of relay processes (e.g. `ORDERFLOW_FAILPOINTS`).
    pub relay_env: Vec<(String, String)>,
    pub consumer_concurrency: u16,
    /// More processor-service flags (stages, webhook, ...).
    pub processor_extra: Vec<String>,
    /// Relays keep published outbox rows (for tests that read them back).
    pub keep_published: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            catalog: vec![Product::new("SKU-1", 2499, 100), Product::new("SKU-2", 1299, 100)],
            blocked_skus: vec![],
            amount_limit: 1_000_000,
            decline_rate: 0.0,
            services_as_processes: false,
            relays_per_db: 1,
            relays_as_processes: false,
            broker_proxy: false,
            relay_env: vec![],
            consumer_concurrency: 8,
            processor_extra: vec![],
            keep_published: false,
        }
    }
}

/// Which service database a relay serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Orders,
    Processor,
}

enum Running {
    Task { token: CancellationToken, handle: JoinHandle<()> },
    Process(Child),
}

impl Running {
    async fn stop(self) {
        match self {
            Running::Task { token, handle } => {
                token.cancel();
                let _ = handle.await;
            }
            Running::Process(mut child) => {
                // SIGTERM: let it drain like in production.
                if let Some(pid) = child.id() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                if tokio::time::timeout(Duration::from_secs(20), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
            }
        }
    }
}

/// A relay of a [`System`].
pub struct RelayHandle {
    pub db: Db,
    pub id: String,
    running: Running,
}

impl RelayHandle {
    /// SIGKILL (process) or abort (task): no cleanup, like a crash.
    pub async fn kill(self) {
        match self.running {
            Running::Task { handle, .. } => {
                handle.abort();
                let _ = handle.await;
            }
            Running::Process(mut child) => {
                let _ = child.kill().await;
            }
        }
    }

    /// Waits for a relay process to exit by itself (a failpoint); returns
    /// whether it did within `deadline`.
    pub async fn exited_within(&mut self, deadline: Duration) -> bool {
        match &mut self.running {
            Running::Process(child) => tokio::time::timeout(deadline, child.wait()).await.is_ok(),
            Running::Task { handle, .. } => tokio::time::timeout(deadline, handle).await.is_ok(),
        }
    }
}

/// A whole orderflow system for one test.
///
/// Field order matters on drop: the running parts go first, so that they
/// cannot declare queues again while the test broker deletes them.
pub struct System {
    orders: Option<Running>,
    processor: Option<Running>,
    pub relays: Vec<RelayHandle>,
    next_relay: usize,
    pub opts: Options,
    pub http: reqwest::Client,
    pub order_port: u16,
    pub processor_port: u16,
    pub amqp_proxy: Option<FaultProxy>,
    pub broker: TestBroker,
    pub orders_db: TestDb,
    pub processor_db: TestDb,
}

impl Drop for System {
    /// A test that panics never reaches `stop()`: abort whatever still runs
    /// in this process (processes are killed by their handles).
    fn drop(&mut self) {
        let running = self.orders.iter().chain(&self.processor).chain(self.relays.iter().map(|r| &r.running));
        for r in running {
            if let Running::Task { token, handle } = r {
                token.cancel();
                handle.abort();
            }
        }
    }
}

/// Path of one of this package's binaries. Cargo builds a package's
/// binaries before its integration tests, into the directory above the test
/// executables (`target/<profile>/` next to `deps/`).
pub fn bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target directory");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build it with `cargo build -p orderflow-e2e --bins`", path.display());
    path.display().to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The queues the services declare, so the test broker deletes them.
fn consumer_specs() -> Vec<QueueSpec> {
    let tiers = RETRY_DELAYS.split(',').count();
    let mut specs = vec![(order_service::outcomes::CONSUMER, order_service::outcomes::BINDINGS)];
    specs.push((processor_service::inventory::CONSUMER, processor_service::inventory::BINDINGS));
    specs.push((processor_service::payment::CONSUMER, processor_service::payment::BINDINGS));
    specs.push((processor_service::shipping::CONSUMER, processor_service::shipping::BINDINGS));
    specs.push((processor_service::notification::CONSUMER, processor_service::notification::BINDINGS));
    specs
        .into_iter()
        .map(|(consumer, bindings)| QueueSpec {
            consumer: consumer.to_owned(),
            bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
            retry_delays: vec![Duration::from_millis(1); tiers],
            delivery_limit: 20,
        })
        .collect()
}

impl System {
    /// Starts both services and the relays, and waits until they are ready.
    pub async fn start(opts: Options) -> Self {
        let broker = TestBroker::new().await;
        for spec in consumer_specs() {
            broker.track(&spec);
        }
        let orders_db = TestDb::new(Some(order_service::MIGRATIONS)).await;
        let processor_db = TestDb::new(Some(processor_service::MIGRATIONS)).await;
        let amqp_proxy = if opts.broker_proxy { Some(FaultProxy::for_url(&broker.amqp_url).await) } else { None };
        let mut system = Self {
            opts,
            broker,
            orders_db,
            processor_db,
            amqp_proxy,
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
            order_port: 0,
            processor_port: 0,
            orders: None,
            processor: None,
            relays: Vec::new(),
            next_relay: 0,
        };
        system.start_processor().await;
        system.start_orders().await;
        for _ in 0..system.opts.relays_per_db {
            system.start_relay(Db::Orders).await;
            system.start_relay(Db::Processor).await;
        }
        system
    }

    /// The broker URL components use (through the proxy if there is one).
    pub fn amqp_url(&self) -> String {
        match &self.amqp_proxy {
            Some(p) => p.url_through(&self.broker.amqp_url),
            None => self.broker.amqp_url.clone(),
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.broker.topology
    }

    fn common_args(&self) -> Vec<String> {
        [
            "--amqp-url",
            &self.amqp_url(),
            "--topology-prefix",
            self.topology().prefix(),
            "--retry-delays",
            RETRY_DELAYS,
            "--consumer-concurrency",
            &self.opts.consumer_concurrency.to_string(),
            "--create-database",
            "false",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn processor_args(&self, port: u16) -> Vec<String> {
        let catalog: Vec<Value> = self
            .opts
            .catalog
            .iter()
            .map(|p| json!({"sku": p.sku, "name": format!("Test {}", p.sku), "price": p.price, "on_hand": p.on_hand}))
            .collect();
        let mut args: Vec<String> = vec![
            "processor-service".into(),
            "--http-addr".into(),
            format!("127.0.0.1:{port}"),
            "--database-url".into(),
            self.processor_db.url.clone(),
            "--catalog".into(),
            Value::Array(catalog).to_string(),
            "--payment-blocked-skus".into(),
            self.opts.blocked_skus.join(","),
            "--payment-amount-limit".into(),
            self.opts.amount_limit.to_string(),
            "--payment-decline-rate".into(),
            self.opts.decline_rate.to_string(),
        ];
        args.extend(self.common_args());
        args.extend(self.opts.processor_extra.iter().cloned());
        args
    }

    fn order_args(&self, port: u16) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "order-service".into(),
            "--http-addr".into(),
            format!("127.0.0.1:{port}"),
            "--database-url".into(),
            self.orders_db.url.clone(),
        ];
        args.extend(self.common_args());
        args
    }

    async fn start_processor(&mut self) {
        let port = if self.opts.services_as_processes { free_port() } else { 0 };
        let args = self.processor_args(port);
        let (running, port) = if self.opts.services_as_processes {
            (spawn(&bin("e2e-processor-service"), &args[1..], &[]), port)
        } else {
            let cfg = <processor_service::Config as clap::Parser>::try_parse_from(&args).unwrap();
            let token = CancellationToken::new();
            let service = processor_service::build(cfg, token.clone()).await.unwrap();
            let port = service.port();
            let handle = tokio::spawn(async move {
                let _ = service.run_until_stopped().await;
            });
            (Running::Task { token, handle }, port)
        };
        self.processor = Some(running);
        self.processor_port = port;
        self.wait_ready(port).await;
    }

    /// Stops processor-service (draining) and starts it again with `extra`
    /// flags instead of the options' (e.g. other `--stages`).
    pub async fn restart_processor(&mut self, extra: &[&str]) {
        if let Some(r) = self.processor.take() {
            r.stop().await;
        }
        self.opts.processor_extra = extra.iter().map(|s| s.to_string()).collect();
        self.start_processor().await;
    }

    async fn start_orders(&mut self) {
        let port = if self.opts.services_as_processes { free_port() } else { 0 };
        let args = self.order_args(port);
        let (running, port) = if self.opts.services_as_processes {
            (spawn(&bin("e2e-order-service"), &args[1..], &[]), port)
        } else {
            let cfg = <order_service::Config as clap::Parser>::try_parse_from(&args).unwrap();
            let token = CancellationToken::new();
            let service = order_service::build(cfg, token.clone()).await.unwrap();
            let port = service.port();
            let handle = tokio::spawn(async move {
                let _ = service.run_until_stopped().await;
            });
            (Running::Task { token, handle }, port)
        };
        self.orders = Some(running);
        self.order_port = port;
        self.wait_ready(port).await;
    }

    async fn wait_ready(&self, port: u16) {
        let url = format!("http://127.0.0.1:{port}/ready");
        eventually(&format!("{url} answers 200"), DEADLINE, || async {
            matches!(self.http.get(&url).send().await, Ok(r) if r.status() == StatusCode::OK)
        })
        .await;
    }

    pub fn db_url(&self, db: Db) -> &str {
        match db {
            Db::Orders => &self.orders_db.url,
            Db::Processor => &self.processor_db.url,
        }
    }

    pub fn pool(&self, db: Db) -> &Pool {
        match db {
            Db::Orders => &self.orders_db.pool,
            Db::Processor => &self.processor_db.pool,
        }
    }

    /// Starts one more relay on `db`, per the options (task or process).
    pub async fn start_relay(&mut self, db: Db) {
        let env = self.opts.relay_env.clone();
        self.start_relay_with(db, self.opts.relays_as_processes, &env).await;
    }

    /// Starts a relay on `db`, as a process or a task, with `env` (process only).
    pub async fn start_relay_with(&mut self, db: Db, process: bool, env: &[(String, String)]) {
        self.next_relay += 1;
        let id = format!("{}-{}", if db == Db::Orders { "orders" } else { "processor" }, self.next_relay);
        let running = if process {
            let args: Vec<String> = [
                "run",
                "--database-url",
                self.db_url(db),
                "--amqp-url",
                &self.amqp_url(),
                "--topology-prefix",
                self.topology().prefix(),
                "--relay-id",
                &id,
                "--poll-interval",
                "200ms",
                "--retry-base",
                "100ms",
                "--reconnect-max",
                "1s",
                "--metrics-addr",
                "off",
                "--published-retention",
                if self.opts.keep_published { "1h" } else { "0s" },
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            spawn(&bin("e2e-outbox-relay"), &args, env)
        } else {
            let mut cfg = RelayConfig::new(self.db_url(db), self.amqp_url(), self.topology().clone());
            cfg.relay_id = id.clone();
            cfg.poll_interval = Duration::from_millis(200);
            cfg.retry_base = Duration::from_millis(100);
            cfg.reconnect_max = Duration::from_secs(1);
            if self.opts.keep_published {
                cfg.retention.published = Duration::from_secs(3600);
            }
            let token = CancellationToken::new();
            let handle = tokio::spawn(relay::run(cfg, token.clone()));
            Running::Task { token, handle }
        };
        self.relays.push(RelayHandle { db, id, running });
    }

    /// Removes and returns relay `i` (to kill it or wait for it).
    pub fn take_relay(&mut self, i: usize) -> RelayHandle {
        self.relays.remove(i)
    }

    pub fn order_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.order_port)
    }

    pub fn processor_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.processor_port)
    }

    /// POSTs an order; returns the status and the JSON body.
    pub async fn post_order(&self, body: &Value) -> (StatusCode, Value) {
        let r = self.http.post(self.order_url("/orders")).json(body).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POSTs an order that must be accepted; returns its id.
    pub async fn place(&self, body: &Value) -> String {
        let (status, order) = self.post_order(body).await;
        assert_eq!(status, StatusCode::CREATED, "{order}");
        order["order_id"].as_str().unwrap().to_owned()
    }

    pub async fn get_json(&self, url: &str) -> Value {
        let r = self.http.get(url).send().await.unwrap();
        assert!(r.status().is_success(), "GET {url}: {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn order(&self, id: &str) -> Value {
        self.get_json(&self.order_url(&format!("/orders/{id}"))).await
    }

    /// Waits until the order leaves `pending` and returns it.
    pub async fn wait_final(&self, id: &str) -> Value {
        eventually_some(&format!("order {id} reaches a final state"), DEADLINE, || async {
            let r = self.http.get(self.order_url(&format!("/orders/{id}"))).send().await.ok()?;
            let order: Value = r.json().await.ok()?;
            (order["status"] != "pending").then_some(order)
        })
        .await
    }

    /// The product's stock buckets as processor-service reports them.
    pub async fn product(&self, sku: &str) -> Value {
        self.get_json(&self.processor_url(&format!("/products/{sku}"))).await
    }

    /// Waits until every outbox row of both databases is published.
    pub async fn wait_outboxes_drained(&self) {
        eventually("both outboxes fully published", DEADLINE, || async {
            count(self.pool(Db::Orders), "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await == 0
                && count(self.pool(Db::Processor), "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL").await
                    == 0
        })
        .await;
    }

    /// Stops everything: relays, then services (draining).
    pub async fn stop(mut self) {
        for relay in std::mem::take(&mut self.relays) {
            relay.running.stop().await;
        }
        if let Some(r) = self.orders.take() {
            r.stop().await;
        }
        if let Some(r) = self.processor.take() {
            r.stop().await;
        }
    }
}

fn spawn(program: &str, args: &[String], env: &[(String, String)]) -> Running {
    let child = Command::new(program)
        .args(args)
        .envs(env.iter().cloned())
        .env(
            "RUST_LOG",
            std::env::var("TEST_CHILD_LOG").unwrap_or_else(|_| "warn,lapin::returned_messages=error".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    Running::Process(child)
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Runs a `SELECT ... AS n` returning one bigint.
pub async fn count(pool: &Pool, sql: &str) -> i64 {
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query(sql).get_result::<N>(&mut conn).await.unwrap().n
}

/// POSTs to `/orders/{id}/cancel`; returns the status and the JSON body.
pub async fn cancel(sys: &System, id: &str) -> (StatusCode, Value) {
    let r = sys.http.post(sys.order_url(&format!("/orders/{id}/cancel"))).send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Event types of an order's timeline, in order.
pub async fn timeline(sys: &System, id: &str) -> Vec<String> {
    let events = sys.get_json(&sys.order_url(&format!("/orders/{id}/events"))).await;
    events.as_array().unwrap().iter().map(|e| e["event_type"].as_str().unwrap().to_owned()).collect()
}

/// A one-column text query.
pub async fn texts(pool: &Pool, sql: &str) -> Vec<String> {
    #[derive(QueryableByName)]
    struct T {
        #[diesel(sql_type = diesel::sql_types::Text)]
        t: String,
    }
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query(sql).load::<T>(&mut conn).await.unwrap().into_iter().map(|r| r.t).collect()
}

/// An order body for `POST /orders`.
pub fn order_body(customer: &str, items: &[(&str, i64, i64)]) -> Value {
    json!({
        "customer_id": customer,
        "items": items.iter().map(|(sku, quantity, price)| json!({"sku": sku, "quantity": quantity, "price": price})).collect::<Vec<_>>(),
    })
}
