//! The open-loop schedule, the POSTs and the polls (see the module docs).

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{Notify, Semaphore};
use tokio::time::{Instant, sleep_until, timeout_at};

use super::catalog::CatalogItem;
use super::record::{FinalStatus, Recorder, scheduled_offset};
use super::report::{Report, cpu_seconds_self, peak_rss_kib};

/// How often an order is polled: every `clamp(age * factor, min, max)`;
/// or, with `long_poll`, as long polls (`GET /orders/{id}?wait=`) that the
/// server answers once the order is final (or after the wait), one after
/// the other.
#[derive(Debug, Clone, Copy)]
pub struct PollPolicy {
    pub min: Duration,
    pub factor: f64,
    pub max: Duration,
    /// Each poll waits on the server up to this long (whole seconds).
    pub long_poll: Option<Duration>,
}

impl Default for PollPolicy {
    fn default() -> Self {
        Self { min: Duration::from_millis(10), factor: 0.1, max: Duration::from_secs(1), long_poll: None }
    }
}

impl PollPolicy {
    /// The wait before the next poll of an order of this age.
    pub fn interval(&self, age: Duration) -> Duration {
        if self.long_poll.is_some() {
            // The server did the waiting.
            return Duration::ZERO;
        }
        age.mul_f64(self.factor.max(0.0)).clamp(self.min, self.max.max(self.min))
    }
}

/// Which products orders name.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    /// Orders are spread at random over the first `products` of the catalog
    /// (all of it when larger); e.g. 3 for a few hot products.
    pub products: usize,
    /// Lines per order (distinct products while there are enough).
    pub lines: usize,
}

/// One run of the driver.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Orders per second.
    pub rate: f64,
    /// How long orders are scheduled.
    pub duration: Duration,
    /// The start of the run left out of rates and latencies.
    pub warmup: Duration,
    /// Most POSTs in flight at once (keep-alive connections for POSTs).
    pub connections: usize,
    /// Most polls in flight at once (their own connections).
    pub poll_connections: usize,
    /// Poll orders until they are final (off: intake only).
    pub poll: bool,
    pub poll_policy: PollPolicy,
    /// How long to keep polling after the load ends for orders to finish.
    pub drain: Duration,
    pub catalog: Vec<CatalogItem>,
    pub mix: Mix,
    /// Prefix of the order ids (`<tag>-<n>`), unique per run.
    pub tag: String,
    /// Seed of the product choice.
    pub seed: u64,
}

/// A request that got no HTTP answer (or an unreadable one).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request failed")]
    Http(#[from] reqwest::Error),
    #[error("unreadable order")]
    Body(#[from] serde_json::Error),
    #[error("HTTP {0}")]
    Status(u16),
}

impl RequestError {
    /// A short name to count errors by.
    fn kind(&self) -> &'static str {
        match self {
            RequestError::Http(e) if e.is_timeout() => "timeout",
            RequestError::Http(e) if e.is_connect() => "connect error",
            RequestError::Http(_) => "transport error",
            RequestError::Body(_) => "unreadable body",
            RequestError::Status(_) => "unexpected status",
        }
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("the rate must be a positive number of orders per second")]
    Rate,
    #[error("the catalog is empty")]
    EmptyCatalog,
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
}

/// What a poll saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Pending,
    Final(FinalStatus),
}

/// The order API as the driver uses it (HTTP for real, a fake in tests).
#[allow(async_fn_in_trait)] // used on one thread only (LocalSet)
pub trait Api {
    /// POSTs an order body; the HTTP status.
    async fn post(&self, body: Vec<u8>) -> Result<u16, RequestError>;
    /// The status of order `id`; with `wait`, once it is final or the wait
    /// is over (a long poll).
    async fn status(&self, id: &str, wait: Option<Duration>) -> Result<Seen, RequestError>;
}

/// order-service over HTTP/1.1 keep-alive connections.
pub struct HttpApi {
    client: reqwest::Client,
    orders_url: String,
}

impl HttpApi {
    /// A client of the order-service at `base` (e.g. `http://127.0.0.1:8000`)
    /// keeping up to `connections` idle connections.
    pub fn new(base: &str, connections: usize) -> Result<Self, LoadError> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections)
            .pool_idle_timeout(Duration::from_secs(90))
            .timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .map_err(LoadError::Client)?;
        Ok(Self { client, orders_url: format!("{}/orders", base.trim_end_matches('/')) })
    }
}

#[derive(Deserialize)]
struct StatusOnly<'a> {
    #[serde(borrow)]
    status: &'a str,
}

impl Api for HttpApi {
    async fn post(&self, body: Vec<u8>) -> Result<u16, RequestError> {
        let r = self.client.post(&self.orders_url).header("content-type", "application/json").body(body).send().await?;
        let status = r.status().as_u16();
        // Read the body so the connection goes back to the pool.
        r.bytes().await?;
        Ok(status)
    }

    async fn status(&self, id: &str, wait: Option<Duration>) -> Result<Seen, RequestError> {
        let mut url = String::with_capacity(self.orders_url.len() + 12 + id.len());
        let _ = write!(url, "{}/{id}", self.orders_url);
        if let Some(wait) = wait {
            let _ = write!(url, "?wait={}", wait.as_secs().max(1));
        }
        let r = self.client.get(url).send().await?;
        let code = r.status().as_u16();
        let body = r.bytes().await?;
        if code != 200 {
            return Err(RequestError::Status(code));
        }
        let order: StatusOnly<'_> = serde_json::from_slice(&body)?;
        Ok(match order.status {
            "confirmed" => Seen::Final(FinalStatus::Confirmed),
            "failed" => Seen::Final(FinalStatus::Failed),
            "cancelled" => Seen::Final(FinalStatus::Cancelled),
            _ => Seen::Pending,
        })
    }
}

/// Runs `cfg` against the order-service at `base` over HTTP.
pub async fn run(base: &str, cfg: LoadConfig) -> Result<Report, LoadError> {
    let api = HttpApi::new(base, cfg.connections + cfg.poll_connections)?;
    run_with(Rc::new(api), cfg).await
}

/// An accepted order being watched.
struct Slot {
    /// The order's number (its id is `<tag>-<n>`).
    n: u64,
    /// Scheduled time, from the start.
    at: Duration,
    /// When it was last seen pending.
    pending_seen: Instant,
    done: bool,
}

struct Shared<A> {
    api: Rc<A>,
    cfg: LoadConfig,
    start: Instant,
    rec: RefCell<Recorder>,
    slots: RefCell<Vec<Slot>>,
    /// Next poll of each order: (due, slot index).
    due: RefCell<BinaryHeap<Reverse<(Instant, usize)>>>,
    wake: Notify,
    posts_in_flight: Cell<usize>,
    polls_in_flight: Cell<usize>,
    scheduling_done: Cell<bool>,
}

impl<A: Api + 'static> Shared<A> {
    fn since_start(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start)
    }

    /// Order `i`'s id.
    fn id(&self, i: u64, out: &mut String) {
        out.clear();
        let _ = write!(out, "{}-{i}", self.cfg.tag);
    }

    /// Order `i`'s body: one line per product, at the catalog's price.
    fn body(&self, i: u64, rng: &mut u64) -> Vec<u8> {
        let mut s = String::with_capacity(160);
        let _ = write!(s, r#"{{"order_id":"{}-{i}","customer_id":"c-{}","items":["#, self.cfg.tag, i % 1000);
        let pool = self.cfg.mix.products.clamp(1, self.cfg.catalog.len());
        let first = (next_random(rng) % pool as u64) as usize;
        let lines = self.cfg.mix.lines.clamp(1, pool);
        for line in 0..lines {
            let p = &self.cfg.catalog[(first + line) % pool];
            let quantity = 1 + next_random(rng) % 2;
            if line > 0 {
                s.push(',');
            }
            let _ = write!(s, r#"{{"sku":"{}","quantity":{quantity},"price":{}}}"#, p.sku, p.price);
        }
        s.push_str("]}");
        s.into_bytes()
    }

    fn schedule_poll(&self, slot: usize, now: Instant) {
        let at = self.slots.borrow()[slot].at;
        let age = self.since_start(now).saturating_sub(at);
        self.due.borrow_mut().push(Reverse((now + self.cfg.poll_policy.interval(age), slot)));
        self.wake.notify_one();
    }
}

/// xorshift64*: a cheap, seeded choice of products.
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Runs `cfg` against `api`; must be called on a `current_thread` runtime
/// (it runs its tasks on a `LocalSet`).
pub async fn run_with<A: Api + 'static>(api: Rc<A>, cfg: LoadConfig) -> Result<Report, LoadError> {
    if !(cfg.rate.is_finite() && cfg.rate > 0.0) {
        return Err(LoadError::Rate);
    }
    if cfg.catalog.is_empty() {
        return Err(LoadError::EmptyCatalog);
    }
    let local = tokio::task::LocalSet::new();
    Ok(local.run_until(drive(api, cfg)).await)
}

async fn drive<A: Api + 'static>(api: Rc<A>, cfg: LoadConfig) -> Report {
    let cpu_before = cpu_seconds_self();
    let start = Instant::now();
    let total = (cfg.rate * cfg.duration.as_secs_f64()).floor() as u64;
    let shared = Rc::new(Shared {
        api,
        rec: RefCell::new(Recorder::new(cfg.warmup, cfg.duration)),
        slots: RefCell::new(Vec::with_capacity(usize::try_from(total).unwrap_or(0).min(1 << 22))),
        due: RefCell::new(BinaryHeap::new()),
        wake: Notify::new(),
        posts_in_flight: Cell::new(0),
        polls_in_flight: Cell::new(0),
        scheduling_done: Cell::new(false),
        start,
        cfg,
    });
    let scheduler = tokio::task::spawn_local(schedule(shared.clone(), total));
    if shared.cfg.poll {
        poll_loop(&shared).await;
    }
    let _ = scheduler.await;
    if !shared.cfg.poll {
        // Intake only: wait for the POSTs still in flight.
        while shared.posts_in_flight.get() > 0 {
            shared.wake.notified().await;
        }
    }
    let now = shared.since_start(Instant::now());
    let mut rec = shared.rec.borrow_mut();
    if shared.cfg.poll {
        for slot in shared.slots.borrow().iter().filter(|s| !s.done) {
            rec.on_not_final(slot.at, now);
        }
    }
    let cfg = &shared.cfg;
    Report {
        offered_rate: cfg.rate,
        duration_s: cfg.duration.as_secs_f64(),
        warmup_s: cfg.warmup.min(cfg.duration).as_secs_f64(),
        products: cfg.mix.products.clamp(1, cfg.catalog.len()),
        connections: cfg.connections,
        polled: cfg.poll,
        achieved_post_rate: rec.per_second(rec.accepted_in_window),
        completed_rate: rec.per_second(rec.completed_in_window),
        e2e: Recorder::summary(&rec.e2e),
        post: Recorder::summary(&rec.post),
        post_service: Recorder::summary(&rec.post_service),
        send_lag: Recorder::summary(&rec.send_lag),
        resolution: Recorder::summary(&rec.resolution),
        scheduled: rec.scheduled,
        sent: rec.sent,
        accepted: rec.accepted,
        not_sent: rec.not_sent,
        post_errors: rec.post_errors.clone(),
        confirmed: rec.confirmed,
        failed: rec.failed,
        cancelled: rec.cancelled,
        not_final: rec.not_final,
        polls: rec.polls,
        poll_errors: rec.poll_errors,
        wall_s: now.as_secs_f64(),
        cpu_s: cpu_seconds_self() - cpu_before,
        peak_rss_kib: peak_rss_kib("self").unwrap_or(0),
    }
}

/// Sends order `i` at `start + i / rate`, or as soon after as a connection
/// is free; stops at the end of the load.
async fn schedule<A: Api + 'static>(shared: Rc<Shared<A>>, total: u64) {
    let permits = Arc::new(Semaphore::new(shared.cfg.connections.max(1)));
    let end = shared.start + shared.cfg.duration;
    let mut rng = shared.cfg.seed | 1;
    for i in 0..total {
        let at = scheduled_offset(i, shared.cfg.rate);
        shared.rec.borrow_mut().scheduled += 1;
        sleep_until(shared.start + at).await;
        // Late orders are still sent (and their wait counted) until the
        // load ends; what could not be sent by then is reported.
        let Ok(Ok(permit)) = timeout_at(end, permits.clone().acquire_owned()).await else {
            let now = shared.since_start(Instant::now());
            let mut rec = shared.rec.borrow_mut();
            rec.scheduled = total;
            for j in i..total {
                rec.on_not_sent(scheduled_offset(j, shared.cfg.rate), now);
            }
            break;
        };
        let body = shared.body(i, &mut rng);
        shared.posts_in_flight.set(shared.posts_in_flight.get() + 1);
        let s = shared.clone();
        tokio::task::spawn_local(async move {
            let sent = Instant::now();
            let outcome = s.api.post(body).await;
            let done = Instant::now();
            drop(permit);
            let accepted = matches!(outcome, Ok(201));
            let outcome = outcome.as_ref().map(|c| *c).map_err(RequestError::kind);
            s.rec.borrow_mut().on_post(at, s.since_start(sent), s.since_start(done), outcome);
            if accepted && s.cfg.poll {
                let slot = {
                    let mut slots = s.slots.borrow_mut();
                    slots.push(Slot { n: i, at, pending_seen: done, done: false });
                    slots.len() - 1
                };
                s.schedule_poll(slot, done);
            }
            s.posts_in_flight.set(s.posts_in_flight.get() - 1);
            s.wake.notify_one();
        });
    }
    shared.scheduling_done.set(true);
    shared.wake.notify_one();
}

/// Polls every accepted order when due until it is final, the load is over
/// and nothing is pending, or the drain time has passed.
async fn poll_loop<A: Api + 'static>(shared: &Rc<Shared<A>>) {
    let permits = Arc::new(Semaphore::new(shared.cfg.poll_connections.max(1)));
    let deadline = shared.start + shared.cfg.duration + shared.cfg.drain;
    loop {
        let next = shared.due.borrow().peek().map(|Reverse((due, slot))| (*due, *slot));
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match next {
            None => {
                let idle = shared.posts_in_flight.get() == 0 && shared.polls_in_flight.get() == 0;
                if shared.scheduling_done.get() && idle {
                    break;
                }
                let _ = timeout_at(deadline, shared.wake.notified()).await;
            }
            Some((due, _)) if due > now => {
                let _ = timeout_at(due.min(deadline), shared.wake.notified()).await;
            }
            Some((_, slot)) => {
                shared.due.borrow_mut().pop();
                let Ok(Ok(permit)) = timeout_at(deadline, permits.clone().acquire_owned()).await else { break };
                shared.polls_in_flight.set(shared.polls_in_flight.get() + 1);
                let s = shared.clone();
                tokio::task::spawn_local(async move {
                    let mut id = String::with_capacity(s.cfg.tag.len() + 12);
                    let n = s.slots.borrow()[slot].n;
                    s.id(n, &mut id);
                    poll_once(&s, slot, &id).await;
                    drop(permit);
                    s.polls_in_flight.set(s.polls_in_flight.get() - 1);
                    s.wake.notify_one();
                });
            }
        }
    }
}

async fn poll_once<A: Api + 'static>(s: &Rc<Shared<A>>, slot: usize, id: &str) {
    let seen = s.api.status(id, s.cfg.poll_policy.long_poll).await;
    let now = Instant::now();
    let mut rec = s.rec.borrow_mut();
    rec.polls += 1;
    match seen {
        Ok(Seen::Final(status)) => {
            let mut slots = s.slots.borrow_mut();
            let o = &mut slots[slot];
            o.done = true;
            rec.on_final(o.at, s.since_start(now), s.since_start(o.pending_seen), status);
        }
        Ok(Seen::Pending) => {
            s.slots.borrow_mut()[slot].pending_seen = now;
            drop(rec);
            s.schedule_poll(slot, now);
        }
        Err(_) => {
            rec.poll_errors += 1;
            drop(rec);
            s.schedule_poll(slot, now);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The whole driver against a fake order-service on tokio's paused
    //! clock: time only moves when every task waits, so the figures are
    //! exact and the test takes no real time.
    use std::collections::HashMap;

    use orderflow_contracts::Money;

    use super::*;

    /// Answers a POST after `post_takes`; an order is final `final_after`
    /// its POST was answered.
    struct Fake {
        post_takes: Duration,
        final_after: Duration,
        accepted: RefCell<HashMap<String, Instant>>,
    }

    impl Api for Fake {
        async fn post(&self, body: Vec<u8>) -> Result<u16, RequestError> {
            let order: serde_json::Value = serde_json::from_slice(&body)?;
            assert_eq!(order["items"][0]["price"].to_string(), "24.99", "catalog price as written");
            tokio::time::sleep(self.post_takes).await;
            let id = order["order_id"].as_str().unwrap_or_default().to_owned();
            self.accepted.borrow_mut().insert(id, Instant::now());
            Ok(201)
        }

        async fn status(&self, id: &str, wait: Option<Duration>) -> Result<Seen, RequestError> {
            let accepted = self.accepted.borrow().get(id).copied().ok_or(RequestError::Status(404))?;
            if let Some(wait) = wait {
                // A long poll: answered when final, or when the wait is over.
                tokio::time::sleep_until((accepted + self.final_after).min(Instant::now() + wait)).await;
            }
            Ok(if Instant::now() >= accepted + self.final_after {
                Seen::Final(FinalStatus::Confirmed)
            } else {
                Seen::Pending
            })
        }
    }

    fn config(rate: f64, seconds: u64, connections: usize) -> LoadConfig {
        LoadConfig {
            rate,
            duration: Duration::from_secs(seconds),
            warmup: Duration::ZERO,
            connections,
            poll_connections: 4,
            poll: true,
            poll_policy: PollPolicy::default(),
            drain: Duration::from_secs(10),
            catalog: vec![CatalogItem { sku: "SKU-1".into(), price: Money::from_minor(2499) }],
            mix: Mix { products: 1, lines: 1 },
            tag: "t".into(),
            seed: 7,
        }
    }

    fn fake(post_ms: u64, final_ms: u64) -> Rc<Fake> {
        Rc::new(Fake {
            post_takes: Duration::from_millis(post_ms),
            final_after: Duration::from_millis(final_ms),
            accepted: RefCell::default(),
        })
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn measures_from_the_scheduled_time_and_polls_until_final() {
        let report = run_with(fake(5, 100), config(50.0, 2, 8)).await.unwrap();
        assert_eq!((report.scheduled, report.accepted, report.confirmed, report.not_final), (100, 100, 100, 0));
        assert!((report.achieved_post_rate - 50.0).abs() < 1.0, "{report:?}");
        // 5 ms POST + 100 ms to final, seen by polls 10 ms apart.
        assert!(report.e2e.p50_ms >= 105.0 && report.e2e.max_ms <= 116.0, "{:?}", report.e2e);
        assert!(report.resolution.max_ms <= 10.5, "{:?}", report.resolution);
        assert!(report.polls <= 100 * 12, "{} polls", report.polls);
        assert!(report.post.max_ms < 6.0, "{:?}", report.post);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_saturated_server_shows_in_the_latency_not_in_a_lower_load() {
        // One connection, 50 ms per POST: 20 orders/s get through, 100 are due.
        let report = run_with(fake(50, 0), config(100.0, 2, 1)).await.unwrap();
        assert_eq!(report.scheduled, 200);
        assert!((report.achieved_post_rate - 20.0).abs() <= 1.0, "{report:?}");
        assert!(report.not_sent >= 155 && report.sent + report.not_sent == 200, "{report:?}");
        // Order 39 is due at 0.39 s and answered at 2.0 s: its wait counts.
        assert!(report.post.max_ms > 1500.0, "{:?}", report.post);
        assert!(report.post_service.max_ms <= 50.5, "{:?}", report.post_service);
        assert!(report.send_lag.max_ms > 1400.0, "{:?}", report.send_lag);
        assert!(report.e2e.p99_ms >= report.post.p99_ms, "end to end includes the POST wait");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn long_polls_see_the_final_status_when_it_happens_with_one_or_two_polls() {
        let mut cfg = config(50.0, 2, 8);
        cfg.poll_connections = 64;
        // Final 100 ms after the POST; each long poll waits up to 1 s.
        cfg.poll_policy.long_poll = Some(Duration::from_secs(1));
        let report = run_with(fake(5, 100), cfg.clone()).await.unwrap();
        assert_eq!((report.accepted, report.confirmed, report.not_final), (100, 100, 0));
        assert!(report.e2e.p50_ms >= 105.0 && report.e2e.max_ms <= 106.0, "{:?}", report.e2e);
        assert_eq!(report.polls, 100, "one long poll per order");
        // Final after 2.5 s: each order takes three polls.
        let report = run_with(fake(5, 2500), cfg).await.unwrap();
        assert_eq!((report.confirmed, report.polls), (100, 300), "{report:?}");
        assert!(report.e2e.max_ms <= 2510.0, "{:?}", report.e2e);
    }

    #[test]
    fn polls_back_off_with_age() {
        let p = PollPolicy::default();
        assert_eq!(p.interval(Duration::from_millis(30)), Duration::from_millis(10));
        assert_eq!(p.interval(Duration::from_secs(2)), Duration::from_millis(200));
        assert_eq!(p.interval(Duration::from_secs(60)), Duration::from_secs(1));
    }
}
