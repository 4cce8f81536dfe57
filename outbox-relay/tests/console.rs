//! The operator console in a real headless browser (chromium through
//! chromedriver), against a real relay, database and broker.
//!
//! Needs `chromedriver` and `chromium` (Debian: `chromium-driver`,
//! `chromium`; `make tools` installs them). `CHROMEDRIVER` and `CHROMIUM`
//! override where they are; `CONSOLE_SCREENSHOTS=<dir>` saves a PNG of each
//! page the test looks at.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;

use common::*;
use diesel_async::RunQueryDsl;
use fantoccini::{Client, ClientBuilder, Locator};
use orderflow_contracts::Money;
use orderflow_contracts::events::PaymentRefunded;
use orderflow_envelope::{Envelope, Metadata};
use orderflow_testkit::{TestBroker, TestDb, eventually, eventually_some};
use serde_json::json;
use tokio::process::{Child, Command};
use uuid::Uuid;

const TOKEN: &str = "s3cret-console-token";

/// A chromedriver (in its own process group, so the browsers it starts go
/// with it) and a session on it.
struct Browser {
    driver: Child,
    client: Option<Client>,
}

impl Browser {
    async fn start() -> Self {
        let bin = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = free_port();
        let driver = Command::new(&bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin}: {e}; install chromium and chromedriver with `make tools` (apt packages chromium, chromium-driver)")
            });
        let mut options = json!({
            "args": ["--headless", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,2000"]
        });
        let chromium = std::env::var("CHROMIUM").ok().or_else(|| {
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
                .map(str::to_owned)
        });
        if let Some(path) = chromium {
            options["binary"] = json!(path);
        }
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), options);
        let url = format!("http://127.0.0.1:{port}");
        let client = eventually_some("chromedriver starts a headless chromium session", DEADLINE, || {
            let caps = caps.clone();
            let url = url.clone();
            async move {
                let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
                builder.capabilities(caps);
                match builder.connect(&url).await {
                    Ok(client) => Some(client),
                    Err(e) => {
                        eprintln!("no WebDriver session yet: {e}");
                        None
                    }
                }
            }
        })
        .await;
        Self { driver, client: Some(client) }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    async fn close(mut self) {
        if let Some(client) = self.client.take() {
            let _ = client.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium's processes are chromedriver's children: end the group.
        if let Some(pid) = self.driver.id() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Saves the current page as `<CONSOLE_SCREENSHOTS>/<name>.png`, if asked to.
async fn shot(client: &Client, name: &str) {
    if let Ok(dir) = std::env::var("CONSOLE_SCREENSHOTS") {
        let png = client.screenshot().await.unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
    }
}

/// The text of the first element matching `css` on the current page.
async fn text(client: &Client, css: &str) -> String {
    client.wait().for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("{css}: {e}")).text().await.unwrap()
}

/// Fills the action form matching `form_css` and submits it with its button.
async fn act(client: &Client, form_css: &str, reason: &str, operator: &str, token: &str) {
    let form = client.wait().for_element(Locator::Css(form_css)).await.unwrap_or_else(|e| panic!("{form_css}: {e}"));
    form.find(Locator::Css("input[name=reason]")).await.unwrap().send_keys(reason).await.unwrap();
    form.find(Locator::Css("input[name=operator]")).await.unwrap().send_keys(operator).await.unwrap();
    form.find(Locator::Css("input[name=token]")).await.unwrap().send_keys(token).await.unwrap();
    form.find(Locator::Css("button[type=submit]")).await.unwrap().click().await.unwrap();
}

async fn post(url: &str, form: &[(&str, &str)], bearer: Option<&str>) -> (u16, String, serde_json::Value) {
    let mut request = reqwest::Client::new().post(url).form(form);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let kind = response.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, kind, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_replays_a_dead_row_and_requeues_a_dead_letter_from_the_console() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    // Nobody consumes payment.refunded yet: the broker returns it until it dies.
    let work = probe(&broker, &channel, "probe", &["payment.declined"]).await;
    let order = Uuid::now_v7().to_string();
    // The refund was caused by a message this database's payment consumer handled.
    let cause = Uuid::now_v7();
    let refund = Envelope::new(
        &PaymentRefunded { order_id: order.clone(), payment_id: Uuid::now_v7(), amount: Money::from_minor(5) },
        1,
        &Metadata { causation_id: Some(cause), ..Default::default() },
    )
    .unwrap();
    let mut conn = db.pool.get().await.unwrap();
    diesel::sql_query("INSERT INTO inbox (consumer, message_id, event_type) VALUES ('payment', $1, 'order.cancelled')")
        .bind::<diesel::sql_types::Uuid, _>(cause)
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    // Another order's refund dies too; it is replayed from its journey.
    let other = Uuid::now_v7().to_string();
    let other_refund = Envelope::new(
        &PaymentRefunded { order_id: other.clone(), payment_id: Uuid::now_v7(), amount: Money::from_minor(7) },
        1,
        &Metadata::default(),
    )
    .unwrap();
    write(&db.pool, vec![refund.clone(), declined(order.parse().unwrap(), 2), other_refund.clone()]).await;
    // A consumer parked a message about the same order; its reason is markup.
    let letter = declined(order.parse().unwrap(), 7);
    dead_letter(&channel, &broker.topology.dead_letter_queue("probe"), &letter, "<b>handler</b> said no").await;

    let prefix = broker.topology.prefix().to_owned();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _relay = run_relay(
        &db,
        &broker.amqp_url,
        &prefix,
        "r1",
        &[
            "--max-attempts",
            "3",
            "--metrics-addr",
            &addr,
            "--admin-token",
            TOKEN,
            "--published-retention",
            "1h",
            "--consumer",
            "probe",
        ],
    );
    eventually("both refund rows are dead", DEADLINE, || async {
        count(&db.pool, "SELECT count(*) AS n FROM outbox WHERE dead_at IS NOT NULL").await == 2
    })
    .await;
    let base = format!("http://{addr}");

    // Actions need the token; without who and why they are refused.
    let replay_url = format!("{base}/console/replay");
    let (status, kind, body) = post(&replay_url, &[("event_type", "payment.refunded")], None).await;
    assert_eq!((status, kind.as_str()), (401, "application/problem+json"), "{body}");
    let (status, kind, body) = post(
        &replay_url,
        &[("event_type", "payment.refunded"), ("reason", "x"), ("operator", "x"), ("token", "wrong")],
        None,
    )
    .await;
    assert_eq!((status, kind.as_str()), (401, "application/problem+json"), "{body}");
    let (status, kind, body) = post(&replay_url, &[("event_type", "payment.refunded")], Some(TOKEN)).await;
    assert_eq!((status, kind.as_str()), (400, "application/problem+json"), "{body}");
    let fields: Vec<&str> = body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["reason", "operator"], "{body}");
    assert_eq!(count(&db.pool, "SELECT count(*) AS n FROM outbox_replays").await, 0, "nothing replayed");

    let browser = Browser::start().await;
    let client = browser.client();

    // The outbox page shows the dead rows by type and by reason.
    client.goto(&format!("{base}/console")).await.unwrap();
    let row = text(client, "#dead-by-type tr[data-event-type='payment.refunded']").await;
    assert!(row.contains("payment.refunded") && row.contains('2'), "{row}");
    let reasons = text(client, "#dead-by-reason").await;
    assert!(reasons.contains("returned by broker"), "{reasons}");
    assert!(client.find(Locator::Css("#read-only")).await.is_err(), "a relay with a token is not read-only");
    shot(client, "1-outbox").await;

    // The order's journey: the dead row, the row waiting behind it, the dead letter.
    client.goto(&format!("{base}/console/orders/{order}")).await.unwrap();
    let rows = text(client, "#outbox-rows").await;
    assert!(rows.contains("dead") && rows.contains("pending") && rows.contains("payment.declined"), "{rows}");
    let inbox = text(client, "#inbox").await;
    assert!(inbox.contains("payment") && inbox.contains(&cause.to_string()), "{inbox}");
    let letters = text(client, "table.letters").await;
    assert!(
        letters.contains(&letter.message_id.to_string()) && letters.contains("<b>handler</b> said no"),
        "{letters}"
    );
    let source = client.source().await.unwrap();
    assert!(
        source.contains("&lt;b&gt;handler") && !source.contains("<b>handler"),
        "database and broker text is escaped"
    );
    shot(client, "2-journey-dead").await;

    // The cause is fixed: a consumer of payment.refunded now exists. Replay
    // the other order's dead row from its journey, then the rest by type.
    let refunds = probe(&broker, &channel, "refunds", &["payment.refunded"]).await;
    client.goto(&format!("{base}/console/orders/{other}")).await.unwrap();
    act(client, &format!("form[data-order='{other}']"), "refunds are bound", "carol", TOKEN).await;
    let result = text(client, "#result").await;
    assert!(result.contains("Replayed 1 dead rows") && result.contains("carol"), "{result}");
    client.goto(&format!("{base}/console")).await.unwrap();
    act(client, "form[data-event-type='payment.refunded']", "bound refunds", "alice", TOKEN).await;
    let result = text(client, "#result").await;
    assert!(result.contains("Replayed 1 dead rows") && result.contains("alice"), "{result}");
    shot(client, "3-replayed").await;

    // It is published, and the order's next event after it.
    let journey = format!("{base}/console/orders/{order}");
    eventually("the journey shows every row published", DEADLINE, || async {
        client.goto(&journey).await.unwrap();
        let states: Vec<String> = futures::future::join_all(
            client.find_all(Locator::Css("#outbox-rows td.state")).await.unwrap().iter().map(|e| e.text()),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        states.len() == 2 && states.iter().all(|s| s == "published")
    })
    .await;
    shot(client, "4-journey-published").await;
    let got: Vec<Uuid> = drain_until(&channel, &refunds, 2).await.into_iter().map(|e| e.message_id).collect();
    assert!(got.contains(&refund.message_id) && got.contains(&other_refund.message_id), "{got:?}");
    let replays = count(
        &db.pool,
        "SELECT count(*) AS n FROM outbox_replays WHERE kind = 'outbox' AND operator = 'alice' \
         AND reason = 'bound refunds' AND items = '[1]' AND selector -> 'selector' ->> 'event_type' = 'payment.refunded'",
    )
    .await;
    assert_eq!(replays, 1, "recorded as the CLI records it");
    let by_order = count(
        &db.pool,
        &format!(
            "SELECT count(*) AS n FROM outbox_replays WHERE kind = 'outbox' AND operator = 'carol' \
             AND items = '[3]' AND selector -> 'selector' ->> 'aggregate_id' = '{other}'"
        ),
    )
    .await;
    assert_eq!(by_order, 1, "an order's replay is recorded as `replay --aggregate`");

    // The dead letters page groups by error; inspecting kept the message. Requeue it.
    client.goto(&format!("{base}/console/dlq")).await.unwrap();
    let groups = text(client, "section[data-consumer='probe'] table.groups").await;
    assert!(groups.contains("<b>handler</b> said no") && groups.contains("payment.declined"), "{groups}");
    shot(client, "5-dead-letters").await;
    act(client, "section[data-consumer='probe'] form[data-all='false']", "handler fixed", "bob", TOKEN).await;
    let result = text(client, "#result").await;
    assert!(result.contains("Requeued 1 dead letters of probe"), "{result}");
    shot(client, "6-requeued").await;
    // The order's next event (published after the replay) and the requeued letter.
    let back = drain_until(&channel, &work, 2).await;
    assert!(back.iter().any(|e| e.message_id == letter.message_id), "the dead letter is back in its queue");
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) AS n FROM outbox_replays WHERE kind = 'dlq' AND operator = 'bob' AND reason = 'handler fixed'"
        )
        .await,
        1
    );
    client.goto(&format!("{base}/console")).await.unwrap();
    let log = text(client, "#replays").await;
    assert!(
        log.contains("alice") && log.contains("bound refunds") && log.contains("bob") && log.contains("carol"),
        "{log}"
    );

    // A relay without a token serves a read-only console.
    let quiet_port = free_port();
    let quiet_addr = format!("127.0.0.1:{quiet_port}");
    let _quiet = run_relay(&db, &broker.amqp_url, &prefix, "r2", &["--metrics-addr", &quiet_addr]);
    let quiet = format!("http://{quiet_addr}");
    eventually("the second relay serves", DEADLINE, || async { http_status(quiet_port, "/live").await == Some(200) })
        .await;
    client.goto(&format!("{quiet}/console")).await.unwrap();
    text(client, "#read-only").await;
    shot(client, "7-read-only").await;
    assert!(client.find_all(Locator::Css("form[method=post]")).await.unwrap().is_empty(), "no action forms");
    let (status, kind, body) = post(
        &format!("{quiet}/console/replay"),
        &[("event_type", "payment.refunded"), ("reason", "x"), ("operator", "x")],
        Some(TOKEN),
    )
    .await;
    assert_eq!((status, kind.as_str()), (403, "application/problem+json"), "{body}");

    browser.close().await;
}
