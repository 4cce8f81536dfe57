//! Rows held back until just before a batch's commit, so that each kind
//! goes in with one statement for the whole batch instead of one per
//! message.
//!
//! A consumer's batch runs many handlers in one transaction, and most of
//! what they write are plain inserts (an outbox row per event, a timeline
//! entry per message). The runtime opens a [`scope`], turns holding on with
//! [`start`] where a failure need not be pinned on one message, and calls
//! [`flush`] before it commits. A writer offers its rows with [`hold`]: held
//! if holding is on, handed back to be written at once otherwise (outside a
//! scope, e.g. an HTTP handler, or in a batch run with one savepoint per
//! message). Held rows are not in the transaction until the flush: the
//! transaction's own queries do not see them, and a scope that ends
//! without a flush drops them, as a rollback would.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;

use diesel::QueryResult;

use crate::Conn;

/// A kind of row that can be held: how a batch of them is written.
pub trait HeldRows: Send + Sized + 'static {
    /// Writes `rows` (in the order they were held), with one statement as a
    /// rule.
    fn write(conn: &mut Conn, rows: Vec<Self>) -> impl Future<Output = QueryResult<()>> + Send;
}

type Write<'a> = Pin<Box<dyn Future<Output = QueryResult<()>> + Send + 'a>>;

/// The rows of one kind, behind a type-erased face.
trait Kind: Send {
    fn as_any(&mut self) -> &mut dyn Any;
    fn write<'a>(self: Box<Self>, conn: &'a mut Conn) -> Write<'a>;
}

impl<R: HeldRows> Kind for Vec<R> {
    fn as_any(&mut self) -> &mut dyn Any {
        self
    }

    fn write<'a>(self: Box<Self>, conn: &'a mut Conn) -> Write<'a> {
        Box::pin(R::write(conn, *self))
    }
}

/// Held rows by kind, kinds in the order they were first held.
type Held = Vec<Box<dyn Kind>>;

tokio::task_local! {
    /// `None` while not holding.
    static HELD: RefCell<Option<Held>>;
}

/// Runs `work` in a scope where [`start`] may turn holding on (off at
/// first).
pub async fn scope<F: Future>(work: F) -> F::Output {
    HELD.scope(RefCell::new(None), work).await
}

/// Holds rows offered from now on in this [`scope`] until [`flush`]. Outside
/// a scope it does nothing.
pub fn start() {
    let _ = HELD.try_with(|held| {
        held.borrow_mut().get_or_insert_with(Vec::new);
    });
}

/// Holds `rows` if holding is on in this task; hands them back to be
/// written at once otherwise.
pub fn hold<R: HeldRows>(rows: Vec<R>) -> Result<(), Vec<R>> {
    let mut rows = Some(rows);
    let _ = HELD.try_with(|held| {
        let mut held = held.borrow_mut();
        let Some(held) = held.as_mut() else { return };
        let Some(taken) = rows.take() else { return };
        match held.iter_mut().find_map(|kind| kind.as_any().downcast_mut::<Vec<R>>()) {
            Some(kind) => kind.extend(taken),
            None => held.push(Box::new(taken)),
        }
    });
    rows.map_or(Ok(()), Err)
}

/// Writes every held row, a statement per kind in the order the kinds were
/// first held, and turns holding off.
pub async fn flush(conn: &mut Conn) -> QueryResult<()> {
    let held = HELD.try_with(|held| held.borrow_mut().take()).ok().flatten().unwrap_or_default();
    for kind in held {
        kind.write(conn).await?;
    }
    Ok(())
}
