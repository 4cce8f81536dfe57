use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` until it returns true, panicking with `what` after
/// `deadline`. The poll interval is short and grows a little; the deadline
/// is generous because 2 shared cores can be slow, and a passing test
/// returns as soon as the condition holds.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_some(what, deadline, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `check` until it returns `Some`, and returns that value; panics
/// with `what` after `deadline`.
pub async fn eventually_some<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut interval = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 3 / 2).min(Duration::from_millis(200));
    }
}
