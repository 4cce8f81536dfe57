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
    let content_type =
        req.headers().get(actix_web::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
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
        let message = err.into_inner().to_string();
        Problem::validation(vec![FieldError { field: field_of(&path, &message), message }])
    })
}

/// The field a serde error is about. For a missing or unknown field serde's
/// path names the object that holds it, and the message names the field.
fn field_of(path: &str, message: &str) -> String {
    // serde_path_to_error writes "." for the root and "?" where it could
    // not tell (a syntax error before any key).
    let container = if path == "." || path == "?" { "" } else { path };
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    match (container, named) {
        // For an unknown field the path already ends with it.
        (c, Some(name)) if c == name || c.ends_with(&format!(".{name}")) => c.to_owned(),
        ("", Some(name)) => name.to_owned(),
        (c, Some(name)) => format!("{c}.{name}"),
        ("", None) => "body".to_owned(),
        (c, None) => c.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::field_of;

    #[test]
    fn names_the_field_at_fault() {
        assert_eq!(field_of(".", "missing field `customer_id` at line 1 column 2"), "customer_id");
        assert_eq!(field_of("items[0]", "missing field `price` at line 1 column 9"), "items[0].price");
        assert_eq!(field_of("forcefail", "unknown field `forcefail`, expected one of `a`"), "forcefail");
        assert_eq!(field_of("items[0].colour", "unknown field `colour`, expected one of `a`"), "items[0].colour");
        assert_eq!(field_of("items[1].quantity", "invalid type: string \"2\", expected i64"), "items[1].quantity");
        assert_eq!(field_of(".", "EOF while parsing an object at line 1 column 1"), "body");
        assert_eq!(field_of("?", "key must be a string at line 1 column 2"), "body");
    }
}
