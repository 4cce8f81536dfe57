//! Logging, tracing and metrics set-up shared by every orderflow process.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

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

/// Installs the global tracing subscriber. Call once, at start-up.
pub fn init(args: &LogArgs, to: LogTo) -> Result<(), TelemetryError> {
    let filter = EnvFilter::try_new(&args.log_filter)
        .map_err(|e| TelemetryError::Filter { filter: args.log_filter.clone(), reason: e.to_string() })?;
    let writer = match to {
        LogTo::Stdout => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stdout),
        LogTo::Stderr => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(true).with_writer(writer);
    let result = match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    // Already installed (tests start several apps in one process): keep it.
    let _ = result;
    Ok(())
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
