//! The production shape for real: `docker-compose.yml` on the stand-in images
//! (`scripts/compose.sh up --local-images`), driven through its published ports, with containers
//! killed and restarted under it. The live tests are `#[ignore]`d in the main pass and run by
//! `scripts/test.sh`'s compose phase, one at a time, against the stack that phase brings up
//! (its URLs and secrets: `.dev/compose.env`). The `compose.sh` bad-input tests need no engine
//! and run in the main pass.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gpuq_e2e::{eventually, repo_root, sum_metric};
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// The stack under test

/// The compose stack's endpoints and secrets, from `.dev/compose.env`.
pub(crate) struct ComposeStack {
    pub(crate) env: HashMap<String, String>,
    pub(crate) http: reqwest::Client,
}

impl ComposeStack {
    pub(crate) fn load() -> Self {
        let path = std::env::var("GPUQ_TEST_COMPOSE_ENV")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join(".dev/compose.env"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}: bring the stack up with scripts/compose.sh up --local-images",
                path.display()
            )
        });
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ComposeStack {
            env,
            http: gpuq_common::tls::http_client_builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        }
    }

    pub(crate) fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!(".dev/compose.env has no {key}"))
    }

    pub(crate) fn worker_urls(&self) -> Vec<String> {
        self.get("GPUQ_WORKER_URLS")
            .split(',')
            .map(String::from)
            .collect()
    }

    pub(crate) async fn submit(&self, body: &Value) -> Uuid {
        let resp = self
            .http
            .post(format!("{}/v1/jobs", self.get("GPUQ_GATEWAY_URL")))
            .bearer_auth(self.get("GPUQ_API_KEY"))
            .json(body)
            .send()
            .await
            .expect("the gateway answers");
        let status = resp.status();
        let v: Value = resp.json().await.expect("a JSON answer");
        assert_eq!(status, 202, "submit answered {status}: {v}");
        v["id"].as_str().unwrap().parse().unwrap()
    }

    /// Submits `n` jobs, `concurrency` at a time; every one must be accepted.
    async fn submit_many(&self, n: usize, body: &Value) -> Vec<Uuid> {
        futures_util::stream::iter(0..n)
            .map(|_| self.submit(body))
            .buffer_unordered(32)
            .collect()
            .await
    }

    async fn mongo(&self) -> mongodb::Collection<Document> {
        let client = mongodb::Client::with_uri_str(self.get("GPUQ_COMPOSE_MONGODB_URL"))
            .await
            .expect("the MongoDB URL parses");
        client.database("gpuq").collection("jobs")
    }

    /// Reads the records of `ids` straight from MongoDB (not through the gateway) until every
    /// one is final; asserts each id is stored once and succeeded.
    async fn assert_all_succeeded_once_in_mongodb(&self, ids: &[Uuid], timeout: Duration) {
        let wanted: HashSet<String> = ids.iter().map(Uuid::to_string).collect();
        assert_eq!(wanted.len(), ids.len(), "the gateway handed out unique ids");
        let jobs = self.mongo().await;
        let list: Vec<&String> = wanted.iter().collect();
        let deadline = Instant::now() + timeout;
        loop {
            let docs = match jobs.find(doc! { "_id": { "$in": &list } }).await {
                Ok(cursor) => cursor
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()
                    .ok(),
                Err(_) => None, // MongoDB restarting: ask again.
            };
            if let Some(docs) = docs {
                let mut seen = HashSet::new();
                let mut by_status: HashMap<String, usize> = HashMap::new();
                for d in &docs {
                    let id = d.get_str("_id").unwrap().to_string();
                    assert!(seen.insert(id.clone()), "job {id} is stored twice");
                    *by_status
                        .entry(d.get_str("status").unwrap_or("?").to_string())
                        .or_default() += 1;
                }
                if by_status.get("succeeded") == Some(&ids.len()) {
                    assert_eq!(seen, wanted);
                    return;
                }
                let bad: usize = by_status
                    .iter()
                    .filter(|(s, _)| !matches!(s.as_str(), "queued" | "running" | "succeeded"))
                    .map(|(_, n)| n)
                    .sum();
                assert_eq!(bad, 0, "jobs ended badly: {by_status:?}");
                assert!(
                    Instant::now() < deadline,
                    "not all {} jobs succeeded within {timeout:?}: {} stored, {by_status:?}",
                    ids.len(),
                    docs.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// After a fault: every job of `ids` succeeded once, and the whole stack is back.
    async fn assert_recovered(&self, ids: &[Uuid]) {
        self.assert_all_succeeded_once_in_mongodb(ids, Duration::from_secs(300))
            .await;
        self.wait_settled().await;
    }

    /// The workers' summed counter `name` (a worker that does not answer counts 0).
    async fn workers_metric(&self, name: &str) -> f64 {
        let mut total = 0.0;
        for url in self.worker_urls() {
            if let Ok(r) = self.http.get(format!("{url}/metrics")).send().await
                && let Ok(text) = r.text().await
            {
                total += sum_metric(&text, name);
            }
        }
        total
    }

    pub(crate) async fn rabbitmq(&self, path: &str) -> Option<Value> {
        let (user, pass) = self.get("GPUQ_COMPOSE_RABBITMQ_ADMIN").split_once(':')?;
        let r = self
            .http
            .get(format!(
                "{}/api{path}",
                self.get("GPUQ_COMPOSE_RABBITMQ_URL")
            ))
            .basic_auth(user, Some(pass))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())?;
        r.json().await.ok()
    }

    async fn running_rabbitmq_nodes(&self) -> usize {
        self.rabbitmq("/nodes").await.map_or(0, |nodes| {
            nodes
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["running"] == true)
                .count()
        })
    }

    async fn healthy_engines(&self) -> Vec<String> {
        let Ok(r) = self
            .http
            .get(format!("{}/v1/engines", self.get("GPUQ_MANAGER_URL")))
            .bearer_auth(self.get("GPUQ_READ_TOKEN"))
            .send()
            .await
        else {
            return Vec::new();
        };
        let engines: Vec<Value> = r.json().await.unwrap_or_default();
        let mut ids: Vec<String> = engines
            .iter()
            .filter(|e| e["state"] == "healthy")
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    }

    async fn prometheus(&self, path: &str) -> Option<Value> {
        let url = format!("{}/api/v1/{path}", self.get("GPUQ_COMPOSE_PROMETHEUS_URL"));
        self.http.get(url).send().await.ok()?.json().await.ok()
    }

    /// Waits until the whole stack is back: 3 brokers, 3 healthy engines, every container healthy.
    async fn wait_settled(&self) {
        eventually(
            "3 running RabbitMQ nodes",
            Duration::from_secs(180),
            || async { self.running_rabbitmq_nodes().await == 3 },
        )
        .await;
        eventually("3 healthy engines", Duration::from_secs(180), || async {
            self.healthy_engines().await.len() == 3
        })
        .await;
        eventually(
            "every container healthy",
            Duration::from_secs(180),
            || async {
                let out = docker(&[
                    "ps",
                    "--filter",
                    "label=com.docker.compose.project=gpuq",
                    "--format",
                    "{{.Names}} {{.Status}}",
                ]);
                !out.is_empty() && out.lines().all(|l| l.contains("(healthy)"))
            },
        )
        .await;
    }
}

/// Debian's docker client where there is one (the engine's own), else the one on PATH.
fn docker_bin() -> &'static str {
    if std::path::Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new(docker_bin())
        .args(args)
        .output()
        .expect("docker runs");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn inspect(container: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, container])
}

fn simulate(duration_ms: u64) -> Value {
    json!({"kind": "simulate", "params": {"duration_ms": duration_ms}, "gpus": 1})
}

// ---------------------------------------------------------------------------------------------
// Live tests (the compose phase)

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the compose stack: run by scripts/test.sh's compose phase"]
async fn the_brokers_form_one_cluster_and_the_job_queue_is_a_three_member_quorum_queue() {
    let stack = ComposeStack::load();
    stack.wait_settled().await;
    let nodes = stack
        .rabbitmq("/nodes")
        .await
        .expect("the management API answers");
    let mut names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["running"] == true)
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["rabbit@rabbitmq1", "rabbit@rabbitmq2", "rabbit@rabbitmq3"]
    );
    let q = stack
        .rabbitmq("/queues/%2f/gpuq.jobs.default")
        .await
        .expect("gpuq.jobs.default exists");
    assert_eq!(q["type"], "quorum", "{q}");
    let members = q["members"]
        .as_array()
        .expect("a quorum queue lists its members");
    assert_eq!(members.len(), 3, "members: {members:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the compose stack: run by scripts/test.sh's compose phase"]
async fn the_manager_sees_three_healthy_container_workers_and_prometheus_scrapes_every_target() {
    let stack = ComposeStack::load();
    stack.wait_settled().await;
    assert_eq!(
        stack.healthy_engines().await,
        ["worker-1", "worker-2", "worker-3"]
    );
    // Every target of deploy/prometheus/prometheus.yml is up, inside the compose network.
    eventually(
        "every Prometheus target up",
        Duration::from_secs(60),
        || async {
            let Some(t) = stack.prometheus("targets").await else {
                return false;
            };
            let active = t["data"]["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let jobs: HashSet<&str> = active
                .iter()
                .filter_map(|t| t["labels"]["job"].as_str())
                .collect();
            // 1 gateway, 1 manager, 3 workers, 3 RabbitMQ nodes.
            active.len() == 8
                && ["gpuq-gateway", "gpuq-manager", "gpuq-worker", "rabbitmq"]
                    .iter()
                    .all(|j| jobs.contains(j))
                && active.iter().all(|t| t["health"] == "up")
        },
    )
    .await;
    // The alert rules of deploy/prometheus/alerts.yml are loaded, every one of them.
    let file: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .unwrap();
    let want: HashSet<String> = file["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .filter_map(|r| r["alert"].as_str().map(String::from))
        .collect();
    let rules = stack
        .prometheus("rules")
        .await
        .expect("the rules API answers");
    let loaded: HashSet<String> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .filter_map(|r| r["name"].as_str().map(String::from))
        .collect();
    assert!(!want.is_empty());
    assert_eq!(
        loaded, want,
        "Prometheus loaded other rules than alerts.yml holds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the compose stack: run by scripts/test.sh's compose phase"]
async fn a_thousand_jobs_succeed_and_mongodb_holds_each_exactly_once() {
    let stack = ComposeStack::load();
    stack.wait_settled().await;
    let started = stack.workers_metric("gpuq_jobs_started_total").await;
    let discarded = stack.workers_metric("gpuq_results_discarded_total").await;
    let ids = stack.submit_many(1000, &simulate(5)).await;
    stack
        .assert_all_succeeded_once_in_mongodb(&ids, Duration::from_secs(300))
        .await;
    eventually(
        "the workers counted 1000 starts",
        Duration::from_secs(10),
        || async { stack.workers_metric("gpuq_jobs_started_total").await - started == 1000.0 },
    )
    .await;
    assert_eq!(
        stack.workers_metric("gpuq_results_discarded_total").await,
        discarded,
        "no result was written twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the compose stack: run by scripts/test.sh's compose phase"]
async fn a_worker_container_killed_mid_run_is_restarted_by_compose_and_nothing_is_lost_or_stored_twice()
 {
    let stack = ComposeStack::load();
    stack.wait_settled().await;
    let container = "gpuq-worker2-1";
    let restarts: u64 = inspect(container, "{{.RestartCount}}").parse().unwrap();
    let ids = stack.submit_many(240, &simulate(150)).await;
    // Mid-run: worker-2 holds jobs now.
    let w2 = stack.worker_urls()[1].clone();
    eventually("worker-2 runs jobs", Duration::from_secs(30), || async {
        let Ok(r) = stack.http.get(format!("{w2}/metrics")).send().await else {
            return false;
        };
        sum_metric(&r.text().await.unwrap_or_default(), "gpuq_leases_held") > 0.0
    })
    .await;
    // A crash, not a stop: SIGKILL of the container's main process from the host (`docker
    // kill` would count as a manual stop, which the restart policy honours).
    let pid = inspect(container, "{{.State.Pid}}");
    let out = Command::new("kill").args(["-9", &pid]).output().unwrap();
    assert!(out.status.success(), "kill -9 {pid}");
    eventually(
        "compose restarted worker-2",
        Duration::from_secs(60),
        || async {
            inspect(container, "{{.RestartCount}}")
                .parse::<u64>()
                .unwrap()
                > restarts
                && inspect(container, "{{.State.Running}}") == "true"
        },
    )
    .await;
    stack.assert_recovered(&ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the compose stack: run by scripts/test.sh's compose phase"]
async fn a_broker_container_stopped_and_started_mid_run_loses_nothing() {
    let stack = ComposeStack::load();
    stack.wait_settled().await;
    let mut ids = stack.submit_many(150, &simulate(40)).await;
    docker(&["stop", "gpuq-rabbitmq2-1"]);
    // Submissions go on through the two nodes left.
    ids.extend(stack.submit_many(150, &simulate(40)).await);
    docker(&["start", "gpuq-rabbitmq2-1"]);
    stack.assert_recovered(&ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the compose stack: run by scripts/test.sh's compose phase"]
async fn a_mongodb_restart_mid_run_loses_nothing() {
    let stack = ComposeStack::load();
    stack.wait_settled().await;
    let ids = stack.submit_many(300, &simulate(40)).await;
    docker(&["restart", "gpuq-mongodb-1"]);
    stack.assert_recovered(&ids).await;
}
