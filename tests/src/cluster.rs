//! Orders on a 3-node RabbitMQ cluster while its nodes fail (issue 14).
//!
//! Every part reaches the cluster through the multi-address `AMQP_URL`,
//! each node behind a fault proxy of its own: 2 order-service and 2
//! processor-service processes, 3 relays per database. While clients place
//! (and sometimes cancel) orders on both order-services, the run
//! (a) kills with SIGKILL the node leading most of the consumers' queues,
//! waits until every queue it led has a new leader, and starts it again;
//! (b) stops the node leading the inventory queue gracefully, then starts
//! it again; (c) cuts the node most clients are connected to off through
//! its proxy (every connection closed, new ones refused), then restores it.
//! One node is down at a time, so the quorum queues keep a majority. Then
//! the system settles and the [`invariants`] are checked.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orderflow_broker::QueueSpec;
use orderflow_testkit::cluster::NODES;
use orderflow_testkit::{Cluster, FaultProxy, TestBroker};
use rand::SeedableRng;
use rand::rngs::StdRng;
use reqwest::StatusCode;
use serde_json::Value;

use crate::invariants::{self, Expectations, Verdict};
use crate::{Db, System, chaos, consumer_specs, count, eventually, eventually_some};

/// Sizes of a cluster run.
#[derive(Debug, Clone)]
pub struct ClusterRunConfig {
    /// Clients placing orders at once, spread over both order-services.
    pub clients: usize,
    /// Pause of each client between two orders.
    pub pace: Duration,
    /// How long a node stays down (killed, stopped or cut off).
    pub down: Duration,
    /// Share of accepted orders the client then tries to cancel.
    pub cancel_share: f64,
    /// Seeds the orders.
    pub seed: u64,
}

impl Default for ClusterRunConfig {
    fn default() -> Self {
        Self { clients: 4, pace: Duration::from_millis(250), down: Duration::from_secs(5), cancel_share: 0.2, seed: 14 }
    }
}

/// What a run did and what held.
#[derive(Debug)]
pub struct ClusterReport {
    /// Replicas of each consumer's work queue as the services declared them
    /// (no group size set: the broker's default).
    pub default_members: BTreeMap<String, usize>,
    /// Replicas of a queue declared with `AMQP_QUORUM_REPLICAS=2`.
    pub members_with_two: usize,
    /// What was done, when, and what was seen.
    pub steps: Vec<(Duration, String)>,
    pub accepted: usize,
    pub client_retries: usize,
    pub cancels: BTreeMap<String, usize>,
    /// Connections let through each node's proxy over the run.
    pub connections_per_node: Vec<usize>,
    pub settle: Duration,
    pub verdict: Verdict,
}

impl ClusterReport {
    pub fn passed(&self) -> bool {
        self.verdict.all_held()
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "cluster: 3 nodes; 2 order-service, 2 processor-service, 3 relays per database");
        let _ = writeln!(
            out,
            "replicas: work queues {:?} (broker default); {} with AMQP_QUORUM_REPLICAS=2",
            self.default_members, self.members_with_two
        );
        for (at, what) in &self.steps {
            let _ = writeln!(out, "  {:>7.2}s  {what}", at.as_secs_f64());
        }
        let _ = writeln!(
            out,
            "clients: {} orders accepted, {} requests retried; cancels {:?}; connections per node (via proxies) {:?}; settled {:.1}s after the last fault",
            self.accepted,
            self.client_retries,
            self.cancels,
            self.connections_per_node,
            self.settle.as_secs_f64()
        );
        let _ = writeln!(out, "invariants:");
        out.push_str(&self.verdict.render());
        out
    }
}

#[derive(Default)]
struct Tally {
    accepted: Vec<String>,
    retries: usize,
    cancels: BTreeMap<String, usize>,
}

/// What the run did, printed as it goes (a failing run shows how far it got).
struct Steps {
    started: Instant,
    done: Vec<(Duration, String)>,
}

impl Steps {
    fn note(&mut self, what: String) {
        let at = self.started.elapsed();
        eprintln!("cluster run {:>7.2}s  {what}", at.as_secs_f64());
        self.done.push((at, what));
    }
}

/// Sends until a definite answer (not a connection error, timeout or 5xx).
async fn persist(tally: &Mutex<Tally>, send: impl Fn() -> reqwest::RequestBuilder) -> Option<(StatusCode, Value)> {
    let started = Instant::now();
    loop {
        match send().send().await {
            Ok(r) if !r.status().is_server_error() => {
                let status = r.status();
                return Some((status, r.json().await.unwrap_or(Value::Null)));
            }
            _ if started.elapsed() > Duration::from_secs(90) => return None,
            _ => {
                tally.lock().unwrap().retries += 1;
                tokio::time::sleep(Duration::from_millis(rand::random_range(100..400))).await;
            }
        }
    }
}

/// Places orders on the order-services in turn until `stop`.
async fn client(
    http: reqwest::Client,
    bases: Vec<String>,
    cfg: ClusterRunConfig,
    next: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let i = next.fetch_add(1, Ordering::SeqCst);
        let mut rng = StdRng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003).wrapping_add(i as u64));
        let body = chaos::order_body(&mut rng, i);
        let base = &bases[i % bases.len()];
        let url = format!("{base}/orders");
        match persist(&tally, || http.post(&url).json(&body)).await {
            Some((StatusCode::CREATED, order)) => {
                let id = order["order_id"].as_str().unwrap().to_owned();
                tally.lock().unwrap().accepted.push(id.clone());
                if rand::Rng::random_bool(&mut rng, cfg.cancel_share) {
                    // Through the other replica: either may answer for any order.
                    let other = &bases[(i + 1) % bases.len()];
                    let url = format!("{other}/orders/{id}/cancel");
                    let outcome = match persist(&tally, || http.post(&url)).await {
                        Some((status, _)) => status.as_u16().to_string(),
                        None => "gave up".into(),
                    };
                    *tally.lock().unwrap().cancels.entry(outcome).or_default() += 1;
                }
            }
            Some((status, body)) => panic!("order {i} refused with {status}: {body}"),
            None => {}
        }
        tokio::time::sleep(cfg.pace).await;
    }
}

/// The work queue of each consumer of the services.
fn work_queues(sys: &System) -> Vec<String> {
    consumer_specs().iter().map(|s| sys.topology().queue(&s.consumer)).collect()
}

/// Leader of each of `queues`, once every one has a leader on a running node.
async fn leaders(cluster: &Cluster, queues: &[String]) -> BTreeMap<String, u8> {
    let mut found = BTreeMap::new();
    for q in queues {
        let leader = eventually_some(&format!("a leader for {q}"), Duration::from_secs(60), || cluster.leader(q)).await;
        found.insert(q.clone(), leader);
    }
    found
}

async fn back_in_cluster(cluster: &Cluster, n: u8) {
    eventually(&format!("c{n} running in the cluster again"), Duration::from_secs(120), || cluster.healthy()).await;
}

/// Runs the campaign on `cluster` and checks the invariants.
pub async fn run(cluster: &Cluster, cfg: ClusterRunConfig) -> ClusterReport {
    // Each node behind a proxy of its own: clients reach the cluster only
    // through them, so one node can be cut off from the clients alone.
    let mut proxies = Vec::new();
    for n in NODES {
        let addr: SocketAddr = format!("127.0.0.1:{}", Cluster::amqp_port(n)).parse().unwrap();
        proxies.push(FaultProxy::start(addr).await);
    }
    let amqp_url =
        NODES.iter().zip(&proxies).map(|(n, p)| p.url_through(&Cluster::node_url(*n))).collect::<Vec<_>>().join(",");

    // The chaos run's parts, with its catalog and probe, on the cluster;
    // but the default timeouts: this run is about the broker's nodes, and
    // a handler timeout of 1 s on 2 cores shared with three broker nodes
    // sends slow messages through the retry tiers to the dead letters.
    let mut options = chaos::options(&chaos::ChaosConfig { relays_per_db: 3, ..chaos::ChaosConfig::default() });
    options.amqp_url = Some(amqp_url.clone());
    options.broker_proxy = false;
    options.db_proxy = false;
    options.relay_broker_proxies = false;
    options.service_env = vec![];
    // A publish waits for the queues' leaders, and electing new ones takes
    // seconds: a confirm timeout of 5 s, not the chaos run's 2 s.
    options.relay_env = vec![("RELAY_CONFIRM_TIMEOUT".into(), "5s".into())];

    let sys = System::start(options).await;
    let started = Instant::now();
    let mut steps = Steps { started, done: Vec::new() };
    let queues = work_queues(&sys);
    let mut default_members = BTreeMap::new();
    for q in &queues {
        default_members.insert(q.clone(), cluster.members(q).await.len());
    }
    let members_with_two = replicas_when_set(cluster, &amqp_url, 2).await;

    let (order2, order2_port) = sys.order_replica().await;
    let processor2 = sys.processor_replica(&[]).await;
    steps.note("second order-service and processor-service replicas up".to_owned());

    let initial_stock: HashMap<String, i64> =
        chaos::catalog().into_iter().map(|p| (p.sku, i64::from(p.on_hand))).collect();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let bases = vec![sys.order_url(""), format!("http://127.0.0.1:{order2_port}")];
    let clients: Vec<_> = (0..cfg.clients)
        .map(|_| {
            tokio::spawn(client(http.clone(), bases.clone(), cfg.clone(), next.clone(), stop.clone(), tally.clone()))
        })
        .collect();
    let accepted = |t: &Arc<Mutex<Tally>>| t.lock().unwrap().accepted.len();
    eventually("orders flowing", Duration::from_secs(60), || async { accepted(&tally) >= 10 }).await;

    // (a) The leader of the busiest queues, killed.
    let before = leaders(cluster, &queues).await;
    let mut led: BTreeMap<u8, usize> = BTreeMap::new();
    for n in before.values() {
        *led.entry(*n).or_default() += 1;
    }
    let victim = led.iter().max_by_key(|(n, k)| (**k, std::cmp::Reverse(**n))).map(|(n, _)| *n).unwrap();
    let its: Vec<String> = before.iter().filter(|(_, n)| **n == victim).map(|(q, _)| q.clone()).collect();
    let at = accepted(&tally);
    cluster.kill_node(victim).await;
    let killed = Instant::now();
    eventually_some(&format!("new leaders for the queues c{victim} led"), Duration::from_secs(60), || async {
        for q in &its {
            match cluster.leader(q).await {
                Some(n) if n != victim => {}
                _ => return None,
            }
        }
        Some(())
    })
    .await;
    let elected = killed.elapsed();
    tokio::time::sleep(cfg.down.saturating_sub(elected)).await;
    let during = accepted(&tally) - at;
    steps.note(format!(
            "SIGKILL c{victim}, leader of {} of {} work queues; new leaders within {:.1}s; {during} orders accepted while it was down",
            its.len(),
            queues.len(),
        elected.as_secs_f64()
    ));
    cluster.start_node(victim).await;
    back_in_cluster(cluster, victim).await;
    steps.note(format!("c{victim} restarted and back in the cluster"));

    // (b) The leader of the inventory queue, stopped gracefully.
    let inventory = sys.topology().queue(processor_service::inventory::CONSUMER);
    let stopped = leaders(cluster, std::slice::from_ref(&inventory)).await[&inventory];
    let at = accepted(&tally);
    cluster.stop_node(stopped).await;
    tokio::time::sleep(cfg.down).await;
    let during = accepted(&tally) - at;
    let new_leader = leaders(cluster, std::slice::from_ref(&inventory)).await[&inventory];
    steps.note(format!(
            "stopped c{stopped} gracefully (leader of {inventory}, now c{new_leader}); {during} orders accepted while it was down"
    ));
    cluster.start_node(stopped).await;
    back_in_cluster(cluster, stopped).await;
    steps.note(format!("c{stopped} started again and back in the cluster"));

    // (c) The node with the most client connections, cut off by its proxy.
    let (i, open) = proxies.iter().enumerate().map(|(i, p)| (i, p.open_connections())).max_by_key(|(_, o)| *o).unwrap();
    let cut = NODES[i];
    let at = accepted(&tally);
    let refused_before = proxies[i].refused_connections();
    proxies[i].cut();
    eventually("clients reconnected to the other nodes", Duration::from_secs(60), || async {
        proxies.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, p)| p.open_connections()).sum::<usize>() >= open
    })
    .await;
    tokio::time::sleep(cfg.down).await;
    let during = accepted(&tally) - at;
    let refused = proxies[i].refused_connections() - refused_before;
    proxies[i].restore();
    steps.note(format!(
        "cut c{cut} off (it had {open} client connections, the most); they reconnected to the others; \
             {refused} attempts on c{cut} refused; {during} orders accepted while cut"
    ));

    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let settling = Instant::now();
    let orders = sys.pool(Db::Orders).clone();
    let processor = sys.pool(Db::Processor).clone();
    // Settled: every order final, both outboxes drained, every outcome
    // notified. On a timeout, what was still missing and the queues.
    let progress = || async {
        let pending = count(&orders, "SELECT count(*) AS n FROM orders WHERE status = 'pending'").await;
        let unpublished =
            count(&orders, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND dead_at IS NULL").await
                + count(&processor, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND dead_at IS NULL")
                    .await;
        let all = count(&orders, "SELECT count(*) AS n FROM orders").await;
        let notified = count(&processor, "SELECT count(*) AS n FROM notifications WHERE kind <> 'order_shipped'").await;
        (pending, unpublished, all, notified)
    };
    loop {
        let (pending, unpublished, all, notified) = progress().await;
        if pending == 0 && unpublished == 0 && notified >= all {
            break;
        }
        if settling.elapsed() > Duration::from_secs(180) {
            panic!(
                "not settled after 180 s: {pending} of {all} orders pending, {unpublished} outbox rows unpublished, \
                 {notified} notified; steps:\n{}\nqueues (leader, ready, unacked, consumers):\n{}\nwhy dead letters died:\n{}",
                steps
                    .done
                    .iter()
                    .map(|(at, s)| format!("  {:>7.2}s  {s}", at.as_secs_f64()))
                    .collect::<Vec<_>>()
                    .join("\n"),
                cluster.queues(sys.topology().prefix()).await,
                dead_letter_reasons(&sys).await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settle = settling.elapsed();

    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let expectations = Expectations { accepted: tally.accepted.clone(), initial_stock, unroutable: vec![] };
    let verdict = invariants::check(&sys, &expectations).await;
    order2.stop().await;
    processor2.stop().await;
    sys.stop().await;
    ClusterReport {
        default_members,
        members_with_two,
        steps: steps.done,
        accepted: tally.accepted.len(),
        client_retries: tally.retries,
        cancels: tally.cancels,
        connections_per_node: proxies.iter().map(FaultProxy::accepted_connections).collect(),
        settle,
        verdict,
    }
}

/// Members of a new queue declared the way a service with
/// `AMQP_QUORUM_REPLICAS=replicas` declares its queues.
async fn replicas_when_set(cluster: &Cluster, amqp_url: &str, replicas: u16) -> usize {
    let broker = TestBroker::on(amqp_url);
    let topology = broker.topology.clone().with_quorum_replicas(Some(replicas));
    let spec = QueueSpec { consumer: "replicas".into(), bindings: vec![], retry_delays: vec![], delivery_limit: 5 };
    broker.track_in(&topology, &spec);
    let conn = orderflow_broker::connect(amqp_url, "test-replicas").await.unwrap();
    topology.ensure_consumer(&conn, &spec).await.unwrap();
    let _ = conn.close(200, "bye".into()).await;
    cluster.members(&topology.queue("replicas")).await.len()
}

/// The reasons given by the first few dead letters of each consumer: the
/// consumer's own `x-orderflow-error`, or the broker's `x-first-death-reason`
/// (e.g. `delivery_limit`). They are given back to their queue.
async fn dead_letter_reasons(sys: &System) -> String {
    use orderflow_broker::lapin::options::{BasicGetOptions, BasicNackOptions};
    let (_conn, channel) = sys.broker.channel().await;
    let mut out = Vec::new();
    for spec in consumer_specs() {
        let dlq = sys.topology().dead_letter_queue(&spec.consumer);
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut taken = Vec::new();
        while taken.len() < 20 {
            let Ok(Some(msg)) = channel.basic_get(dlq.as_str().into(), BasicGetOptions::default()).await else { break };
            let headers = &msg.delivery.properties;
            let reason = orderflow_broker::header_str(headers, "x-orderflow-error")
                .map(|e| format!("consumer: {e}"))
                .or_else(|| {
                    orderflow_broker::header_str(headers, "x-first-death-reason").map(|r| format!("broker: {r}"))
                })
                .unwrap_or_else(|| "no reason given".into());
            *reasons.entry(reason).or_default() += 1;
            taken.push(msg.delivery.delivery_tag);
        }
        for tag in taken {
            let _ = channel.basic_nack(tag, BasicNackOptions { requeue: true, ..Default::default() }).await;
        }
        if !reasons.is_empty() {
            out.push(format!("  {dlq}: {reasons:?}"));
        }
    }
    out.join("\n")
}
