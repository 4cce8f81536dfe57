//! What must hold after any run, faults or not (see README.md, "The
//! promise"): every accepted order reached a final state; no event was lost
//! or parked; stock moved exactly by what the confirmed orders bought; each
//! order's effects (reservation, charge, refund, shipment) match its final
//! state and happened once; one notification per outcome; and every
//! aggregate's events were published in the order written, every version
//! once.
//!
//! The checker only checks what can fail. What a database constraint already
//! enforces is not re-checked (stock buckets balancing and never negative:
//! a CHECK; one payment, one shipment, one reservation per order: primary
//! keys; one notification per order and kind: a UNIQUE). It is split in two:
//! [`collect`] reads a run's [`History`] from the databases and the broker,
//! and [`judge`] is a pure function of it, so its self-test can feed it
//! corrupted histories and see each invariant fail.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Integer, Nullable, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use orderflow_broker::lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use orderflow_broker::lapin::types::FieldTable;
use orderflow_db::Pool;
use orderflow_envelope::Envelope;
use uuid::Uuid;

use crate::{Db, PROBE, System, UNROUTABLE_EVENT, consumer_specs, count};

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
    /// Message ids of events of a type no queue is bound to
    /// ([`UNROUTABLE_EVENT`]), written to the orders outbox during the run.
    pub unroutable: Vec<Uuid>,
}

/// An order as order-service stored it.
#[derive(Debug, Clone, QueryableByName)]
pub struct OrderRow {
    #[diesel(sql_type = Text)]
    pub id: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub tracking_number: Option<String>,
}

/// One line of an order.
#[derive(Debug, Clone, QueryableByName)]
pub struct Line {
    #[diesel(sql_type = Text)]
    pub order_id: String,
    #[diesel(sql_type = Text)]
    pub sku: String,
    #[diesel(sql_type = Integer)]
    pub quantity: i32,
}

#[derive(QueryableByName)]
struct Keyed {
    #[diesel(sql_type = Text)]
    order_id: String,
    #[diesel(sql_type = Text)]
    value: String,
}

/// How often an effect's event is on an order's timeline.
#[derive(Debug, Clone, QueryableByName)]
pub struct TimelineCount {
    #[diesel(sql_type = Text)]
    pub order_id: String,
    #[diesel(sql_type = Text)]
    pub event_type: String,
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

/// A product's stock buckets.
#[derive(Debug, Clone, QueryableByName)]
pub struct Stock {
    #[diesel(sql_type = Text)]
    pub sku: String,
    #[diesel(sql_type = BigInt)]
    pub on_hand: i64,
    #[diesel(sql_type = BigInt)]
    pub reserved: i64,
    #[diesel(sql_type = BigInt)]
    pub shipped: i64,
}

#[derive(QueryableByName)]
struct Id {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

#[derive(QueryableByName)]
struct Parked {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Bool)]
    dead: bool,
}

/// The first copy of a published event, in the order the probe queue got it.
#[derive(Debug, Clone)]
pub struct Published {
    pub message_id: Uuid,
    pub event_type: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub aggregate_version: i64,
}

/// Everything [`judge`] looks at, as [`collect`] read it after a run.
#[derive(Debug, Clone, Default)]
pub struct History {
    pub expectations: Expectations,
    pub orders: Vec<OrderRow>,
    pub lines: Vec<Line>,
    pub stock: Vec<Stock>,
    /// Per order: reservation, payment and shipment status, and tracking number.
    pub reservations: HashMap<String, String>,
    pub payments: HashMap<String, String>,
    pub shipments: HashMap<String, String>,
    pub tracking: HashMap<String, String>,
    /// Timeline counts of the effect events (payment.authorized,
    /// payment.refunded, shipment.created).
    pub effects: Vec<TimelineCount>,
    /// (order, kind) of every notification.
    pub notifications: HashSet<(String, String)>,
    /// "N unpublished rows in the orders outbox" and the like.
    pub parked: Vec<String>,
    /// Message ids of `order.created` events and of those inventory handled.
    pub created: Vec<Uuid>,
    pub handled_by_inventory: HashSet<Uuid>,
    /// What the probe queue got (first copies), if the run had a probe.
    pub published: Option<Vec<Published>>,
    /// Copies dropped as republished duplicates.
    pub republished: usize,
    /// Rows of [`UNROUTABLE_EVENT`] still in the orders outbox: message id,
    /// and whether the row is dead. A missing row was deleted as published.
    pub unroutable_rows: HashMap<Uuid, bool>,
}

async fn load<T: QueryableByName<diesel::pg::Pg> + Send + 'static>(pool: &Pool, sql: &str) -> Vec<T> {
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query(sql).load(&mut conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn keyed(pool: &Pool, sql: &str) -> HashMap<String, String> {
    load::<Keyed>(pool, sql).await.into_iter().map(|r| (r.order_id, r.value)).collect()
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
    judge(&collect(sys, exp).await)
}

/// Reads the run's history from both databases, the dead-letter queues and
/// (if the run had one) the probe queue, which it drains.
pub async fn collect(sys: &System, exp: &Expectations) -> History {
    let (orders_db, processor_db) = (sys.pool(Db::Orders), sys.pool(Db::Processor));
    let mut parked = Vec::new();
    for (name, pool) in [("orders", orders_db), ("processor", processor_db)] {
        let unpublished =
            count(pool, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL AND dead_at IS NULL").await;
        // Rows of an event no queue is bound to are meant to die: judged
        // on their own below.
        let dead = count(
            pool,
            &format!(
                "SELECT count(*) AS n FROM outbox WHERE dead_at IS NOT NULL AND event_type <> '{UNROUTABLE_EVENT}'"
            ),
        )
        .await;
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
    let (published, republished) = if sys.opts.probe {
        let (p, r) = drain_probe(sys).await;
        (Some(p), r)
    } else {
        (None, 0)
    };
    History {
        expectations: exp.clone(),
        orders: load(orders_db, "SELECT id, status, tracking_number FROM orders").await,
        lines: load(orders_db, "SELECT order_id, sku, quantity FROM order_items").await,
        stock: load(
            processor_db,
            "SELECT sku, on_hand::bigint AS on_hand, reserved::bigint AS reserved, shipped::bigint AS shipped FROM products",
        )
        .await,
        reservations: keyed(processor_db, "SELECT order_id, status AS value FROM reservations").await,
        payments: keyed(processor_db, "SELECT order_id, status AS value FROM payments").await,
        shipments: keyed(processor_db, "SELECT order_id, status AS value FROM shipments").await,
        tracking: keyed(processor_db, "SELECT order_id, tracking_number AS value FROM shipments").await,
        effects: load(
            orders_db,
            "SELECT order_id, event_type, count(*) AS n FROM order_timeline \
             WHERE event_type IN ('payment.authorized', 'payment.refunded', 'shipment.created') \
             GROUP BY order_id, event_type",
        )
        .await,
        notifications: load::<Keyed>(processor_db, "SELECT order_id, kind AS value FROM notifications")
            .await
            .into_iter()
            .map(|n| (n.order_id, n.value))
            .collect(),
        parked,
        created: load::<Id>(orders_db, "SELECT message_id AS id FROM order_timeline WHERE event_type = 'order.created'")
            .await
            .into_iter()
            .map(|r| r.id)
            .collect(),
        handled_by_inventory: load::<Id>(processor_db, "SELECT message_id AS id FROM inbox WHERE consumer = 'inventory'")
            .await
            .into_iter()
            .map(|r| r.id)
            .collect(),
        published,
        republished,
        unroutable_rows: load::<Parked>(
            orders_db,
            &format!(
                "SELECT message_id AS id, dead_at IS NOT NULL AS dead FROM outbox WHERE event_type = '{UNROUTABLE_EVENT}'"
            ),
        )
        .await
        .into_iter()
        .map(|r| (r.id, r.dead))
        .collect(),
    }
}

/// Every invariant, judged on `h` alone.
pub fn judge(h: &History) -> Verdict {
    let exp = &h.expectations;
    let mut v = Verdict::default();

    let status: HashMap<&str, &str> = h.orders.iter().map(|o| (o.id.as_str(), o.status.as_str())).collect();
    let missing: Vec<String> = exp
        .accepted
        .iter()
        .filter(|id| !status.contains_key(id.as_str()))
        .map(|id| format!("{id} accepted but not stored"))
        .collect();
    v.add(
        "every accepted order is stored",
        missing,
        format!("{} accepted, {} stored", exp.accepted.len(), h.orders.len()),
    );

    let pending: Vec<String> =
        h.orders.iter().filter(|o| o.status == "pending").map(|o| format!("{} still pending", o.id)).collect();
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &h.orders {
        *by_status.entry(o.status.as_str()).or_default() += 1;
    }
    v.add("every order reached a final state", pending, format!("{by_status:?}"));

    // Lost or parked: nothing unpublished or dead in either outbox, nothing
    // in any dead-letter queue, and inventory saw every order.created.
    let mut parked = h.parked.clone();
    let unseen = h.created.iter().filter(|c| !h.handled_by_inventory.contains(c)).count();
    if unseen > 0 {
        parked.push(format!("{unseen} order.created never handled by inventory"));
    }
    v.add(
        "no event lost or parked",
        parked,
        format!("{} order.created all handled, outboxes and DLQs empty", h.created.len()),
    );

    // Stock moved exactly by what the confirmed orders bought; nothing is
    // left reserved once every order is final. (The buckets balancing is a
    // CHECK constraint: not re-checked.)
    let mut bought: HashMap<&str, i64> = HashMap::new();
    for line in &h.lines {
        if status.get(line.order_id.as_str()) == Some(&"confirmed") {
            *bought.entry(line.sku.as_str()).or_default() += i64::from(line.quantity);
        }
    }
    let mut moved = Vec::new();
    for p in &h.stock {
        if p.reserved != 0 {
            moved.push(format!("{}: {} still reserved", p.sku, p.reserved));
        }
        let sold = bought.get(p.sku.as_str()).copied().unwrap_or(0);
        if p.shipped != sold {
            moved.push(format!("{}: shipped {} but confirmed orders bought {sold}", p.sku, p.shipped));
        }
        if let Some(initial) = exp.initial_stock.get(&p.sku)
            && p.on_hand + p.shipped != *initial
        {
            moved.push(format!("{}: on hand {} + shipped {} != initial {initial}", p.sku, p.on_hand, p.shipped));
        }
    }
    let shipped_total: i64 = h.stock.iter().map(|p| p.shipped).sum();
    v.add(
        "stock moved exactly by confirmed orders",
        moved,
        format!("{} products, {shipped_total} units shipped", h.stock.len()),
    );

    // Effects: consistent with the final state, and each effect's event
    // recorded once (two charges would be two payment.authorized events
    // with different message ids; the primary keys cannot see that).
    let mut wrong = Vec::new();
    for t in h.effects.iter().filter(|t| t.n > 1) {
        wrong.push(format!("{}: {} x{}", t.order_id, t.event_type, t.n));
    }
    for o in &h.orders {
        let (r, p, s) = (
            h.reservations.get(&o.id).map(String::as_str),
            h.payments.get(&o.id).map(String::as_str),
            h.shipments.get(&o.id).map(String::as_str),
        );
        let ok = match o.status.as_str() {
            "confirmed" => {
                r == Some("shipped")
                    && p == Some("authorized")
                    && s == Some("created")
                    && o.tracking_number.as_ref() == h.tracking.get(&o.id)
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
    let charged = h.payments.values().filter(|p| *p == "authorized" || *p == "refunded").count();
    let refunded = h.payments.values().filter(|p| *p == "refunded").count();
    v.add(
        "each order's effects match its state, once",
        wrong,
        format!("{charged} charged, {refunded} refunded, {} shipments", h.shipments.len()),
    );

    // One notification per outcome. ((order, kind) is UNIQUE in the table:
    // nobody is told the same thing twice; that is not re-checked.)
    let notes = &h.notifications;
    let mut unnotified = Vec::new();
    for o in h.orders.iter().filter(|o| o.status != "pending") {
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
    v.add("one notification per order and outcome", unnotified, format!("{} notifications", notes.len()));

    if let Some(published) = &h.published {
        let (problems, detail) = in_written_order(published, h.republished);
        v.add("every aggregate's events in written order, every version once", problems, detail);
    }

    // An event no queue is bound to is parked dead where it was written,
    // never marked published (a return credited to another row would
    // delete it as published: lost without a trace).
    let published_ids: HashSet<Uuid> = h.published.iter().flatten().map(|p| p.message_id).collect();
    let mut unparked = Vec::new();
    for id in &exp.unroutable {
        match h.unroutable_rows.get(id) {
            None => unparked.push(format!("{id}: row gone, marked published although no queue is bound")),
            Some(false) => unparked.push(format!("{id}: not parked dead")),
            Some(true) => {}
        }
        if published_ids.contains(id) {
            unparked.push(format!("{id}: reached the probe"));
        }
    }
    v.add(
        "every unroutable event parked dead, never published",
        unparked,
        format!("{} unroutable events, all dead in the outbox", exp.unroutable.len()),
    );
    v
}

/// Per aggregate (type and id: an order's order, reservation, payment and
/// shipment are four aggregates), the first copies must arrive with versions
/// 1, 2, 3, ... exactly: a version out of order, repeated under another
/// message id, or missing (a lost event, or a gap) fails. Events of
/// different aggregates of one order (a refund and a stock release) are
/// written by unrelated transactions and have no order to keep.
fn in_written_order(published: &[Published], republished: usize) -> (Vec<String>, String) {
    let mut versions: HashMap<(&str, &str), Vec<(i64, &str)>> = HashMap::new();
    for e in published {
        versions
            .entry((e.aggregate_type.as_str(), e.aggregate_id.as_str()))
            .or_default()
            .push((e.aggregate_version, e.event_type.as_str()));
    }
    let mut problems = Vec::new();
    for ((kind, id), seen) in &versions {
        let expected: Vec<i64> = (1..=seen.len() as i64).collect();
        let got: Vec<i64> = seen.iter().map(|(v, _)| *v).collect();
        if got != expected {
            let shown: Vec<String> = seen.iter().map(|(v, t)| format!("{t} v{v}")).collect();
            problems.push(format!("{kind} {id}: published {}", shown.join(", ")));
        }
    }
    problems.sort();
    let detail = format!(
        "{} events of {} aggregates, {republished} republished copies dropped, versions 1..n in order",
        published.len(),
        versions.len()
    );
    (problems, detail)
}

/// Drains the probe queue: the first copy of each message in arrival order
/// (later copies, republished after a relay died before marking, are
/// dropped as a consumer's inbox would), and how many copies were dropped.
async fn drain_probe(sys: &System) -> (Vec<Published>, usize) {
    let (_conn, channel) = sys.broker.channel().await;
    let queue = sys.relay_topology().queue(PROBE);
    let mut seen = HashSet::new();
    let mut published = Vec::new();
    let mut duplicates = 0usize;
    while let Some(msg) = channel.basic_get(queue.as_str().into(), BasicGetOptions::default()).await.unwrap() {
        let _ = msg.delivery.ack(BasicAckOptions::default()).await;
        let Ok(env) = Envelope::from_slice(&msg.delivery.data) else { continue };
        if !seen.insert(env.message_id) {
            duplicates += 1;
            continue;
        }
        published.push(Published {
            message_id: env.message_id,
            event_type: env.event_type,
            aggregate_type: env.aggregate_type,
            aggregate_id: env.aggregate_id,
            aggregate_version: env.aggregate_version,
        });
    }
    (published, duplicates)
}

#[cfg(test)]
mod self_test {
    //! The checker fails on corrupted histories: each corruption below breaks
    //! one promise, and exactly that invariant must fail while a clean
    //! history holds them all.
    use super::*;

    fn order(id: &str, status: &str, tracking: Option<&str>) -> OrderRow {
        OrderRow { id: id.into(), status: status.into(), tracking_number: tracking.map(Into::into) }
    }

    fn event(kind: &str, id: &str, version: i64, event_type: &str) -> Published {
        Published {
            message_id: Uuid::now_v7(),
            event_type: event_type.into(),
            aggregate_type: kind.into(),
            aggregate_id: id.into(),
            aggregate_version: version,
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// A confirmed order (2 x SKU-1), one rejected by inventory, one
    /// cancelled after payment (stock released, payment refunded).
    fn clean() -> History {
        let created: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        let unroutable = Uuid::now_v7();
        History {
            expectations: Expectations {
                accepted: vec!["a".into(), "b".into(), "c".into()],
                initial_stock: [("SKU-1".to_owned(), 10)].into(),
                unroutable: vec![unroutable],
            },
            orders: vec![
                order("a", "confirmed", Some("OF1")),
                order("b", "failed", None),
                order("c", "cancelled", None),
            ],
            lines: vec![
                Line { order_id: "a".into(), sku: "SKU-1".into(), quantity: 2 },
                Line { order_id: "b".into(), sku: "SKU-1".into(), quantity: 50 },
                Line { order_id: "c".into(), sku: "SKU-1".into(), quantity: 1 },
            ],
            stock: vec![Stock { sku: "SKU-1".into(), on_hand: 8, reserved: 0, shipped: 2 }],
            reservations: map(&[("a", "shipped"), ("b", "rejected"), ("c", "released")]),
            payments: map(&[("a", "authorized"), ("c", "refunded")]),
            shipments: map(&[("a", "created")]),
            tracking: map(&[("a", "OF1")]),
            effects: vec![
                TimelineCount { order_id: "a".into(), event_type: "payment.authorized".into(), n: 1 },
                TimelineCount { order_id: "a".into(), event_type: "shipment.created".into(), n: 1 },
                TimelineCount { order_id: "c".into(), event_type: "payment.refunded".into(), n: 1 },
            ],
            notifications: [
                ("a", "order_shipped"),
                ("a", "order_confirmed"),
                ("b", "order_failed"),
                ("c", "order_cancelled"),
            ]
            .iter()
            .map(|(o, k)| ((*o).to_owned(), (*k).to_owned()))
            .collect(),
            parked: vec![],
            handled_by_inventory: created.iter().copied().collect(),
            created,
            published: Some(vec![
                event("order", "a", 1, "order.created"),
                event("order", "b", 1, "order.created"),
                event("reservation", "a", 1, "inventory.reserved"),
                event("order", "c", 1, "order.created"),
                event("reservation", "b", 1, "inventory.rejected"),
                event("payment", "a", 1, "payment.authorized"),
                event("reservation", "c", 1, "inventory.reserved"),
                event("shipment", "a", 1, "shipment.created"),
                event("order", "b", 2, "order.failed"),
                event("payment", "c", 1, "payment.authorized"),
                event("order", "a", 2, "order.confirmed"),
                event("order", "c", 2, "order.cancelled"),
                event("reservation", "c", 2, "inventory.released"),
                event("payment", "c", 2, "payment.refunded"),
            ]),
            republished: 0,
            unroutable_rows: [(unroutable, true)].into(),
        }
    }

    fn failed(h: &History) -> Vec<&'static str> {
        judge(h).checks.iter().filter(|c| !c.held).map(|c| c.name).collect()
    }

    #[test]
    fn a_clean_history_holds_every_invariant() {
        let verdict = judge(&clean());
        assert!(verdict.all_held(), "{}", verdict.render());
        assert_eq!(verdict.checks.len(), 8);
    }

    #[test]
    fn each_corruption_fails_its_invariant_and_only_it() {
        type Corrupt = fn(&mut History);
        let cases: Vec<(&str, Corrupt)> = vec![
            ("every accepted order is stored", |h| h.expectations.accepted.push("lost".into())),
            ("every order reached a final state", |h| h.orders[1].status = "pending".into()),
            ("no event lost or parked", |h| h.parked.push("1 messages in x.payment.dlq".into())),
            ("no event lost or parked", |h| {
                h.handled_by_inventory.remove(&h.created[0]);
            }),
            ("stock moved exactly by confirmed orders", |h| h.stock[0].shipped = 3),
            ("stock moved exactly by confirmed orders", |h| {
                h.stock[0].reserved = 1;
                h.stock[0].on_hand = 7;
            }),
            ("stock moved exactly by confirmed orders", |h| h.stock[0].on_hand = 9),
            ("each order's effects match its state, once", |h| h.effects[0].n = 2),
            ("each order's effects match its state, once", |h| {
                h.payments.insert("b".into(), "authorized".into());
            }),
            ("each order's effects match its state, once", |h| {
                h.shipments.insert("c".into(), "created".into());
            }),
            ("each order's effects match its state, once", |h| {
                h.tracking.insert("a".into(), "OF2".into());
            }),
            ("one notification per order and outcome", |h| {
                h.notifications.remove(&("b".to_owned(), "order_failed".to_owned()));
            }),
            ("one notification per order and outcome", |h| {
                h.notifications.insert(("b".into(), "order_confirmed".into()));
            }),
            ("one notification per order and outcome", |h| {
                h.notifications.remove(&("a".to_owned(), "order_shipped".to_owned()));
            }),
            // An order's events published out of order: order.created of
            // order a after its order.confirmed.
            ("every aggregate's events in written order, every version once", |h| {
                if let Some(p) = h.published.as_mut() {
                    let created = p.remove(0);
                    p.push(created);
                }
            }),
            // A lost event: a version missing.
            ("every aggregate's events in written order, every version once", |h| {
                if let Some(p) = h.published.as_mut() {
                    p.retain(|e| e.event_type != "inventory.reserved" || e.aggregate_id != "c");
                }
            }),
            // An unroutable row deleted as if it had been published.
            ("every unroutable event parked dead, never published", |h| h.unroutable_rows.clear()),
            // An unroutable row left neither published nor dead.
            ("every unroutable event parked dead, never published", |h| {
                for dead in h.unroutable_rows.values_mut() {
                    *dead = false;
                }
            }),
            // The same version twice under two message ids (written twice).
            ("every aggregate's events in written order, every version once", |h| {
                if let Some(p) = h.published.as_mut() {
                    let again = Published { message_id: Uuid::now_v7(), ..p[5].clone() };
                    p.push(again);
                }
            }),
        ];
        for (i, (invariant, corrupt)) in cases.into_iter().enumerate() {
            let mut h = clean();
            corrupt(&mut h);
            assert_eq!(failed(&h), [invariant], "corruption #{i}:\n{}", judge(&h).render());
        }
    }
}
