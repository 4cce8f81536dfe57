//! Prepared statements for the queries diesel will not cache.
//!
//! diesel prepares a statement once per connection and reuses it only for
//! queries it can prove always render the same SQL. It refuses every
//! `UPDATE`, every PostgreSQL `INSERT` (a value may render as `DEFAULT`),
//! `ON CONFLICT`, `eq_any` and raw `sql_query`: each of those is parsed,
//! planned and prepared again on every execution, and diesel-async prepares
//! it in a round trip of its own before the one that runs it. On the hot
//! paths (the inbox, the outbox, the handlers' writes, the relay's claims)
//! that was most of the database's work per message.
//!
//! [`Cached`] marks a query as safe to cache, which is sound because it
//! also gives up diesel's per-type cache key: the statement is cached by
//! its SQL text and bind types, so a query that renders different SQL (a
//! changeset without one of its optional columns, a batch insert of another
//! size) gets a statement of its own.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::result::QueryResult;

/// A query whose prepared statement is cached per connection by its SQL
/// text (see the module docs). Made with [`CachedDsl::cached`] (or
/// [`CachedDsl::cached_if`]).
#[derive(Debug, Clone, Copy)]
pub struct Cached<Q>(Q, bool);

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for Cached<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &Pg) -> QueryResult<bool> {
        Ok(self.1)
    }
}

impl<Q> QueryId for Cached<Q> {
    type QueryId = ();
    // No static id: the cache is keyed by the SQL text and bind types.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Cached<Q> {
    type SqlType = Q::SqlType;
}

/// `.cached()` on any query (before `execute`, `get_result(s)` or `load`).
pub trait CachedDsl: Sized {
    /// This query, with its prepared statement cached per connection.
    fn cached(self) -> Cached<Self> {
        Cached(self, true)
    }

    /// As [`CachedDsl::cached`] when `cache` is true; prepared anew on each
    /// execution otherwise. For statements whose SQL varies without bound,
    /// e.g. a batch insert of any size: every size cached on every pooled
    /// connection costs the service megabytes of statements (and the
    /// server as much), for statements a batch runs once.
    fn cached_if(self, cache: bool) -> Cached<Self> {
        Cached(self, cache)
    }
}

impl<Q: QueryFragment<Pg>> CachedDsl for Q {}
