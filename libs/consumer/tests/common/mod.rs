//! Helpers shared by the consumer runtime's fault and topology tests.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel_async::RunQueryDsl;
use orderflow_broker::lapin::Channel;
use orderflow_broker::lapin::options::{BasicAckOptions, BasicGetOptions};
use orderflow_consumer::{Handler, HandlerError, Incoming};
use orderflow_db::{Conn, Pool};
use orderflow_envelope::{Envelope, Metadata};
use orderflow_testkit::events::Noted;
use uuid::Uuid;

/// Generous: 2 shared cores can be slow; passing tests return early.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Behaves as the reason of a `test.noted` says: `transient:N` fails
/// transiently N times, `permanent` always fails, `lock` updates the row
/// `hot` of table `products` (see [`create_products`]), anything else
/// succeeds. Every successful call also writes a row into `effects` when
/// that table exists.
#[derive(Clone, Default)]
pub struct Scripted {
    calls: Arc<Mutex<HashMap<Uuid, u32>>>,
}

impl Scripted {
    pub fn calls(&self, id: Uuid) -> u32 {
        self.calls.lock().unwrap().get(&id).copied().unwrap_or(0)
    }

    pub fn called(&self) -> HashSet<Uuid> {
        self.calls.lock().unwrap().keys().copied().collect()
    }
}

impl Handler for Scripted {
    type Event = Noted;

    async fn handle(&self, conn: &mut Conn, msg: Incoming<'_, Noted>) -> Result<(), HandlerError> {
        let ev = msg.event;
        let n = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(msg.envelope.message_id).or_default();
            *n += 1;
            *n
        };
        match ev.note.split_once(':') {
            Some(("transient", k)) if n <= k.parse().unwrap() => Err(HandlerError::Transient(format!("flaky #{n}"))),
            _ if ev.note == "permanent" => Err(HandlerError::Permanent("no way".into())),
            _ if ev.note == "lock" => {
                diesel::sql_query("UPDATE products SET stock = stock - 1 WHERE sku = 'hot'").execute(conn).await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

pub fn declined(reason: &str) -> Envelope {
    Envelope::new(&Noted { key: Uuid::now_v7().to_string(), note: reason.into() }, 1, &Metadata::default()).unwrap()
}

pub async fn exec(pool: &Pool, sql: &str) {
    let mut conn = pool.get().await.unwrap();
    diesel::sql_query(sql).execute(&mut conn).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

pub async fn create_products(pool: &Pool) {
    exec(pool, "CREATE TABLE products (sku TEXT PRIMARY KEY, stock INT NOT NULL)").await;
    exec(pool, "INSERT INTO products VALUES ('hot', 1000000)").await;
}

/// Takes (gets and acks) every message now in `queue`; returns their ids.
pub async fn drain(channel: &Channel, queue: &str) -> Vec<String> {
    let mut ids = Vec::new();
    while let Some(msg) = channel.basic_get(queue.into(), BasicGetOptions::default()).await.unwrap() {
        ids.push(msg.delivery.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default());
        msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    ids
}
