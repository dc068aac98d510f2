//! What a test asks of a running stack: authenticated requests, submissions and waits, queue
//! depths, worker metrics, the CLI pointed at it, its logs.

use super::*;

impl Stack {
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
}
