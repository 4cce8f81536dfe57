use actix_web::http::StatusCode;
use actix_web::http::header::ContentType;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde::Serialize;
use utoipa::ToSchema;

/// One field at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FieldError {
    /// Path of the field, e.g. `items[0].quantity`; `body` for the whole body.
    pub field: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

/// An RFC 9457 problem document, sent as `application/problem+json`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the kind.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// What happened this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Every field at fault (validation problems).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.title)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problem {}

impl Problem {
    /// A problem of `status` with a slug for its type.
    pub fn new(status: StatusCode, slug: &str, title: &str, detail: impl Into<Option<String>>) -> Self {
        Self {
            kind: format!("https://orderflow.dev/problems/{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// 400: the request is invalid; `errors` names every field at fault.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect::<Vec<_>>().join("; ");
        Self { errors, ..Self::new(StatusCode::BAD_REQUEST, "validation", "Invalid request", detail) }
    }

    /// 400 about a single field.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::validation(vec![FieldError { field: field.into(), message: message.into() }])
    }

    /// 404.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail.into())
    }

    /// 409.
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", "Conflict", detail.into())
    }

    /// 503: a dependency is down; try again.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable", detail.into())
    }

    /// 500, without leaking internals (they go to the log).
    pub fn internal() -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", None)
    }
}

impl ResponseError for Problem {
    fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).insert_header(ContentType(problem_mime())).json(self)
    }
}

fn problem_mime() -> mime::Mime {
    "application/problem+json".parse().unwrap_or(mime::APPLICATION_JSON)
}

/// Path and query extractor configs whose errors are problem+json 400s
/// naming the parameter, instead of actix's plain-text 404/400.
pub fn extractor_errors(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::PathConfig::default().error_handler(|err, _req| Problem::invalid("path", err.to_string()).into()),
    )
    .app_data(web::QueryConfig::default().error_handler(|err, _req| {
        let message = err.to_string();
        let field = message.split('`').nth(1).map(|f| format!("query.{f}")).unwrap_or_else(|| "query".to_owned());
        Problem::invalid(field, message).into()
    }));
}

/// Default service: unknown routes answer a problem+json 404.
pub async fn not_found_fallback(req: HttpRequest) -> HttpResponse {
    Problem::not_found(format!("no route for {} {}", req.method(), req.path())).error_response()
}

// `mime` is re-exported by actix-web.
use actix_web::mime;
