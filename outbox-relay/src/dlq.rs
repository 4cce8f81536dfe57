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

use crate::cli::{BrokerTarget, DlqListArgs, DlqRequeueArgs, DlqShowArgs};

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

/// `dlq list`.
pub async fn list(args: DlqListArgs) -> anyhow::Result<()> {
    let (conn, topology) = connect(&args.broker).await?;
    let mut o = String::new();
    writeln!(o, "{:<16} {:>10}  queue", "consumer", "dead")?;
    for consumer in &args.consumers {
        let queue = topology.dead_letter_queue(consumer);
        match depth(&conn, &queue).await? {
            Some(n) => writeln!(o, "{consumer:<16} {n:>10}  {queue}")?,
            None => writeln!(o, "{consumer:<16} {:>10}  {queue} (not declared)", "-")?,
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    crate::ops::print(&o)
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
    }
    Ok(held)
}

/// `dlq show`.
pub async fn show(args: DlqShowArgs) -> anyhow::Result<()> {
    let (conn, topology) = connect(&args.broker).await?;
    let queue = topology.dead_letter_queue(&args.consumer);
    if depth(&conn, &queue).await?.is_none() {
        bail!(
            "no dead-letter queue {queue}: is the consumer name right (orders, inventory, payment, shipping, notification) and the prefix?"
        );
    }
    let channel = conn.create_channel().await?;
    let held = take(&channel, &queue, args.limit).await?;
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
    // Closing the channel returns every message to the queue.
    let _ = channel.close(200, "shown".into()).await;
    let _ = conn.close(200, "bye".into()).await;
    crate::ops::print(&o)
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
    if depth(&conn, &dlq).await?.is_none() || depth(&conn, &target).await?.is_none() {
        bail!("no queues for consumer {:?} under prefix {:?}", args.consumer, args.broker.topology_prefix);
    }
    let mut db =
        orderflow_db::establish(&args.db.database_url).await.context("recording the requeue needs the database")?;
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    let held = take(&channel, &dlq, args.limit).await?;
    let wanted = |d: &orderflow_broker::lapin::message::Delivery| {
        args.all || d.properties.message_id().as_ref().is_some_and(|m| args.message_ids.iter().any(|w| w == m.as_str()))
    };
    let mut o = String::new();
    let mut requeued = Vec::new();
    let mut failure = None;
    for d in held.iter().filter(|d| wanted(d)) {
        let id = d.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default();
        let error = header_str(&d.properties, "x-orderflow-error").unwrap_or_default();
        if args.dry_run {
            writeln!(o, "would requeue {id} to {target}  ({error})")?;
            continue;
        }
        // Confirmed in the work queue before it leaves the DLQ: never lost.
        match move_one(&channel, d, &target, &id).await {
            Ok(()) => {
                writeln!(o, "requeued {id} to {target}")?;
                requeued.push(id);
            }
            Err(e) => {
                failure = Some(e.context(format!("{id} stays in {dlq}")));
                break;
            }
        }
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
    Ok(Requeued { report: o, requeued, failure })
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
