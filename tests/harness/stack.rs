//! A running gpuq deployment for one test: the gateway, the manager and the workers spawned from
//! `GPUQ_BIN_DIR` under a fresh prefix, with typed clients (gpuq-client), job submission and
//! waiting, queue depths, worker metrics, the CLI pointed at it, and a clean stop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gpuq_common::config::Secret;
use gpuq_common::store::{self, JobStore};
use gpuq_common::{JobRecord, JobStatus};
use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use serde_json::Value;
use uuid::Uuid;

use crate::access::{provision_topology, service_env};
use crate::env::{
    admin_amqp_urls, bin_dir, free_port, repo_root, test_env, test_store_url, test_tls,
};
use crate::metrics::sum_metric;
use crate::procs::Supervised;

mod requests;

/// Tenants every stack has a `submit` key for, next to the admin key.
pub const TENANTS: [&str; 3] = ["team-a", "team-b", "team-c"];

/// What to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub workers: usize,
    pub manager: bool,
    /// `GPUQ_GPUS` of every worker.
    pub gpus: String,
    pub fault_injection: bool,
    /// Extra environment for every service.
    pub env: Vec<(String, String)>,
    /// Extra environment per worker (index 0 = worker-1).
    pub worker_env: HashMap<usize, Vec<(String, String)>>,
    /// Serve HTTPS with the native stack's certificate and trust its CA everywhere (`test_tls`);
    /// the broker and Redis URLs stay what `env` says.
    pub https: bool,
    /// A store prepared beforehand (`GPUQ_STORE_URL`), instead of a fresh one per stack.
    pub store_url: Option<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            workers: 3,
            manager: true,
            gpus: "sim:2".into(),
            fault_injection: false,
            env: vec![],
            worker_env: HashMap::new(),
            https: false,
            store_url: None,
        }
    }
}

/// A running gpuq deployment for one test.
pub struct Stack {
    pub prefix: String,
    pub dir: PathBuf,
    /// The store this stack made (see `TEST_STORE_ENV`), which every service got unless a
    /// benchmark gave them their own (`GPUQ_BENCH_SERVICES_STORE=own`).
    pub store_url: String,
    /// The `default` tenant's admin key (sees every tenant's jobs).
    pub api_key: String,
    /// `submit` keys of the tenants `TENANTS` names, in that order.
    pub tenant_keys: Vec<(String, String)>,
    pub admin_token: String,
    /// The manager's read-only token (`GPUQ_READ_TOKEN`).
    pub read_token: String,
    /// The manager's fleet secret (`GPUQ_WORKER_SECRET`); worker i gets
    /// `worker_token(worker_secret, "worker-{i+1}")` as its `GPUQ_WORKER_TOKEN`.
    pub worker_secret: String,
    pub gateway_url: String,
    pub manager_url: String,
    pub worker_urls: Vec<String>,
    pub gateway: Supervised,
    pub manager: Option<Supervised>,
    pub workers: Vec<Supervised>,
    pub store: Arc<dyn JobStore>,
    pub http: reqwest::Client,
    /// The CA the services' HTTPS certificate is checked with, when they serve HTTPS.
    pub tls_ca: Option<PathBuf>,
    base_env: Vec<(String, String)>,
}

/// Starts the stack's workers (`worker-1`…), each on a free port; answers them and their URLs.
/// `first` is the index of the first one (0: `worker-1`).
fn spawn_workers(
    opts: &StackOptions,
    first: usize,
    scheme: &str,
    base_env: &[(String, String)],
    worker_secret: &str,
    dir: &Path,
) -> anyhow::Result<(Vec<Supervised>, Vec<String>)> {
    let mut workers = vec![];
    let mut worker_urls = vec![];
    for i in first..first + opts.workers {
        let port = free_port();
        let mut env = base_env.to_vec();
        env.extend(own_users("worker", opts));
        let id = format!("worker-{}", i + 1);
        env.extend([
            (
                "GPUQ_WORKER_TOKEN".into(),
                worker_token(worker_secret, &id).expose().to_string(),
            ),
            ("GPUQ_WORKER_ID".into(), id),
            ("GPUQ_WORKER_BIND".into(), format!("127.0.0.1:{port}")),
            ("GPUQ_GPUS".into(), opts.gpus.clone()),
            (
                "GPUQ_FAULT_INJECTION".into(),
                opts.fault_injection.to_string(),
            ),
        ]);
        if let Some(extra) = opts.worker_env.get(&i) {
            env.extend(extra.iter().cloned());
        }
        workers.push(Supervised::spawn(
            &format!("worker-{}", i + 1),
            &bin_dir().join("gpuq-worker"),
            env,
            dir,
        )?);
        worker_urls.push(format!("{scheme}://127.0.0.1:{port}"));
    }
    Ok((workers, worker_urls))
}

/// What every test stack's services run with: JSON logs, quick heartbeats and stops, and the
/// programs `command` jobs may run.
fn test_settings() -> Vec<(String, String)> {
    [
        ("GPUQ_LOG_FORMAT", "json"),
        ("GPUQ_LOG", "info"),
        ("GPUQ_HEARTBEAT_INTERVAL_MS", "1000"),
        ("GPUQ_SHUTDOWN_GRACE_S", "5"),
        (
            "GPUQ_PROGRAMS",
            "sh=/bin/sh,echo=/bin/echo,sleep=/bin/sleep",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `service`'s own RabbitMQ and Redis users (`access::service_env`), but for the settings the
/// test sets itself in `opts.env` (a TLS stack's `amqps://` URLs, say), which win.
fn own_users(service: &str, opts: &StackOptions) -> Vec<(String, String)> {
    service_env(service)
        .into_iter()
        .filter(|(k, _)| !opts.env.iter().any(|(set, _)| set == k))
        .collect()
}

/// A fresh admin key, a `submit` key per tenant of `TENANTS`, and the `GPUQ_API_KEYS` of both.
fn new_api_keys() -> (String, Vec<(String, String)>, String) {
    let api_key = Uuid::new_v4().simple().to_string();
    let tenant_keys: Vec<(String, String)> = TENANTS
        .iter()
        .map(|t| (t.to_string(), Uuid::new_v4().simple().to_string()))
        .collect();
    let keys = std::iter::once(api_key.clone())
        .chain(tenant_keys.iter().map(|(t, k)| format!("{t}:submit:{k}")))
        .collect::<Vec<_>>()
        .join(",");
    (api_key, tenant_keys, keys)
}

/// Engine `engine_id`'s credential under the fleet secret `worker_secret`.
pub fn worker_token(worker_secret: &str, engine_id: &str) -> Secret {
    gpuq_common::credentials::worker_token(&Secret::new(worker_secret), engine_id)
        .expect("a non-empty worker secret")
}

impl Stack {
    pub async fn start(opts: StackOptions) -> anyhow::Result<Stack> {
        // Under `gpuq-`: the services' own users may use the prefix gpuq and its sub-prefixes
        // gpuq-<name> only (scripts/stack-access.sh).
        let prefix = format!("gpuq-t{}", &Uuid::new_v4().simple().to_string()[..12]);
        let dir = repo_root().join("target/e2e").join(&prefix);
        std::fs::create_dir_all(&dir)?;
        let (api_key, tenant_keys, keys) = new_api_keys();
        let admin_token = Uuid::new_v4().simple().to_string();
        let read_token = Uuid::new_v4().simple().to_string();
        let worker_secret = Uuid::new_v4().simple().to_string();
        let store_url = opts
            .store_url
            .clone()
            .unwrap_or_else(|| test_store_url(&prefix, &dir));
        // Shown with the output of a test that fails: which store, where the logs are.
        eprintln!(
            "e2e stack {prefix}: store {store_url}, logs in {}",
            dir.display()
        );
        let gateway_port = free_port();
        let manager_port = free_port();
        let tls = opts.https.then(test_tls);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let gateway_url = format!("{scheme}://127.0.0.1:{gateway_port}");
        let manager_url = format!("{scheme}://127.0.0.1:{manager_port}");
        let services_store = crate::env::services_store(&store_url, &dir);
        let mut base_env: Vec<(String, String)> = vec![
            ("GPUQ_AMQP_URLS".into(), test_env("GPUQ_TEST_AMQP_URLS")),
            ("GPUQ_REDIS_URL".into(), test_env("GPUQ_TEST_REDIS_URL")),
            ("GPUQ_QUEUE_PREFIX".into(), prefix.clone()),
            ("GPUQ_STORE_URL".into(), services_store),
            ("GPUQ_API_KEYS".into(), keys),
            ("GPUQ_ADMIN_TOKEN".into(), admin_token.clone()),
            ("GPUQ_READ_TOKEN".into(), read_token.clone()),
        ];
        base_env.extend(test_settings());
        if opts.manager {
            base_env.push(("GPUQ_MANAGER_URL".into(), manager_url.clone()));
        }
        if let Some(tls) = &tls {
            base_env.extend(tls.service_env());
        }
        base_env.extend(opts.env.iter().cloned());
        provision_topology(&base_env).await?;
        // The store (file, or database indexes) is created before the services race to create it.
        let store = store::open(&store_url).await?;
        let manager = if opts.manager {
            let mut env = base_env.clone();
            env.extend(own_users("manager", &opts));
            env.push((
                "GPUQ_MANAGER_BIND".into(),
                format!("127.0.0.1:{manager_port}"),
            ));
            // Only the manager holds the fleet secret; each worker gets its own credential.
            env.push(("GPUQ_WORKER_SECRET".into(), worker_secret.clone()));
            Some(Supervised::spawn(
                "manager",
                &bin_dir().join("gpuq-manager"),
                env,
                &dir,
            )?)
        } else {
            None
        };
        let mut env = base_env.clone();
        env.extend(own_users("gateway", &opts));
        env.push((
            "GPUQ_GATEWAY_BIND".into(),
            format!("127.0.0.1:{gateway_port}"),
        ));
        let gateway = Supervised::spawn("gateway", &bin_dir().join("gpuq-gateway"), env, &dir)?;
        let (workers, worker_urls) =
            spawn_workers(&opts, 0, scheme, &base_env, &worker_secret, &dir)?;
        let trust = gpuq_common::tls::Trust::load(tls.as_ref().map(|t| t.ca.as_path()))?;
        let stack = Stack {
            prefix,
            dir,
            store_url,
            api_key,
            tenant_keys,
            admin_token,
            read_token,
            worker_secret,
            gateway_url,
            manager_url,
            worker_urls,
            gateway,
            manager,
            workers,
            store,
            http: gpuq_common::tls::http_client_builder_trusting(&trust)
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(64)
                .build()?,
            tls_ca: tls.map(|t| t.ca),
            base_env,
        };
        stack.wait_ready().await?;
        Ok(stack)
    }

    /// Starts `opts.workers` more workers (numbered after the running ones) with `opts.gpus`,
    /// `opts.fault_injection` and `opts.worker_env` (indexed from the first new one); the
    /// stack's other options are ignored. A stack started with no workers fills its queue first.
    pub fn add_workers(&mut self, opts: &StackOptions) -> anyhow::Result<()> {
        let first = self.workers.len();
        let mut opts = opts.clone();
        opts.worker_env = opts
            .worker_env
            .into_iter()
            .map(|(i, env)| (i + first, env))
            .collect();
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        let (workers, urls) = spawn_workers(
            &opts,
            first,
            scheme,
            &self.base_env,
            &self.worker_secret,
            &self.dir,
        )?;
        self.workers.extend(workers);
        self.worker_urls.extend(urls);
        Ok(())
    }

    /// The environment every service got (for running the CLI against this stack).
    pub fn env(&self) -> &[(String, String)] {
        &self.base_env
    }

    /// `start`, then waits until every worker's engine is healthy in the manager.
    pub async fn start_healthy(opts: StackOptions) -> Stack {
        let workers = opts.workers;
        let stack = Stack::start(opts).await.unwrap();
        stack
            .wait_engines_healthy(workers, Duration::from_secs(30))
            .await
            .unwrap();
        stack
    }

    /// Waits until every service answers `/readyz` and every worker consumes.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let mut urls = vec![self.gateway_url.clone()];
        if self.manager.is_some() {
            urls.push(self.manager_url.clone());
        }
        urls.extend(self.worker_urls.iter().cloned());
        let deadline = Instant::now() + Duration::from_secs(60);
        for url in urls {
            loop {
                let ok = self
                    .http
                    .get(format!("{url}/readyz"))
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{url} not ready after 60 s; logs in {}", self.dir.display());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Stops every service (SIGTERM, then SIGKILL) and deletes this stack's queues.
    pub async fn stop(mut self) {
        for w in &mut self.workers {
            w.stop().await;
        }
        self.gateway.stop().await;
        if let Some(m) = &mut self.manager {
            m.stop().await;
        }
        let urls = admin_amqp_urls();
        if let Ok((conn, _)) = gpuq_common::amqp::connect_any(&urls, "gpuq-e2e-cleanup").await {
            if let Ok(ch) = conn.create_channel().await {
                for q in [
                    format!("{}.jobs.default", self.prefix),
                    format!("{}.dead", self.prefix),
                ] {
                    let _ = ch
                        .queue_delete(ShortString::from(q), Default::default())
                        .await;
                }
            }
            let _ = conn.close(200, "OK".into()).await;
        }
    }
}
