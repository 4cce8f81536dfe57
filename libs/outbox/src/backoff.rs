//! Waits between retries, shared by the relay and the consumers so that every
//! reconnect in the platform backs off the same way.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// First wait after a failure.
const FIRST: Duration = Duration::from_millis(100);

/// Endless reconnect waits: 100 ms doubling up to `max`, each jittered. Start
/// a fresh one after a success, so that the next outage begins short again.
pub fn reconnect(max: Duration) -> Reconnect {
    Reconnect(ExponentialBuilder::default().with_min_delay(FIRST).with_max_delay(max).without_max_times().build())
}

/// See [`reconnect`].
#[derive(Debug)]
pub struct Reconnect(backon::ExponentialBackoff);

impl Reconnect {
    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        // The builder has no limit of attempts, so it never ends; the
        // fallback only keeps this total.
        jitter(self.0.next().unwrap_or(FIRST))
    }
}

/// `d` scaled by a random factor in [0.5, 1.5), so that many relays, consumers
/// or rows failing together do not retry in lockstep. (backon's own jitter
/// only adds, up to doubling the wait past its cap.)
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_within_jitter() {
        let mut waits = reconnect(Duration::from_secs(1));
        let expected = [100, 200, 400, 800, 1000, 1000];
        for ms in expected {
            let base = Duration::from_millis(ms);
            let wait = waits.next_wait();
            assert!(wait >= base.mul_f64(0.5) && wait < base.mul_f64(1.5), "{wait:?} for base {base:?}");
        }
    }
}
