//! `status`, `replay` and `replays`: what operators see and repair.

use std::fmt::Write;

use anyhow::{Context, bail};
use orderflow_db::Conn;
use orderflow_outbox::admin::{self, Scope, Selector};

use crate::cli::{ReplayArgs, ReplaysArgs, ScopeArg, StatusArgs};

async fn connect(url: &str) -> anyhow::Result<Conn> {
    Ok(orderflow_db::establish(url).await?)
}

/// Prints a command's output (not a log) to stdout in one write: the lock
/// is never held across an await.
pub(crate) fn print(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
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

/// `outbox-relay status`.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let mut conn = connect(&args.db.database_url).await?;
    let s = admin::status(&mut conn).await.context("reading the outbox")?;
    let mut o = String::new();
    if args.json {
        writeln!(o, "{}", serde_json::to_string_pretty(&s)?)?;
        return print(&o);
    }
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
    print(&o)
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
    let mut o = String::new();
    if args.dry_run {
        let rows = admin::replay_candidates(&mut conn, scope, &selector).await.context("selecting rows")?;
        writeln!(o, "would replay {} rows (dry run, nothing changed):", rows.len())?;
        for r in &rows {
            let state = if r.dead_at.is_some() {
                "dead"
            } else if r.published_at.is_some() {
                "published"
            } else {
                "stuck"
            };
            writeln!(
                o,
                "  {:>8}  {:<22} {:<38} {:<9} attempts {:<3} {}",
                r.id,
                r.event_type,
                r.aggregate_id,
                state,
                r.attempts,
                r.last_error.as_deref().unwrap_or("")
            )?;
        }
        return print(&o);
    }
    let rows = admin::replay(&mut conn, scope, &selector, &args.record.operator, args.record.reason.as_deref())
        .await
        .context("replaying")?;
    writeln!(o, "replayed {} rows (recorded as {}):", rows.len(), args.record.operator)?;
    for r in &rows {
        writeln!(o, "  {:>8}  {:<22} {}", r.id, r.event_type, r.aggregate_id)?;
    }
    print(&o)
}

/// `outbox-relay replays`.
pub async fn replays(args: ReplaysArgs) -> anyhow::Result<()> {
    let mut conn = connect(&args.db.database_url).await?;
    let records = admin::replays(&mut conn, args.limit).await.context("reading replays")?;
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
