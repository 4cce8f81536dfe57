//! A circuit breaker for the webhook: after `threshold` consecutive
//! failures it opens and no calls are made for `cooldown`; then it lets one
//! probe through (half-open); the probe's success closes it, its failure
//! opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The breaker's state, as reported in metrics and `/notifications/webhook`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// No calls until the cooldown ends.
    Open,
    /// One probe call is allowed.
    HalfOpen,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// See the module docs.
#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self { threshold: threshold.max(1), cooldown, inner: Mutex::new(Inner::Closed { failures: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May a call be made now? `Err(wait)` says how long until it may.
    pub fn try_acquire(&self) -> Result<(), Duration> {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } => Ok(()),
            Inner::Open { until } => {
                let now = Instant::now();
                if now >= until {
                    *inner = Inner::HalfOpen { probing: true };
                    Ok(())
                } else {
                    Err(until - now)
                }
            }
            // One probe at a time; the others wait for its verdict.
            Inner::HalfOpen { probing: true } => Err(self.cooldown.min(Duration::from_millis(100))),
            Inner::HalfOpen { probing: false } => {
                *inner = Inner::HalfOpen { probing: true };
                Ok(())
            }
        }
    }

    /// How long the breaker stays open, if it is (does not start a probe).
    pub fn try_acquire_peek(&self) -> Option<Duration> {
        match *self.lock() {
            Inner::Open { until } => until.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()),
            _ => None,
        }
    }

    /// A call succeeded: close.
    pub fn on_success(&self) {
        let mut inner = self.lock();
        if !matches!(*inner, Inner::Closed { failures: 0 }) {
            tracing::info!("webhook circuit breaker closed");
        }
        *inner = Inner::Closed { failures: 0 };
        metrics::gauge!("notification_breaker_state").set(0.0);
    }

    /// A call failed: count it, open at the threshold or after a failed probe.
    pub fn on_failure(&self) {
        let mut inner = self.lock();
        let open = match *inner {
            Inner::Closed { failures } if failures + 1 < self.threshold => {
                *inner = Inner::Closed { failures: failures + 1 };
                false
            }
            _ => true,
        };
        if open {
            tracing::warn!(cooldown = ?self.cooldown, "webhook circuit breaker open");
            *inner = Inner::Open { until: Instant::now() + self.cooldown };
            metrics::gauge!("notification_breaker_state").set(1.0);
            metrics::counter!("notification_breaker_opened_total").increment(1);
        }
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if Instant::now() < until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_at_the_threshold_probes_once_and_closes_on_success() {
        let b = CircuitBreaker::new(3, Duration::from_millis(30));
        for _ in 0..2 {
            assert!(b.try_acquire().is_ok());
            b.on_failure();
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_err(), "no calls while open");

        std::thread::sleep(Duration::from_millis(40));
        assert!(b.try_acquire().is_ok(), "the probe");
        assert!(b.try_acquire().is_err(), "only one probe at a time");
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Open, "a failed probe reopens");

        std::thread::sleep(Duration::from_millis(40));
        assert!(b.try_acquire().is_ok());
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.try_acquire().is_ok());
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let b = CircuitBreaker::new(2, Duration::from_secs(60));
        b.on_failure();
        b.on_success();
        b.on_failure();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
