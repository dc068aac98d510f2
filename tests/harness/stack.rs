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
    /// The `GPUQ_STORE_URL` every service got (see `TEST_STORE_ENV`).
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

    pub fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        rb.bearer_auth(&self.api_key)
    }

    /// GET `url` (with a bearer token when given) and its JSON body, whatever the status.
    pub async fn get_json(&self, url: &str, bearer: Option<&str>) -> Value {
        let mut rb = self.http.get(url);
        if let Some(b) = bearer {
            rb = rb.bearer_auth(b);
        }
        rb.send().await.unwrap().json().await.unwrap()
    }

    /// The `submit` key of one of `TENANTS`.
    pub fn key_of(&self, tenant: &str) -> &str {
        self.tenant_keys
            .iter()
            .find(|(t, _)| t == tenant)
            .map(|(_, k)| k.as_str())
            .unwrap_or_else(|| panic!("no key for tenant {tenant}"))
    }

    /// POST /v1/jobs; returns the status and the JSON body.
    pub async fn submit(&self, body: &Value) -> anyhow::Result<(u16, Value)> {
        let r = self
            .auth(self.http.post(format!("{}/v1/jobs", self.gateway_url)))
            .json(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await.unwrap_or(Value::Null)))
    }

    /// Submits and expects a 202; returns the id.
    pub async fn submit_ok(&self, body: &Value) -> anyhow::Result<Uuid> {
        let (status, v) = self.submit(body).await?;
        if status != 202 {
            bail!("submit answered {status}: {v}");
        }
        v["id"].as_str().context("no id")?.parse().context("bad id")
    }

    /// Submits `n` jobs with `concurrency` requests in flight.
    pub async fn submit_many(
        &self,
        n: usize,
        concurrency: usize,
        body: &Value,
    ) -> anyhow::Result<Vec<Uuid>> {
        use futures_util::StreamExt;
        let results: Vec<anyhow::Result<Uuid>> = futures_util::stream::iter(0..n)
            .map(|_| self.submit_ok(body))
            .buffer_unordered(concurrency)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// The gateway's typed client, with this stack's API key.
    pub fn gateway_client(&self) -> gpuq_client::Gateway {
        gpuq_client::Gateway::new(
            self.http.clone(),
            &self.gateway_url,
            Some(Secret::new(self.api_key.clone())),
        )
    }

    /// The manager's typed client: reads with this stack's read token, acts with its admin token.
    pub fn manager_client(&self) -> gpuq_client::Manager {
        gpuq_client::Manager::new(
            self.http.clone(),
            &self.manager_url,
            Some(Secret::new(self.admin_token.clone())),
        )
        .with_read_token(Some(Secret::new(self.read_token.clone())))
    }

    /// The typed client of worker `i` (`worker-{i+1}`)'s admin API.
    pub fn worker_client(&self, i: usize) -> gpuq_client::Worker {
        gpuq_client::Worker::new(
            format!("worker-{}", i + 1),
            self.http.clone(),
            &self.worker_urls[i],
            Some(Secret::new(self.admin_token.clone())),
        )
    }

    /// GET /v1/jobs/{id}, as JSON.
    pub async fn job(&self, id: Uuid) -> anyhow::Result<Value> {
        Ok(serde_json::to_value(self.gateway_client().job(id).await?)?)
    }

    /// Waits until every job is final (read from the store); fails with the stragglers.
    pub async fn wait_final(
        &self,
        ids: &[Uuid],
        timeout: Duration,
    ) -> anyhow::Result<Vec<JobRecord>> {
        let deadline = Instant::now() + timeout;
        let mut done: HashMap<Uuid, JobRecord> = HashMap::new();
        loop {
            for id in ids {
                if done.contains_key(id) {
                    continue;
                }
                if let Some(r) = self.store.get(*id).await?
                    && r.status.is_final()
                {
                    done.insert(*id, r);
                }
            }
            if done.len() == ids.len() {
                return Ok(ids.iter().map(|i| done.remove(i).expect("done")).collect());
            }
            if Instant::now() > deadline {
                let missing: Vec<_> = ids
                    .iter()
                    .filter(|i| !done.contains_key(i))
                    .take(5)
                    .collect();
                bail!(
                    "{} of {} jobs not final after {timeout:?}, e.g. {missing:?}; logs in {}",
                    ids.len() - done.len(),
                    ids.len(),
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the job is recorded `running` (a job shorter than the worker's
    /// `GPUQ_RUNNING_RECORD_DELAY_MS` never is); returns its record.
    pub async fn wait_running(&self, id: Uuid, timeout: Duration) -> JobRecord {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.store.get(id).await.unwrap().expect("job stored");
            if r.status == JobStatus::Running {
                return r;
            }
            assert!(
                !r.status.is_final(),
                "job {id} ended before it was seen running: {r:?}"
            );
            assert!(
                Instant::now() < deadline,
                "job {id} not running after {timeout:?}: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until one job is final and returns its record.
    pub async fn wait_one(&self, id: Uuid, timeout: Duration) -> anyhow::Result<JobRecord> {
        Ok(self.wait_final(&[id], timeout).await?.remove(0))
    }

    /// GET /v1/dead-letters (the first page), as JSON.
    pub async fn dead_letters(&self) -> anyhow::Result<Value> {
        let page = self.gateway_client().dead_letters(None, None).await?;
        Ok(serde_json::to_value(page)?)
    }

    /// Messages in a pool's queue (ready + unacked), read by a passive declare.
    pub async fn queue_depth(&self, pool: &str) -> anyhow::Result<u32> {
        let queue = format!("{}.jobs.{pool}", self.prefix);
        self.passive_count(&queue).await
    }

    pub async fn passive_count(&self, queue: &str) -> anyhow::Result<u32> {
        let urls = admin_amqp_urls();
        let (conn, _) = gpuq_common::amqp::connect_any(&urls, "gpuq-e2e").await?;
        let ch = conn.create_channel().await?;
        let q = ch
            .queue_declare(
                ShortString::from(queue.to_string()),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let _ = conn.close(200, "OK".into()).await;
        Ok(q.message_count())
    }

    /// Sum of a counter over its labels, from one worker's /metrics (None if unreachable).
    pub async fn worker_metric(&self, worker: usize, name: &str) -> Option<f64> {
        Some(sum_metric(&self.worker_metrics_text(worker).await?, name))
    }

    /// A worker's `/metrics` page; `None` when it does not answer within 2 s.
    pub async fn worker_metrics_text(&self, worker: usize) -> Option<String> {
        let client = self.worker_client(worker);
        tokio::time::timeout(Duration::from_secs(2), client.metrics())
            .await
            .ok()?
            .ok()
    }

    /// The workers started `jobs` jobs in all and discarded no result: nothing ran twice.
    pub async fn assert_each_started_once(&self, jobs: usize) {
        assert_eq!(
            self.workers_metric("gpuq_jobs_started_total").await,
            jobs as f64,
            "every job started exactly once"
        );
        assert_eq!(
            self.workers_metric("gpuq_results_discarded_total").await,
            0.0,
            "no result was discarded"
        );
    }

    /// The `gpuq` CLI, pointed at this stack's services (its flags still win).
    pub fn cli(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(bin_dir().join("gpuq"));
        cmd.env("GPUQ_GATEWAY_URL", &self.gateway_url)
            .env("GPUQ_API_KEY", &self.api_key)
            .env("GPUQ_MANAGER_URL", &self.manager_url)
            .env("GPUQ_ADMIN_TOKEN", &self.admin_token)
            .env("GPUQ_READ_TOKEN", &self.read_token)
            .env("GPUQ_WORKER_URLS", self.worker_urls.join(","))
            .current_dir(&self.dir);
        if let Some(ca) = &self.tls_ca {
            cmd.env("GPUQ_TLS_CA_FILE", ca);
        }
        cmd
    }

    /// Runs the CLI with `args` to its end; panics with its output unless it exits 0.
    /// Returns its standard output.
    pub async fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli().args(args).output().await.expect("run gpuq");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "gpuq {args:?} exited with {}: {stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    /// Sum of a counter over every worker that answers.
    pub async fn workers_metric(&self, name: &str) -> f64 {
        let mut total = 0.0;
        for i in 0..self.worker_urls.len() {
            total += self.worker_metric(i, name).await.unwrap_or(0.0);
        }
        total
    }

    /// Arms a fault scenario on worker `i` for its next `count` jobs (`POST /admin/faults`).
    pub async fn arm_fault(
        &self,
        worker: usize,
        scenario: &str,
        count: u32,
    ) -> anyhow::Result<gpuq_client::worker::FaultsView> {
        Ok(self.worker_client(worker).arm(scenario, count).await?)
    }

    /// Lines of a service's log (JSON lines and restart notes).
    pub fn log_lines(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.join(format!("{name}.log")))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
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
