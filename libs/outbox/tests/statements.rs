//! The hot paths' statements are prepared once per connection and reused:
//! diesel on its own prepares every `INSERT`, `UPDATE` and raw statement
//! anew on each execution (a round trip and a plan each time), which was
//! most of the database's work per message (issue 10). `orderflow_db::Cached`
//! keeps them; PostgreSQL's own `pg_prepared_statements` shows it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use diesel::QueryableByName;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Text};
use diesel_async::{AsyncConnection, RunQueryDsl};
use orderflow_db::schema::outbox;
use orderflow_db::{CachedDsl, Conn};
use orderflow_envelope::{Envelope, Metadata};
use orderflow_testkit::TestDb;
use orderflow_testkit::events::Noted;

#[derive(QueryableByName, Debug, PartialEq)]
struct Prepared {
    #[diesel(sql_type = BigInt)]
    statements: i64,
    #[diesel(sql_type = BigInt)]
    executions: i64,
}

/// Prepared statements of this session whose text starts with `prefix`,
/// and how often they ran (generic and custom plans).
async fn prepared(conn: &mut Conn, prefix: &str) -> Prepared {
    diesel::sql_query(
        "SELECT count(*) AS statements, coalesce(sum(generic_plans + custom_plans), 0)::bigint AS executions \
         FROM pg_prepared_statements WHERE statement LIKE $1 || '%'",
    )
    .bind::<Text, _>(prefix)
    .get_result(conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_append_and_the_relay_marks_are_prepared_once_per_connection() {
    let db = TestDb::new(None).await;
    let mut pooled = db.pool.get().await.unwrap();
    let conn: &mut Conn = &mut pooled;

    for n in 0..6 {
        let event =
            Envelope::new(&Noted { key: "k".into(), note: format!("n{n}") }, n + 1, &Metadata::default()).unwrap();
        conn.transaction::<_, diesel::result::Error, _>(async |tx| orderflow_outbox::append(tx, &[event]).await)
            .await
            .unwrap();
        // The same UPDATE as it would run without `Cached`, and with it.
        diesel::update(outbox::table.filter(outbox::id.eq(-1)))
            .set(outbox::attempts.eq(1))
            .execute(conn)
            .await
            .unwrap();
        diesel::update(outbox::table.filter(outbox::id.eq(-2)))
            .set(outbox::attempts.eq(2))
            .cached()
            .execute(conn)
            .await
            .unwrap();
    }
    // One statement each, run six times: parsed and prepared once.
    assert_eq!(prepared(conn, "INSERT INTO \"outbox\"").await, Prepared { statements: 1, executions: 6 });
    assert_eq!(
        prepared(conn, "UPDATE \"outbox\"").await,
        Prepared { statements: 1, executions: 6 },
        "only the cached UPDATE is kept"
    );
}
