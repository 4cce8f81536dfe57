//! An open-loop load driver for order-service (`loadgen`, and the
//! whole-system benchmark of `make bench`).
//!
//! Orders are scheduled at a fixed rate: order `i` is due at
//! `start + i / rate`, whatever happened to the ones before it. Every
//! latency is measured from that *scheduled* time, so a driver or a server
//! that falls behind shows up in the figures instead of silently lowering
//! the load (no coordinated omission). At most `connections` POSTs are in
//! flight (a client with a fixed keep-alive pool); an order that waits for
//! a free connection is sent late and its latency includes the wait.
//!
//! After its `201`, each order is polled with `GET /orders/{id}` until it
//! is final; its end-to-end latency is scheduled time -> the first poll
//! that saw the final status. Polls come every `clamp(age * factor, min,
//! max)`, so young orders are watched closely and old ones (a backlog) do
//! not flood the server; the gap between the last pending poll and the
//! final one is reported as the measurement's resolution.
//!
//! The driver runs on one thread (`current_thread` runtime and a
//! `LocalSet`): it must cost far less than the system it measures, and it
//! reports its own CPU time to show that it does.

mod catalog;
mod driver;
mod record;
mod report;

pub use catalog::{CatalogError, CatalogItem, parse_catalog};
pub use driver::{Api, HttpApi, LoadConfig, LoadError, Mix, PollPolicy, RequestError, Seen, run, run_with};
pub use record::{FinalStatus, Recorder, scheduled_offset};
pub use report::{LatencySummary, Report, cpu_seconds_self, peak_rss_kib};
