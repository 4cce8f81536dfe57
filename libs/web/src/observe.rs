use std::time::Instant;

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};

/// The request span of tracing-actix-web, continuing the caller's W3C trace
/// (`traceparent` header) when there is one, so one trace follows an order
/// from the client's request through every service.
pub struct TraceContextRootSpan;

impl RootSpanBuilder for TraceContextRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let span = tracing_actix_web::root_span!(request);
        let traceparent = request.headers().get("traceparent").and_then(|v| v.to_str().ok());
        orderflow_telemetry::continue_trace(&span, traceparent);
        span
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}

/// Middleware recording `http_requests_total` and
/// `http_request_duration_seconds` by method, route pattern (not the raw
/// path, so ids do not multiply the series) and status.
pub async fn http_metrics(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let started = Instant::now();
    let method = req.method().to_string();
    let result = next.call(req).await;
    let (route, status) = match &result {
        Ok(res) => (res.request().match_pattern().unwrap_or_else(|| "unmatched".into()), res.status().as_u16()),
        Err(e) => ("unmatched".into(), e.as_response_error().status_code().as_u16()),
    };
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    result
}
