use diesel::sql_types::{BigInt, Text};
use diesel::{QueryableByName, sql_query};
use diesel_async::{AsyncMigrationHarness, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::{DbError, Pool};

/// The platform's DDL (outbox, inbox, ...), run by every service before its
/// own migrations.
pub const PLATFORM_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// Serializes migrations of one database across processes (a service and its
/// replicas starting at once).
const MIGRATION_LOCK: i64 = 0x6f72_6465_7266_6c6f; // "orderflo"

#[derive(QueryableByName)]
struct Found {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Creates the database named in `url` if it does not exist yet, by
/// connecting to the server's `postgres` database.
pub async fn ensure_database(url: &str) -> Result<(), DbError> {
    let mut parsed = url::Url::parse(url).map_err(|e| DbError::Config(format!("{e}: {}", crate::redact_url(url))))?;
    let name = parsed.path().trim_start_matches('/').to_owned();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(DbError::Config(format!(
            "database name {name:?} in {} must be non-empty and use only letters, digits and _",
            crate::redact_url(url)
        )));
    }
    parsed.set_path("/postgres");
    let mut conn = crate::establish(parsed.as_str()).await?;
    let found: Found = sql_query("SELECT count(*) AS n FROM pg_database WHERE datname = $1")
        .bind::<Text, _>(&name)
        .get_result(&mut conn)
        .await?;
    if found.n > 0 {
        return Ok(());
    }
    // The name was validated above, so quoting it is enough.
    match sql_query(format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await {
        Ok(_) => {
            tracing::info!(database = %name, "created database");
            Ok(())
        }
        // Another process created it between our check and our CREATE.
        Err(e) if e.to_string().contains("already exists") || e.to_string().contains("pg_database_datname_index") => {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Runs the platform migrations, then the service's own (none for a
/// platform-only database), holding an advisory
/// lock so concurrent starters do not race. Needs the multi-thread runtime
/// (diesel's migration harness is synchronous and runs in `block_in_place`).
pub async fn migrate(pool: &Pool, service: Option<EmbeddedMigrations>) -> Result<(), DbError> {
    let mut conn = pool.get().await.map_err(|e| DbError::Migration(e.into()))?;
    sql_query("SELECT pg_advisory_lock($1)").bind::<BigInt, _>(MIGRATION_LOCK).execute(&mut conn).await?;
    let mut harness = AsyncMigrationHarness::new(conn);
    let result = run_all(&mut harness, service);
    let mut conn = harness.into_inner();
    sql_query("SELECT pg_advisory_unlock($1)").bind::<BigInt, _>(MIGRATION_LOCK).execute(&mut conn).await?;
    result
}

fn run_all<H: MigrationHarness<diesel::pg::Pg>>(
    harness: &mut H,
    service: Option<EmbeddedMigrations>,
) -> Result<(), DbError> {
    for source in std::iter::once(PLATFORM_MIGRATIONS).chain(service) {
        let applied = harness.run_pending_migrations(source).map_err(DbError::Migration)?;
        for version in applied {
            tracing::info!(%version, "applied migration");
        }
    }
    Ok(())
}
