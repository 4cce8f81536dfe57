//! Orders under injected faults. While clients place (and sometimes cancel)
//! orders, a campaign SIGKILLs and SIGTERMs every kind of process at random
//! moments and restarts it; cuts or stalls the broker and the database
//! through the fault proxies, stalls for longer than every timeout the
//! parts have ([`TIMEOUTS`]); cuts one relay off from the broker alone;
//! holds a lock on the hottest product row past the handler timeout; and
//! writes events of a type no queue is bound to, which must end dead in the
//! outbox. Every kind of fault is met at least once, in a seeded order, then
//! at random. Afterwards everything is restored, the system is left to
//! settle, and the [`invariants`] are checked.
//!
//! Clients behave like careful real clients: each order has its own id, so
//! a POST that failed (connection refused while order-service was down, a
//! 503 while the database was cut) is simply sent again.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use diesel_async::SimpleAsyncConnection;
use orderflow_contracts::Money;
use orderflow_contracts::events::PaymentRefunded;
use orderflow_envelope::{Envelope, Metadata};

use crate::invariants::{self, Expectations, Verdict};
use crate::{Db, Options, Part, Product, System, UNROUTABLE_EVENT, count, eventually, money};

/// The timeouts of a chaos run's parts, short so that stalls outlast them:
/// a handler's transaction (the consumers' `statement_timeout` and
/// `lock_timeout`), a relay's database session, a relay's wait for a
/// publisher confirm.
pub const TIMEOUTS: [(&str, Duration); 3] = [
    ("CONSUMER_HANDLER_TIMEOUT", Duration::from_secs(1)),
    ("RELAY_SESSION_TIMEOUT", Duration::from_secs(2)),
    ("RELAY_CONFIRM_TIMEOUT", Duration::from_secs(2)),
];

/// Stalls last longer than every one of [`TIMEOUTS`] (and the handler's
/// grace on top), but less than a message's retry budget: what this
/// checks is that a stall costs time, never an order.
const LONG_STALL: (Duration, Duration) = (Duration::from_millis(2_500), Duration::from_millis(4_500));

/// The kinds of fault a campaign injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Terminate,
    BrokerCut,
    BrokerStall,
    DatabaseCut,
    DatabaseStall,
    RelayOffBroker,
    HotRowLock,
    Unroutable,
}

const FAULTS: [Fault; 9] = [
    Fault::Kill,
    Fault::Terminate,
    Fault::BrokerCut,
    Fault::BrokerStall,
    Fault::DatabaseCut,
    Fault::DatabaseStall,
    Fault::RelayOffBroker,
    Fault::HotRowLock,
    Fault::Unroutable,
];

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

/// Sizes of a chaos run.
#[derive(Debug, Clone)]
pub struct ChaosConfig {
    /// Orders placed in all.
    pub orders: usize,
    /// Clients placing them at once.
    pub clients: usize,
    /// How long faults are injected (the orders are spread over it).
    pub duration: Duration,
    /// Pause between two faults, drawn from this range.
    pub pause: (Duration, Duration),
    /// Share of accepted orders the client then tries to cancel.
    pub cancel_share: f64,
    /// Seeds every random choice (orders, faults), for a repeatable run.
    pub seed: u64,
    /// Relays per service database.
    pub relays_per_db: usize,
}

impl Default for ChaosConfig {
    fn default() -> Self {
        Self {
            orders: 40,
            clients: 4,
            duration: Duration::from_secs(15),
            pause: (Duration::from_millis(500), Duration::from_millis(2000)),
            cancel_share: 0.25,
            seed: 7,
            relays_per_db: 2,
        }
    }
}

/// What a run did and what held.
#[derive(Debug)]
pub struct ChaosReport {
    pub config: ChaosConfig,
    pub injected: Vec<(Duration, String)>,
    pub accepted: usize,
    pub client_retries: usize,
    pub cancels: BTreeMap<String, usize>,
    pub unclean_exits: Vec<String>,
    /// Unroutable events written (each must end dead).
    pub unroutable: usize,
    pub settle: Duration,
    pub verdict: Verdict,
}

impl ChaosReport {
    /// True when every invariant held and every SIGTERM drained cleanly.
    pub fn passed(&self) -> bool {
        self.verdict.all_held() && self.unclean_exits.is_empty()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "chaos: {} orders from {} clients over {:?}, seed {}, {} relays per database",
            c.orders, c.clients, c.duration, c.seed, c.relays_per_db
        );
        let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, what) in &self.injected {
            *kinds.entry(what.split(':').next().unwrap_or("")).or_default() += 1;
        }
        let timeouts: Vec<String> = TIMEOUTS.iter().map(|(k, d)| format!("{k}={}", secs(*d))).collect();
        let _ = writeln!(
            out,
            "timeouts: {}; stalls last {}-{}",
            timeouts.join(" "),
            secs(LONG_STALL.0),
            secs(LONG_STALL.1)
        );
        let _ = writeln!(out, "injected {} faults: {kinds:?}", self.injected.len());
        for (at, what) in &self.injected {
            let _ = writeln!(out, "  {:>7.2}s  {what}", at.as_secs_f64());
        }
        let _ = writeln!(out, "{} events of a type no queue is bound to written", self.unroutable);
        let _ = writeln!(
            out,
            "clients: {} orders accepted, {} requests retried; cancels {:?}; settled {:.1}s after the last fault",
            self.accepted,
            self.client_retries,
            self.cancels,
            self.settle.as_secs_f64()
        );
        if self.unclean_exits.is_empty() {
            let _ = writeln!(out, "every SIGTERM drained and exited 0");
        } else {
            let _ = writeln!(out, "SIGTERM did not drain cleanly: {:?}", self.unclean_exits);
        }
        let _ = writeln!(out, "invariants:");
        out.push_str(&self.verdict.render());
        out
    }
}

/// The catalog of a chaos run: plenty of one product, little of another
/// (so some orders fail for stock), one blocked by payment.
pub fn catalog() -> Vec<Product> {
    vec![Product::new("PLENTY", 500, 100_000), Product::new("SCARCE", 900, 25), Product::new("BANNED", 100, 1000)]
}

/// The system a chaos run needs: every part a process, several relays per
/// database, the broker and the database behind fault proxies (and each
/// relay's broker behind one of its own), a probe, short timeouts.
pub fn options(cfg: &ChaosConfig) -> Options {
    let env = |prefix: &str| -> Vec<(String, String)> {
        TIMEOUTS
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, d)| ((*k).to_owned(), format!("{}ms", d.as_millis())))
            .collect()
    };
    let mut relay_env = env("RELAY_");
    // Unroutable rows die after 4 attempts (100, 200, 400 ms apart) rather
    // than 10 (minutes), so the run settles quickly.
    relay_env.push(("RELAY_MAX_ATTEMPTS".into(), "4".into()));
    Options {
        catalog: catalog(),
        blocked_skus: vec!["BANNED".into()],
        amount_limit: 8_000,
        decline_rate: 0.1,
        services_as_processes: true,
        relays_as_processes: true,
        relays_per_db: cfg.relays_per_db,
        broker_proxy: true,
        db_proxy: true,
        relay_broker_proxies: true,
        probe: true,
        service_env: env("CONSUMER_"),
        relay_env,
        ..Options::default()
    }
}

pub fn order_body(rng: &mut StdRng, i: usize) -> Value {
    let mut items = vec![json!({"sku": "PLENTY", "quantity": rng.random_range(1..4), "price": money(500)})];
    match rng.random_range(0..10) {
        0..=2 => items.push(json!({"sku": "SCARCE", "quantity": rng.random_range(1..3), "price": money(900)})),
        3 => items.push(json!({"sku": "BANNED", "quantity": 1, "price": money(100)})),
        _ => {}
    }
    json!({
        // Client-chosen string ids, as the old service's clients send them.
        "order_id": format!("chaos-{}-{i}", Uuid::new_v4().simple()),
        "customer_id": format!("chaos-{}", i % 13),
        "items": items,
        "force_fail": rng.random_bool(0.05),
    })
}

#[derive(Default)]
struct Tally {
    accepted: Vec<String>,
    retries: usize,
    cancels: BTreeMap<String, usize>,
}

/// Sends a request until it gets a definite answer (anything but a
/// connection error, a timeout or a 5xx), or gives up after `deadline`.
async fn persist(
    http: &reqwest::Client,
    deadline: Duration,
    tally: &Mutex<Tally>,
    send: impl Fn() -> reqwest::RequestBuilder,
) -> Option<(StatusCode, Value)> {
    let started = Instant::now();
    loop {
        match send().send().await {
            Ok(r) if !r.status().is_server_error() => {
                let status = r.status();
                return Some((status, r.json().await.unwrap_or(Value::Null)));
            }
            _ if started.elapsed() > deadline => return None,
            _ => {
                tally.lock().unwrap().retries += 1;
                let _ = http;
                tokio::time::sleep(Duration::from_millis(rand::random_range(100..400))).await;
            }
        }
    }
}

async fn client(
    http: reqwest::Client,
    base: String,
    cfg: ChaosConfig,
    next: Arc<AtomicUsize>,
    tally: Arc<Mutex<Tally>>,
) {
    let spacing = cfg.duration.mul_f64(cfg.clients as f64 / cfg.orders.max(1) as f64);
    loop {
        let i = next.fetch_add(1, Ordering::SeqCst);
        if i >= cfg.orders {
            return;
        }
        let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        let body = order_body(&mut rng, i);
        let url = format!("{base}/orders");
        let answer = persist(&http, Duration::from_secs(90), &tally, || http.post(&url).json(&body)).await;
        match answer {
            Some((StatusCode::CREATED, order)) => {
                let id = order["order_id"].as_str().unwrap().to_owned();
                tally.lock().unwrap().accepted.push(id.clone());
                if rng.random_bool(cfg.cancel_share) {
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
                    let url = format!("{base}/orders/{id}/cancel");
                    let outcome = match persist(&http, Duration::from_secs(90), &tally, || http.post(&url)).await {
                        Some((status, _)) => status.as_u16().to_string(),
                        None => "gave up".into(),
                    };
                    *tally.lock().unwrap().cancels.entry(outcome).or_default() += 1;
                }
            }
            Some((status, body)) => panic!("order {i} refused with {status}: {body}"),
            None => {}
        }
        tokio::time::sleep(spacing.mul_f64(rng.random_range(0.5..1.5))).await;
    }
}

/// Runs one chaos campaign and checks the invariants.
pub async fn run(cfg: ChaosConfig) -> ChaosReport {
    let mut sys = System::start(options(&cfg)).await;
    let initial_stock: HashMap<String, i64> = catalog().into_iter().map(|p| (p.sku, i64::from(p.on_hand))).collect();
    let started = Instant::now();

    let tally = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(AtomicUsize::new(0));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let clients: Vec<_> = (0..cfg.clients)
        .map(|_| tokio::spawn(client(http.clone(), sys.order_url(""), cfg.clone(), next.clone(), tally.clone())))
        .collect();

    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut injected = Vec::new();
    let mut unclean_exits = Vec::new();
    let mut unroutable = Vec::new();
    // Every kind once, in a seeded order, then at random until the time is up.
    let mut first_round = FAULTS.to_vec();
    first_round.sort_by_key(|_| rng.random::<u32>());
    while started.elapsed() < cfg.duration || !first_round.is_empty() {
        let pause = rng.random_range(cfg.pause.0..=cfg.pause.1);
        tokio::time::sleep(pause).await;
        let fault = first_round.pop().unwrap_or_else(|| FAULTS[rng.random_range(0..FAULTS.len())]);
        let at = started.elapsed();
        let what = inject(&mut sys, fault, &mut rng, &mut unclean_exits, &mut unroutable).await;
        injected.push((at, what));
    }
    for c in clients {
        c.await.unwrap();
    }
    sys.amqp_proxy.as_ref().unwrap().restore();
    sys.db_proxy.as_ref().unwrap().restore();
    sys.revive().await;

    let settling = Instant::now();
    let orders = sys.pool(Db::Orders).clone();
    let processor = sys.pool(Db::Processor).clone();
    eventually("every order final, outboxes drained and every outcome notified", Duration::from_secs(240), || async {
        let pending = count(&orders, "SELECT count(*) AS n FROM orders WHERE status = 'pending'").await;
        let unpublished =
            count(&orders, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND dead_at IS NULL").await
                + count(&processor, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND dead_at IS NULL")
                    .await;
        let all = count(&orders, "SELECT count(*) AS n FROM orders").await;
        let notified = count(&processor, "SELECT count(*) AS n FROM notifications WHERE kind <> 'order_shipped'").await;
        pending == 0 && unpublished == 0 && notified >= all
    })
    .await;
    let settle = settling.elapsed();

    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let expectations = Expectations { accepted: tally.accepted.clone(), initial_stock, unroutable: unroutable.clone() };
    let verdict = invariants::check(&sys, &expectations).await;
    sys.stop().await;
    ChaosReport {
        config: cfg,
        injected,
        accepted: tally.accepted.len(),
        client_retries: tally.retries,
        cancels: tally.cancels,
        unclean_exits,
        unroutable: unroutable.len(),
        settle,
        verdict,
    }
}

/// Injects one fault, waits until it is over, and says what it was.
async fn inject(
    sys: &mut System,
    fault: Fault,
    rng: &mut StdRng,
    unclean_exits: &mut Vec<String>,
    unroutable: &mut Vec<Uuid>,
) -> String {
    let parts = sys.parts();
    let part = parts[rng.random_range(0..parts.len())];
    let name = describe(sys, part);
    let short = Duration::from_millis(rng.random_range(300..2500));
    let long = rng.random_range(LONG_STALL.0..=LONG_STALL.1);
    match fault {
        Fault::Kill => {
            sys.crash(part).await;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
            sys.restart(part).await;
            format!("SIGKILL: {name}, restarted")
        }
        Fault::Terminate => {
            let status = sys.terminate(part).await;
            if !status.is_some_and(|s| s.success()) {
                unclean_exits.push(format!("{name}: {status:?}"));
            }
            sys.restart(part).await;
            format!("SIGTERM: {name} drained ({status:?}), restarted")
        }
        Fault::BrokerCut => {
            let proxy = sys.amqp_proxy.as_ref().unwrap();
            proxy.cut();
            tokio::time::sleep(short).await;
            proxy.restore();
            format!("broker cut: every connection closed for {}", secs(short))
        }
        Fault::BrokerStall => {
            let proxy = sys.amqp_proxy.as_ref().unwrap();
            proxy.stall();
            tokio::time::sleep(long).await;
            proxy.restore();
            format!("broker stall: no bytes through for {}, longer than the confirm timeout", secs(long))
        }
        Fault::DatabaseCut => {
            let proxy = sys.db_proxy.as_ref().unwrap();
            proxy.cut();
            tokio::time::sleep(short).await;
            proxy.restore();
            format!("database cut: every connection closed for {}", secs(short))
        }
        Fault::DatabaseStall => {
            let proxy = sys.db_proxy.as_ref().unwrap();
            proxy.stall();
            tokio::time::sleep(long).await;
            proxy.restore();
            format!(
                "database stall: no bytes through for {}, longer than the handler and relay session timeouts",
                secs(long)
            )
        }
        Fault::RelayOffBroker => {
            let i = rng.random_range(0..sys.relays.len());
            let relay = &sys.relays[i];
            let proxy = relay.broker_proxy.as_ref().expect("chaos relays have their own broker proxy");
            let stall = rng.random_bool(0.5);
            if stall {
                proxy.stall();
            } else {
                proxy.cut();
            }
            tokio::time::sleep(long).await;
            // Lanes it still holds at the end, and what the others hold
            // (its lanes move once it notices: at once for a cut, after
            // the confirm timeout for a stall while it has work).
            let lanes = lanes_held(sys.pool(relay.db), &relay.id).await;
            proxy.restore();
            let how = if stall { "stalled" } else { "cut" };
            format!(
                "relay off broker: {} alone ({how}) for {}, the others connected; lanes at the end: {} {}, others {}",
                relay.id,
                secs(long),
                relay.id,
                lanes.0,
                lanes.1
            )
        }
        Fault::HotRowLock => {
            let hold = Duration::from_millis(rng.random_range(1_500..3_000));
            let mut conn = sys.pool(Db::Processor).get().await.unwrap();
            conn.batch_execute("BEGIN; SELECT 1 FROM products WHERE sku = 'PLENTY' FOR UPDATE").await.unwrap();
            let mut most_waiting = 0;
            let until = Instant::now() + hold;
            while Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let waiting = count(
                    sys.pool(Db::Processor),
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .await;
                most_waiting = most_waiting.max(waiting);
            }
            conn.batch_execute("ROLLBACK").await.unwrap();
            format!(
                "hot row lock: PLENTY locked FOR UPDATE for {}, past the handler timeout; at most {most_waiting} sessions waited on it",
                secs(hold)
            )
        }
        Fault::Unroutable => {
            let n = rng.random_range(1..=3);
            let mut events = Vec::with_capacity(n);
            for _ in 0..n {
                let event = PaymentRefunded {
                    order_id: format!("unrouted-{}", Uuid::now_v7()),
                    payment_id: Uuid::now_v7(),
                    amount: Money::from_minor(1),
                };
                let mut env = Envelope::new(&event, 1, &Metadata::default()).unwrap();
                env.event_type = UNROUTABLE_EVENT.into();
                env.aggregate_type = "chaos".into();
                env.aggregate_id = event.order_id.clone();
                unroutable.push(env.message_id);
                events.push(env);
            }
            let mut conn = sys.pool(Db::Orders).get().await.unwrap();
            orderflow_outbox::append(&mut conn, &events).await.unwrap();
            format!("unroutable: {n} {UNROUTABLE_EVENT} events written, no queue bound to them")
        }
    }
}

/// Lanes (advisory locks of the lane class) held by relay `id`'s sessions,
/// and by every other session, on a relay database.
async fn lanes_held(pool: &orderflow_db::Pool, id: &str) -> (i64, i64) {
    let sql = |mine: bool| {
        format!(
            "SELECT count(*) AS n FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted AND l.classid::bigint = {} \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND (a.application_name = 'outbox-relay:{id}') = {mine}",
            orderflow_outbox::relay::LANE_LOCK_CLASS
        )
    };
    (count(pool, &sql(true)).await, count(pool, &sql(false)).await)
}

fn describe(sys: &System, part: Part) -> String {
    match part {
        Part::Orders => "order-service".into(),
        Part::Processor => "processor-service".into(),
        Part::Relay(i) => format!("relay {}", sys.relays[i].id),
    }
}
