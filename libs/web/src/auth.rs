//! Bearer tokens for the write endpoints that not everyone may call.
//!
//! A service configured with a token (`ADMIN_TOKEN`) answers such requests
//! only with `Authorization: Bearer <token>`; a missing or wrong token is a
//! 401 problem with `WWW-Authenticate: Bearer`. Without a token the
//! endpoints are open, for local use (`make run`), and the service says so
//! in its log at start.

use actix_web::HttpRequest;
use actix_web::http::header::AUTHORIZATION;
use subtle::ConstantTimeEq;
use utoipa::Modify;
use utoipa::openapi::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use crate::Problem;

/// Name of the security scheme in the OpenAPI documents.
pub const SCHEME: &str = "admin_token";

/// The token write endpoints require, if any.
#[derive(Clone, Default)]
pub struct AdminToken(Option<String>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_tuple("AdminToken").field(&self.0.as_ref().map(|_| "<set>")).finish()
    }
}

impl AdminToken {
    /// A token; blank means none (the endpoints are open).
    pub fn new(token: Option<String>) -> Self {
        Self(token.filter(|t| !t.trim().is_empty()))
    }

    /// Whether a token is required.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Whether `given` is the configured token (false when none is
    /// configured), for tokens that come in another way than the header,
    /// e.g. a form field. Takes the same time wherever the tokens differ.
    pub fn accepts(&self, given: &str) -> bool {
        self.0.as_ref().is_some_and(|expected| bool::from(given.trim().as_bytes().ct_eq(expected.as_bytes())))
    }

    /// Ok if no token is configured or `req` carries it; a 401 otherwise.
    /// The comparison takes the same time wherever the tokens differ.
    pub fn check(&self, req: &HttpRequest) -> Result<(), Problem> {
        let Some(expected) = &self.0 else { return Ok(()) };
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        match given {
            None => Err(Problem::unauthorized("this endpoint needs `Authorization: Bearer <ADMIN_TOKEN>`")),
            Some(token) if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
            Some(_) => Err(Problem::unauthorized("the bearer token is not this service's ADMIN_TOKEN")),
        }
    }
}

/// Adds the bearer scheme [`SCHEME`] to an OpenAPI document; operations
/// name it with `security(("admin_token" = []))`.
pub struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The service's ADMIN_TOKEN. Required when the service has one; without one (local use) \
                         these endpoints are open.",
                    ))
                    .build(),
            ),
        );
    }
}
