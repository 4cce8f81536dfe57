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

/// The wait before retry number `n` (0 for the first) of something that
/// failed: `base` doubling per retry up to `max`, jittered. The one formula
/// of the platform: the relay's refused rows, notifications, and (with a
/// 100 ms base) [`reconnect`].
pub fn nth(n: u32, base: Duration, max: Duration) -> Duration {
    let mut waits = ExponentialBuilder::default().with_min_delay(base).with_max_delay(max).without_max_times().build();
    jitter(waits.nth(n.min(64) as usize).unwrap_or(max))
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
    fn nth_doubles_from_the_base_up_to_the_cap_within_jitter() {
        let (base, max) = (Duration::from_millis(500), Duration::from_secs(5));
        for (n, ms) in [(0, 500), (1, 1000), (2, 2000), (3, 4000), (4, 5000), (40, 5000)] {
            let expected = Duration::from_millis(ms);
            let wait = nth(n, base, max);
            assert!(
                wait >= expected.mul_f64(0.5) && wait < expected.mul_f64(1.5),
                "retry {n}: {wait:?} for {expected:?}"
            );
        }
    }

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
