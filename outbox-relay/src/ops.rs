//! `status`, `replay` and `replays`: what operators see and repair.

use std::fmt::Write;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use orderflow_db::Conn;
use orderflow_outbox::admin::{self, Candidate, ReplayRecord, Scope, Selector, Status};
use serde::Serialize;

use crate::cli::{ReplayArgs, ReplaysArgs, ScopeArg, StatusArgs};
pub(crate) use crate::output::print;
use crate::output::{Progress, print_json, print_json_line};

async fn connect(url: &str) -> anyhow::Result<Conn> {
    Ok(orderflow_db::establish(url).await?)
}

pub(crate) fn age(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 1.0 => format!("{:.0} ms", s * 1000.0),
        Some(s) if s < 120.0 => format!("{s:.1} s"),
        Some(s) if s < 7200.0 => format!("{:.1} min", s / 60.0),
        Some(s) => format!("{:.1} h", s / 3600.0),
    }
}

fn status_text(s: &Status) -> anyhow::Result<String> {
    let mut o = String::new();
    writeln!(o, "backlog            {} rows ({} backing off)", s.backlog, s.backing_off)?;
    writeln!(o, "oldest unpublished {}", age(s.oldest_unpublished_age_seconds))?;
    writeln!(o, "published, kept    {} rows", s.published_retained)?;
    let dead: i64 = s.dead_by_type.iter().map(|t| t.count).sum();
    writeln!(o, "dead               {dead} rows")?;
    for t in &s.dead_by_type {
        writeln!(o, "  {:<28} {}", t.event_type, t.count)?;
    }
    writeln!(o, "relays             {}", s.relays.len())?;
    for r in &s.relays {
        let lanes: Vec<String> = r.lanes.iter().map(i32::to_string).collect();
        writeln!(o, "  {:<28} pid {:<7} {} lanes: {}", r.name, r.pid, r.lanes.len(), lanes.join(","))?;
    }
    if !s.unowned_lanes.is_empty() {
        let lanes: Vec<String> = s.unowned_lanes.iter().map(i32::to_string).collect();
        writeln!(o, "unowned lanes      {}", lanes.join(","))?;
    }
    Ok(o)
}

/// `outbox-relay status`.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    if let Some(every) = args.watch {
        return watch(&args, every).await;
    }
    let mut conn = connect(&args.db.database_url).await?;
    let s = admin::status(&mut conn).await.context("reading the outbox")?;
    if args.json {
        return print_json(&s);
    }
    print(&status_text(&s)?)
}

/// One frame of `status --watch --json`: the status fields of `status
/// --json` plus when it was read, or the error that frame met.
#[derive(Serialize)]
struct WatchFrame<'a> {
    at: DateTime<Utc>,
    #[serde(flatten)]
    status: Option<&'a Status>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `status --watch`: reads and shows the status every `every` until Ctrl-C
/// or SIGTERM. A database outage is shown and retried, not fatal: watching
/// is what an operator does during one.
async fn watch(args: &StatusArgs, every: Duration) -> anyhow::Result<()> {
    let stop = orderflow_web::shutdown_signal();
    // Redraw in place on a terminal; elsewhere (a log) append frames.
    let redraw = !args.json && std::io::stdout().is_terminal();
    let mut conn: Option<Conn> = None;
    loop {
        let at = Utc::now();
        let read = async {
            let c = match conn.take() {
                Some(c) => c,
                None => connect(&args.db.database_url).await?,
            };
            admin::status(conn.insert(c)).await.context("reading the outbox")
        };
        let result: anyhow::Result<Status> = tokio::select! {
            r = read => r,
            () = stop.cancelled() => return Ok(()),
        };
        if result.is_err() {
            // Reconnect on the next frame.
            conn = None;
        }
        if args.json {
            let (status, error) = match &result {
                Ok(s) => (Some(s), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            print_json_line(&WatchFrame { at, status, error })?;
        } else {
            let mut o = String::new();
            if redraw {
                // Clear the screen and go home.
                o.push_str("\x1b[2J\x1b[H");
            } else {
                o.push('\n');
            }
            writeln!(
                o,
                "outbox status at {} (every {}, Ctrl-C to stop)",
                at.to_rfc3339_opts(SecondsFormat::Secs, true),
                humantime::format_duration(every)
            )?;
            match &result {
                Ok(s) => o.push_str(&status_text(s)?),
                Err(e) => writeln!(o, "cannot read the outbox: {e:#} (retrying)")?,
            }
            print(&o)?;
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = stop.cancelled() => return Ok(()),
        }
    }
}

/// What a row is, for people and `--json` (`state`).
fn state(r: &Candidate) -> &'static str {
    if r.dead_at.is_some() {
        "dead"
    } else if r.published_at.is_some() {
        "published"
    } else {
        "stuck"
    }
}

/// A row in `replay --json`: the row's fields and its `state` before the replay.
#[derive(Serialize)]
struct ReplayRow<'a> {
    #[serde(flatten)]
    row: &'a Candidate,
    state: &'static str,
}

/// `replay --json`.
#[derive(Serialize)]
struct ReplayOutput<'a> {
    dry_run: bool,
    scope: Scope,
    operator: &'a str,
    reason: Option<&'a str>,
    count: usize,
    rows: Vec<ReplayRow<'a>>,
}

/// `outbox-relay replay`.
pub async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let selector = Selector {
        ids: args.ids.clone(),
        aggregate_id: args.aggregate.clone(),
        event_type: args.event_type.clone(),
        since: args.since,
        until: args.until,
    };
    if selector.is_empty() && !args.all {
        bail!(
            "no filter given: pass --id, --aggregate, --event-type, --since or --until, or --all to replay every {:?} row",
            args.scope
        );
    }
    let scope = match args.scope {
        ScopeArg::Dead => Scope::Dead,
        ScopeArg::Stuck => Scope::Stuck,
        ScopeArg::DeadOrStuck => Scope::DeadOrStuck,
        ScopeArg::Published => Scope::Published,
    };
    let mut conn = connect(&args.db.database_url).await?;
    let rows = if args.dry_run {
        admin::replay_candidates(&mut conn, scope, &selector).await.context("selecting rows")?
    } else {
        // The total is known once the rows are selected.
        let mut progress: Option<Progress> = None;
        let rows = admin::replay_with_progress(
            &mut conn,
            scope,
            &selector,
            &args.record.operator,
            args.record.reason.as_deref(),
            |done, total| {
                let p = progress.get_or_insert_with(|| Progress::new("replay", total as u64, args.json));
                p.set(done as u64);
            },
        )
        .await
        .context("replaying")?;
        if let Some(p) = progress {
            p.finish();
        }
        rows
    };
    if args.json {
        return print_json(&ReplayOutput {
            dry_run: args.dry_run,
            scope,
            operator: &args.record.operator,
            reason: args.record.reason.as_deref(),
            count: rows.len(),
            rows: rows.iter().map(|row| ReplayRow { row, state: state(row) }).collect(),
        });
    }
    let mut o = String::new();
    if args.dry_run {
        writeln!(o, "would replay {} rows (dry run, nothing changed):", rows.len())?;
        for r in &rows {
            writeln!(
                o,
                "  {:>8}  {:<22} {:<38} {:<9} attempts {:<3} {}",
                r.id,
                r.event_type,
                r.aggregate_id,
                state(r),
                r.attempts,
                r.last_error.as_deref().unwrap_or("")
            )?;
        }
        return print(&o);
    }
    writeln!(o, "replayed {} rows (recorded as {}):", rows.len(), args.record.operator)?;
    for r in &rows {
        writeln!(o, "  {:>8}  {:<22} {}", r.id, r.event_type, r.aggregate_id)?;
    }
    print(&o)
}

/// `replays --json`.
#[derive(Serialize)]
struct ReplaysOutput<'a> {
    replays: &'a [ReplayRecord],
}

/// `outbox-relay replays`.
pub async fn replays(args: ReplaysArgs) -> anyhow::Result<()> {
    let mut conn = connect(&args.db.database_url).await?;
    let records = admin::replays(&mut conn, args.limit).await.context("reading replays")?;
    if args.json {
        return print_json(&ReplaysOutput { replays: &records });
    }
    let mut o = String::new();
    for r in records {
        writeln!(
            o,
            "{}  #{:<5} {:<6} {:>5} items  by {:<12} {}  selector {}",
            r.replayed_at.format("%Y-%m-%d %H:%M:%S"),
            r.id,
            r.kind,
            r.item_count,
            r.operator,
            r.reason.as_deref().map(|x| format!("({x})")).unwrap_or_default(),
            r.selector
        )?;
    }
    print(&o)
}
