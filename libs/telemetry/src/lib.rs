//! Logging, tracing and metrics set-up shared by every orderflow process:
//! logs (JSON or human), OpenTelemetry spans with W3C trace context carried
//! across services (exported over OTLP when configured), and the Prometheus
//! recorder. Errors follow the platform's error policy (`orderflow_db::error`).
//!
//! A service flattens [`LogArgs`] (`RUST_LOG`, `LOG_FORMAT`) into its
//! configuration; `orderflow_web::run` calls [`init`] with it before
//! anything else, so every later log line and span is recorded.

use std::sync::OnceLock;
use std::time::Duration;

use std::collections::HashMap;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (for log shippers).
    Json,
    /// Human-readable lines.
    Pretty,
}

/// Logging options, flattened into each binary's command line.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `info,orderflow_outbox=debug`.
    /// lapin's returned-message warnings (whole bodies) are muted by default:
    /// the relay logs each refused message itself.
    #[arg(long, env = "RUST_LOG", default_value = "info,lapin::returned_messages=error")]
    pub log_filter: String,
}

/// Errors of telemetry set-up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built from OTEL_EXPORTER_OTLP_*.
    #[error("cannot set up the OTLP exporter: {0} (check OTEL_EXPORTER_OTLP_ENDPOINT, e.g. http://jaeger:4318)")]
    Exporter(String),
    /// The log filter does not parse.
    #[error("invalid log filter {filter:?}: {reason} (example: RUST_LOG=info,orderflow_outbox=debug)")]
    Filter {
        /// The filter given.
        filter: String,
        /// Why it was rejected.
        reason: String,
    },
}

/// Where logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTo {
    /// Standard output (services: the platform collects it).
    Stdout,
    /// Standard error (command-line tools, whose stdout is their output).
    Stderr,
}

/// Keeps the tracer provider alive; dropping it flushes the spans not yet
/// exported. Hold it until the process exits.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global tracing subscriber: logs (JSON or human, to `to`)
/// and OpenTelemetry spans, so that every span has a W3C trace context that
/// can be carried to other services. Spans are exported over OTLP/HTTP when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set (service name `OTEL_SERVICE_NAME`,
/// default `service`). Call once, at start-up, and keep the guard.
pub fn init(args: &LogArgs, to: LogTo, service: &str) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_new(&args.log_filter)
        .map_err(|e| TelemetryError::Filter { filter: args.log_filter.clone(), reason: e.to_string() })?;
    let writer = match to {
        LogTo::Stdout => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stdout),
        LogTo::Stderr => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let mut provider =
        SdkTracerProvider::builder().with_resource(Resource::builder().with_service_name(service.clone()).build());
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        // The exporter reads the endpoint and headers from the standard
        // OTEL_EXPORTER_OTLP_* variables.
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    let tracer = provider.tracer(service);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // The log filter applies to logs only: spans (and so trace context across
    // services) must not depend on how verbose the logs are.
    let spans = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(LevelFilter::INFO);
    let logs = tracing_subscriber::fmt::layer().with_target(true).with_writer(writer);
    let registry = tracing_subscriber::registry().with(spans);
    let result = match args.log_format {
        LogFormat::Json => {
            registry.with(logs.json().flatten_event(true).with_current_span(true).with_filter(filter)).try_init()
        }
        LogFormat::Pretty => registry.with(logs.with_filter(filter)).try_init(),
    };
    // Already installed (tests start several services in one process): keep it.
    let _ = result;
    Ok(TelemetryGuard { provider: Some(provider) })
}

/// The W3C `traceparent` of the current span, to store with the events it
/// writes (None without a tracing subscriber with the OpenTelemetry layer).
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes `span` a child of the trace in `traceparent` (from an HTTP header
/// or a message). Call right after creating the span. A missing or malformed
/// `traceparent` leaves the span a new trace's root.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else { return };
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id of a `traceparent` (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|id| id.len() == 32)
}

/// Latency buckets (seconds) for every `*_seconds` histogram: from 0.5 ms,
/// where a commit-to-confirm lands on a quiet machine, to 10 s.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// Installs the process-wide Prometheus recorder (once; later calls return
/// the same handle) and keeps its histograms trimmed.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZE_BUCKETS));
            let handle = match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program's):
                // render an unattached one rather than failing.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            };
            let upkeep = handle.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        tick.tick().await;
                        upkeep.run_upkeep();
                    }
                });
            }
            handle
        })
        .clone()
}

/// Command-line value parsers shared by every orderflow binary, so a bad
/// value gets the same one-line explanation everywhere.
pub mod args {
    use std::time::Duration;

    /// A duration such as `250ms`, `5s` or `2m`.
    pub fn duration(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (examples: 250ms, 5s, 2m)"))
    }

    /// A duration that is more than zero.
    pub fn positive_duration(s: &str) -> Result<Duration, String> {
        match duration(s)? {
            d if d.is_zero() => Err("must be more than zero (examples: 250ms, 5s, 2m)".into()),
            d => Ok(d),
        }
    }

    /// A PostgreSQL URL.
    pub fn pg_url(s: &str) -> Result<String, String> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(s.to_owned())
        } else {
            Err("expected postgres://user@host:port/database".into())
        }
    }

    /// An http(s) URL.
    pub fn http_url(s: &str) -> Result<String, String> {
        if s.starts_with("http://") || s.starts_with("https://") {
            Ok(s.to_owned())
        } else {
            Err("expected an http:// or https:// URL".into())
        }
    }
}
