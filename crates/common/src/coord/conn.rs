//! The one way gpuq opens Redis: every handle of the coordination layer (`kv::Kv`,
//! `lease::Coordinator`, `registry::Registry`) makes its `ConnectionManager` here, with the
//! connect and response timeouts and the reconnect retries its service needs. A `rediss://` URL
//! is reached over TLS, trusting the process's CA file (`tls::trust`) when it has one.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisResult, TlsCertificates};

use crate::tls::Trust;

/// A connection config whose connect and response timeouts are both `timeout`, retrying a lost
/// connection `retries` times. Callers may tune it further (e.g. the reconnect backoff).
pub fn config(timeout: Duration, retries: usize) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(retries)
}

/// A client of `url`; for `rediss://`, trusting the process's CA file (`tls::trust`).
pub fn client(url: &str) -> RedisResult<redis::Client> {
    client_trusting(url, crate::tls::trust())
}

/// [`client`] with an explicit trust: a `rediss://` URL with a CA file trusts only that CA (the
/// Redis client's rule), without one the system's roots.
pub fn client_trusting(url: &str, trust: &Trust) -> RedisResult<redis::Client> {
    match trust.ca_pem() {
        Some(pem) if url.starts_with("rediss://") => redis::Client::build_with_tls(
            url,
            TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.as_bytes().to_vec()),
            },
        ),
        _ => redis::Client::open(url),
    }
}

/// Parses the URL and prepares the connection without making it: the service can start (and
/// report not ready) while Redis is away.
pub fn lazy(url: &str, config: ConnectionManagerConfig) -> RedisResult<ConnectionManager> {
    ConnectionManager::new_lazy_with_config(client(url)?, config)
}

/// Parses the URL and connects now.
pub async fn connect(url: &str, config: ConnectionManagerConfig) -> RedisResult<ConnectionManager> {
    ConnectionManager::new_with_config(client(url)?, config).await
}
