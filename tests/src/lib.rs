//! The end-to-end harness: a whole orderflow system per test, on its own
//! databases and topology prefix.
//!
//! - [`System`]: services and relays in the test process (fast, the
//!   default) or as real processes of the same programs (for SIGKILL,
//!   SIGTERM and failpoints), optionally behind fault proxies;
//! - [`chaos`]: orders under injected faults, for the test and `make chaos`;
//! - [`invariants`]: what must hold after any run;
//! - [`storm`]: every message delivered twice and out of order;
//! - [`load`]: the open-loop load driver (`loadgen`, `make bench`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use diesel::QueryableByName;
use diesel_async::RunQueryDsl;
use orderflow_db::Pool;
use reqwest::StatusCode;
use serde_json::{Value, json};

pub use orderflow_testkit::{count, eventually, eventually_some};

pub mod chaos;
pub mod cluster;
pub mod invariants;
pub mod load;
pub mod storm;
mod system;
mod webhook;
pub use system::{
    Db, PROBE, PROBE_BINDINGS, Part, RelayHandle, Running, System, UNROUTABLE_EVENT, bin, consumer_specs,
    consumer_specs_with,
};
pub use webhook::WebhookSink;

/// Generous: 2 shared cores can be slow; passing tests return early.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// Retry tiers used by the services under test (short, so tests are quick).
pub const RETRY_DELAYS: &str = "200ms,500ms,1s";

/// A product of the test catalog (price in cents).
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
    /// Payment's limit, cents.
    pub amount_limit: i64,
    pub decline_rate: f64,
    /// Run order-service and processor-service as processes.
    pub services_as_processes: bool,
    /// Relays per service database.
    pub relays_per_db: usize,
    /// Run relays as processes.
    pub relays_as_processes: bool,
    /// Route every broker connection through a fault proxy.
    pub broker_proxy: bool,
    /// Route every database connection of the parts through a fault proxy.
    pub db_proxy: bool,
    /// Declare a queue bound to everything the relays publish (see [`PROBE`]).
    pub probe: bool,
    /// Relays publish to a raw exchange; a shuffler delivers each message
    /// twice, out of order, to the services.
    pub storm: bool,
    /// Environment of relay processes (e.g. `ORDERFLOW_FAILPOINTS`).
    pub relay_env: Vec<(String, String)>,
    pub consumer_concurrency: u16,
    /// More processor-service flags (stages, webhook, ...).
    pub processor_extra: Vec<String>,
    /// Relays keep published outbox rows (for tests that read them back).
    pub keep_published: bool,
    /// Environment of service processes (e.g. `ORDERFLOW_FAILPOINTS`).
    pub service_env: Vec<(String, String)>,
    /// Relay processes serve /metrics on a port of their own.
    pub relay_metrics: bool,
    /// Each relay reaches the broker through a fault proxy of its own
    /// ([`RelayHandle::broker_proxy`]), behind the shared one if there is
    /// one: one relay can be cut off from the broker alone.
    pub relay_broker_proxies: bool,
    /// The broker every part uses instead of the test broker, e.g. a
    /// cluster's nodes (several URLs, comma-separated).
    pub amqp_url: Option<String>,
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
            db_proxy: false,
            probe: false,
            storm: false,
            relay_env: vec![],
            consumer_concurrency: 8,
            processor_extra: vec![],
            keep_published: false,
            service_env: vec![],
            relay_metrics: false,
            relay_broker_proxies: false,
            amqp_url: None,
        }
    }
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

/// An amount in cents as the API writes money: a JSON number in major
/// units with two decimals (`2499` is `24.99`).
pub fn money(cents: i64) -> Value {
    let text = orderflow_contracts::Money::from_minor(cents).to_string();
    Value::Number(text.parse().unwrap())
}

/// An amount the API answered (`24.99`, `"24.99"`), in cents, read exactly.
pub fn cents(v: &Value) -> i64 {
    let text = v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    orderflow_contracts::Money::parse(&text).unwrap_or_else(|e| panic!("{v} is not money: {e}")).minor()
}

/// An order body for `POST /orders`; prices in cents.
pub fn order_body(customer: &str, items: &[(&str, i64, i64)]) -> Value {
    json!({
        "customer_id": customer,
        "items": items.iter().map(|(sku, quantity, price)| json!({"sku": sku, "quantity": quantity, "price": money(*price)})).collect::<Vec<_>>(),
    })
}
