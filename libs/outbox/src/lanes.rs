//! Lane leases on PostgreSQL advisory locks.
//!
//! Every relay of a database holds a membership lock `(MEMBER_LOCK_CLASS,
//! backend pid)` for the life of its session, and one lock
//! `(LANE_LOCK_CLASS, lane)` per lane it owns. Nothing is stored: the live
//! relays and the lane owners are read back from `pg_locks`, and a relay
//! that dies (or whose connection drops) releases everything with its
//! session. Each relay aims at a fair share, `ceil(LANE_COUNT / relays)`,
//! giving lanes back above it and taking free lanes below it, so relays
//! joining or leaving rebalance within one lease interval.
//!
//! Lanes spread the work; they are not what keeps an aggregate in order.
//! The claim only takes the head of each aggregate's queue (see
//! `store::claim`), so even a claim transaction of a dead relay that is
//! still open for a moment cannot be overtaken: its rows are skipped as
//! locked, and the events behind them are not heads until they are gone.

use std::collections::BTreeSet;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Bool, Integer};
use diesel_async::RunQueryDsl;
use orderflow_db::Conn;
use orderflow_envelope::LANE_COUNT;

/// Advisory lock class of lane leases (`pg_locks.classid`).
pub const LANE_LOCK_CLASS: i32 = 0x4F46_4C4E;
/// Advisory lock class of relay membership (`pg_locks.classid`).
pub const MEMBER_LOCK_CLASS: i32 = 0x4F46_4D42;

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct Lane {
    #[diesel(sql_type = Integer)]
    lane: i32,
}

#[derive(QueryableByName)]
struct Locked {
    #[diesel(sql_type = Bool)]
    locked: bool,
}

/// The lanes this session owns.
pub(crate) struct Lanes {
    held: BTreeSet<i16>,
}

impl Lanes {
    /// Announces this session as a relay of the database.
    pub(crate) async fn join(conn: &mut Conn) -> diesel::QueryResult<Self> {
        diesel::sql_query("SELECT pg_advisory_lock($1, pg_backend_pid())")
            .bind::<Integer, _>(MEMBER_LOCK_CLASS)
            .execute(conn)
            .await?;
        Ok(Self { held: BTreeSet::new() })
    }

    /// Owned lanes, ascending.
    pub(crate) fn held(&self) -> Vec<i16> {
        self.held.iter().copied().collect()
    }

    /// Moves towards the fair share: releases lanes above it, takes free
    /// lanes below it.
    pub(crate) async fn rebalance(&mut self, conn: &mut Conn, relay_id: &str) -> diesel::QueryResult<()> {
        let relays: Count = diesel::sql_query(
            "SELECT count(*) AS n FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND classid::bigint = $1 \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .bind::<BigInt, _>(i64::from(MEMBER_LOCK_CLASS))
        .get_result(conn)
        .await?;
        let relays = relays.n.max(1) as usize;
        let lanes = LANE_COUNT as usize;
        let target = lanes.div_ceil(relays);
        let before = self.held.len();

        while self.held.len() > target {
            let Some(lane) = self.held.pop_last() else { break };
            diesel::sql_query("SELECT pg_advisory_unlock($1, $2)")
                .bind::<Integer, _>(LANE_LOCK_CLASS)
                .bind::<Integer, _>(i32::from(lane))
                .execute(conn)
                .await?;
        }
        if self.held.len() < target {
            let taken: BTreeSet<i16> = diesel::sql_query(
                "SELECT objid::int AS lane FROM pg_locks \
                 WHERE locktype = 'advisory' AND granted AND classid::bigint = $1 \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .bind::<BigInt, _>(i64::from(LANE_LOCK_CLASS))
            .load::<Lane>(conn)
            .await?
            .into_iter()
            .filter_map(|l| i16::try_from(l.lane).ok())
            .collect();
            for lane in 0..LANE_COUNT {
                if self.held.len() >= target {
                    break;
                }
                if taken.contains(&lane) || self.held.contains(&lane) {
                    continue;
                }
                let got: Locked = diesel::sql_query("SELECT pg_try_advisory_lock($1, $2) AS locked")
                    .bind::<Integer, _>(LANE_LOCK_CLASS)
                    .bind::<Integer, _>(i32::from(lane))
                    .get_result(conn)
                    .await?;
                if got.locked {
                    self.held.insert(lane);
                }
            }
        }
        if self.held.len() != before {
            tracing::info!(relay = relay_id, relays, lanes = self.held.len(), target, "lanes rebalanced");
        }
        metrics::gauge!("outbox_relay_lanes_owned").set(self.held.len() as f64);
        Ok(())
    }
}
