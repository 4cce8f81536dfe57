//! What a run measured, as text for people and JSON for the benchmark.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Figures of one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Orders per second the driver scheduled.
    pub offered_rate: f64,
    /// Seconds of load, and the warm-up left out of rates and latencies.
    pub duration_s: f64,
    pub warmup_s: f64,
    /// Products the orders were spread over.
    pub products: usize,
    pub connections: usize,
    pub polled: bool,
    /// 201 answers per second within the window.
    pub achieved_post_rate: f64,
    /// Orders seen final per second within the window.
    pub completed_rate: f64,
    /// Scheduled -> first poll that saw the final status.
    pub e2e: LatencySummary,
    /// Scheduled -> POST answered.
    pub post: LatencySummary,
    /// Sent -> POST answered (the server's part alone).
    pub post_service: LatencySummary,
    /// Scheduled -> sent.
    pub send_lag: LatencySummary,
    /// Gap between the last pending poll and the final one.
    pub resolution: LatencySummary,
    pub scheduled: u64,
    pub sent: u64,
    pub accepted: u64,
    pub not_sent: u64,
    pub post_errors: BTreeMap<String, u64>,
    pub confirmed: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub not_final: u64,
    pub polls: u64,
    pub poll_errors: u64,
    /// Wall time of the whole run (load and drain), seconds.
    pub wall_s: f64,
    /// The driver's own CPU time (user + system), seconds.
    pub cpu_s: f64,
    /// The driver's peak resident memory, KiB.
    pub peak_rss_kib: u64,
}

impl Report {
    /// The driver's CPU time as a share of one core over its wall time.
    pub fn cpu_share(&self) -> f64 {
        if self.wall_s > 0.0 { self.cpu_s / self.wall_s } else { 0.0 }
    }

    /// The report for people.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let l = |s: &mut String, name: &str, h: &LatencySummary| {
            if h.count == 0 {
                let _ = writeln!(s, "  {name:<34} n/a (no orders)");
                return;
            }
            let _ = writeln!(
                s,
                "  {name:<34} p50 {:>9.1}  p90 {:>9.1}  p99 {:>9.1}  max {:>9.1} ms  (n={})",
                h.p50_ms, h.p90_ms, h.p99_ms, h.max_ms, h.count
            );
        };
        let _ = writeln!(
            s,
            "offered {:.1} orders/s for {:.0} s ({:.0} s warm-up left out), {} products, {} connections",
            self.offered_rate, self.duration_s, self.warmup_s, self.products, self.connections
        );
        let _ = writeln!(s, "  achieved POST rate                 {:>9.1} /s", self.achieved_post_rate);
        if self.polled {
            let _ = writeln!(s, "  completed (seen final)             {:>9.1} orders/s", self.completed_rate);
            l(&mut s, "scheduled -> seen final", &self.e2e);
        }
        l(&mut s, "POST, from scheduled time", &self.post);
        l(&mut s, "POST, from send (server only)", &self.post_service);
        l(&mut s, "send lag (scheduled -> sent)", &self.send_lag);
        if self.polled {
            l(&mut s, "resolution (pending -> final poll)", &self.resolution);
        }
        let errors = if self.post_errors.is_empty() {
            "none".to_owned()
        } else {
            self.post_errors.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
        };
        let _ = writeln!(
            s,
            "  orders: {} scheduled, {} sent, {} accepted, {} not sent (no free connection by the end); POST errors: {errors}",
            self.scheduled, self.sent, self.accepted, self.not_sent
        );
        if self.polled {
            let _ = writeln!(
                s,
                "  final: {} confirmed, {} failed, {} cancelled; {} not final at the end; {} polls ({} failed)",
                self.confirmed, self.failed, self.cancelled, self.not_final, self.polls, self.poll_errors
            );
        }
        let _ = writeln!(
            s,
            "  driver: {:.2} s CPU over {:.1} s wall ({:.1}% of one core), peak RSS {:.1} MiB",
            self.cpu_s,
            self.wall_s,
            self.cpu_share() * 100.0,
            self.peak_rss_kib as f64 / 1024.0
        );
        s
    }
}

/// CPU time (user + system) this process has used, seconds.
pub fn cpu_seconds_self() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
            t(u.user_time()) + t(u.system_time())
        }
        Err(_) => 0.0,
    }
}

/// Peak resident memory (VmHWM) of process `pid` ("self" for this one), KiB.
pub fn peak_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
