//! [`System`]: both services and their relays on a test's own databases and
//! topology prefix, in the test process or as real processes, optionally
//! behind fault proxies, with parts that can be killed and brought back.

use std::net::TcpListener;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use orderflow_broker::{QueueSpec, Topology};
use orderflow_db::Pool;
use orderflow_outbox::relay::{self, RelayConfig};
use orderflow_testkit::{FaultProxy, TestBroker, TestDb, eventually, eventually_some};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::storm::Storm;
use crate::{DEADLINE, Options, RETRY_DELAYS, count};

/// Which service database a relay serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Orders,
    Processor,
}

/// A part of the system that can be stopped and started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Orders,
    Processor,
    /// The relay at this index of [`System::relays`].
    Relay(usize),
}

/// A running part: an in-process task or a child process (killed when dropped).
pub enum Running {
    Task { token: CancellationToken, handle: JoinHandle<()> },
    Process(Child),
}

impl Running {
    /// Runs an in-process service on this runtime until `token` (the one it
    /// was built with) is cancelled.
    fn task(service: orderflow_web::Service, token: CancellationToken) -> Self {
        let handle = tokio::spawn(async move {
            let _ = service.run_until_stopped().await;
        });
        Running::Task { token, handle }
    }

    /// Stops the part: SIGTERM for a process (it drains), cancel for a task.
    pub async fn stop(self) {
        match self {
            Running::Task { token, handle } => {
                token.cancel();
                let _ = handle.await;
            }
            Running::Process(mut child) => {
                // SIGTERM: let it drain like in production.
                signal(&child, Signal::SIGTERM);
                if tokio::time::timeout(Duration::from_secs(20), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
            }
        }
    }

    fn has_exited(&mut self) -> bool {
        match self {
            Running::Task { handle, .. } => handle.is_finished(),
            Running::Process(child) => !matches!(child.try_wait(), Ok(None)),
        }
    }
}

fn signal(child: &Child, sig: Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

/// A relay of a [`System`].
pub struct RelayHandle {
    pub db: Db,
    pub id: String,
    /// Port of its /metrics (processes with `relay_metrics`).
    pub metrics_port: Option<u16>,
    /// Its own way to the broker (with `relay_broker_proxies`).
    pub broker_proxy: Option<FaultProxy>,
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

    /// Waits for a relay to exit by itself (a failpoint); returns whether it
    /// did within `deadline`.
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
    storm: Option<Storm>,
    next_relay: usize,
    pub opts: Options,
    pub http: reqwest::Client,
    pub order_port: u16,
    pub processor_port: u16,
    pub amqp_proxy: Option<FaultProxy>,
    pub db_proxy: Option<FaultProxy>,
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
        if let Some(storm) = &self.storm {
            storm.abort();
        }
    }
}

/// Path of one of this package's binaries. Cargo builds a package's
/// binaries before its integration tests, into the directory above the test
/// executables (`target/<profile>/` next to `deps/`); a binary of the
/// package (the chaos runner) finds them next to itself.
pub fn bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("executable directory");
    let candidates = [dir.join(name), dir.parent().map(|d| d.join(name)).unwrap_or_default()];
    let path = candidates.iter().find(|p| p.exists()).unwrap_or_else(|| {
        panic!("{name} is missing next to {}: build it with `cargo build -p orderflow-e2e --bins`", exe.display())
    });
    path.display().to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Every consumer the services declare, so the test broker deletes them.
pub fn consumer_specs() -> Vec<QueueSpec> {
    consumer_specs_with(RETRY_DELAYS)
}

/// Every consumer the services declare when started with `retry_delays`
/// (e.g. [`orderflow_broker::DEFAULT_RETRY_DELAYS`], as the benchmark
/// starts them): the retry queues are named by them (placeholders here left
/// every retry queue behind).
pub fn consumer_specs_with(retry_delays: &str) -> Vec<QueueSpec> {
    let delays: Vec<Duration> =
        retry_delays.split(',').map(|d| humantime::parse_duration(d).expect("retry delays")).collect();
    [
        (order_service::outcomes::CONSUMER, order_service::outcomes::BINDINGS),
        (processor_service::inventory::CONSUMER, processor_service::inventory::BINDINGS),
        (processor_service::payment::CONSUMER, processor_service::payment::BINDINGS),
        (processor_service::shipping::CONSUMER, processor_service::shipping::BINDINGS),
        (processor_service::notification::CONSUMER, processor_service::notification::BINDINGS),
    ]
    .into_iter()
    .map(|(consumer, bindings)| QueueSpec {
        consumer: consumer.to_owned(),
        bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
        retry_delays: delays.clone(),
        delivery_limit: 20,
    })
    .collect()
}

/// The probe: a queue bound to every event of the catalog the relays publish.
pub const PROBE: &str = "probe";
/// What the probe is bound to: every event of the catalog, and nothing else,
/// so that an event of another type ([`UNROUTABLE_EVENT`]) stays unroutable.
pub const PROBE_BINDINGS: &[&str] = &["order.#", "inventory.#", "payment.#", "shipment.#"];
/// An event type no queue is bound to: the relays must park its rows dead.
pub const UNROUTABLE_EVENT: &str = "chaos.unrouted";

impl System {
    /// Starts both services and the relays, and waits until they are ready.
    pub async fn start(opts: Options) -> Self {
        let broker = match &opts.amqp_url {
            Some(url) => TestBroker::on(url.clone()),
            None => TestBroker::new().await,
        };
        for spec in consumer_specs() {
            broker.track(&spec);
        }
        let orders_db = TestDb::new(Some(order_service::MIGRATIONS)).await;
        let processor_db = TestDb::new(Some(processor_service::MIGRATIONS)).await;
        let amqp_proxy = if opts.broker_proxy { Some(FaultProxy::for_url(&broker.amqp_url).await) } else { None };
        let db_proxy = if opts.db_proxy { Some(FaultProxy::for_url(&orders_db.url).await) } else { None };
        let mut system = Self {
            orders: None,
            processor: None,
            relays: Vec::new(),
            storm: None,
            next_relay: 0,
            opts,
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
            order_port: 0,
            processor_port: 0,
            amqp_proxy,
            db_proxy,
            broker,
            orders_db,
            processor_db,
        };
        let (_conn, channel) = system.broker.channel().await;
        let relay_topology = system.relay_topology();
        if system.opts.probe {
            let probe = QueueSpec {
                consumer: PROBE.into(),
                bindings: PROBE_BINDINGS.iter().map(|b| (*b).to_owned()).collect(),
                retry_delays: vec![],
                delivery_limit: 1000,
            };
            system.broker.track_in(&relay_topology, &probe);
            relay_topology.declare_consumer(&channel, &probe).await.unwrap();
        }
        if system.opts.storm {
            system.storm = Some(Storm::start(&system.broker, &relay_topology, system.topology()).await);
        }
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

    /// The services' topology.
    pub fn topology(&self) -> &Topology {
        &self.broker.topology
    }

    /// The topology relays publish to: the services' one, or in a storm a
    /// raw one whose messages the storm redelivers, twice and shuffled.
    pub fn relay_topology(&self) -> Topology {
        if self.opts.storm {
            Topology::new(format!("{}raw", self.topology().prefix()))
        } else {
            self.topology().clone()
        }
    }

    /// A database's URL as the system's parts use it (through the proxy if
    /// there is one); tests query through [`System::pool`], never the proxy.
    pub fn db_url(&self, db: Db) -> String {
        let url = match db {
            Db::Orders => &self.orders_db.url,
            Db::Processor => &self.processor_db.url,
        };
        match &self.db_proxy {
            Some(p) => p.url_through(url),
            None => url.clone(),
        }
    }

    pub fn pool(&self, db: Db) -> &Pool {
        match db {
            Db::Orders => &self.orders_db.pool,
            Db::Processor => &self.processor_db.pool,
        }
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
            .map(|p| json!({"sku": p.sku, "name": format!("Test {}", p.sku), "price": crate::money(p.price), "on_hand": p.on_hand}))
            .collect();
        let mut args: Vec<String> = vec![
            "processor-service".into(),
            "--http-addr".into(),
            format!("127.0.0.1:{port}"),
            "--database-url".into(),
            self.db_url(Db::Processor),
            "--catalog".into(),
            Value::Array(catalog).to_string(),
            "--payment-blocked-skus".into(),
            self.opts.blocked_skus.join(","),
            "--payment-amount-limit".into(),
            orderflow_contracts::Money::from_minor(self.opts.amount_limit).to_string(),
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
            self.db_url(Db::Orders),
        ];
        args.extend(self.common_args());
        args
    }

    async fn start_processor(&mut self) {
        if self.opts.services_as_processes {
            if self.processor_port == 0 {
                self.processor_port = free_port();
            }
            let args = self.processor_args(self.processor_port);
            let running = self.supervise(&bin("e2e-processor-service"), &args[1..], self.processor_port).await;
            self.processor = Some(running);
        } else {
            let args = self.processor_args(0);
            let cfg = <processor_service::Config as clap::Parser>::try_parse_from(&args).unwrap();
            let token = CancellationToken::new();
            let service = processor_service::build(cfg, token.clone()).await.unwrap();
            self.processor_port = service.port();
            self.processor = Some(Running::task(service, token));
            self.wait_ready(self.processor_port).await;
        }
    }

    /// Starts another processor-service process on the same database and
    /// broker (a second replica: its consumers share the queues, its
    /// dispatcher the notifications), with `extra` flags after the options'.
    /// Killed when dropped.
    pub async fn processor_replica(&self, extra: &[&str]) -> Running {
        let port = free_port();
        let mut args = self.processor_args(port);
        args.extend(extra.iter().map(|s| s.to_string()));
        self.supervise(&bin("e2e-processor-service"), &args[1..], port).await
    }

    /// Starts another order-service process on the same database and broker
    /// (a second replica: its consumer shares the outcome queue). Killed
    /// when dropped.
    pub async fn order_replica(&self) -> (Running, u16) {
        let port = free_port();
        let args = self.order_args(port);
        (self.supervise(&bin("e2e-order-service"), &args[1..], port).await, port)
    }

    async fn start_orders(&mut self) {
        if self.opts.services_as_processes {
            if self.order_port == 0 {
                self.order_port = free_port();
            }
            let args = self.order_args(self.order_port);
            let running = self.supervise(&bin("e2e-order-service"), &args[1..], self.order_port).await;
            self.orders = Some(running);
        } else {
            let args = self.order_args(0);
            let cfg = <order_service::Config as clap::Parser>::try_parse_from(&args).unwrap();
            let token = CancellationToken::new();
            let service = order_service::build(cfg, token.clone()).await.unwrap();
            self.order_port = service.port();
            self.orders = Some(Running::task(service, token));
            self.wait_ready(self.order_port).await;
        }
    }

    /// Starts a service process and waits until it answers `/health`,
    /// starting it again if it exits first (as a process supervisor would:
    /// a service started while the database is cut exits with an error).
    async fn supervise(&self, program: &str, args: &[String], port: u16) -> Running {
        let url = format!("http://127.0.0.1:{port}/health");
        let started = Instant::now();
        loop {
            let mut running = spawn(program, args, &self.opts.service_env);
            loop {
                if matches!(self.http.get(&url).send().await, Ok(r) if r.status() == StatusCode::OK) {
                    return running;
                }
                if running.has_exited() {
                    break;
                }
                assert!(started.elapsed() < DEADLINE, "{program} did not become healthy within {DEADLINE:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the service is ready and every consumer is subscribed
    /// (ready alone means the database answers).
    async fn wait_ready(&self, port: u16) {
        let url = format!("http://127.0.0.1:{port}/ready");
        eventually(&format!("{url} answers 200 with every consumer connected"), DEADLINE, || async {
            let Ok(r) = self.http.get(&url).send().await else { return false };
            r.status() == StatusCode::OK && r.json::<Value>().await.is_ok_and(|b| b["broker"] == true)
        })
        .await;
    }

    /// Starts one more relay on `db`, per the options (task or process).
    pub async fn start_relay(&mut self, db: Db) {
        let env = self.opts.relay_env.clone();
        self.start_relay_with(db, self.opts.relays_as_processes, &env).await;
    }

    /// The broker URL of a relay: through its own proxy if it has one.
    fn relay_amqp_url(&self, proxy: Option<&FaultProxy>) -> String {
        match proxy {
            Some(p) => p.url_through(&self.amqp_url()),
            None => self.amqp_url(),
        }
    }

    fn relay_args(&self, db: Db, id: &str, metrics_port: Option<u16>, proxy: Option<&FaultProxy>) -> Vec<String> {
        let metrics = metrics_port.map_or_else(|| "off".to_owned(), |p| format!("127.0.0.1:{p}"));
        [
            "run",
            "--database-url",
            &self.db_url(db),
            "--amqp-url",
            &self.relay_amqp_url(proxy),
            "--topology-prefix",
            self.relay_topology().prefix(),
            "--relay-id",
            id,
            "--poll-interval",
            "200ms",
            "--retry-base",
            "100ms",
            "--reconnect-max",
            "1s",
            "--metrics-addr",
            &metrics,
            "--published-retention",
            if self.opts.keep_published { "1h" } else { "0s" },
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Starts a relay on `db`, as a process or a task, with `env` (process only).
    pub async fn start_relay_with(&mut self, db: Db, process: bool, env: &[(String, String)]) {
        self.next_relay += 1;
        let id = format!("{}-{}", if db == Db::Orders { "orders" } else { "processor" }, self.next_relay);
        let metrics_port = (process && self.opts.relay_metrics).then(free_port);
        let broker_proxy =
            if self.opts.relay_broker_proxies { Some(FaultProxy::for_url(&self.amqp_url()).await) } else { None };
        let running = if process {
            spawn(&bin("e2e-outbox-relay"), &self.relay_args(db, &id, metrics_port, broker_proxy.as_ref()), env)
        } else {
            let amqp_url = self.relay_amqp_url(broker_proxy.as_ref());
            let mut cfg = RelayConfig::new(self.db_url(db), amqp_url, self.relay_topology());
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
        self.relays.push(RelayHandle { db, id, metrics_port, broker_proxy, running });
    }

    /// Removes and returns relay `i` (to kill it or wait for it).
    pub fn take_relay(&mut self, i: usize) -> RelayHandle {
        self.relays.remove(i)
    }

    fn running(&mut self, part: Part) -> Option<&mut Running> {
        match part {
            Part::Orders => self.orders.as_mut(),
            Part::Processor => self.processor.as_mut(),
            Part::Relay(i) => self.relays.get_mut(i).map(|r| &mut r.running),
        }
    }

    /// Kills a part with SIGKILL (a crash). Processes only.
    pub async fn crash(&mut self, part: Part) {
        if let Some(Running::Process(child)) = self.running(part) {
            let _ = child.kill().await;
        }
    }

    /// Stops a part with SIGTERM and returns how it exited (a clean drain
    /// exits 0). Processes only.
    pub async fn terminate(&mut self, part: Part) -> Option<ExitStatus> {
        let Some(Running::Process(child)) = self.running(part) else { return None };
        signal(child, Signal::SIGTERM);
        match tokio::time::timeout(Duration::from_secs(25), child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = child.kill().await;
                None
            }
        }
    }

    /// Starts a stopped (or crashed) part again, in its place.
    pub async fn restart(&mut self, part: Part) {
        match part {
            Part::Orders => {
                if let Some(r) = self.orders.take() {
                    r.stop().await;
                }
                self.start_orders().await;
            }
            Part::Processor => {
                if let Some(r) = self.processor.take() {
                    r.stop().await;
                }
                self.start_processor().await;
            }
            Part::Relay(i) => {
                let relay = &self.relays[i];
                let args = self.relay_args(relay.db, &relay.id, relay.metrics_port, relay.broker_proxy.as_ref());
                let running = spawn(&bin("e2e-outbox-relay"), &args, &self.opts.relay_env);
                let old = std::mem::replace(&mut self.relays[i].running, running);
                old.stop().await;
            }
        }
    }

    /// Restarts every part that is not running (after a fault campaign).
    pub async fn revive(&mut self) {
        for part in self.parts() {
            if self.running(part).is_none_or(Running::has_exited) {
                self.restart(part).await;
            }
        }
    }

    /// Every part that can be stopped and started.
    pub fn parts(&self) -> Vec<Part> {
        let mut parts = vec![Part::Orders, Part::Processor];
        parts.extend((0..self.relays.len()).map(Part::Relay));
        parts
    }

    /// Stops and starts processor-service with `extra` flags instead of the
    /// options' (e.g. other `--stages`).
    pub async fn restart_processor(&mut self, extra: &[&str]) {
        self.opts.processor_extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart(Part::Processor).await;
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
        if let Some(storm) = self.storm.take() {
            storm.stop().await;
        }
    }
}

/// Where the parts' own logs go: stderr of the test (shown by the test
/// runner when a test fails), or the file named by `TEST_CHILD_STDERR`.
fn child_stderr() -> Stdio {
    match std::env::var("TEST_CHILD_STDERR") {
        Ok(path) => std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map(Stdio::from)
            .unwrap_or_else(|e| panic!("TEST_CHILD_STDERR={path}: {e}")),
        Err(_) => Stdio::inherit(),
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
        .stderr(child_stderr())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    Running::Process(child)
}
