//! The operator CLI as scripts and people use it: `--json` of every command
//! with the documented fields (docs/operations.md, "Operator commands"), progress on
//! stderr, `describe`, `status --watch`, completions and man pages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use orderflow_broker::lapin::options::BasicPublishOptions;
use orderflow_broker::{QueueSpec, properties_for};
use orderflow_envelope::Envelope;
use orderflow_testkit::{TestBroker, TestDb};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

/// Runs `args`, asserts success, parses stdout as JSON; returns it with stderr.
async fn json(args: &[&str]) -> (Value, String) {
    let (ok, out, err) = command(args).await;
    assert!(ok, "{args:?} failed: {err}");
    let value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"));
    (value, err)
}

/// Asserts `value` is an object with every one of `fields`.
fn has_fields(value: &Value, fields: &[&str], what: &str) {
    let object = value.as_object().unwrap_or_else(|| panic!("{what}: not an object: {value}"));
    for f in fields {
        assert!(object.contains_key(*f), "{what}: no field {f:?} in {value}");
    }
}

/// Lines of progress (`what: n/m`) in a command's stderr.
fn progress_lines<'a>(stderr: &'a str, what: &str) -> Vec<&'a str> {
    stderr.lines().filter(|l| l.starts_with(&format!("{what}: "))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outbox_command_prints_json_with_the_documented_fields_and_plain_progress_off_a_terminal() {
    let db = TestDb::new(None).await;
    let (order, other) = (Uuid::now_v7(), Uuid::now_v7());
    write(&db.pool, vec![declined(order, 1), declined(other, 1)]).await;
    // Two dead rows, as the relay leaves them after too many refusals (no relay runs here).
    let mut pooled = db.pool.get().await.unwrap();
    let conn: &mut orderflow_db::Conn = &mut pooled;
    diesel_async::RunQueryDsl::execute(
        diesel::sql_query("UPDATE outbox SET dead_at = now(), attempts = 3, last_error = 'NO_ROUTE'"),
        conn,
    )
    .await
    .unwrap();
    drop(pooled);

    let (status, _) = json(&["status", "--database-url", &db.url, "--json"]).await;
    has_fields(
        &status,
        &[
            "backlog",
            "backing_off",
            "oldest_unpublished_age_seconds",
            "published_retained",
            "dead_by_type",
            "relays",
            "unowned_lanes",
        ],
        "status",
    );
    has_fields(&status["dead_by_type"][0], &["event_type", "count"], "status.dead_by_type[]");
    assert_eq!(status["dead_by_type"][0]["count"], 2);

    let aggregate = order.to_string();
    let (dry, err) =
        json(&["replay", "--database-url", &db.url, "--aggregate", &aggregate, "--dry-run", "--json"]).await;
    has_fields(&dry, &["dry_run", "scope", "operator", "reason", "count", "rows"], "replay");
    assert_eq!((dry["dry_run"].as_bool(), dry["count"].as_u64()), (Some(true), Some(1)));
    assert_eq!(dry["scope"], "dead_or_stuck");
    has_fields(
        &dry["rows"][0],
        &[
            "id",
            "message_id",
            "event_type",
            "aggregate_id",
            "attempts",
            "last_error",
            "created_at",
            "dead_at",
            "published_at",
            "state",
        ],
        "replay.rows[]",
    );
    assert_eq!(dry["rows"][0]["state"], "dead");
    assert!(progress_lines(&err, "replay").is_empty(), "a dry run has nothing to show progress of: {err}");

    // Off a terminal, progress is plain lines on stderr; with --json, none.
    let (ok, out, err) = command(&["replay", "--database-url", &db.url, "--aggregate", &aggregate]).await;
    assert!(ok && out.contains("replayed 1 rows"), "{out}{err}");
    assert_eq!(progress_lines(&err, "replay"), ["replay: 0/1", "replay: 1/1"], "{err}");
    assert!(!err.contains('\u{1b}'), "no terminal escapes off a terminal: {err:?}");
    let (done, err) = json(&[
        "replay",
        "--database-url",
        &db.url,
        "--all",
        "--scope",
        "dead",
        "--operator",
        "bob",
        "--reason",
        "test",
        "--json",
    ])
    .await;
    assert_eq!((done["dry_run"].as_bool(), done["count"].as_u64()), (Some(false), Some(1)));
    assert_eq!((done["operator"].as_str(), done["reason"].as_str()), (Some("bob"), Some("test")));
    assert!(progress_lines(&err, "replay").is_empty(), "--json is silent on stderr: {err}");

    let (replays, _) = json(&["replays", "--database-url", &db.url, "--json"]).await;
    let list = replays["replays"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    has_fields(
        &list[0],
        &["id", "replayed_at", "operator", "reason", "kind", "selector", "items", "item_count"],
        "replays.replays[]",
    );
    assert_eq!((list[0]["operator"].as_str(), list[0]["kind"].as_str()), (Some("bob"), Some("outbox")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dlq_command_prints_json_with_the_documented_fields_and_plain_progress_off_a_terminal() {
    let db = TestDb::new(None).await;
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    let work = probe(&broker, &channel, "inventory", &["order.created"]).await;
    let dlq = broker.topology.dead_letter_queue("inventory");
    let letters: Vec<Envelope> = (0..3).map(|_| declined(Uuid::now_v7(), 1)).collect();
    for env in &letters {
        dead_letter(&channel, &dlq, env, "database said no").await;
    }
    let amqp = broker.amqp_url.clone();
    let prefix = broker.topology.prefix().to_owned();
    let with_broker = |args: &[&'static str]| {
        let mut v: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        v.extend(["--amqp-url".into(), amqp.clone(), "--topology-prefix".into(), prefix.clone()]);
        v
    };
    let run = async |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        json(&args).await
    };

    let (list, _) = run(with_broker(&["dlq", "list", "--consumer", "inventory,nobody", "--json"])).await;
    let queues = list["queues"].as_array().unwrap();
    has_fields(&queues[0], &["consumer", "queue", "declared", "messages"], "dlq list.queues[]");
    assert_eq!(queues[0]["queue"], dlq.as_str());
    assert_eq!((queues[0]["declared"].as_bool(), queues[0]["messages"].as_u64()), (Some(true), Some(3)));
    assert_eq!((queues[1]["declared"].as_bool(), queues[1]["messages"].is_null()), (Some(false), true));

    let (show, _) = run(with_broker(&["dlq", "show", "--consumer", "inventory", "--limit", "2", "--json"])).await;
    has_fields(&show, &["consumer", "queue", "count", "messages"], "dlq show");
    assert_eq!(show["count"], 2);
    let first = &show["messages"][0];
    has_fields(first, &["message_id", "type", "error", "headers", "body"], "dlq show.messages[]");
    assert_eq!(first["message_id"], letters[0].message_id.to_string());
    assert_eq!((first["type"].as_str(), first["error"].as_str()), (Some("payment.declined"), Some("database said no")));
    assert_eq!(first["body"]["message_id"], letters[0].message_id.to_string(), "the body as JSON");

    let mut requeue = with_broker(&["dlq", "requeue", "--consumer", "inventory", "--all"]);
    requeue.extend(["--database-url".into(), db.url.clone()]);
    let mut dry = requeue.clone();
    dry.extend(["--dry-run".into(), "--json".into()]);
    let (dry, _) = run(dry).await;
    has_fields(
        &dry,
        &["consumer", "from", "to", "dry_run", "operator", "reason", "count", "message_ids", "failed"],
        "dlq requeue",
    );
    assert_eq!((dry["dry_run"].as_bool(), dry["count"].as_u64()), (Some(true), Some(3)));
    assert_eq!((dry["from"].as_str(), dry["to"].as_str()), (Some(dlq.as_str()), Some(work.as_str())));

    // Off a terminal: plain progress lines, no escapes.
    let args: Vec<&str> = requeue.iter().map(String::as_str).collect();
    let (ok, out, err) = command(&args).await;
    assert!(ok && out.contains("requeued 3 dead letters"), "{out}{err}");
    assert_eq!(progress_lines(&err, "read").last(), Some(&"read: 3/3"), "{err}");
    assert_eq!(progress_lines(&err, "requeue"), ["requeue: 0/3", "requeue: 1/3", "requeue: 2/3", "requeue: 3/3"]);
    assert!(!err.contains('\u{1b}'), "{err:?}");

    // Back to the DLQ by hand, then a requeue with --json: silent on stderr.
    for env in &letters[..1] {
        dead_letter(&channel, &dlq, env, "again").await;
    }
    let mut with_json = requeue.clone();
    with_json.push("--json".into());
    let (done, err) = run(with_json).await;
    assert_eq!((done["dry_run"].as_bool(), done["count"].as_u64()), (Some(false), Some(1)));
    assert!(done["failed"].is_null(), "{done}");
    assert_eq!(done["message_ids"][0], letters[0].message_id.to_string());
    assert!(progress_lines(&err, "requeue").is_empty() && progress_lines(&err, "read").is_empty(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_a_declared_consumer_with_its_retry_tiers_delivery_limit_and_counts() {
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    let spec = QueueSpec {
        consumer: "inventory".into(),
        bindings: vec!["order.created".into()],
        retry_delays: vec![Duration::from_millis(100), Duration::from_secs(5)],
        delivery_limit: 7,
    };
    broker.track(&spec);
    broker.topology.declare_consumer(&channel, &spec).await.unwrap();
    let queue = broker.topology.queue("inventory");
    let env = declined(Uuid::now_v7(), 1);
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &env.to_vec(),
            properties_for(&env),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let prefix = broker.topology.prefix().to_owned();
    // The relay knows no service: what it says of a consumer beyond the
    // broker's answers comes from the catalog file it is given.
    let catalog = std::env::temp_dir().join(format!("{prefix}-consumers.json"));
    std::fs::write(
        &catalog,
        r#"{"consumers": [{"name": "inventory", "service": "processor-service", "bindings": ["order.created"]}]}"#,
    )
    .unwrap();
    let catalog = catalog.to_str().unwrap().to_owned();
    let args = [
        "describe",
        "--consumers-file",
        &catalog,
        "--amqp-url",
        &broker.amqp_url,
        "--topology-prefix",
        &prefix,
        "--consumer",
        "inventory,nobody",
        "--retry-delays",
        "100ms,5s,30s",
        "--delivery-limit",
        "7",
    ];
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let (d, _) = json(&with_json).await;
    has_fields(&d, &["prefix", "exchange", "consumers", "sources"], "describe");
    has_fields(&d["sources"], &["broker", "catalog", "config", "platform"], "describe.sources");
    assert_eq!(d["exchange"]["name"], broker.topology.events_exchange());
    assert_eq!((d["exchange"]["declared"].as_bool(), d["exchange"]["source"].as_str()), (Some(true), Some("broker")));

    let inventory = &d["consumers"][0];
    has_fields(
        inventory,
        &["consumer", "service", "queue", "bindings", "delivery_limit", "retry_tiers", "dead_letter_queue"],
        "describe.consumers[]",
    );
    assert_eq!(inventory["service"], "processor-service");
    has_fields(&inventory["queue"], &["name", "declared", "messages", "consumers", "source"], "queue");
    assert_eq!(inventory["queue"]["name"], queue.as_str());
    assert_eq!(
        (inventory["queue"]["declared"].as_bool(), inventory["queue"]["messages"].as_u64()),
        (Some(true), Some(1))
    );
    assert_eq!(inventory["bindings"]["source"], "catalog");
    assert!(inventory["bindings"]["value"].as_array().unwrap().iter().any(|b| b == "order.created"));
    assert_eq!(inventory["delivery_limit"]["value"], 7);
    assert_eq!(inventory["delivery_limit"]["source"], "config");
    let tiers = inventory["retry_tiers"].as_array().unwrap();
    let seen: Vec<(&str, &str, bool)> = tiers
        .iter()
        .map(|t| {
            (
                t["delay"].as_str().unwrap(),
                t["queue"]["name"].as_str().unwrap(),
                t["queue"]["declared"].as_bool().unwrap(),
            )
        })
        .collect();
    let tier = |d| broker.topology.retry_queue("inventory", d);
    assert_eq!(
        seen,
        [
            ("100ms", tier(Duration::from_millis(100)).as_str(), true),
            ("5s", tier(Duration::from_secs(5)).as_str(), true),
            ("30s", tier(Duration::from_secs(30)).as_str(), false),
        ]
    );
    assert_eq!(tiers[0]["delay_ms"], 100);
    let dlq = &inventory["dead_letter_queue"];
    assert_eq!(
        (dlq["name"].as_str(), dlq["declared"].as_bool()),
        (Some(broker.topology.dead_letter_queue("inventory").as_str()), Some(true))
    );
    assert_eq!(dlq["delivery_limit"]["value"], i64::from(i32::MAX));

    let nobody = &d["consumers"][1];
    assert!(nobody["service"].is_null() && nobody["bindings"]["value"].is_null(), "{nobody}");
    assert_eq!(nobody["queue"]["declared"], false);

    let (ok, text, err) = command(&args).await;
    assert!(ok, "{err}");
    assert!(text.contains(&queue) && text.contains("1 ready"), "{text}");
    assert!(text.contains("delivery limit 7  [config]") && text.contains(&tier(Duration::from_millis(100))), "{text}");
    assert!(text.contains("NOT DECLARED"), "the 30s tier and nobody's queues: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_redraws_until_interrupted() {
    let db = TestDb::new(None).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["status", "--database-url", &db.url, "--watch", "200ms", "--json"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut frames = Vec::new();
    while frames.len() < 3 {
        let line = tokio::time::timeout(DEADLINE, lines.next_line()).await.expect("a frame in time").unwrap();
        let frame: Value = serde_json::from_str(&line.expect("still running")).unwrap();
        frames.push(frame);
    }
    for f in &frames {
        has_fields(f, &["at", "backlog", "dead_by_type", "relays"], "status --watch --json");
    }
    assert_ne!(frames[0]["at"], frames[2]["at"]);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.expect("stops on Ctrl-C").unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_man_pages_are_generated() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (ok, out, err) = command(&["completions", shell]).await;
        assert!(ok, "{shell}: {err}");
        assert!(out.contains("outbox-relay") && out.contains("describe") && out.contains("requeue"), "{shell}: {out}");
    }
    let (ok, _, err) = command(&["completions", "tcsh"]).await;
    assert!(!ok && err.contains("bash"), "an unknown shell names the known ones: {err}");

    let (ok, page, err) = command(&["man"]).await;
    assert!(ok, "{err}");
    assert!(page.starts_with(".ie") || page.contains(".TH outbox-relay"), "{page}");
    assert!(page.contains("describe") && page.contains("completions"), "{page}");

    let dir = std::env::temp_dir().join(format!("outbox-relay-man-{}", Uuid::now_v7()));
    let out_dir = dir.to_str().unwrap();
    let (ok, _, err) = command(&["man", "--out-dir", out_dir]).await;
    assert!(ok, "{err}");
    for page in ["outbox-relay.1", "outbox-relay-describe.1", "outbox-relay-dlq-requeue.1"] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}: {text}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
