//! `dlq list|show|requeue`: the broker's dead-letter queues.

use std::fmt::Write;

use anyhow::{Context, bail};
use orderflow_broker::lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use orderflow_broker::lapin::types::{AMQPValue, FieldTable, LongString};
use orderflow_broker::lapin::{BasicProperties, Channel, Confirmation, Connection};
use orderflow_broker::{Topology, header_str};
use orderflow_db::Conn;
use serde::Serialize;

use crate::cli::{BrokerTarget, DlqListArgs, DlqRequeueArgs, DlqShowArgs};
use crate::output::{Progress, print, print_json};

pub(crate) async fn connect(target: &BrokerTarget) -> anyhow::Result<(Connection, Topology)> {
    let conn = orderflow_broker::connect(&target.amqp_url, "outbox-relay:dlq").await?;
    Ok((conn, Topology::new(target.topology_prefix.clone())))
}

/// Ready messages in `queue`, or None if it does not exist (a missing queue
/// closes the channel, hence a channel per question).
pub(crate) async fn depth(conn: &Connection, queue: &str) -> anyhow::Result<Option<u32>> {
    let channel = conn.create_channel().await?;
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    match channel.queue_declare(queue.into(), passive, FieldTable::default()).await {
        Ok(q) => {
            let _ = channel.close(200, "ok".into()).await;
            Ok(Some(q.message_count()))
        }
        Err(_) => Ok(None),
    }
}

/// A consumer's dead-letter queue in `dlq list --json`.
#[derive(Serialize)]
struct DeadLetterQueue {
    consumer: String,
    queue: String,
    declared: bool,
    /// Ready messages; null when the queue is not declared.
    messages: Option<u32>,
}

/// `dlq list`.
pub async fn list(args: DlqListArgs) -> anyhow::Result<()> {
    let (conn, topology) = connect(&args.broker).await?;
    let mut queues = Vec::new();
    for consumer in args.consumers.require()? {
        let queue = topology.dead_letter_queue(&consumer.name);
        let messages = depth(&conn, &queue).await?;
        queues.push(DeadLetterQueue { consumer: consumer.name, queue, declared: messages.is_some(), messages });
    }
    let _ = conn.close(200, "bye".into()).await;
    if args.json {
        return print_json(&serde_json::json!({ "queues": queues }));
    }
    let mut o = String::new();
    writeln!(o, "{:<16} {:>10}  queue", "consumer", "dead")?;
    for q in &queues {
        match q.messages {
            Some(n) => writeln!(o, "{:<16} {n:>10}  {}", q.consumer, q.queue)?,
            None => writeln!(o, "{:<16} {:>10}  {} (not declared)", q.consumer, "-", q.queue)?,
        }
    }
    print(&o)
}

pub(crate) fn describe(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::FieldArray(a) => a.as_slice().iter().map(describe).collect::<Vec<_>>().join("; "),
        AMQPValue::FieldTable(t) => {
            t.inner().iter().map(|(k, v)| format!("{}={}", k.as_str(), describe(v))).collect::<Vec<_>>().join(" ")
        }
        other => {
            format!("{other:?}").trim_start_matches(|c: char| c.is_alphabetic()).trim_matches(['(', ')']).to_owned()
        }
    }
}

/// Holds up to `limit` messages of `queue` unacked on `channel`; closing the
/// channel puts back the ones not acked.
pub(crate) async fn take(
    channel: &Channel,
    queue: &str,
    limit: usize,
) -> anyhow::Result<Vec<orderflow_broker::lapin::message::Delivery>> {
    take_counted(channel, queue, limit, None).await
}

/// [`take`], counting each message taken on `progress`.
async fn take_counted(
    channel: &Channel,
    queue: &str,
    limit: usize,
    mut progress: Option<&mut Progress>,
) -> anyhow::Result<Vec<orderflow_broker::lapin::message::Delivery>> {
    let mut held = Vec::new();
    while held.len() < limit {
        match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .with_context(|| format!("reading {queue}"))?
        {
            Some(msg) => held.push(msg.delivery),
            None => break,
        }
        if let Some(p) = progress.as_deref_mut() {
            p.inc();
        }
    }
    Ok(held)
}

/// A dead letter in `dlq show --json`.
#[derive(Serialize)]
struct DeadLetter {
    message_id: Option<String>,
    /// The AMQP `type` property: the event type.
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Why it was dead-lettered (`x-orderflow-error`).
    error: Option<String>,
    /// The orderflow and dead-lettering headers (`x-orderflow-*`, `x-death`,
    /// `aggregate_id`), as text.
    headers: serde_json::Map<String, serde_json::Value>,
    /// The body: its JSON when it is JSON, else its text.
    body: serde_json::Value,
}

fn dead_letter(d: &orderflow_broker::lapin::message::Delivery) -> DeadLetter {
    let p = &d.properties;
    let mut headers = serde_json::Map::new();
    if let Some(table) = p.headers() {
        for (key, value) in table.inner() {
            let key = key.as_str();
            if key.starts_with("x-orderflow-") || key == "x-death" || key == "aggregate_id" {
                headers.insert(key.to_owned(), serde_json::Value::String(describe(value)));
            }
        }
    }
    let body = serde_json::from_slice(&d.data)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&d.data).into_owned()));
    DeadLetter {
        message_id: p.message_id().as_ref().map(|m| m.to_string()),
        kind: p.kind().as_ref().map(|m| m.to_string()),
        error: header_str(p, "x-orderflow-error"),
        headers,
        body,
    }
}

/// `dlq show`.
pub async fn show(args: DlqShowArgs) -> anyhow::Result<()> {
    let (conn, topology) = connect(&args.broker).await?;
    let queue = topology.dead_letter_queue(&args.consumer);
    if depth(&conn, &queue).await?.is_none() {
        bail!(
            "no dead-letter queue {queue}: is the consumer name right (`dlq list` counts each one's) and the prefix?"
        );
    }
    let channel = conn.create_channel().await?;
    let held = take(&channel, &queue, args.limit).await?;
    // Closing the channel returns every message to the queue.
    let _ = channel.close(200, "shown".into()).await;
    let _ = conn.close(200, "bye".into()).await;
    if args.json {
        let messages: Vec<DeadLetter> = held.iter().map(dead_letter).collect();
        return print_json(&serde_json::json!({
            "consumer": args.consumer,
            "queue": queue,
            "count": messages.len(),
            "messages": messages,
        }));
    }
    let mut o = String::new();
    writeln!(o, "{} dead letters in {queue} (shown, left in place):", held.len())?;
    for d in &held {
        let p = &d.properties;
        writeln!(o, "- message_id {}", p.message_id().as_ref().map(|m| m.as_str()).unwrap_or("(none)"))?;
        writeln!(o, "  type       {}", p.kind().as_ref().map(|m| m.as_str()).unwrap_or("(none)"))?;
        if let Some(headers) = p.headers() {
            for (key, value) in headers.inner() {
                let key = key.as_str();
                if key.starts_with("x-orderflow-") || key == "x-death" || key == "aggregate_id" {
                    writeln!(o, "  {key:<10} {}", describe(value))?;
                }
            }
        }
        let body = String::from_utf8_lossy(&d.data);
        let excerpt: String = body.chars().take(300).collect();
        writeln!(o, "  body       {excerpt}{}", if body.chars().count() > 300 { "…" } else { "" })?;
    }
    print(&o)
}

/// Headers of a requeued message: the failure counters are dropped so it
/// gets its full retries again; the last error is kept for reference.
fn fresh(props: &BasicProperties) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(headers) = props.headers() {
        for (key, value) in headers.inner() {
            let k = key.as_str();
            if matches!(
                k,
                "x-orderflow-attempt"
                    | "x-death"
                    | "x-delivery-count"
                    | "x-first-death-exchange"
                    | "x-first-death-queue"
                    | "x-first-death-reason"
                    | "x-last-death-exchange"
                    | "x-last-death-queue"
                    | "x-last-death-reason"
            ) {
                continue;
            }
            if k == "x-orderflow-error" {
                table.insert("x-orderflow-last-error".into(), value.clone());
                continue;
            }
            table.insert(key.clone(), value.clone());
        }
    }
    table.insert(
        "x-orderflow-requeued-at".into(),
        AMQPValue::LongString(LongString::from(chrono::Utc::now().to_rfc3339())),
    );
    props.clone().with_headers(table)
}

/// `dlq requeue --json`.
#[derive(Serialize)]
struct RequeueOutput<'a> {
    consumer: &'a str,
    /// The dead-letter queue the messages come from.
    from: &'a str,
    /// The consumer's work queue they go to.
    to: &'a str,
    dry_run: bool,
    operator: &'a str,
    reason: Option<&'a str>,
    /// How many were requeued (or would be, in a dry run).
    count: usize,
    /// Their message ids.
    message_ids: &'a [String],
    /// The message that could not be moved (it and the rest stay in the
    /// dead-letter queue), and why; null when all moved.
    failed: Option<RequeueFailure>,
}

#[derive(Serialize)]
struct RequeueFailure {
    message_id: String,
    error: String,
}

/// `dlq requeue`.
pub async fn requeue(args: DlqRequeueArgs) -> anyhow::Result<()> {
    let done = requeue_recorded(&args).await?;
    crate::ops::print(&done.report)?;
    done.failure.map_or(Ok(()), Err)
}

/// What a requeue did (also when it stopped part way).
pub(crate) struct Requeued {
    /// What `dlq requeue` prints.
    pub(crate) report: String,
    /// Message ids moved back to the work queue.
    pub(crate) requeued: Vec<String>,
    /// Why it stopped before the end, if it did (the rest stays in the DLQ).
    pub(crate) failure: Option<anyhow::Error>,
}

/// Requeues the dead letters `args` select and records it (the console
/// does the same as `dlq requeue`).
pub(crate) async fn requeue_recorded(args: &DlqRequeueArgs) -> anyhow::Result<Requeued> {
    if args.message_ids.is_empty() && !args.all {
        bail!("say which dead letters: --message-id ID (repeatable) or --all");
    }
    let (conn, topology) = connect(&args.broker).await?;
    let dlq = topology.dead_letter_queue(&args.consumer);
    let target = topology.queue(&args.consumer);
    let (Some(waiting), Some(_)) = (depth(&conn, &dlq).await?, depth(&conn, &target).await?) else {
        bail!("no queues for consumer {:?} under prefix {:?}", args.consumer, args.broker.topology_prefix);
    };
    let mut db =
        orderflow_db::establish(&args.db.database_url).await.context("recording the requeue needs the database")?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let expected = usize::try_from(waiting).unwrap_or(usize::MAX).min(args.limit);
    let mut reading = Progress::new("read", expected as u64, args.json);
    let held = take_counted(&channel, &dlq, args.limit, Some(&mut reading)).await?;
    reading.set_total(held.len() as u64);
    reading.finish();
    let wanted = |d: &orderflow_broker::lapin::message::Delivery| {
        args.all || d.properties.message_id().as_ref().is_some_and(|m| args.message_ids.iter().any(|w| w == m.as_str()))
    };
    let chosen: Vec<_> = held.iter().filter(|d| wanted(d)).collect();
    let mut o = String::new();
    let mut requeued = Vec::new();
    let mut failure = None;
    let mut moving = (!args.dry_run).then(|| Progress::new("requeue", chosen.len() as u64, args.json));
    for d in chosen {
        let id = d.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default();
        let error = header_str(&d.properties, "x-orderflow-error").unwrap_or_default();
        if args.dry_run {
            writeln!(o, "would requeue {id} to {target}  ({error})")?;
            requeued.push(id);
            continue;
        }
        // Confirmed in the work queue before it leaves the DLQ: never lost.
        match move_one(&channel, d, &target, &id).await {
            Ok(()) => {
                writeln!(o, "requeued {id} to {target}")?;
                requeued.push(id);
                if let Some(p) = moving.as_mut() {
                    p.inc();
                }
            }
            Err(e) => {
                failure = Some((id.clone(), e.context(format!("{id} stays in {dlq}"))));
                break;
            }
        }
    }
    if let Some(p) = moving {
        p.finish();
    }
    if !args.dry_run {
        // Record what moved, even if a later message failed.
        let selector =
            serde_json::json!({ "consumer": args.consumer, "message_ids": args.message_ids, "all": args.all });
        admin_record(&mut db, args, &selector, &requeued).await?;
        writeln!(o, "requeued {} dead letters (recorded as {})", requeued.len(), args.record.operator)?;
    }
    // Whatever was not requeued goes back to the DLQ.
    let _ = channel.close(200, "done".into()).await;
    let _ = conn.close(200, "bye".into()).await;
    let report = if args.json {
        format!(
            "{}\n",
            serde_json::to_string_pretty(&RequeueOutput {
                consumer: &args.consumer,
                from: &dlq,
                to: &target,
                dry_run: args.dry_run,
                operator: &args.record.operator,
                reason: args.record.reason.as_deref(),
                count: requeued.len(),
                message_ids: &requeued,
                failed: failure
                    .as_ref()
                    .map(|(id, e)| RequeueFailure { message_id: id.clone(), error: format!("{e:#}") }),
            })?
        )
    } else {
        o
    };
    Ok(Requeued { report, requeued, failure: failure.map(|(_, e)| e) })
}

async fn move_one(
    channel: &Channel,
    d: &orderflow_broker::lapin::message::Delivery,
    target: &str,
    id: &str,
) -> anyhow::Result<()> {
    let options = BasicPublishOptions { mandatory: true, ..Default::default() };
    let confirm =
        channel.basic_publish("".into(), target.into(), options, &d.data, fresh(&d.properties)).await?.await?;
    if !matches!(confirm, Confirmation::Ack(None)) {
        bail!("the broker did not accept {id} into {target}");
    }
    d.ack(BasicAckOptions::default()).await?;
    Ok(())
}

async fn admin_record(
    db: &mut Conn,
    args: &DlqRequeueArgs,
    selector: &serde_json::Value,
    ids: &[String],
) -> anyhow::Result<()> {
    orderflow_outbox::admin::record(
        db,
        "dlq",
        &args.record.operator,
        args.record.reason.as_deref(),
        selector,
        &serde_json::json!(ids),
        ids.len(),
    )
    .await
    .context("recording the requeue")
}
