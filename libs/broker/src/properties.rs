use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use orderflow_envelope::Envelope;

/// Builds the AMQP properties of a message carrying `env`: persistent, with
/// message id, type, timestamp, content type and the envelope's headers.
/// The body stays the whole envelope; these mirror it for routing, tools
/// and operators.
pub fn properties_for(env: &Envelope) -> BasicProperties {
    let mut headers = FieldTable::default();
    let mut put = |k: &str, v: String| {
        headers.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    };
    put("schema_version", env.schema_version.to_string());
    put("aggregate_type", env.aggregate_type.clone());
    put("aggregate_id", env.aggregate_id.clone());
    put("correlation_id", env.correlation_id.to_string());
    if let Some(c) = env.causation_id {
        put("causation_id", c.to_string());
    }
    if let Some(tp) = &env.traceparent {
        put("traceparent", tp.clone());
    }
    headers.insert("aggregate_version".into(), AMQPValue::LongLongInt(env.aggregate_version));
    BasicProperties::default()
        .with_message_id(env.message_id.to_string().into())
        .with_type(env.event_type.as_str().into())
        .with_timestamp(env.occurred_at.timestamp().max(0) as u64)
        .with_content_type("application/json".into())
        .with_correlation_id(env.correlation_id.to_string().into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// Reads a string header (short or long string).
pub fn header_str(props: &BasicProperties, key: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Reads an integer header of any width.
pub fn header_i64(props: &BasicProperties, key: &str) -> Option<i64> {
    match props.headers().as_ref()?.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        _ => None,
    }
}
