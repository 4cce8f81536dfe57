use std::time::{SystemTime, UNIX_EPOCH};

use diesel::QueryableByName;
use diesel::sql_types::Text;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use diesel_migrations::EmbeddedMigrations;
use orderflow_db::Pool;

use crate::infra;

/// A fresh database, migrated with the platform's and the given service's
/// migrations, dropped when the value is dropped (kept if `TEST_KEEP_DB` is
/// set, for a look after a failure).
pub struct TestDb {
    /// Database name (`of_t_<unix time>_<random>`).
    pub name: String,
    /// Its URL.
    pub url: String,
    /// A pool on it.
    pub pool: Pool,
    admin_url: String,
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    datname: String,
}

/// Test databases older than this are leftovers of killed test runs.
const STALE_AFTER_SECS: u64 = 6 * 3600;

impl TestDb {
    /// Creates and migrates a database for one test.
    pub async fn new(service_migrations: Option<EmbeddedMigrations>) -> Self {
        crate::init_tracing();
        let infra = infra().await;
        let admin_url = infra.database_url.clone();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let name = format!("of_t_{now}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let mut admin = AsyncPgConnection::establish(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connect to test PostgreSQL ({}): {e}", infra.source));
        drop_stale(&mut admin, now).await;
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("create test database {name}: {e}"));
        let url = infra.database_url_for(&name);
        let pool = orderflow_db::connect(&url, 16).await.expect("pool on test database");
        orderflow_db::migrate(&pool, service_migrations).await.expect("migrate test database");
        Self { name, url, pool, admin_url }
    }

    /// A new pool of `size` on this database (e.g. for a second app).
    pub async fn new_pool(&self, size: usize) -> Pool {
        orderflow_db::connect(&self.url, size).await.expect("pool on test database")
    }
}

async fn drop_stale(admin: &mut AsyncPgConnection, now: u64) {
    let Ok(names) =
        diesel::sql_query("SELECT datname FROM pg_database WHERE datname LIKE 'of\\_t\\_%'").load::<Name>(admin).await
    else {
        return;
    };
    for n in names {
        let created = n.datname.split('_').nth(2).and_then(|s| s.parse::<u64>().ok()).unwrap_or(now);
        if now.saturating_sub(created) > STALE_AFTER_SECS {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", n.datname))
                .execute(admin)
                .await;
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        self.pool.close();
        if std::env::var_os("TEST_KEEP_DB").is_some() {
            eprintln!("TEST_KEEP_DB: keeping database {}", self.name);
            return;
        }
        let (name, admin_url) = (self.name.clone(), self.admin_url.clone());
        // Drop runs inside the test's runtime, where we cannot block on a
        // future; a thread with its own runtime can.
        let dropper = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let mut admin = AsyncPgConnection::establish(&admin_url).await.map_err(std::io::Error::other)?;
                diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(())
            })
        });
        if let Ok(Err(e)) = dropper.join() {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// Runs a query selecting one bigint named `n` (`SELECT count(*) AS n ...`).
pub async fn count(pool: &Pool, sql: &str) -> i64 {
    let mut conn = pool.get().await.expect("a connection to the test database");
    diesel::sql_query(sql).get_result::<Count>(&mut conn).await.unwrap_or_else(|e| panic!("{sql}: {e}")).n
}
