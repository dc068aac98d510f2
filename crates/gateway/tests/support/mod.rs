//! Test helpers: a router over a temp SQLite store with no broker (`router_app`), and the real
//! gateway on a random port against the local RabbitMQ cluster and Redis (`spawn_app`), each
//! with a fresh queue prefix that is deleted again when the test ends, even when it fails.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use gpuq_common::Settings;
use gpuq_common::config::{GatewayConfig, Secret};
use gpuq_common::coord::kv::Kv;
use gpuq_common::store::JobStore;
use gpuq_common::topology::Topology;
use gpuq_gateway::broker::Broker;
use gpuq_gateway::{AppState, Application, SharedState};
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{FieldTable, ShortString};
use serde_json::Value;
use tower::ServiceExt;

pub const API_KEY: &str = "test-key";

pub fn fresh_prefix() -> String {
    format!(
        "gwtest-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Settings for a test: its own prefix and SQLite file, port 0.
pub fn test_settings(dir: &tempfile::TempDir) -> Settings {
    Settings {
        queue_prefix: fresh_prefix(),
        store_url: format!("sqlite://{}", dir.path().join("gpuq.db").display()),
        gateway_bind: "127.0.0.1:0".into(),
        api_keys: Secret::new(format!("other-key,{API_KEY}")),
        max_body_bytes: 4096,
        ..Settings::default()
    }
}

/// A router whose broker never connects and whose Redis is unreachable: for requests that must
/// be refused before either is needed.
pub struct RouterApp {
    pub router: Router,
    pub state: SharedState,
    pub store: Arc<dyn JobStore>,
    _dir: tempfile::TempDir,
}

pub async fn router_app() -> RouterApp {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        confirm_timeout_ms: 300,
        redis_url: "redis://127.0.0.1:1/0".into(),
        ..test_settings(&dir)
    };
    let store = gpuq_common::store::open(&settings.store_url).await.unwrap();
    let broker = Broker::unconnected(
        Topology::from_settings(&settings),
        Duration::from_millis(settings.confirm_timeout_ms),
    );
    let kv = Kv::lazy(&settings.redis_url).unwrap();
    let state = Arc::new(AppState::new(
        &GatewayConfig::from_settings(&settings).unwrap(),
        store.clone(),
        broker,
        kv,
    ));
    RouterApp {
        router: gpuq_gateway::router(state.clone()),
        state,
        store,
        _dir: dir,
    }
}

impl RouterApp {
    pub async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, headers, body)
    }

    pub async fn job_count(&self) -> u64 {
        self.store.count_by_status().await.unwrap().values().sum()
    }
}

pub fn post_json(uri: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(uri)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {API_KEY}"))
        .body(body.into())
        .unwrap()
}

pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri)
        .header("authorization", format!("Bearer {API_KEY}"))
        .body(Body::empty())
        .unwrap()
}

/// Asserts the gpuq error shape and returns (code, message).
pub fn error_of(body: &Value) -> (String, String) {
    let err = body
        .get("error")
        .unwrap_or_else(|| panic!("not the JSON error shape: {body}"));
    let code = err["code"].as_str().expect("error.code").to_string();
    let message = err["message"].as_str().expect("error.message").to_string();
    assert!(!message.is_empty(), "{body}");
    (code, message)
}

// ---------------------------------------------------------------------------------------------
// The real gateway against the local stack.

fn required_env(name: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| {
        panic!(
            "{name} is not set: this test needs the local RabbitMQ cluster and Redis. \
             Start them with `scripts/stack.sh up` and run e.g. \
             GPUQ_TEST_AMQP_URLS=amqp://guest:guest@127.0.0.1:5672/%2f,amqp://guest:guest@127.0.0.1:5673/%2f,amqp://guest:guest@127.0.0.1:5674/%2f \
             GPUQ_TEST_REDIS_URL=redis://127.0.0.1:6379/0 cargo test -p gpuq-gateway \
             (scripts/test.sh sets both)"
        )
    })
}

pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub settings: Settings,
    pub state: SharedState,
    pub topology: Topology,
    /// A connection of the test's own, to look into the queues.
    pub amqp: lapin::Connection,
    pub channel: lapin::Channel,
    pub redis: redis::aio::MultiplexedConnection,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    if std::env::var("GPUQ_TEST_LOG").is_ok() {
        gpuq_common::telemetry::init_telemetry("gateway-test", "pretty", "info,gpuq_gateway=debug");
    }
    let amqp_urls = required_env("GPUQ_TEST_AMQP_URLS");
    let redis_url = required_env("GPUQ_TEST_REDIS_URL");
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings {
        amqp_urls,
        redis_url,
        ..test_settings(&dir)
    };
    tweak(&mut settings);
    let app = Application::build(GatewayConfig::from_settings(&settings).unwrap())
        .await
        .expect("the gateway builds");
    assert!(
        app.state().broker.is_connected(),
        "the gateway did not reach any node of {}",
        settings.amqp_urls
    );
    let base = format!("http://127.0.0.1:{}", app.port());
    let state = app.state();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    let (amqp, _) = gpuq_common::amqp::connect_any(&settings.amqp_url_list(), "gateway-test")
        .await
        .expect("test connection to the broker");
    let channel = amqp.create_channel().await.unwrap();
    let redis = redis::Client::open(settings.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("test connection to Redis");
    TestApp {
        base,
        http: gpuq_common::tls::http_client_builder().build().unwrap(),
        topology: Topology::from_settings(&settings),
        settings,
        state,
        amqp,
        channel,
        redis,
        shutdown,
        server: Some(server),
        _dir: dir,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The typed client the CLI uses, with the test key.
    pub fn client(&self) -> gpuq_client::Gateway {
        gpuq_client::Gateway::new(self.http.clone(), &self.base, Some(Secret::new(API_KEY)))
    }

    pub async fn submit(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/v1/jobs"))
            .bearer_auth(API_KEY)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn submit_with_key(&self, body: &Value, key: &str) -> reqwest::Response {
        self.http
            .post(self.url("/v1/jobs"))
            .bearer_auth(API_KEY)
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .unwrap()
    }

    /// Messages in a pool's queue, read with a passive declare.
    pub async fn depth(&self, pool: &str) -> u32 {
        let q = self
            .channel
            .queue_declare(
                ShortString::from(self.topology.pool_queue(pool)),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("the pool queue exists");
        q.message_count()
    }

    /// Takes one message off a pool's queue (acked).
    pub async fn take(&self, pool: &str) -> Option<lapin::message::BasicGetMessage> {
        self.channel
            .basic_get(
                ShortString::from(self.topology.pool_queue(pool)),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
    }

    pub async fn purge(&self, pool: &str) {
        self.channel
            .queue_purge(
                ShortString::from(self.topology.pool_queue(pool)),
                QueuePurgeOptions::default(),
            )
            .await
            .unwrap();
    }

    /// Stops the gateway gracefully and waits for it.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(15), server)
                .await
                .expect("the gateway stops within 15 s")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestApp {
    /// Deletes the test's queues, exchanges and Redis keys, even after a failed assertion.
    fn drop(&mut self) {
        self.shutdown.cancel();
        let urls = self.settings.amqp_url_list();
        let redis_url = self.settings.redis_url.clone();
        let topology = self.topology.clone();
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(cleanup(urls, redis_url, topology));
        });
        let _ = cleanup.join();
    }
}

async fn cleanup(urls: Vec<String>, redis_url: String, topology: Topology) {
    if let Ok((conn, _)) = gpuq_common::amqp::connect_any(&urls, "gateway-test-cleanup").await
        && let Ok(ch) = conn.create_channel().await
    {
        for q in [topology.pool_queue("default"), topology.dead_queue()] {
            let _ = ch
                .queue_delete(ShortString::from(q), QueueDeleteOptions::default())
                .await;
        }
        for x in [topology.jobs_exchange(), topology.dead_letter_exchange()] {
            let _ = ch
                .exchange_delete(ShortString::from(x), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, ShortString::from("OK".to_string())).await;
    }
    if let Ok(client) = redis::Client::open(redis_url.as_str())
        && let Ok(mut c) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", topology.prefix))
            .query_async(&mut c)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query_async(&mut c).await;
        }
    }
}
