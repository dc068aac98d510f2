//! The one way gpuq opens Redis: every handle of the coordination layer (`kv::Kv`,
//! `lease::Coordinator`, `registry::Registry`) makes its [`Conn`] here, with the connect and
//! response timeouts and the reconnect retries its service needs. A `rediss://` URL is reached
//! over TLS, trusting the process's CA file (`tls::trust`) when it has one.
//!
//! [`Conn`] is redis-rs's `ConnectionManager` that also heals where the manager gives up. The
//! manager reconnects after an I/O error only: when a reconnect fails otherwise (the server
//! refuses the login: `WRONGPASS`, `NOAUTH`, e.g. Redis restarted before its ACL users were
//! defined), every later command gets that same failed connection back, forever. `Conn` then
//! makes a new manager from the same client and settings, at most once per backoff step (100 ms,
//! doubling up to 5 s, back to 100 ms after a command succeeds), so the service recovers as soon
//! as its credentials work again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, TlsCertificates, Value,
};

use crate::tls::Trust;

/// The first pause between two rebuilds of a connection the manager gave up on.
pub const REBUILD_MIN_DELAY: Duration = Duration::from_millis(100);
/// The longest pause between two rebuilds.
pub const REBUILD_MAX_DELAY: Duration = Duration::from_secs(5);

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
pub fn lazy(url: &str, config: ConnectionManagerConfig) -> RedisResult<Conn> {
    let client = client(url)?;
    let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
    Ok(Conn::wrap(client, config, manager))
}

/// Parses the URL and connects now.
pub async fn connect(url: &str, config: ConnectionManagerConfig) -> RedisResult<Conn> {
    let client = client(url)?;
    let manager = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
    Ok(Conn::wrap(client, config, manager))
}

/// A cheap-to-clone handle on one multiplexed Redis connection that reconnects by itself, also
/// after the errors redis-rs's `ConnectionManager` does not retry (see the module's text).
#[derive(Clone)]
pub struct Conn(Arc<Shared>);

struct Shared {
    client: redis::Client,
    config: ConnectionManagerConfig,
    manager: RwLock<ConnectionManager>,
    rebuild: Mutex<Backoff>,
    /// Whether the last rebuild has not yet been followed by a success (the backoff to reset).
    rebuilt: AtomicBool,
}

struct Backoff {
    /// No rebuild before this instant.
    next: Instant,
    delay: Duration,
}

impl Conn {
    fn wrap(client: redis::Client, config: ConnectionManagerConfig, m: ConnectionManager) -> Self {
        Conn(Arc::new(Shared {
            client,
            config,
            manager: RwLock::new(m),
            rebuild: Mutex::new(Backoff {
                next: Instant::now(),
                delay: REBUILD_MIN_DELAY,
            }),
            rebuilt: AtomicBool::new(false),
        }))
    }

    fn manager(&self) -> ConnectionManager {
        self.0.manager.read().expect("redis manager lock").clone()
    }

    /// After a command: a success resets the backoff; an error the manager does not recover
    /// from replaces the manager (lazily connecting) when the backoff allows.
    fn after<T>(&self, result: &RedisResult<T>) {
        match result {
            Ok(_) => {
                if self.0.rebuilt.swap(false, Ordering::Relaxed) {
                    let mut b = self.0.rebuild.lock().expect("redis backoff lock");
                    b.delay = REBUILD_MIN_DELAY;
                    b.next = Instant::now();
                }
            }
            Err(e) if manager_gives_up(e) => self.rebuild(e),
            Err(_) => {}
        }
    }

    fn rebuild(&self, cause: &RedisError) {
        let mut b = self.0.rebuild.lock().expect("redis backoff lock");
        let now = Instant::now();
        if now < b.next {
            return;
        }
        let fresh =
            ConnectionManager::new_lazy_with_config(self.0.client.clone(), self.0.config.clone());
        let Ok(fresh) = fresh else { return };
        *self.0.manager.write().expect("redis manager lock") = fresh;
        tracing::warn!(
            error.message = %cause,
            retry_in_ms = b.delay.as_millis() as u64,
            "redis: the connection failed in a way redis-rs does not retry; connecting anew"
        );
        b.next = now + b.delay;
        b.delay = (b.delay * 2).min(REBUILD_MAX_DELAY);
        self.0.rebuilt.store(true, Ordering::Relaxed);
    }
}

/// The errors after which a `ConnectionManager` stays broken: a login the server refused (while
/// connecting: `AuthenticationFailed`; on a command of a connection that never logged in:
/// `NOAUTH`, `WRONGPASS`). The manager reconnects by itself after I/O errors.
fn manager_gives_up(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"))
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = self.manager().send_packed_command(cmd).await;
            self.after(&r);
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let r = self
                .manager()
                .send_packed_commands(pipeline, offset, count)
                .await;
            self.after(&r);
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.0.client.get_connection_info().redis_settings().db()
    }
}
