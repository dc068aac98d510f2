//! The one way gpuq opens Redis: every handle of the coordination layer (`kv::Kv`,
//! `lease::Coordinator`, `registry::Registry`) makes its `ConnectionManager` here, with the
//! connect and response timeouts and the reconnect retries its service needs.

use std::time::Duration;

use redis::RedisResult;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// A connection config whose connect and response timeouts are both `timeout`, retrying a lost
/// connection `retries` times. Callers may tune it further (e.g. the reconnect backoff).
pub fn config(timeout: Duration, retries: usize) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(retries)
}

/// Parses the URL and prepares the connection without making it: the service can start (and
/// report not ready) while Redis is away.
pub fn lazy(url: &str, config: ConnectionManagerConfig) -> RedisResult<ConnectionManager> {
    ConnectionManager::new_lazy_with_config(redis::Client::open(url)?, config)
}

/// Parses the URL and connects now.
pub async fn connect(url: &str, config: ConnectionManagerConfig) -> RedisResult<ConnectionManager> {
    ConnectionManager::new_with_config(redis::Client::open(url)?, config).await
}
