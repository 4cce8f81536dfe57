use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use orderflow_db::{ErrorClass, classify};

use crate::Problem;

/// The error of every handler, each case answered as problem+json: the
/// client's problem as it is, an unavailable database as 503 (retry), any
/// other database error as a 500 whose details go to the log only.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A client error with its problem document.
    #[error(transparent)]
    Problem(#[from] Problem),
    /// A database error.
    #[error("database: {0}")]
    Db(#[from] diesel::result::Error),
    /// No database connection could be had.
    #[error("database pool: {0}")]
    Pool(#[from] orderflow_db::PoolError),
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.problem().status_code()
    }

    fn error_response(&self) -> HttpResponse {
        self.problem().error_response()
    }
}

impl ApiError {
    fn problem(&self) -> Problem {
        match self {
            Self::Problem(p) => p.clone(),
            Self::Db(e) if classify(e) != ErrorClass::Permanent => {
                tracing::warn!(error = %e, "database unavailable");
                Problem::unavailable("the database is unavailable; retry shortly")
            }
            Self::Db(e) => {
                tracing::error!(error = %e, "database error");
                Problem::internal()
            }
            Self::Pool(e) => {
                tracing::warn!(error = %e, "no database connection");
                Problem::unavailable("the database is unavailable; retry shortly")
            }
        }
    }
}
