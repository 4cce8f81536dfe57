//! Long polls: `GET /orders/{id}?wait=N` answers when the order leaves
//! `pending` (or after N seconds), instead of the client asking again and
//! again. A request waits on the order's [`Notify`] here, holding no
//! database connection; whatever finalizes an order in this process (the
//! consumer after its batch commits, a cancel after its commit) wakes it,
//! and it reads the order again.
//!
//! A change committed by another instance of order-service wakes nobody
//! here: a waiting request also reads again after [`RECHECK`], then after
//! twice as long each time up to [`RECHECK_MAX`], so it sees such a change
//! within that bound (and one made by this process at once). The backoff
//! keeps a backlog of waiting requests from turning into a flood of reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// When a waiting request first reads the order again even if nobody woke
/// it (a change made by another instance, or lost in a crash between commit
/// and wake-up).
pub const RECHECK: Duration = Duration::from_millis(500);

/// The longest wait between two such reads.
pub const RECHECK_MAX: Duration = Duration::from_secs(4);

/// The orders that requests are waiting on, each with its [`Notify`].
#[derive(Debug, Default)]
pub struct Waiters {
    map: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Waiters {
    /// Starts watching order `id`: the [`Watch`] is woken by [`Self::wake`].
    pub fn watch(self: &Arc<Self>, id: &str) -> Watch {
        let notify = self.lock().entry(id.to_owned()).or_default().clone();
        Watch { waiters: self.clone(), id: id.to_owned(), notify }
    }

    /// Wakes every request waiting on one of `ids` (after their change
    /// committed).
    pub fn wake<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let map = self.lock();
        if map.is_empty() {
            return;
        }
        for id in ids {
            if let Some(n) = map.get(id) {
                n.notify_waiters();
            }
        }
    }

    /// Orders being waited on.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no request waits.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        // The map stays consistent whatever panicked while holding it.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One request's interest in an order; forgotten when dropped.
#[derive(Debug)]
pub struct Watch {
    waiters: Arc<Waiters>,
    id: String,
    notify: Arc<Notify>,
}

impl Watch {
    /// The order's notification: create and `enable` the future before
    /// reading the order, so a wake-up between the read and the wait is not
    /// lost.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        // Under the lock nobody else can take a new reference: two left
        // (the map's and this one) means this was the last watcher.
        if map.get(&self.id).is_some_and(|n| Arc::strong_count(n) <= 2) {
            map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn a_wake_reaches_every_watcher_of_the_order_and_the_last_one_cleans_up() {
        let waiters = Arc::new(Waiters::default());
        let (a, b, other) = (waiters.watch("o-1"), waiters.watch("o-1"), waiters.watch("o-2"));
        {
            let (fa, fb, fo) = (a.notify().notified(), b.notify().notified(), other.notify().notified());
            tokio::pin!(fa, fb, fo);
            fa.as_mut().enable();
            fb.as_mut().enable();
            fo.as_mut().enable();
            waiters.wake(["o-1"]);
            tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(fa, fb) }).await.unwrap();
            assert!(futures_now(fo).is_none(), "o-2 was not changed");
        }
        assert_eq!(waiters.len(), 2);
        drop(a);
        assert_eq!(waiters.len(), 2, "b still watches o-1");
        drop((b, other));
        assert!(waiters.is_empty());
    }

    fn futures_now<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        match f.poll(&mut std::task::Context::from_waker(waker)) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }
}
