use actix_web::{HttpRequest, http::StatusCode, web};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::{FieldError, Problem};

/// Reads at most `limit` bytes of a JSON body and deserializes it.
///
/// Errors are problem+json: 415 for a non-JSON content type, 413 past the
/// limit, and 400 naming the field at fault (`items[0].price: invalid type:
/// floating point 19.99, expected i64`) for anything serde rejects.
pub async fn json_body<T: DeserializeOwned>(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<T, Problem> {
    let content_type = req
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence != "application/json" && !essence.ends_with("+json") {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            format!("expected Content-Type: application/json, got {content_type:?}"),
        ));
    }
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| Problem::invalid("body", e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
                format!("the body must be at most {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    let de = &mut serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let field = if path == "." || path.is_empty() { "body".to_owned() } else { path };
        Problem::validation(vec![FieldError { field, message: err.into_inner().to_string() }])
    })
}
