//! The order-service binary.

use std::process::ExitCode;

use clap::Parser;
use order_service::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let cfg = Config::parse();
    if let Err(e) = orderflow_telemetry::init(&cfg.log) {
        eprintln!("order-service: {e}");
        return ExitCode::from(2);
    }
    let shutdown = orderflow_web::shutdown_signal();
    let app = match order_service::build(cfg, shutdown).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            eprintln!("order-service: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("server failed: {e}");
            ExitCode::FAILURE
        }
    }
}
