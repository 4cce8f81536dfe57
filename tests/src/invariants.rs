//! What must hold after any run, faults or not (see DESIGN.md, "The
//! promise"): every accepted order reached a final state; no event was lost
//! or parked; stock bookkeeping balances; each order was charged, refunded
//! and shipped at most once, consistently with its final state; one
//! notification per outcome; and each service's events about one order were
//! published in the order written.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Integer, Nullable, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use orderflow_broker::lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use orderflow_broker::lapin::types::FieldTable;
use orderflow_db::Pool;
use orderflow_envelope::Envelope;
use uuid::Uuid;

use crate::{Db, PROBE, System, consumer_specs, count};

/// One invariant and whether it held.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub held: bool,
    /// What was measured, or what broke.
    pub detail: String,
}

/// All checks of a run.
#[derive(Debug, Clone, Default)]
pub struct Verdict {
    pub checks: Vec<Check>,
}

impl Verdict {
    fn add(&mut self, name: &'static str, problems: Vec<String>, measured: String) {
        let held = problems.is_empty();
        let detail = if held {
            measured
        } else {
            let shown: Vec<String> = problems.iter().take(8).cloned().collect();
            format!(
                "{} problem(s): {}{}",
                problems.len(),
                shown.join("; "),
                if problems.len() > 8 { "; ..." } else { "" }
            )
        };
        self.checks.push(Check { name, held, detail });
    }

    pub fn all_held(&self) -> bool {
        self.checks.iter().all(|c| c.held)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let _ = writeln!(out, "  [{}] {:<44} {}", if c.held { "held" } else { "FAIL" }, c.name, c.detail);
        }
        out
    }
}

/// What the run expects.
#[derive(Debug, Clone, Default)]
pub struct Expectations {
    /// Orders the clients got a 201 for.
    pub accepted: Vec<String>,
    /// Stock on hand per SKU when the run started.
    pub initial_stock: HashMap<String, i64>,
}

#[derive(QueryableByName)]
struct OrderRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = Nullable<Text>)]
    tracking_number: Option<String>,
}

#[derive(QueryableByName)]
struct Line {
    #[diesel(sql_type = Text)]
    order_id: String,
    #[diesel(sql_type = Text)]
    sku: String,
    #[diesel(sql_type = Integer)]
    quantity: i32,
}

#[derive(QueryableByName)]
struct Keyed {
    #[diesel(sql_type = Text)]
    order_id: String,
    #[diesel(sql_type = Text)]
    value: String,
}

#[derive(QueryableByName)]
struct TimelineCount {
    #[diesel(sql_type = Text)]
    order_id: String,
    #[diesel(sql_type = Text)]
    event_type: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Stock {
    #[diesel(sql_type = Text)]
    sku: String,
    #[diesel(sql_type = BigInt)]
    on_hand: i64,
    #[diesel(sql_type = BigInt)]
    reserved: i64,
    #[diesel(sql_type = BigInt)]
    shipped: i64,
    #[diesel(sql_type = BigInt)]
    received: i64,
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

async fn load<T: QueryableByName<diesel::pg::Pg> + Send + 'static>(pool: &Pool, sql: &str) -> Vec<T> {
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query(sql).load(&mut conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

fn keyed(rows: Vec<Keyed>) -> HashMap<String, String> {
    rows.into_iter().map(|r| (r.order_id, r.value)).collect()
}

/// Ready messages in a queue (0 if it does not exist).
async fn depth(sys: &System, queue: &str) -> u32 {
    let (_conn, channel) = sys.broker.channel().await;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    channel.queue_declare(queue.into(), passive, FieldTable::default()).await.map_or(0, |q| q.message_count())
}

/// Runs every check against the system's databases and broker. Call it when
/// the system is quiet (no orders pending, outboxes drained).
pub async fn check(sys: &System, exp: &Expectations) -> Verdict {
    let (orders_db, processor_db) = (sys.pool(Db::Orders), sys.pool(Db::Processor));
    let mut v = Verdict::default();

    let orders: Vec<OrderRow> = load(orders_db, "SELECT id, status, tracking_number FROM orders").await;
    let status: HashMap<&str, &str> = orders.iter().map(|o| (o.id.as_str(), o.status.as_str())).collect();
    let missing: Vec<String> = exp
        .accepted
        .iter()
        .filter(|id| !status.contains_key(id.as_str()))
        .map(|id| format!("{id} accepted but not stored"))
        .collect();
    v.add(
        "every accepted order is stored",
        missing,
        format!("{} accepted, {} stored", exp.accepted.len(), orders.len()),
    );

    let pending: Vec<String> =
        orders.iter().filter(|o| o.status == "pending").map(|o| format!("{} still pending", o.id)).collect();
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &orders {
        *by_status.entry(o.status.as_str()).or_default() += 1;
    }
    v.add("every order reached a final state", pending, format!("{by_status:?}"));

    // Lost or parked: nothing unpublished or dead in either outbox, nothing
    // in any dead-letter queue, and inventory saw every order.created.
    let mut parked = Vec::new();
    for (name, pool) in [("orders", orders_db), ("processor", processor_db)] {
        let unpublished =
            count(pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND dead_at IS NULL").await;
        let dead = count(pool, "SELECT count(*) AS n FROM outbox WHERE dead_at IS NOT NULL").await;
        if unpublished > 0 {
            parked.push(format!("{unpublished} unpublished rows in the {name} outbox"));
        }
        if dead > 0 {
            parked.push(format!("{dead} dead rows in the {name} outbox"));
        }
    }
    for spec in consumer_specs() {
        let dlq = sys.topology().dead_letter_queue(&spec.consumer);
        let n = depth(sys, &dlq).await;
        if n > 0 {
            parked.push(format!("{n} messages in {dlq}"));
        }
    }
    let created: Vec<Id> =
        load(orders_db, "SELECT message_id AS id FROM order_timeline WHERE event_type = 'order.created'").await;
    let seen: HashSet<Uuid> =
        load::<Id>(processor_db, "SELECT message_id AS id FROM inbox WHERE consumer = 'inventory'")
            .await
            .into_iter()
            .map(|r| r.id)
            .collect();
    let unseen = created.iter().filter(|c| !seen.contains(&c.id)).count();
    if unseen > 0 {
        parked.push(format!("{unseen} order.created never handled by inventory"));
    }
    v.add(
        "no event lost or parked",
        parked,
        format!("{} order.created all handled, outboxes and DLQs empty", created.len()),
    );

    // Stock: balanced in every product, nothing left reserved, and what
    // shipped is exactly what the confirmed orders bought.
    let stock: Vec<Stock> = load(
        processor_db,
        "SELECT sku, on_hand::bigint AS on_hand, reserved::bigint AS reserved, shipped::bigint AS shipped, received FROM products",
    )
    .await;
    let lines: Vec<Line> = load(orders_db, "SELECT order_id, sku, quantity FROM order_items").await;
    let mut bought: HashMap<&str, i64> = HashMap::new();
    for line in &lines {
        if status.get(line.order_id.as_str()) == Some(&"confirmed") {
            *bought.entry(line.sku.as_str()).or_default() += i64::from(line.quantity);
        }
    }
    let mut unbalanced = Vec::new();
    for p in &stock {
        if p.on_hand + p.reserved + p.shipped != p.received || p.on_hand < 0 {
            unbalanced.push(format!("{}: {} + {} + {} != {}", p.sku, p.on_hand, p.reserved, p.shipped, p.received));
        }
        if p.reserved != 0 {
            unbalanced.push(format!("{}: {} still reserved", p.sku, p.reserved));
        }
        let sold = bought.get(p.sku.as_str()).copied().unwrap_or(0);
        if p.shipped != sold {
            unbalanced.push(format!("{}: shipped {} but confirmed orders bought {sold}", p.sku, p.shipped));
        }
        if let Some(initial) = exp.initial_stock.get(&p.sku)
            && p.on_hand + p.shipped != *initial
        {
            unbalanced.push(format!("{}: on hand {} + shipped {} != initial {initial}", p.sku, p.on_hand, p.shipped));
        }
    }
    let shipped_total: i64 = stock.iter().map(|p| p.shipped).sum();
    v.add("stock bookkeeping balances", unbalanced, format!("{} products, {shipped_total} units shipped", stock.len()));

    // Effects: at most once, and consistent with the final state.
    let reservations = keyed(load(processor_db, "SELECT order_id, status AS value FROM reservations").await);
    let payments = keyed(load(processor_db, "SELECT order_id, status AS value FROM payments").await);
    let shipments = keyed(load(processor_db, "SELECT order_id, status AS value FROM shipments").await);
    let tracking = keyed(load(processor_db, "SELECT order_id, tracking_number AS value FROM shipments").await);
    let timeline: Vec<TimelineCount> = load(
        orders_db,
        "SELECT order_id, event_type, count(*) AS n FROM order_timeline \
         WHERE event_type IN ('payment.authorized', 'payment.refunded', 'shipment.created') GROUP BY order_id, event_type",
    )
    .await;
    let mut wrong = Vec::new();
    for t in timeline.iter().filter(|t| t.n > 1) {
        wrong.push(format!("{}: {} x{}", t.order_id, t.event_type, t.n));
    }
    for o in &orders {
        let (r, p, s) = (
            reservations.get(&o.id).map(String::as_str),
            payments.get(&o.id).map(String::as_str),
            shipments.get(&o.id).map(String::as_str),
        );
        let ok = match o.status.as_str() {
            "confirmed" => {
                r == Some("shipped")
                    && p == Some("authorized")
                    && s == Some("created")
                    && o.tracking_number.as_ref() == tracking.get(&o.id)
            }
            // Failed or cancelled (a cancel can win after the processor
            // already rejected or declined the order): nothing is still
            // held, nothing is charged, nothing stays shipped.
            "failed" | "cancelled" => {
                !matches!(r, None | Some("pending" | "reserved" | "shipped"))
                    && !matches!(p, Some("authorized" | "pending"))
                    && matches!(s, None | Some("voided"))
                    && (o.status == "cancelled" || p != Some("refunded"))
            }
            _ => true,
        };
        if !ok {
            wrong.push(format!("{} {}: reservation {r:?}, payment {p:?}, shipment {s:?}", o.id, o.status));
        }
    }
    let charged = payments.values().filter(|p| *p == "authorized" || *p == "refunded").count();
    let refunded = payments.values().filter(|p| *p == "refunded").count();
    v.add(
        "each order charged, refunded and shipped at most once",
        wrong,
        format!("{charged} charged, {refunded} refunded, {} shipments", shipments.len()),
    );

    let notes: HashSet<(String, String)> =
        load::<Keyed>(processor_db, "SELECT order_id, kind AS value FROM notifications")
            .await
            .into_iter()
            .map(|n| (n.order_id, n.value))
            .collect();
    let mut unnotified = Vec::new();
    for o in orders.iter().filter(|o| o.status != "pending") {
        let outcome = format!("order_{}", o.status);
        if !notes.contains(&(o.id.clone(), outcome.clone())) {
            unnotified.push(format!("{} {}: no {outcome} notification", o.id, o.status));
        }
        for other in ["order_confirmed", "order_failed", "order_cancelled"] {
            if other != outcome && notes.contains(&(o.id.clone(), other.to_owned())) {
                unnotified.push(format!("{} {}: also told {other}", o.id, o.status));
            }
        }
        if o.status == "confirmed" && !notes.contains(&(o.id.clone(), "order_shipped".to_owned())) {
            unnotified.push(format!("{} confirmed: no order_shipped notification", o.id));
        }
    }
    // (order, kind) is unique in the table: nobody is told the same thing twice.
    v.add("one notification per order and outcome", unnotified, format!("{} notifications", notes.len()));

    if sys.opts.probe {
        let (order, detail) = published_in_order(sys).await;
        v.add("each service's events per order in written order", order, detail);
    }
    v
}

/// Drains the probe queue and checks, per aggregate (an order's order,
/// reservation, payment and shipment), that the first copy of each event
/// arrived in the order written: its aggregate versions only go up. Later
/// copies (republished after a relay died before marking) are dropped first,
/// as a consumer's inbox would. Events of different aggregates of one order
/// (a refund and a stock release) are written by unrelated transactions and
/// have no order to keep.
async fn published_in_order(sys: &System) -> (Vec<String>, String) {
    let (_conn, channel) = sys.broker.channel().await;
    let queue = sys.relay_topology().queue(PROBE);
    let mut seen = HashSet::new();
    let (mut total, mut duplicates) = (0usize, 0usize);
    let mut last: HashMap<(String, String), (i64, String)> = HashMap::new();
    let mut problems = Vec::new();
    while let Some(msg) = channel.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap() {
        let _ = msg.delivery.ack(BasicAckOptions::default()).await;
        let Ok(env) = Envelope::from_slice(&msg.delivery.data) else { continue };
        total += 1;
        if !seen.insert(env.message_id) {
            duplicates += 1;
            continue;
        }
        let key = (env.aggregate_type.clone(), env.aggregate_id.clone());
        if let Some((previous, previous_type)) = last.get(&key)
            && env.aggregate_version <= *previous
        {
            problems.push(format!(
                "{} {}: {} (version {}) published after {previous_type} (version {previous})",
                env.aggregate_type, env.aggregate_id, env.event_type, env.aggregate_version
            ));
        }
        last.insert(key, (env.aggregate_version, env.event_type.clone()));
    }
    (problems, format!("{total} published, {duplicates} republished copies dropped, versions in order"))
}
