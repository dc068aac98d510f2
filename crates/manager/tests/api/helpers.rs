//! `spawn_app() -> TestApp`: the real manager on a random port, against the local RabbitMQ
//! cluster and Redis, with a fresh queue/key prefix and a temporary SQLite store.

use std::time::{Duration, Instant};

use gpuq_common::Settings;
use gpuq_common::amqp::{confirm_channel, connect_any, job_properties, publish_confirmed};
use gpuq_common::config::{ManagerConfig, Secret};
use gpuq_common::coord::keys::Keys;
use gpuq_common::engine::{GpuHealth, GpuSnapshot, Heartbeat};
use gpuq_common::topology::Topology;
use gpuq_manager::{AppState, Application, Intervals};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::{FieldTable, ShortString};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const READ_TOKEN: &str = "test-read-token";
pub const WORKER_SECRET: &str = "test-worker-secret";

/// Engine `engine_id`'s credential under `WORKER_SECRET`.
pub fn worker_token(engine_id: &str) -> String {
    gpuq_common::credentials::worker_token(&Secret::new(WORKER_SECRET), engine_id)
        .unwrap()
        .expose()
        .to_string()
}

fn env(name: &str, example: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not set: these tests need the local stack (scripts/stack.sh up) and \
             {name}={example} (scripts/test.sh sets it)"
            )
        })
}

pub fn amqp_urls() -> Vec<String> {
    env(
        "GPUQ_TEST_AMQP_URLS",
        "amqp://guest:guest@127.0.0.1:5672/%2f,amqp://guest:guest@127.0.0.1:5673/%2f,…",
    )
    .split(',')
    .map(|s| s.trim().to_string())
    .filter(|s| !s.is_empty())
    .collect()
}

pub struct TestApp {
    pub base: String,
    pub prefix: String,
    pub keys: Keys,
    pub state: AppState,
    pub http: reqwest::Client,
    pub redis: redis::aio::ConnectionManager,
    token: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

pub async fn spawn_app() -> TestApp {
    let amqp = amqp_urls().join(",");
    let redis_url = env("GPUQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/0");
    let dir = tempfile::tempdir().expect("temp dir");
    let prefix = format!(
        "mgrtest{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let settings = Settings {
        amqp_urls: amqp,
        redis_url: redis_url.clone(),
        store_url: format!("sqlite://{}", dir.path().join("jobs.db").display()),
        queue_prefix: prefix.clone(),
        manager_bind: "127.0.0.1:0".into(),
        admin_token: Secret::new(ADMIN_TOKEN),
        read_token: Secret::new(READ_TOKEN),
        worker_secret: Secret::new(WORKER_SECRET),
        heartbeat_interval_ms: 300,
        engine_offline_after_heartbeats: 3,
        ..Settings::default()
    };
    let intervals = Intervals {
        fleet_refresh: Duration::from_millis(200),
        queue_poll: Duration::from_millis(500),
    };
    let app = Application::build_with(ManagerConfig::from_settings(&settings).unwrap(), intervals)
        .await
        .expect("the manager builds");
    let base = format!("http://127.0.0.1:{}", app.port());
    let state = app.state();
    let token = app.shutdown_token();
    let handle = tokio::spawn(app.run_until_stopped());
    let redis = redis::Client::open(redis_url)
        .unwrap()
        .get_connection_manager()
        .await
        .expect("Redis at GPUQ_TEST_REDIS_URL answers");
    let test_app = TestApp {
        base,
        keys: Keys::new(&prefix),
        prefix,
        state,
        http: gpuq_common::tls::http_client_builder().build().unwrap(),
        redis,
        token,
        handle,
        _dir: dir,
    };
    test_app.wait_ready().await;
    test_app
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The typed client the CLI uses: reads with the read token, acts with the admin token.
    pub fn client(&self) -> gpuq_client::Manager {
        gpuq_client::Manager::new(
            self.http.clone(),
            &self.base,
            Some(Secret::new(ADMIN_TOKEN)),
        )
        .with_read_token(Some(Secret::new(READ_TOKEN)))
    }

    /// The manager's SQLite file, for tests that must write what no store write makes.
    pub fn store_path(&self) -> std::path::PathBuf {
        self._dir.path().join("jobs.db")
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = self.http.get(self.url("/readyz")).send().await;
            if let Ok(r) = &r
                && r.status() == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "manager not ready in 30 s: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET with the read token.
    pub async fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(READ_TOKEN)
            .send()
            .await
            .expect("GET");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// GET with no token (`/ui`, `/metrics`, `/openapi.json` are open).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self.http.get(self.url(path)).send().await.expect("GET");
        (r.status().as_u16(), r.text().await.expect("body"))
    }

    /// POST with the admin token (or another bearer, or none).
    pub async fn post(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.http.post(self.url(path));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// POST /v1/heartbeats with the credential of the engine it names.
    pub async fn heartbeat(&self, hb: &Heartbeat) -> (u16, serde_json::Value) {
        self.post(
            "/v1/heartbeats",
            Some(&worker_token(&hb.engine_id)),
            Some(serde_json::to_value(hb).unwrap()),
        )
        .await
    }

    pub async fn redis_get(&self, key: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.redis.clone())
            .await
            .expect("redis GET")
    }

    /// Publishes straight to the dead-letter exchange, as the broker would dead-letter a job.
    pub async fn publish_dead_letter(&self, id: &str, body: &[u8], headers: FieldTable) {
        let (conn, _) = connect_any(&amqp_urls(), "gpuq-manager-test")
            .await
            .unwrap();
        let channel = confirm_channel(&conn).await.unwrap();
        let topology = Topology {
            prefix: self.prefix.clone(),
            ..Topology::from_settings(&Settings::default())
        };
        publish_confirmed(
            &channel,
            &topology.dead_letter_exchange(),
            "",
            body,
            job_properties(id, None, headers),
            Duration::from_secs(5),
        )
        .await
        .expect("dead letter published");
        let _ = conn.close(200, ShortString::from("OK")).await;
    }

    /// Stops the manager and removes this test's queues, exchanges and Redis keys.
    pub async fn cleanup(self) {
        self.token.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(15), self.handle).await;
        assert!(stopped.is_ok(), "the manager did not stop within 15 s");
        if let Ok((conn, _)) = connect_any(&amqp_urls(), "gpuq-manager-test-cleanup").await {
            if let Ok(ch) = conn.create_channel().await {
                let t = Topology {
                    prefix: self.prefix.clone(),
                    ..Topology::from_settings(&Settings::default())
                };
                for q in [t.dead_queue(), t.pool_queue("default")] {
                    let _ = ch
                        .queue_delete(ShortString::from(q), QueueDeleteOptions::default())
                        .await;
                }
                for x in [t.jobs_exchange(), t.dead_letter_exchange()] {
                    let _ = ch
                        .exchange_delete(ShortString::from(x), ExchangeDeleteOptions::default())
                        .await;
                }
            }
            let _ = conn.close(200, ShortString::from("OK")).await;
        }
        let mut redis = self.redis.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}:*", self.prefix))
            .query_async(&mut redis)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(&mut redis).await;
        }
    }
}

pub fn gpu(index: u32, health: GpuHealth) -> GpuSnapshot {
    GpuSnapshot {
        index,
        uuid: format!("GPU-sim-{index}"),
        name: "Simulated GPU".into(),
        health,
        reasons: if health == GpuHealth::Healthy {
            vec![]
        } else {
            vec!["temperature".into()]
        },
        utilization_pct: 40 + index * 10,
        memory_used_mb: 2048,
        memory_total_mb: 24 * 1024,
        temperature_c: 55 + index,
        power_w: 150.0,
        ecc_errors: 0,
        job: None,
        fault: None,
    }
}

pub fn heartbeat(engine: &str, instance: &str, gpus: Vec<GpuSnapshot>) -> Heartbeat {
    Heartbeat {
        engine_id: engine.into(),
        instance_id: instance.into(),
        version: "test".into(),
        gpu_backend: "sim".into(),
        pools: vec!["default".into()],
        gpus,
        running_jobs: vec![],
        consuming: true,
        jobs_processed: 0,
        jobs_failed: 0,
        avg_job_ms: 0.0,
        admin_url: "http://127.0.0.1:9".into(),
        started_at_ms: gpuq_common::job::now_ms(),
        sent_at_ms: gpuq_common::job::now_ms(),
        heartbeat_interval_ms: 300,
        fault_injection: false,
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
