//! The operator console: server-rendered pages under `/console` on the
//! relay's HTTP port (`RELAY_METRICS_ADDR`), for what `status`, `replay`,
//! `replays` and `dlq` do on the command line.
//!
//! - `GET /console`: the outbox of the relay's database (backlog, oldest
//!   unpublished age, dead rows by event type and by last error, relays,
//!   recent replays), with a replay form per dead event type;
//! - `GET /console/dlq`: each consumer's dead-letter queue grouped by error,
//!   with requeue forms; `GET /console/dlq/{consumer}`: its dead letters;
//! - `GET /console/orders/{id}`: one order's journey: its outbox rows, the
//!   inbox entries linked to them, the dead letters that name it;
//! - `POST /console/replay` and `POST /console/dlq/{consumer}/requeue`: the
//!   repairs, recorded in `outbox_replays` exactly as the CLI records them.
//!
//! Actions need the relay's `RELAY_ADMIN_TOKEN`, given as the `token` form
//! field (the forms have one) or as `Authorization: Bearer <token>`. A token
//! that only travels in the form body (never a cookie) also makes the forms
//! useless to a cross-site request forgery. Without a configured token the
//! console is read-only: no action forms, and actions answer 403.
//!
//! Inspecting a dead-letter queue takes its messages without acking them and
//! gives them back by closing the channel, as `dlq show` does: dead-letter
//! queues have a practically unlimited delivery limit, so nothing is dropped.
//! While a page is being built, another reader sees those messages as
//! in flight.

use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use anyhow::Context;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use orderflow_broker::header_str;
use orderflow_broker::lapin::message::Delivery;
use orderflow_db::Conn;
use orderflow_outbox::admin::{self, Candidate, Scope, Selector};
use orderflow_web::{AdminToken, FieldError, Problem};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};

use crate::cli::{BrokerTarget, ConsoleArgs, DbTarget, DlqRequeueArgs, Record};

/// Longest a page or an action may take (database and broker included);
/// past it the console answers 503 instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(20);
/// Dead letters read per queue for a page.
const DLQ_PAGE_LIMIT: usize = 500;
/// Rows, groups and entries shown per table.
const ROWS_LIMIT: i64 = 500;
/// The payload field that names an order in events about other aggregates.
const ORDER_FIELD: &str = "order_id";
/// Longest operator name and reason accepted.
const MAX_OPERATOR: usize = 100;
const MAX_REASON: usize = 1000;

/// What the console's handlers share.
#[derive(Debug, Clone)]
pub(crate) struct Console {
    database_url: String,
    broker: BrokerTarget,
    token: AdminToken,
    consumers: Vec<String>,
}

impl Console {
    /// The console of a relay on `database_url` and the broker `broker`.
    /// Fails when the consumer catalog file cannot be read.
    pub(crate) fn new(database_url: String, broker: BrokerTarget, args: ConsoleArgs) -> anyhow::Result<Self> {
        let consumers = args.consumers.resolve()?.into_iter().map(|c| c.name).collect();
        Ok(Self { database_url, broker, token: args.admin_token.unwrap_or_default(), consumers })
    }

    /// Whether actions are possible at all (a token is configured).
    fn writable(&self) -> bool {
        self.token.is_set()
    }

    async fn db(&self) -> anyhow::Result<Conn> {
        Ok(orderflow_db::establish(&self.database_url).await?)
    }
}

/// Registers the console's routes under `/console`.
pub(crate) fn configure(console: Console) -> impl Fn(&mut web::ServiceConfig) + Clone {
    let data = web::Data::new(console);
    move |cfg: &mut web::ServiceConfig| {
        cfg.app_data(data.clone()).service(
            web::scope("/console")
                .route("", web::get().to(overview))
                .route("/", web::get().to(overview))
                .route("/dlq", web::get().to(dead_letters))
                .route("/dlq/{consumer}", web::get().to(consumer_dead_letters))
                .route("/dlq/{consumer}/requeue", web::post().to(requeue))
                .route("/orders", web::get().to(find_order))
                .route("/orders/{id}", web::get().to(order))
                .route("/replay", web::post().to(replay)),
        );
    }
}

/// Runs `work` within [`TIMEOUT`]; a failure or timeout is a 503 naming the cause.
async fn bounded<T>(what: &str, work: impl Future<Output = anyhow::Result<T>>) -> Result<T, Problem> {
    match tokio::time::timeout(TIMEOUT, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => {
            tracing::warn!(error = %format!("{e:#}"), "console: {what} failed");
            Err(Problem::unavailable(format!("{what} failed: {e:#}")))
        }
        Err(_) => {
            tracing::warn!("console: {what} took longer than {TIMEOUT:?}");
            Err(Problem::unavailable(format!("{what} took longer than {}s", TIMEOUT.as_secs())))
        }
    }
}

// ---------------------------------------------------------------- rendering

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0 2em 2em;color:#222}\
nav{padding:.8em 0;border-bottom:1px solid #ccc;margin-bottom:1em}nav a{margin-right:1.2em}\
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}\
th{background:#f4f4f4}td.num{text-align:right}code,pre{font-size:12px}pre{white-space:pre-wrap;word-break:break-all;max-width:48em;margin:0}\
.dead{color:#b00;font-weight:600}.published{color:#070}.pending{color:#a60}\
.note{background:#fff8dc;border:1px solid #e8d890;padding:.4em .8em}.ok{background:#e9f7e9;border:1px solid #9c9;padding:.4em .8em}\
form.action{display:flex;gap:.4em;flex-wrap:wrap;margin:0}form.action input[name=reason]{min-width:16em}";

/// Encodes a path segment (an order id or a consumer name) for a link.
const SEGMENT: &AsciiSet = &CONTROLS.add(b' ').add(b'"').add(b'#').add(b'%').add(b'/').add(b'<').add(b'>').add(b'?');

fn order_link(id: &str) -> String {
    format!("/console/orders/{}", utf8_percent_encode(id, SEGMENT))
}

fn consumer_link(consumer: &str) -> String {
    format!("/console/dlq/{}", utf8_percent_encode(consumer, SEGMENT))
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()).unwrap_or_default()
}

/// A whole page; `console` decides whether the read-only note shows.
fn page(console: &Console, title: &str, body: Markup) -> HttpResponse {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · outbox-relay console" }
                style { (PreEscaped(CSS)) }
            }
            body {
                nav {
                    a href="/console" { "Outbox" }
                    a href="/console/dlq" { "Dead letters" }
                    form method="get" action="/console/orders" style="display:inline" {
                        input type="text" name="id" placeholder="order id" required;
                        " "
                        button type="submit" { "Order journey" }
                    }
                }
                @if !console.writable() {
                    p.note id="read-only" {
                        "Read-only: this relay has no RELAY_ADMIN_TOKEN, so replays and requeues are off."
                    }
                }
                h1 { (title) }
                (body)
            }
        }
    };
    html_response(HttpResponse::Ok(), markup)
}

fn html_response(mut builder: actix_web::HttpResponseBuilder, markup: Markup) -> HttpResponse {
    builder
        .content_type("text/html; charset=utf-8")
        // No scripts, no framing (clickjacking), forms post only here.
        .insert_header((
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
            ),
        ))
        .insert_header((header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        .insert_header((header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")))
        .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .body(markup.into_string())
}

/// The who/why/token fields every action form carries.
fn action_fields(button: &str) -> Markup {
    html! {
        input type="text" name="reason" placeholder="reason (required)" required maxlength=(MAX_REASON);
        input type="text" name="operator" placeholder="operator (required)" required maxlength=(MAX_OPERATOR);
        input type="password" name="token" placeholder="RELAY_ADMIN_TOKEN" required autocomplete="off";
        button type="submit" { (button) }
    }
}

fn state(row: &Candidate) -> Markup {
    if row.dead_at.is_some() {
        html! { span.dead { "dead" } }
    } else if row.published_at.is_some() {
        html! { span.published { "published" } }
    } else if row.attempts > 0 {
        html! { span.pending { "pending (backing off)" } }
    } else {
        html! { span.pending { "pending" } }
    }
}

fn rows_table(rows: &[Candidate]) -> Markup {
    html! {
        table id="outbox-rows" {
            tr { th { "id" } th { "event type" } th { "aggregate" } th { "message id" } th { "state" }
                 th { "attempts" } th { "last error" } th { "written" } th { "published / dead" } }
            @for r in rows {
                tr data-row-id=(r.id) {
                    td.num { (r.id) }
                    td { (r.event_type) }
                    td { a href=(order_link(&r.aggregate_id)) { (r.aggregate_id) } }
                    td { code { (r.message_id) } }
                    td.state { (state(r)) }
                    td.num { (r.attempts) }
                    td { (r.last_error.as_deref().unwrap_or("")) }
                    td { (when(Some(r.created_at))) }
                    td { (when(r.published_at.or(r.dead_at))) }
                }
            }
        }
    }
}

// ------------------------------------------------------------------ outbox

/// `GET /console`: the outbox at a glance.
async fn overview(console: web::Data<Console>) -> Result<HttpResponse, Problem> {
    let (status, reasons, replays) = bounded("reading the outbox", async {
        let mut conn = console.db().await?;
        let status = admin::status(&mut conn).await.context("reading the outbox")?;
        let reasons = admin::dead_by_reason(&mut conn, ROWS_LIMIT).await.context("reading dead rows")?;
        let replays = admin::replays(&mut conn, 10).await.context("reading replays")?;
        Ok((status, reasons, replays))
    })
    .await?;
    let dead: i64 = status.dead_by_type.iter().map(|t| t.count).sum();
    let body = html! {
        table id="status" {
            tr { th { "backlog" } td.num id="backlog" { (status.backlog) } td { (status.backing_off) " backing off" } }
            tr { th { "oldest unpublished" } td.num colspan="2" { (crate::ops::age(status.oldest_unpublished_age_seconds)) } }
            tr { th { "published, kept" } td.num colspan="2" { (status.published_retained) } }
            tr { th { "dead" } td.num id="dead" colspan="2" { (dead) } }
        }
        h2 { "Dead rows by event type" }
        @if status.dead_by_type.is_empty() {
            p { "No dead rows." }
        } @else {
            table id="dead-by-type" {
                tr { th { "event type" } th { "rows" } @if console.writable() { th { "replay every dead row of the type" } } }
                @for t in &status.dead_by_type {
                    tr data-event-type=(t.event_type) {
                        td { (t.event_type) }
                        td.num { (t.count) }
                        @if console.writable() {
                            td {
                                form.action method="post" action="/console/replay" data-event-type=(t.event_type) {
                                    input type="hidden" name="event_type" value=(t.event_type);
                                    (action_fields("Replay"))
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Dead rows by reason" }
            table id="dead-by-reason" {
                tr { th { "event type" } th { "last error" } th { "rows" } }
                @for r in &reasons {
                    tr { td { (r.event_type) } td { (r.reason) } td.num { (r.count) } }
                }
            }
        }
        h2 { "Relays" }
        table id="relays" {
            tr { th { "session" } th { "pid" } th { "lanes" } }
            @for r in &status.relays {
                tr {
                    td { (r.name) }
                    td.num { (r.pid) }
                    td { (r.lanes.len()) ": " (r.lanes.iter().map(i32::to_string).collect::<Vec<_>>().join(",")) }
                }
            }
        }
        @if !status.unowned_lanes.is_empty() {
            p.note { "Lanes no relay owns: " (status.unowned_lanes.iter().map(i32::to_string).collect::<Vec<_>>().join(",")) }
        }
        h2 { "Recent replays and requeues" }
        @if replays.is_empty() { p { "None yet." } }
        table id="replays" {
            tr { th { "when" } th { "kind" } th { "items" } th { "operator" } th { "reason" } th { "selection" } }
            @for r in &replays {
                tr {
                    td { (when(Some(r.replayed_at))) }
                    td { (r.kind) }
                    td.num { (r.item_count) }
                    td { (r.operator) }
                    td { (r.reason.as_deref().unwrap_or("")) }
                    td { code { (r.selector.to_string()) } }
                }
            }
        }
    };
    Ok(page(&console, "Outbox", body))
}

// ------------------------------------------------------------ dead letters

/// One dead letter, as the console shows it.
struct DeadLetter {
    message_id: String,
    event_type: String,
    order: Option<String>,
    error: String,
    failed_at: String,
    body: String,
}

impl DeadLetter {
    fn of(d: &Delivery) -> Self {
        let p = &d.properties;
        let error = header_str(p, "x-orderflow-error")
            .or_else(|| header_str(p, "x-first-death-reason").map(|r| format!("broker: {r}")))
            .unwrap_or_else(|| "(no reason recorded)".to_owned());
        let body: Option<serde_json::Value> = serde_json::from_slice(&d.data).ok();
        let order = header_str(p, "aggregate_id").or_else(|| {
            body.as_ref()?["payload"][ORDER_FIELD]
                .as_str()
                .map(str::to_owned)
                .or_else(|| body.as_ref()?["aggregate_id"].as_str().map(str::to_owned))
        });
        let failed_at = header_str(p, "x-orderflow-failed-at").unwrap_or_default();
        let text = String::from_utf8_lossy(&d.data);
        let mut excerpt: String = text.chars().take(300).collect();
        if text.chars().count() > 300 {
            excerpt.push('…');
        }
        let mut details = Vec::new();
        if let Some(headers) = p.headers() {
            for (key, value) in headers.inner() {
                if key.as_str() == "x-death" {
                    details.push(format!("x-death {}", crate::dlq::describe(value)));
                }
            }
        }
        if !details.is_empty() {
            excerpt = format!("{}\n{excerpt}", details.join("\n"));
        }
        Self {
            message_id: p.message_id().as_ref().map(|m| m.to_string()).unwrap_or_else(|| "(none)".to_owned()),
            event_type: p.kind().as_ref().map(|m| m.to_string()).unwrap_or_default(),
            order,
            error,
            failed_at,
            body: excerpt,
        }
    }

    fn names(&self, order: &str) -> bool {
        self.order.as_deref() == Some(order)
    }
}

/// A consumer's dead-letter queue as read for a page.
struct Queue {
    consumer: String,
    name: String,
    /// Ready messages; None if the queue is not declared.
    depth: Option<u32>,
    letters: Vec<DeadLetter>,
}

impl Queue {
    /// Letters grouped by error, largest groups first.
    fn groups(&self) -> Vec<(&str, Vec<&DeadLetter>)> {
        let mut groups: Vec<(&str, Vec<&DeadLetter>)> = Vec::new();
        for letter in &self.letters {
            match groups.iter_mut().find(|(e, _)| *e == letter.error) {
                Some((_, v)) => v.push(letter),
                None => groups.push((&letter.error, vec![letter])),
            }
        }
        groups.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
        groups
    }
}

/// Reads up to [`DLQ_PAGE_LIMIT`] dead letters of each of `consumers` and
/// puts them back, as `dlq show` does.
async fn read_queues(console: &Console, consumers: &[String]) -> anyhow::Result<Vec<Queue>> {
    let (conn, topology) = crate::dlq::connect(&console.broker).await?;
    let mut queues = Vec::new();
    for consumer in consumers {
        let name = topology.dead_letter_queue(consumer);
        let depth = crate::dlq::depth(&conn, &name).await?;
        let mut letters = Vec::new();
        if depth.is_some_and(|n| n > 0) {
            let channel = conn.create_channel().await?;
            let held = crate::dlq::take(&channel, &name, DLQ_PAGE_LIMIT).await;
            if let Ok(held) = &held {
                letters = held.iter().map(DeadLetter::of).collect();
            }
            // Closing the channel returns every message to the queue.
            let _ = channel.close(200, "shown".into()).await;
            held?;
        }
        queues.push(Queue { consumer: consumer.clone(), name, depth, letters });
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(queues)
}

fn requeue_form(consumer: &str, ids: Option<&[&DeadLetter]>, button: &str) -> Markup {
    let action = format!("{}/requeue", consumer_link(consumer));
    html! {
        form.action method="post" action=(action) data-consumer=(consumer) data-all=(if ids.is_none() { "true" } else { "false" }) {
            @match ids {
                Some(letters) => {
                    input type="hidden" name="message_ids"
                        value=(letters.iter().map(|l| l.message_id.as_str()).collect::<Vec<_>>().join(","));
                }
                None => { input type="hidden" name="all" value="true"; }
            }
            (action_fields(button))
        }
    }
}

fn queue_summary(console: &Console, q: &Queue) -> Markup {
    html! {
        section.queue data-consumer=(q.consumer) {
            h2 { a href=(consumer_link(&q.consumer)) { (q.consumer) } }
            @match q.depth {
                None => p { code { (q.name) } " is not declared." },
                Some(0) => p { code { (q.name) } ": empty." },
                Some(n) => {
                    p {
                        code { (q.name) } ": " (n) " dead letters"
                        @if q.letters.len() < n as usize { " (the first " (q.letters.len()) " are grouped below)" }
                        "."
                    }
                    table.groups {
                        tr { th { "error" } th { "messages" } th { "event types" } @if console.writable() { th { "requeue these" } } }
                        @for (error, letters) in q.groups() {
                            tr {
                                td.error { (error) }
                                td.num { (letters.len()) }
                                td { (distinct(letters.iter().map(|l| l.event_type.as_str()))) }
                                @if console.writable() { td { (requeue_form(&q.consumer, Some(letters.as_slice()), "Requeue")) } }
                            }
                        }
                    }
                    @if console.writable() {
                        p { "Every dead letter of " (q.consumer) ": " }
                        (requeue_form(&q.consumer, None, "Requeue all"))
                    }
                }
            }
        }
    }
}

fn distinct<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for item in items {
        if !seen.contains(&item) {
            seen.push(item);
        }
    }
    seen.join(", ")
}

fn letters_table(letters: &[(&str, &DeadLetter)], show_consumer: bool) -> Markup {
    html! {
        table.letters {
            tr {
                @if show_consumer { th { "consumer" } }
                th { "message id" } th { "type" } th { "order" } th { "error" } th { "failed at" } th { "body" }
            }
            @for (consumer, l) in letters {
                tr data-message-id=(l.message_id) {
                    @if show_consumer { td { a href=(consumer_link(consumer)) { (consumer) } } }
                    td { code { (l.message_id) } }
                    td { (l.event_type) }
                    td { @if let Some(o) = &l.order { a href=(order_link(o)) { (o) } } }
                    td.error { (l.error) }
                    td { (l.failed_at) }
                    td { pre { (l.body) } }
                }
            }
        }
    }
}

/// `GET /console/dlq`: every consumer's dead letters, grouped by error.
async fn dead_letters(console: web::Data<Console>) -> Result<HttpResponse, Problem> {
    let queues = bounded("reading the dead-letter queues", read_queues(&console, &console.consumers)).await?;
    let body = html! {
        p { "Messages are read and put back: inspecting never removes them." }
        @for q in &queues { (queue_summary(&console, q)) }
    };
    Ok(page(&console, "Dead letters", body))
}

fn known_consumer(console: &Console, consumer: &str) -> Result<(), Problem> {
    if console.consumers.iter().any(|c| c == consumer) {
        Ok(())
    } else {
        Err(Problem::not_found(format!(
            "no consumer {consumer:?} here; the console shows {} (RELAY_CONSUMERS, RELAY_CONSUMERS_FILE)",
            console.consumers.join(", ")
        )))
    }
}

/// `GET /console/dlq/{consumer}`: one consumer's dead letters.
async fn consumer_dead_letters(
    console: web::Data<Console>,
    consumer: web::Path<String>,
) -> Result<HttpResponse, Problem> {
    let consumer = consumer.into_inner();
    known_consumer(&console, &consumer)?;
    let queues =
        bounded("reading the dead-letter queue", read_queues(&console, std::slice::from_ref(&consumer))).await?;
    let body = html! {
        @for q in &queues {
            (queue_summary(&console, q))
            @if !q.letters.is_empty() {
                h2 { "Messages" }
                (letters_table(&q.letters.iter().map(|l| (q.consumer.as_str(), l)).collect::<Vec<_>>(), false))
            }
        }
    };
    Ok(page(&console, &format!("Dead letters of {consumer}"), body))
}

// ------------------------------------------------------------------ orders

/// Query of `GET /console/orders`.
#[derive(serde::Deserialize)]
struct OrderQuery {
    id: Option<String>,
}

/// `GET /console/orders?id=…`: the lookup form's target; redirects to the journey.
async fn find_order(query: web::Query<OrderQuery>) -> Result<HttpResponse, Problem> {
    let id = query.id.as_deref().map(str::trim).unwrap_or_default();
    if id.is_empty() {
        return Err(Problem::invalid("query.id", "give an order id"));
    }
    Ok(HttpResponse::SeeOther().insert_header((header::LOCATION, order_link(id))).finish())
}

/// `GET /console/orders/{id}`: one order's journey.
async fn order(console: web::Data<Console>, id: web::Path<String>) -> Result<HttpResponse, Problem> {
    let id = id.into_inner();
    let (rows, inbox) = bounded("reading the order's rows", async {
        let mut conn = console.db().await?;
        let rows = admin::rows_naming(&mut conn, &id, ORDER_FIELD, ROWS_LIMIT).await.context("reading the outbox")?;
        let inbox = admin::inbox_naming(&mut conn, &id, ORDER_FIELD, ROWS_LIMIT).await.context("reading the inbox")?;
        Ok((rows, inbox))
    })
    .await?;
    let queues = bounded("reading the dead-letter queues", read_queues(&console, &console.consumers)).await?;
    let letters: Vec<(&str, &DeadLetter)> = queues
        .iter()
        .flat_map(|q| q.letters.iter().filter(|l| l.names(&id)).map(|l| (q.consumer.as_str(), l)))
        .collect();
    let dead_rows = rows.iter().filter(|r| r.dead_at.is_some()).count();
    let body = html! {
        h2 { "Outbox rows" }
        @if rows.is_empty() {
            p { "No outbox row names this order (published rows are deleted unless RELAY_PUBLISHED_RETENTION keeps them)." }
        } @else {
            (rows_table(&rows))
            @if dead_rows > 0 && console.writable() {
                p { "Replay this order's " (dead_rows) " dead rows:" }
                form.action method="post" action="/console/replay" data-order=(id) {
                    input type="hidden" name="order" value=(id);
                    (action_fields("Replay"))
                }
            }
        }
        h2 { "Inbox entries" }
        @match &inbox {
            None => p { "This database has no inbox table." },
            Some(entries) if entries.is_empty() => p { "No inbox entry is linked to this order's outbox rows." },
            Some(entries) => {
                p { "Messages this database's consumers handled that caused, or are, this order's outbox rows." }
                table id="inbox" {
                    tr { th { "consumer" } th { "message id" } th { "event type" } th { "handled" } }
                    @for e in entries {
                        tr { td { (e.consumer) } td { code { (e.message_id) } } td { (e.event_type) } td { (when(Some(e.received_at))) } }
                    }
                }
            }
        }
        h2 { "Dead letters" }
        @if letters.is_empty() {
            p { "No dead letter names this order." }
        } @else {
            (letters_table(&letters, true))
        }
    };
    Ok(page(&console, &format!("Order {id}"), body))
}

// ----------------------------------------------------------------- actions

/// A posted form, read as `application/x-www-form-urlencoded` pairs.
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Self {
        Self(url::form_urlencoded::parse(body).into_owned().collect())
    }

    /// The first non-blank value of `key`, trimmed.
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().filter(|(k, _)| k == key).map(|(_, v)| v.trim()).find(|v| !v.is_empty())
    }
}

/// Actions need the configured token, from the `Authorization` header or the
/// `token` form field: 403 when the console is read-only, 401 when missing
/// or wrong.
fn authorize(console: &Console, req: &HttpRequest, form: &Form) -> Result<(), Problem> {
    if !console.writable() {
        return Err(Problem::new(
            actix_web::http::StatusCode::FORBIDDEN,
            "read-only",
            "Forbidden",
            "the console is read-only: start the relay with RELAY_ADMIN_TOKEN to allow replays and requeues".to_owned(),
        ));
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
    match bearer.or_else(|| form.get("token")) {
        None => Err(Problem::unauthorized(
            "this action needs the relay's RELAY_ADMIN_TOKEN (the `token` form field or `Authorization: Bearer`)",
        )),
        Some(token) if console.token.accepts(token) => Ok(()),
        Some(_) => Err(Problem::unauthorized("the token is not this relay's RELAY_ADMIN_TOKEN")),
    }
}

/// Who and why, both required; problems name each missing field.
fn record_of(form: &Form, errors: &mut Vec<FieldError>) -> Record {
    let mut field = |name: &str, max: usize| match form.get(name) {
        None => {
            errors.push(FieldError { field: name.into(), message: "required: say who and why".into() });
            String::new()
        }
        Some(v) if v.chars().count() > max => {
            errors.push(FieldError { field: name.into(), message: format!("at most {max} characters") });
            String::new()
        }
        Some(v) => v.to_owned(),
    };
    let reason = field("reason", MAX_REASON);
    let operator = field("operator", MAX_OPERATOR);
    Record { operator, reason: Some(reason) }
}

/// `POST /console/replay`: replays the dead rows of one event type
/// (`event_type`) or of one order (`order`), as `outbox-relay replay
/// --scope dead` does, and records it.
async fn replay(console: web::Data<Console>, req: HttpRequest, body: web::Bytes) -> Result<HttpResponse, Problem> {
    let form = Form::parse(&body);
    authorize(&console, &req, &form)?;
    let mut errors = Vec::new();
    let record = record_of(&form, &mut errors);
    let event_type = form.get("event_type").map(str::to_owned);
    let order = form.get("order").map(str::to_owned);
    if event_type.is_some() == order.is_some() {
        errors.push(FieldError { field: "event_type".into(), message: "give either event_type or order".into() });
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let rows = bounded("replaying", async {
        let mut conn = console.db().await?;
        let selector = if let Some(t) = &event_type {
            Selector { event_type: Some(t.clone()), ..Default::default() }
        } else if let Some(order) = &order {
            // The rows the journey shows: by aggregate, or by id when some
            // dead row names the order only in its payload.
            let rows = admin::rows_naming(&mut conn, order, ORDER_FIELD, ROWS_LIMIT).await?;
            let dead: Vec<&Candidate> = rows.iter().filter(|r| r.dead_at.is_some()).collect();
            if dead.iter().all(|r| &r.aggregate_id == order) {
                Selector { aggregate_id: Some(order.clone()), ..Default::default() }
            } else {
                Selector { ids: dead.iter().map(|r| r.id).collect(), ..Default::default() }
            }
        } else {
            Selector::default()
        };
        if selector.is_empty() {
            return Ok(Vec::new());
        }
        Ok(admin::replay(&mut conn, Scope::Dead, &selector, &record.operator, record.reason.as_deref()).await?)
    })
    .await?;
    tracing::info!(operator = %record.operator, rows = rows.len(), "console replay");
    let back = order.as_deref().map(order_link).unwrap_or_else(|| "/console".to_owned());
    let body = html! {
        p.ok id="result" {
            "Replayed " (rows.len()) " dead rows (recorded as " (record.operator) ": " (record.reason.as_deref().unwrap_or("")) "). "
            "They are due now; the relay publishes them at once."
        }
        @if !rows.is_empty() { (rows_table(&rows)) }
        p { a href=(back) { "Back" } }
    };
    Ok(page(&console, "Replay", body))
}

/// `POST /console/dlq/{consumer}/requeue`: sends the consumer's dead letters
/// (`message_ids`, comma-separated, or `all`) back to its queue with fresh
/// retries, as `outbox-relay dlq requeue` does, and records it.
async fn requeue(
    console: web::Data<Console>,
    consumer: web::Path<String>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, Problem> {
    let consumer = consumer.into_inner();
    let form = Form::parse(&body);
    authorize(&console, &req, &form)?;
    known_consumer(&console, &consumer)?;
    let mut errors = Vec::new();
    let record = record_of(&form, &mut errors);
    let message_ids: Vec<String> = form
        .0
        .iter()
        .filter(|(k, _)| k == "message_ids" || k == "message_id")
        .flat_map(|(_, v)| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned))
        .collect();
    let all = form.get("all").is_some_and(|v| v == "true" || v == "on" || v == "1");
    if message_ids.is_empty() != all {
        errors.push(FieldError { field: "message_ids".into(), message: "give message_ids or all=true".into() });
    }
    if !errors.is_empty() {
        return Err(Problem::validation(errors));
    }
    let args = DlqRequeueArgs {
        broker: console.broker.clone(),
        db: DbTarget { database_url: console.database_url.clone() },
        consumer: consumer.clone(),
        message_ids,
        all,
        limit: 10_000,
        dry_run: false,
        // The page shows the plain report; the terminal progress lines
        // are for people at a CLI, not for a service's stderr.
        json: false,
        record: record.clone(),
    };
    let done = bounded("requeueing", crate::dlq::requeue_recorded(&args)).await?;
    tracing::info!(operator = %record.operator, consumer = %consumer, messages = done.requeued.len(), "console requeue");
    let body = html! {
        @if let Some(failure) = &done.failure {
            p.note id="failure" { "Stopped part way: " (format!("{failure:#}")) }
        }
        p.ok id="result" {
            "Requeued " (done.requeued.len()) " dead letters of " (consumer) " (recorded as " (record.operator) ": "
            (record.reason.as_deref().unwrap_or("")) ")."
        }
        pre { (done.report) }
        p { a href=(consumer_link(&consumer)) { "Back" } }
    };
    Ok(page(&console, "Requeue", body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_encode_what_a_path_segment_cannot_hold() {
        assert_eq!(order_link("ord-001"), "/console/orders/ord-001");
        assert_eq!(order_link("a/b c?#%<\"x"), "/console/orders/a%2Fb%20c%3F%23%25%3C%22x");
        assert_eq!(consumer_link("inventory"), "/console/dlq/inventory");
    }

    #[test]
    fn forms_take_the_first_value_that_is_not_blank() {
        let form = Form::parse(b"reason=+&reason=bound+the+queue&token=%20abc%20&message_ids=a,b&message_ids=c");
        assert_eq!(form.get("reason"), Some("bound the queue"));
        assert_eq!(form.get("token"), Some("abc"));
        assert_eq!(form.get("operator"), None);
    }
}
