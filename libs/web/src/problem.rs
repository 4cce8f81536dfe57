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

    /// 401: a missing or wrong bearer token.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized", detail.into())
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
        let mut response = HttpResponse::build(self.status_code());
        response.insert_header(ContentType(problem_mime()));
        if self.status == StatusCode::UNAUTHORIZED.as_u16() {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        response.json(self)
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

/// Methods a resource may be registered for, in the order `Allow` lists them.
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Default service: a problem+json 405 with an `Allow` header when the path
/// exists under other methods, a problem+json 404 otherwise.
///
/// actix routes a method that no resource's guard accepts here, like an
/// unknown path, and keeps no record of which methods a path has. So the
/// methods are read from the resources' names: a resource named
/// `"<METHOD> <pattern>"`, e.g. `#[get("/orders/{id}", name = "GET /orders/{id}")]`,
/// declares that method for that path. RFC 9110 requires the 405 and its
/// `Allow` header; clients (and contract fuzzers) rely on them to tell "wrong
/// method" from "no such resource".
pub async fn not_found_fallback(req: HttpRequest) -> HttpResponse {
    let allowed = allowed_methods(&req);
    if allowed.is_empty() {
        return Problem::not_found(format!("no route for {} {}", req.method(), req.path())).error_response();
    }
    let allow = allowed.join(", ");
    let mut response = Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{} is not allowed on {}; use {allow}", req.method(), req.path()),
    )
    .error_response();
    if let Ok(value) = actix_web::http::header::HeaderValue::from_str(&allow) {
        response.headers_mut().insert(actix_web::http::header::ALLOW, value);
    }
    response
}

/// The methods registered for the resource matching the request's path, by
/// the `"<METHOD> <pattern>"` naming convention; empty if none.
fn allowed_methods(req: &HttpRequest) -> Vec<&'static str> {
    let rmap = req.resource_map();
    let Some(pattern) = rmap.match_pattern(req.path()) else {
        return Vec::new();
    };
    METHODS
        .into_iter()
        .filter(|method| {
            // Only the name is looked up: a missing name is `ResourceNotFound`;
            // any other answer (no elements given for `{id}`...) means it exists.
            !matches!(
                rmap.url_for(req, &format!("{method} {pattern}"), std::iter::empty::<&str>()),
                Err(actix_web::error::UrlGenerationError::ResourceNotFound)
            )
        })
        .collect()
}

// `mime` is re-exported by actix-web.
use actix_web::mime;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use actix_web::{App, HttpResponse, test, web};

    use super::not_found_fallback;

    async fn ok() -> HttpResponse {
        HttpResponse::Ok().finish()
    }

    #[actix_web::test]
    async fn a_known_path_under_another_method_is_405_with_allow() {
        let app = test::init_service(
            App::new()
                .service(web::resource("/orders").name("POST /orders").guard(actix_web::guard::Post()).to(ok))
                .service(web::resource("/orders").name("GET /orders").guard(actix_web::guard::Get()).to(ok))
                .service(web::resource("/orders/{id}").name("GET /orders/{id}").guard(actix_web::guard::Get()).to(ok))
                .route("/health", web::get().to(ok))
                .default_service(web::to(not_found_fallback)),
        )
        .await;
        let call = |method: &str, path: &str| {
            test::TestRequest::default().method(method.parse().unwrap()).uri(path).to_request()
        };

        let response = test::call_service(&app, call("DELETE", "/orders")).await;
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers().get("allow").unwrap(), "GET, POST");
        assert_eq!(response.headers().get("content-type").unwrap(), "application/problem+json");
        let response = test::call_service(&app, call("TRACE", "/orders/42")).await;
        assert_eq!(response.status(), 405);
        assert_eq!(response.headers().get("allow").unwrap(), "GET");

        // No named resource says which methods /health has: unknown, 404.
        assert_eq!(test::call_service(&app, call("POST", "/health")).await.status(), 404);
        let response = test::call_service(&app, call("GET", "/nowhere")).await;
        assert_eq!(response.status(), 404);
        assert!(!response.headers().contains_key("allow"));
        assert_eq!(test::call_service(&app, call("GET", "/orders/42")).await.status(), 200);
    }
}
