//! The HTTP metrics, described and registered when a service's server is
//! built, so `/metrics` lists them before the first request.

use metrics::{Unit, counter, describe_counter, describe_histogram, histogram};

/// Describes the HTTP metrics and registers them at zero. Their labels
/// come from requests (method, route pattern, status), so the series
/// registered is the one every service answers first and most often,
/// Prometheus's own `GET /metrics`. Idempotent: it adds 0, never resets.
pub fn describe_and_register() {
    orderflow_telemetry::metrics();
    describe_counter!("http_requests_total", "HTTP requests by method, route pattern and status");
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by method and route pattern"
    );
    counter!("http_requests_total", "method" => "GET", "route" => "/metrics", "status" => "200").increment(0);
    let _ = histogram!("http_request_duration_seconds", "method" => "GET", "route" => "/metrics");
}
