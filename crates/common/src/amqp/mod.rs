//! Broker connections: connect through any node of the cluster, publish with confirms, read
//! gpuq's message headers. `supervisor` keeps a service's connection up.

mod supervisor;

pub use supervisor::{Session, Supervisor};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::runtime::default_runtime;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};

use crate::tls::Trust;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("no broker node answered ({tried} tried): {last}")]
    NoNode { tried: usize, last: String },
    #[error("broker: {0}")]
    Lapin(#[from] lapin::Error),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("the message could not be routed to a queue")]
    Unroutable,
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
}

static NEXT_NODE: AtomicUsize = AtomicUsize::new(0);

/// Connects to the first node that answers, starting at a rotating offset so that services
/// spread over the cluster and a reconnect tries another node first. An `amqps://` node is
/// reached over TLS with the process's trust (`tls::trust`).
pub async fn connect_any(urls: &[String], name: &str) -> Result<(Connection, String), AmqpError> {
    connect_any_trusting(urls, name, crate::tls::trust()).await
}

/// [`connect_any`] with an explicit trust for `amqps://` nodes.
pub async fn connect_any_trusting(
    urls: &[String],
    name: &str,
    trust: &Trust,
) -> Result<(Connection, String), AmqpError> {
    let start = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
    let mut last = String::from("no URL configured");
    for i in 0..urls.len() {
        let url = &urls[(start + i) % urls.len()];
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(name.to_string()));
        let tls = OwnedTLSConfig {
            identity: None,
            cert_chain: trust.ca_pem().map(str::to_string),
        };
        let connect = Connection::connect_with_config(url, props, tls, default_runtime()?);
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(conn)) => {
                tracing::info!(node = %redact(url), "connected to broker");
                return Ok((conn, url.clone()));
            }
            Ok(Err(e)) => last = format!("{}: {e}", redact(url)),
            Err(_) => last = format!("{}: connect timed out", redact(url)),
        }
        tracing::warn!(error.message = %last, "broker node unavailable, trying the next");
    }
    Err(AmqpError::NoNode {
        tried: urls.len(),
        last,
    })
}

/// Drops the password from a URL before it reaches a log line.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// A channel in confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, AmqpError> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Properties of a job message: persistent JSON whose `message_id` is the job id.
pub fn job_properties(
    id: &str,
    expiration_ms: Option<u64>,
    headers: FieldTable,
) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_message_id(ShortString::from(id.to_string()))
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(ms) = expiration_ms {
        props = props.with_expiration(ShortString::from(ms.to_string()));
    }
    props
}

/// Publishes (mandatory) and waits for the broker's confirm. Only `Ok` means the message is
/// stored by the queue's replicas.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    timeout: Duration,
) -> Result<(), AmqpError> {
    let wait = async {
        let confirm = channel
            .basic_publish(
                ShortString::from(exchange.to_string()),
                ShortString::from(routing_key.to_string()),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(AmqpError::Unroutable),
            Confirmation::Nack(_) => Err(AmqpError::Nacked),
            Confirmation::NotRequested => Ok(()),
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| AmqpError::ConfirmTimeout(timeout))?
}

/// A string header, if present.
pub fn header_str(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// An integer header (e.g. quorum queues' `x-delivery-count`), if present.
pub fn header_u64(headers: Option<&FieldTable>, key: &str) -> Option<u64> {
    match headers?.inner().get(key)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        _ => None,
    }
}

/// The reason of the first `x-death` entry (`rejected`, `expired`, `delivery_limit`, `maxlen`).
pub fn death_reason(headers: Option<&FieldTable>) -> Option<String> {
    let AMQPValue::FieldArray(deaths) = headers?.inner().get("x-death")? else {
        return None;
    };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()? else {
        return None;
    };
    header_str(Some(first), "reason")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_logs() {
        assert_eq!(
            redact("amqp://gpuq:s3cret@rabbit1:5672/%2f"),
            "amqp://gpuq:***@rabbit1:5672/%2f"
        );
        assert_eq!(redact("amqp://rabbit1:5672"), "amqp://rabbit1:5672");
    }

    #[test]
    fn the_death_reason_is_read_from_x_death() {
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
        );
        assert_eq!(
            death_reason(Some(&headers)).as_deref(),
            Some("delivery_limit")
        );
        headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        assert_eq!(header_u64(Some(&headers), "x-delivery-count"), Some(3));
    }
}
