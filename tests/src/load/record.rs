//! The driver's accounting, as a function of times alone (offsets from the
//! start of the run), so that it can be checked with made-up times.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::report::LatencySummary;

/// When order `i` is due, from the start of the run, at `rate` per second.
/// Computed from `i` (never by adding up periods), so no drift accumulates
/// and a late order never moves the ones after it.
pub fn scheduled_offset(i: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / rate)
}

/// Latencies are kept in microseconds, up to an hour.
fn histogram() -> Histogram<u64> {
    // 1 µs to 1 h at 3 significant digits: fixed size, no allocation while
    // recording. Constant bounds that are valid: this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// How a final order ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalStatus {
    Confirmed,
    Failed,
    Cancelled,
}

/// Counts and histograms of one run. Every time is an offset from the start
/// of the run; an order is "in the window" when it was scheduled after the
/// warm-up and before the end of the load.
#[derive(Debug)]
pub struct Recorder {
    warmup: Duration,
    end: Duration,
    /// Scheduled time -> first poll that saw the final status (orders
    /// scheduled in the window; unfinished ones at their age at the end).
    pub e2e: Histogram<u64>,
    /// Scheduled time -> POST response (orders scheduled in the window).
    pub post: Histogram<u64>,
    /// Send -> POST response: what the server alone took.
    pub post_service: Histogram<u64>,
    /// Scheduled time -> send: how late the driver sent (waiting for a
    /// free connection, or busy itself).
    pub send_lag: Histogram<u64>,
    /// Last poll that saw the order pending -> the poll that saw it final:
    /// the resolution of each end-to-end latency.
    pub resolution: Histogram<u64>,
    pub scheduled: u64,
    pub sent: u64,
    pub accepted: u64,
    /// 201 responses received within the window.
    pub accepted_in_window: u64,
    /// Orders seen final within the window.
    pub completed_in_window: u64,
    pub confirmed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Accepted orders not final when the driver stopped.
    pub not_final: u64,
    /// Orders due before the end that could not be sent by the end (every
    /// connection busy).
    pub not_sent: u64,
    pub post_errors: BTreeMap<String, u64>,
    pub polls: u64,
    pub poll_errors: u64,
}

impl Recorder {
    /// A recorder for a run whose load lasts `end` and whose first `warmup`
    /// is left out of the rates and latencies.
    pub fn new(warmup: Duration, end: Duration) -> Self {
        Self {
            warmup: warmup.min(end),
            end,
            e2e: histogram(),
            post: histogram(),
            post_service: histogram(),
            send_lag: histogram(),
            resolution: histogram(),
            scheduled: 0,
            sent: 0,
            accepted: 0,
            accepted_in_window: 0,
            completed_in_window: 0,
            confirmed: 0,
            failed: 0,
            cancelled: 0,
            not_final: 0,
            not_sent: 0,
            post_errors: BTreeMap::new(),
            polls: 0,
            poll_errors: 0,
        }
    }

    /// Length of the measured window (load minus warm-up).
    pub fn window(&self) -> Duration {
        self.end - self.warmup
    }

    fn in_window(&self, t: Duration) -> bool {
        t >= self.warmup && t < self.end
    }

    /// Order scheduled at `at` was sent at `sent` and answered at `done`
    /// with `outcome` (an HTTP status, or the name of a transport error).
    pub fn on_post(&mut self, at: Duration, sent: Duration, done: Duration, outcome: Result<u16, &str>) {
        self.sent += 1;
        if self.in_window(at) {
            self.post.saturating_record(micros(done.saturating_sub(at)));
            self.send_lag.saturating_record(micros(sent.saturating_sub(at)));
        }
        self.post_service.saturating_record(micros(done.saturating_sub(sent)));
        match outcome {
            Ok(201) => {
                self.accepted += 1;
                if self.in_window(done) {
                    self.accepted_in_window += 1;
                }
            }
            Ok(code) => *self.post_errors.entry(format!("HTTP {code}")).or_default() += 1,
            Err(kind) => *self.post_errors.entry(kind.to_owned()).or_default() += 1,
        }
    }

    /// Order scheduled at `at` was seen final at `seen`; the poll before
    /// (or the POST's answer) saw it pending at `pending_seen`.
    pub fn on_final(&mut self, at: Duration, seen: Duration, pending_seen: Duration, status: FinalStatus) {
        match status {
            FinalStatus::Confirmed => self.confirmed += 1,
            FinalStatus::Failed => self.failed += 1,
            FinalStatus::Cancelled => self.cancelled += 1,
        }
        if self.in_window(seen) {
            self.completed_in_window += 1;
        }
        if self.in_window(at) {
            self.e2e.saturating_record(micros(seen.saturating_sub(at)));
        }
        self.resolution.saturating_record(micros(seen.saturating_sub(pending_seen)));
    }

    /// Order scheduled at `at` was still pending when the driver stopped at
    /// `now`: its latency is at least its age, and it is recorded as such.
    pub fn on_not_final(&mut self, at: Duration, now: Duration) {
        self.not_final += 1;
        if self.in_window(at) {
            self.e2e.saturating_record(micros(now.saturating_sub(at)));
        }
    }

    /// Order scheduled at `at` could not be sent by `now`, the end of the
    /// load (every connection busy): it counts as not sent, and in the
    /// latencies at its age then (a lower bound), so that a driver that
    /// falls behind cannot make the figures look better.
    pub fn on_not_sent(&mut self, at: Duration, now: Duration) {
        self.not_sent += 1;
        if self.in_window(at) {
            self.post.saturating_record(micros(now.saturating_sub(at)));
            self.e2e.saturating_record(micros(now.saturating_sub(at)));
        }
    }

    /// Rate of `n` events over the window, per second.
    pub fn per_second(&self, n: u64) -> f64 {
        let w = self.window().as_secs_f64();
        if w > 0.0 { n as f64 / w } else { 0.0 }
    }

    /// p50/p90/p99/max of `h`, in milliseconds.
    pub fn summary(h: &Histogram<u64>) -> LatencySummary {
        let ms = |v: u64| v as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn schedule_is_computed_not_accumulated() {
        assert_eq!(scheduled_offset(0, 200.0), ms(0));
        assert_eq!(scheduled_offset(200, 200.0), ms(1000));
        // 1/3 s periods added 3 million times would drift; computed, they do not.
        assert_eq!(scheduled_offset(3_000_000, 3.0), Duration::from_secs(1_000_000));
    }

    #[test]
    fn latency_counts_from_the_scheduled_time_when_the_send_is_late() {
        let mut r = Recorder::new(ms(1000), ms(11_000));
        // Due at 2.0 s, sent 500 ms late (no free connection), answered 10 ms later.
        r.on_post(ms(2000), ms(2500), ms(2510), Ok(201));
        // Seen pending at 2.6 s, final at 2.62 s.
        r.on_final(ms(2000), ms(2620), ms(2600), FinalStatus::Confirmed);
        let post = Recorder::summary(&r.post);
        assert!((post.p50_ms - 510.0).abs() < 1.0, "{post:?}");
        assert!((Recorder::summary(&r.post_service).max_ms - 10.0).abs() < 0.1);
        assert!((Recorder::summary(&r.send_lag).max_ms - 500.0).abs() < 1.0);
        let e2e = Recorder::summary(&r.e2e);
        assert!((e2e.p50_ms - 620.0).abs() < 1.0, "{e2e:?}");
        assert!((Recorder::summary(&r.resolution).max_ms - 20.0).abs() < 0.1);
        assert_eq!((r.accepted, r.accepted_in_window, r.completed_in_window, r.confirmed), (1, 1, 1, 1));
    }

    #[test]
    fn warm_up_is_left_out_of_rates_and_latencies_but_not_of_counts() {
        let mut r = Recorder::new(ms(1000), ms(3000));
        r.on_post(ms(500), ms(500), ms(600), Ok(201));
        r.on_final(ms(500), ms(900), ms(800), FinalStatus::Failed);
        r.on_post(ms(900), ms(900), ms(1100), Ok(201));
        r.on_final(ms(900), ms(1500), ms(1400), FinalStatus::Confirmed);
        r.on_post(ms(2000), ms(2000), ms(2001), Ok(503));
        assert_eq!(r.accepted, 2);
        assert_eq!(r.accepted_in_window, 1, "answered at 1.1 s, inside the window");
        assert_eq!(r.completed_in_window, 1);
        assert_eq!((r.confirmed, r.failed), (1, 1));
        assert_eq!(r.e2e.len(), 0, "both were scheduled during the warm-up");
        assert_eq!(r.post_errors.get("HTTP 503"), Some(&1));
        assert!((r.per_second(r.completed_in_window) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn unfinished_orders_count_at_their_age() {
        let mut r = Recorder::new(ms(0), ms(1000));
        r.on_post(ms(100), ms(100), ms(110), Ok(201));
        r.on_not_final(ms(100), ms(31_100));
        assert_eq!(r.not_final, 1);
        assert!((Recorder::summary(&r.e2e).max_ms - 31_000.0).abs() < 50.0);
        r.on_not_sent(ms(900), ms(1000));
        assert_eq!((r.not_sent, r.e2e.len(), r.post.len()), (1, 2, 2));
        assert!((Recorder::summary(&r.post).max_ms - 100.0).abs() < 1.0);
    }
}
