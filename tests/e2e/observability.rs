//! Issue 5's "Must show", on the real binaries, the local RabbitMQ cluster and Redis:
//!
//! 1. A real Prometheus (Debian's `prometheus`) scrapes a stack that runs a workload (successes,
//!    a retried job, a failed job, dead letters, a worker crash, a lost ack, a GPU fault that
//!    interrupts a job), with the alert rules loaded. Then **every** PromQL expression of every
//!    Grafana panel, dashboard variable and alert rule goes through Prometheus's HTTP API: each is
//!    valid, each one tied to the workload returns data, and every metric name they use has
//!    series; a name that no service exports fails the test.
//! 2. Every field a LogQL query of the dashboards selects, filters or groups by is in the
//!    services' real JSON log lines, and each query, run over those lines the way Loki would
//!    (labels as Promtail makes them), finds lines. Promtail promotes only low-cardinality fields.
//! 3. Headless Chromium (Debian's `chromium`, driven over the DevTools protocol) opens the
//!    manager's `/ui`, sees every engine and GPU with its state, sees a GPU fault appear without a
//!    reload, and saves a screenshot to `test-artifacts/ui.png`.

// Test scenarios read as one story from top to bottom: exempt from the workspace's
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use gpuq_common::JobStatus;
use gpuq_e2e::{Stack, StackOptions, free_port, repo_root};
use regex::Regex;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use uuid::Uuid;

// =============================================================================================
// The dashboards and alert rules, as files
// =============================================================================================

/// One query of one panel.
#[derive(Debug, Clone)]
struct PanelQuery {
    file: String,
    panel: String,
    /// Data source uid: `prometheus` or `loki`.
    ds: String,
    expr: String,
}

/// One dashboard variable.
#[derive(Debug, Clone)]
struct Variable {
    file: String,
    name: String,
    kind: String,
    ds: Option<String>,
    query: String,
    all_value: Option<String>,
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = repo_root().join("grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("grafana/dashboards")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboard in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("dashboard");
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let v: Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
            (name, v)
        })
        .collect()
}

fn ds_uid(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) => m.get("uid").and_then(Value::as_str).map(String::from),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// Every panel query (rows' nested panels included) and every variable of every dashboard.
fn dashboard_queries() -> (Vec<PanelQuery>, Vec<Variable>) {
    let mut queries = vec![];
    let mut variables = vec![];
    for (file, d) in dashboards() {
        let mut panels: Vec<&Value> = vec![];
        for p in d["panels"].as_array().into_iter().flatten() {
            panels.push(p);
            panels.extend(p["panels"].as_array().into_iter().flatten());
        }
        for p in panels {
            let title = p["title"].as_str().unwrap_or("").to_string();
            for t in p["targets"].as_array().into_iter().flatten() {
                let Some(expr) = t["expr"].as_str() else {
                    continue;
                };
                let ds = ds_uid(&t["datasource"])
                    .or_else(|| ds_uid(&p["datasource"]))
                    .unwrap_or_else(|| panic!("{file} panel {title:?}: no data source"));
                assert!(
                    ds == "prometheus" || ds == "loki",
                    "{file} panel {title:?}: unknown data source {ds}"
                );
                queries.push(PanelQuery {
                    file: file.clone(),
                    panel: title.clone(),
                    ds,
                    expr: expr.to_string(),
                });
            }
        }
        for v in d["templating"]["list"].as_array().into_iter().flatten() {
            let query = match &v["query"] {
                Value::String(s) => s.clone(),
                Value::Object(m) => m
                    .get("query")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                _ => String::new(),
            };
            variables.push(Variable {
                file: file.clone(),
                name: v["name"].as_str().unwrap_or("").to_string(),
                kind: v["type"].as_str().unwrap_or("").to_string(),
                ds: ds_uid(&v["datasource"]),
                query,
                all_value: v["allValue"].as_str().map(String::from),
            });
        }
    }
    (queries, variables)
}

/// (alert name, expression) of every rule in deploy/prometheus/alerts.yml.
fn alert_rules() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))
        .expect("alerts.yml");
    let v: Value = serde_yaml::from_str(&text).expect("alerts.yml is YAML");
    let mut out = vec![];
    for g in v["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .expect("rule name");
            out.push((
                name.to_string(),
                r["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    assert!(!out.is_empty(), "alerts.yml has no rule");
    out
}

/// `label_values(<selector>, <label>)` of a query variable.
fn label_values_query(q: &str) -> Option<(String, String)> {
    let re = Regex::new(r"^\s*label_values\(\s*(.*?)\s*,\s*(\w+)\s*\)\s*$").unwrap();
    let c = re.captures(q)?;
    Some((c[1].to_string(), c[2].to_string()))
}

/// Replaces Grafana variables (`$x`, `${x}`, `${x:fmt}`, `[[x]]`); an unknown variable panics.
fn substitute(expr: &str, vals: &HashMap<&str, String>) -> String {
    let re = Regex::new(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)").unwrap();
    re.replace_all(expr, |c: &regex::Captures| {
        let name = c.get(1).or(c.get(2)).or(c.get(3)).expect("group").as_str();
        vals.get(name)
            .unwrap_or_else(|| panic!("{expr}: unknown dashboard variable ${name}"))
            .clone()
    })
    .into_owned()
}

/// The expression without its string literals (label values, regexes).
fn strip_strings(expr: &str) -> String {
    let mut out = String::new();
    let (mut in_str, mut escaped) = (false, false);
    for c in expr.chars() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
                out.push_str("\"\"");
            }
            continue;
        }
        if c == '"' {
            in_str = true;
        } else {
            out.push(c);
        }
    }
    out
}

/// Metric names a PromQL expression uses: gpuq's, RabbitMQ's, the process collector's, `up`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    strip_strings(expr)
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| {
            t.starts_with("gpuq_")
                || t.starts_with("rabbitmq_")
                || t.starts_with("process_")
                || *t == "up"
        })
        .map(String::from)
        .collect()
}

// =============================================================================================
// A real Prometheus for one stack
// =============================================================================================

struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::Client,
    log: PathBuf,
}

/// One sample of an instant query: its labels and its value as Prometheus wrote it.
#[derive(Debug, Clone)]
struct Sample {
    labels: Value,
    value: String,
}

impl Sample {
    fn number(&self) -> f64 {
        match self.value.as_str() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or(f64::NAN),
        }
    }
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

impl Prometheus {
    /// Writes a config derived from deploy/prometheus/prometheus.local.yml (same jobs, same
    /// `engine` labels, same RabbitMQ targets) with this stack's ports, a 1 s scrape and rule
    /// evaluation interval and the real alert rules, and starts Prometheus on a random port
    /// with its own TSDB under the stack's directory.
    async fn start(stack: &Stack) -> anyhow::Result<Prometheus> {
        let local = repo_root().join("deploy/prometheus/prometheus.local.yml");
        let mut cfg: Value = serde_yaml::from_str(&std::fs::read_to_string(&local)?)
            .context("prometheus.local.yml")?;
        cfg["global"]["scrape_interval"] = json!("1s");
        cfg["global"]["scrape_timeout"] = json!("1s");
        cfg["global"]["evaluation_interval"] = json!("1s");
        let rules = repo_root().join("deploy/prometheus/alerts.yml");
        cfg["rule_files"] = json!([rules.display().to_string()]);
        let mut ports: HashMap<u16, String> = HashMap::new();
        ports.insert(8080, format!("127.0.0.1:{}", port_of(&stack.gateway_url)));
        ports.insert(8090, format!("127.0.0.1:{}", port_of(&stack.manager_url)));
        for (i, url) in stack.worker_urls.iter().enumerate() {
            ports.insert(9001 + i as u16, format!("127.0.0.1:{}", port_of(url)));
        }
        let mut jobs = BTreeSet::new();
        let mut gpuq_targets = 0;
        for sc in cfg["scrape_configs"]
            .as_array_mut()
            .context("scrape_configs")?
        {
            let job = sc["job_name"].as_str().unwrap_or("").to_string();
            jobs.insert(job.clone());
            for st in sc["static_configs"]
                .as_array_mut()
                .context("static_configs")?
            {
                let engine = st["labels"]["engine"].as_str().map(String::from);
                for t in st["targets"].as_array_mut().context("targets")? {
                    let addr = t.as_str().context("target")?.to_string();
                    let port = port_of(&addr);
                    if job == "rabbitmq" {
                        continue; // the shared local cluster's prometheus plugin, as it is
                    }
                    let ours = ports
                        .get(&port)
                        .with_context(|| format!("{job} target {addr}: not a service of dev.sh"))?;
                    if (9001..=9003).contains(&port) {
                        // The harness names workers like dev.sh: worker-N on port 900N.
                        let want = format!("worker-{}", port - 9000);
                        if engine.as_deref() != Some(want.as_str()) {
                            bail!("{addr} has engine label {engine:?}, dev.sh runs {want} there");
                        }
                    }
                    *t = json!(ours);
                    gpuq_targets += 1;
                }
            }
        }
        let want: BTreeSet<String> = ["gpuq-gateway", "gpuq-manager", "gpuq-worker", "rabbitmq"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if jobs != want {
            bail!("prometheus.local.yml has jobs {jobs:?}, expected {want:?}");
        }
        let dir = stack.dir.join("prometheus");
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("prometheus.yml");
        // JSON is YAML: Prometheus reads it as it is.
        std::fs::write(&config, serde_json::to_string_pretty(&cfg)?)?;
        let port = free_port();
        let log = stack.dir.join("prometheus.log");
        let out = std::fs::File::create(&log)?;
        let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context(
                "prometheus is not installed (Debian's `prometheus`; scripts/test.sh installs it)",
            )?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1d")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting prometheus")?;
        let mut p = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()?,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = p
                .http
                .get(format!("{}/-/ready", p.url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            // Ready is not scraping yet: Prometheus applies discovered targets every 5 s. The
            // workload must happen while it watches (a counter's first sample must come before
            // its increments), so wait for the first scrape of every gpuq target.
            if ready
                && p.query("up").await.is_ok_and(|up| {
                    up.iter()
                        .filter(|s| {
                            s.labels["job"]
                                .as_str()
                                .is_some_and(|j| j.starts_with("gpuq-"))
                        })
                        .count()
                        == gpuq_targets
                })
            {
                return Ok(p);
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                bail!(
                    "prometheus exited ({status}): {}",
                    std::fs::read_to_string(&p.log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 30 s; log {}", p.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET an API path; the `data` of a `success` answer, else the error Prometheus gave.
    async fn api(&self, path: &str, params: &[(&str, String)]) -> anyhow::Result<Value> {
        let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.url), params)?;
        let r = self.http.get(url).send().await?;
        let code = r.status();
        let v: Value = r.json().await.with_context(|| format!("{path}: {code}"))?;
        if v["status"] != "success" {
            bail!("{} ({}): {}", v["errorType"], code, v["error"]);
        }
        Ok(v["data"].clone())
    }

    /// An instant query now: its samples (a scalar answer is one sample).
    async fn query(&self, expr: &str) -> anyhow::Result<Vec<Sample>> {
        let data = self
            .api("/api/v1/query", &[("query", expr.to_string())])
            .await?;
        match data["resultType"].as_str() {
            Some("vector") => Ok(data["result"]
                .as_array()
                .context("result")?
                .iter()
                .map(|s| Sample {
                    labels: s["metric"].clone(),
                    value: s["value"][1].as_str().unwrap_or("").to_string(),
                })
                .collect()),
            Some("scalar") => Ok(vec![Sample {
                labels: json!({}),
                value: data["result"][1].as_str().unwrap_or("").to_string(),
            }]),
            other => bail!("unexpected result type {other:?} for {expr}"),
        }
    }

    /// Polls a query until it returns samples.
    async fn wait_for(&self, expr: &str, timeout: Duration) -> anyhow::Result<Vec<Sample>> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.query(expr).await?;
            if !r.is_empty() {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!("{expr} returned nothing for {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Series of a metric name in the last 10 minutes.
    async fn series(&self, name: &str) -> anyhow::Result<usize> {
        let now = now_s();
        let data = self
            .api(
                "/api/v1/series",
                &[
                    ("match[]", format!("{{__name__=\"{name}\"}}")),
                    ("start", format!("{:.3}", now - 600.0)),
                    ("end", format!("{now:.3}")),
                ],
            )
            .await?;
        Ok(data.as_array().map_or(0, Vec::len))
    }

    /// Waits until every target was scraped at least twice after `t` (Unix seconds).
    async fn wait_two_scrapes_after(&self, t: f64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let stamps = self.query("timestamp(up)").await?;
            // Scrapes are 1 s apart: a latest scrape at t + 1.5 s or later had one before it,
            // after t.
            if !stamps.is_empty() && stamps.iter().all(|s| s.number() >= t + 1.5) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("targets not scraped twice after the workload: {stamps:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

// =============================================================================================
// 1. Every PromQL expression, live
// =============================================================================================

/// Counters of events this workload does not cause: each needs an outage of the shared Redis
/// or job store (the disruptive suite's business), or a race that gpuq exists to prevent. The
/// services create a labelled counter's series at its first increment (they do not initialise
/// them at 0), so these may have no series at all here: an expression made only of them may
/// return nothing. Each must still be a metric that gpuq defines (checked against
/// crates/common/src/metrics.rs), so a misspelt name is not excused.
const NOT_CAUSED: &[(&str, &str)] = &[
    (
        "gpuq_results_discarded_total",
        "a job ran twice and the later result was discarded (what gpuq prevents)",
    ),
    (
        "gpuq_store_write_retries_total",
        "the job store refused a write (a store outage)",
    ),
    (
        "gpuq_dead_letters_unrecorded_total",
        "a dead letter without a job id, or whose stored record is corrupt",
    ),
    (
        "gpuq_redis_errors_total",
        "a Redis command failed (a Redis outage)",
    ),
    (
        "gpuq_lease_contended_total",
        "a live worker held the lease of a redelivered job (a race)",
    ),
];

/// Alerts whose condition the workload makes true (a dead letter; a GPU left overheated).
const ALERTS_THE_WORKLOAD_RAISES: &[&str] = &["GpuqDeadLettersGrowing", "GpuqGpuUnhealthy"];

/// What the workload did, for the later checks.
struct Workload {
    retried: Uuid,
    interrupted_on: String,
}

async fn workload(stack: &Stack) -> anyhow::Result<Workload> {
    let sim = |ms: u64| json!({"kind": "simulate", "params": {"duration_ms": ms}});
    // Redelivered jobs (a retry, a crash, a lost ack) run while GPUs are free, so that none is
    // given back: what this suite checks is which metrics and alerts each event moves.

    // A: successes, an idempotent replay, then a retry, a failure, two kinds of dead letter,
    // and a submission to a pool nobody serves (the broker returns it: a publish failure).
    let mut ok = stack.submit_many(20, 8, &sim(100)).await?;
    stack.wait_final(&ok, Duration::from_secs(60)).await?;
    let key = Uuid::new_v4().to_string();
    let mut replay = vec![];
    for _ in 0..2 {
        let r = stack
            .auth(stack.http.post(format!("{}/v1/jobs", stack.gateway_url)))
            .header("Idempotency-Key", &key)
            .json(&sim(50))
            .send()
            .await?;
        let code = r.status().as_u16();
        let v: Value = r.json().await?;
        replay.push((code, v["id"].as_str().unwrap_or("").to_string()));
    }
    if replay[0].0 != 202 || replay[1].0 != 200 || replay[0].1 != replay[1].1 {
        bail!("an Idempotency-Key replay did not answer 202 then 200 with one id: {replay:?}");
    }
    ok.push(replay[0].1.parse()?);
    let retried = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 50, "fail_times": 1}}))
        .await?;
    let failed = stack
        .submit_ok(
            &json!({"kind": "command", "params": {"program": "sh", "args": ["-c", "exit 3"]}}),
        )
        .await?;
    let poison = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"always_fail": true}}))
        .await?;
    let too_big = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 10}, "gpus": 3}))
        .await?;
    let (code, body) = stack
        .submit(&json!({"kind": "simulate", "params": {"duration_ms": 10}, "pool": "nobody"}))
        .await?;
    if code != 422 {
        bail!("a job for a pool nobody serves answered {code}: {body}");
    }
    let mut all = ok.clone();
    all.extend([retried, failed, poison, too_big]);
    let recs = stack.wait_final(&all, Duration::from_secs(60)).await?;
    let status = |id: Uuid| recs.iter().find(|r| r.id == id).map(|r| r.status);
    for id in &ok {
        if status(*id) != Some(JobStatus::Succeeded) {
            bail!("job {id}: {:?}", status(*id));
        }
    }
    let want = [
        (retried, JobStatus::Succeeded),
        (failed, JobStatus::Failed),
        (poison, JobStatus::DeadLettered),
        (too_big, JobStatus::DeadLettered),
    ];
    for (id, s) in want {
        if status(id) != Some(s) {
            bail!("job {id}: {:?}, expected {s:?}", status(id));
        }
    }

    // B: worker-2 dies in the middle of a job (restart, redelivery, lease takeover), then
    // worker-1 loses an ack (the redelivery is suppressed as a duplicate). One after the other,
    // so that no job is returned twice within the delivery limit of 2.
    stack.arm_fault(1, "crash_mid_task", 1).await?;
    // Four jobs on six GPUs: round robin gives worker-2 one of them.
    let ids = stack.submit_many(4, 4, &sim(400)).await?;
    let recs = stack.wait_final(&ids, Duration::from_secs(60)).await?;
    if recs.iter().any(|r| r.status != JobStatus::Succeeded) {
        bail!("after a worker crash: {:?}", gpuq_e2e::by_status(&recs));
    }
    if stack.workers[1].restarts() == 0 {
        bail!("worker-2 did not crash (no job reached it?)");
    }
    stack.arm_fault(0, "duplicate_after_complete", 1).await?;
    let ids = stack.submit_many(4, 4, &sim(300)).await?;
    let recs = stack.wait_final(&ids, Duration::from_secs(60)).await?;
    if recs.iter().any(|r| r.status != JobStatus::Succeeded) {
        bail!("after a lost ack: {:?}", gpuq_e2e::by_status(&recs));
    }

    // C: a GPU overheats under a running job (GPUQ_FINISH_ON_UNHEALTHY=false): the job is
    // stopped, given back, and finishes elsewhere. The GPU stays unhealthy.
    let long = stack.submit_ok(&sim(3000)).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (worker, gpu) = loop {
        let v = stack.job(long).await?;
        if v["status"] == "running"
            && let (Some(w), Some(g)) = (v["worker"].as_str(), v["gpus"][0].as_u64())
        {
            break (w.to_string(), u32::try_from(g)?);
        }
        if Instant::now() > deadline {
            bail!("job {long} never ran: {v}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stack.gpu_fault(&worker, gpu, "overheat").await?;
    let r = stack
        .wait_final(&[long], Duration::from_secs(60))
        .await?
        .remove(0);
    if r.status != JobStatus::Succeeded {
        bail!("the interrupted job ended {:?}", r.status);
    }
    Ok(Workload {
        retried,
        interrupted_on: worker,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_evaluates_every_dashboard_and_alert_expression_against_a_live_workload() {
    let t0 = Instant::now();
    let (queries, variables) = dashboard_queries();
    let prom_queries: Vec<&PanelQuery> = queries.iter().filter(|q| q.ds == "prometheus").collect();
    let rules = alert_rules();
    assert!(!prom_queries.is_empty(), "no PromQL panel query found");
    let metrics_rs =
        std::fs::read_to_string(repo_root().join("crates/common/src/metrics.rs")).unwrap();
    for (name, why) in NOT_CAUSED {
        assert!(
            metrics_rs.contains(&format!("\"{name}\"")),
            "{name} ({why}) is not defined in crates/common/src/metrics.rs"
        );
    }

    let stack = Stack::start(StackOptions {
        fault_injection: true,
        env: vec![
            ("GPUQ_DELIVERY_LIMIT".into(), "2".into()),
            ("GPUQ_FINISH_ON_UNHEALTHY".into(), "false".into()),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
    let prom = Prometheus::start(&stack).await.unwrap();
    stack
        .wait_engines_healthy(3, Duration::from_secs(30))
        .await
        .unwrap();
    let w = workload(&stack).await.unwrap();
    eprintln!(
        "workload done in {:?} (retried job {}, GPU fault on {})",
        t0.elapsed(),
        w.retried,
        w.interrupted_on
    );

    // The workload's marks reach Prometheus through the services (the manager via heartbeats
    // and its broker polls).
    let wait = Duration::from_secs(30);
    for expr in [
        r#"gpuq_gpu_health{state="unhealthy"} == 1"#,
        r#"gpuq_dead_letters_total{reason="delivery_limit"}"#,
        r#"gpuq_dead_letters_total{reason="unschedulable"}"#,
        r#"gpuq_engine_restarts_total{engine="worker-2"} > 0"#,
        r#"gpuq_publish_failures_total{reason="unroutable"}"#,
        r#"gpuq_jobs_completed_total{outcome="interrupted"}"#,
        r#"gpuq_deliveries_given_back_total{reason="interrupted"}"#,
        r#"gpuq_duplicates_suppressed_total"#,
        r#"gpuq_lease_takeovers_total"#,
        r#"gpuq_idempotent_replays_total"#,
        r#"gpuq_queue_consumers{queue=~".+\\.jobs\\.default"} > 0"#,
    ] {
        prom.wait_for(expr, wait)
            .await
            .unwrap_or_else(|e| panic!("{e}; logs in {}", stack.dir.display()));
    }
    let t_end = now_s();
    prom.wait_two_scrapes_after(t_end).await.unwrap();

    let mut failures: Vec<String> = vec![];
    let mut report: Vec<String> = vec![];

    // Every gpuq target is up; at least one RabbitMQ node answers its plugin.
    let up = prom.query("up").await.unwrap();
    for s in &up {
        let job = s.labels["job"].as_str().unwrap_or("");
        if job.starts_with("gpuq-") && s.value != "1" {
            failures.push(format!("target {} is down", s.labels));
        }
    }
    let gpuq_targets = up
        .iter()
        .filter(|s| {
            s.labels["job"]
                .as_str()
                .is_some_and(|j| j.starts_with("gpuq-"))
        })
        .count();
    if gpuq_targets != 5 {
        failures.push(format!("{gpuq_targets} gpuq targets, expected 5: {up:?}"));
    }
    if !up
        .iter()
        .any(|s| s.labels["job"] == "rabbitmq" && s.value == "1")
    {
        failures.push("no RabbitMQ node is scraped".into());
    }

    // Dashboard variables: each Prometheus `label_values` finds values; the engines the manager
    // names are the engines the worker targets are labelled with.
    let mut first_value: HashMap<String, String> = HashMap::new();
    for v in &variables {
        if v.kind != "query" || v.ds.as_deref() != Some("prometheus") {
            continue;
        }
        let Some((selector, label)) = label_values_query(&v.query) else {
            failures.push(format!(
                "{} variable {}: not label_values(): {}",
                v.file, v.name, v.query
            ));
            continue;
        };
        let values = prom
            .api(
                &format!("/api/v1/label/{label}/values"),
                &[("match[]", selector.clone())],
            )
            .await;
        match values {
            Ok(Value::Array(a)) if !a.is_empty() => {
                let vals: BTreeSet<&str> = a.iter().filter_map(Value::as_str).collect();
                if v.name == "engine" {
                    let want: BTreeSet<&str> = ["worker-1", "worker-2", "worker-3"].into();
                    if vals != want {
                        failures.push(format!(
                            "{} variable engine: {vals:?}, expected {want:?}",
                            v.file
                        ));
                    }
                }
                first_value
                    .entry(v.name.clone())
                    .or_insert_with(|| vals.iter().next().unwrap().to_string());
            }
            other => failures.push(format!(
                "{} variable {} ({}): no values: {other:?}",
                v.file, v.name, v.query
            )),
        }
    }
    for engine in ["worker-1", "worker-2", "worker-3"] {
        for expr in [
            format!(r#"gpuq_worker_gpu_slots{{engine="{engine}"}}"#),
            format!(r#"gpuq_gpu_health{{engine="{engine}"}}"#),
        ] {
            if prom.query(&expr).await.map_or(true, |r| r.is_empty()) {
                failures.push(format!("{expr} has no series: engine labels do not join"));
            }
        }
    }

    // Every panel query, with "All" selected (the variable's allValue, as Grafana sends it)
    // and with one concrete value of each variable.
    let mut all_vals: HashMap<&str, String> = HashMap::new();
    all_vals.insert("__rate_interval", "1m".into());
    all_vals.insert("__interval", "1m".into());
    all_vals.insert("job_id", w.retried.to_string());
    let mut one_vals = all_vals.clone();
    for v in &variables {
        if v.ds.as_deref() == Some("prometheus") {
            all_vals.insert(&v.name, v.all_value.clone().unwrap_or_else(|| ".*".into()));
            one_vals.insert(
                &v.name,
                first_value.get(&v.name).cloned().unwrap_or_default(),
            );
        }
    }
    let not_caused: BTreeSet<&str> = NOT_CAUSED.iter().map(|(n, _)| *n).collect();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut empty_allowed = vec![];
    for q in &prom_queries {
        let where_ = format!("{} / {}", q.file, q.panel);
        for m in metric_names(&q.expr) {
            names.entry(m).or_insert_with(|| where_.clone());
        }
        let expr = substitute(&q.expr, &all_vals);
        match prom.query(&expr).await {
            Err(e) => failures.push(format!("{where_}: invalid: {e}: {expr}")),
            Ok(r) => {
                let gpuq: BTreeSet<String> = metric_names(&q.expr)
                    .into_iter()
                    .filter(|m| m.starts_with("gpuq_"))
                    .collect();
                let may_be_empty =
                    !gpuq.is_empty() && gpuq.iter().all(|m| not_caused.contains(m.as_str()));
                if r.is_empty() {
                    if may_be_empty {
                        empty_allowed.push(format!("{where_}: {expr}"));
                    } else {
                        failures.push(format!("{where_}: returned no data: {expr}"));
                    }
                } else if !may_be_empty && r.iter().all(|s| s.number().is_nan()) {
                    failures.push(format!("{where_}: only NaN: {expr} = {r:?}"));
                }
            }
        }
        let expr = substitute(&q.expr, &one_vals);
        if let Err(e) = prom.query(&expr).await {
            failures.push(format!(
                "{where_} (one value per variable): invalid: {e}: {expr}"
            ));
        }
    }
    for v in &variables {
        if v.ds.as_deref() == Some("prometheus")
            && let Some((selector, _)) = label_values_query(&v.query)
        {
            for m in metric_names(&selector) {
                names
                    .entry(m)
                    .or_insert_with(|| format!("{} variable {}", v.file, v.name));
            }
        }
    }

    // Every alert rule: valid; the ones the workload raises return data; and the alerts are in
    // Prometheus's rule manager, evaluated without error, the raised ones pending or firing.
    let mut alert_data = vec![];
    for (name, expr) in &rules {
        for m in metric_names(expr) {
            names
                .entry(m)
                .or_insert_with(|| format!("alerts.yml {name}"));
        }
        match prom.query(expr).await {
            Err(e) => failures.push(format!("alert {name}: invalid: {e}")),
            Ok(r) => {
                if r.is_empty() && ALERTS_THE_WORKLOAD_RAISES.contains(&name.as_str()) {
                    failures.push(format!(
                        "alert {name}: the workload made its condition true, yet it returned nothing"
                    ));
                }
                alert_data.push(format!("{name}: {} series", r.len()));
            }
        }
    }
    let loaded = prom.api("/api/v1/rules", &[]).await.unwrap();
    let mut loaded_rules: BTreeMap<String, (String, String, String)> = BTreeMap::new();
    for g in loaded["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            loaded_rules.insert(
                r["name"].as_str().unwrap_or("").into(),
                (
                    r["health"].as_str().unwrap_or("").into(),
                    r["lastError"].as_str().unwrap_or("").into(),
                    r["state"].as_str().unwrap_or("").into(),
                ),
            );
        }
    }
    for (name, _) in &rules {
        match loaded_rules.get(name) {
            None => failures.push(format!("alert {name} is not loaded by Prometheus")),
            Some((health, err, state)) => {
                if health != "ok" {
                    failures.push(format!("alert {name}: rule health {health}: {err}"));
                }
                if ALERTS_THE_WORKLOAD_RAISES.contains(&name.as_str())
                    && state != "pending"
                    && state != "firing"
                {
                    failures.push(format!(
                        "alert {name} is {state}, expected pending or firing"
                    ));
                }
            }
        }
    }

    // Every metric name anywhere has series, but for the events this workload does not cause.
    let mut not_caused_seen = vec![];
    for (name, first_use) in &names {
        let n = prom.series(name).await.unwrap();
        if n == 0 {
            if not_caused.contains(name.as_str()) {
                not_caused_seen.push(name.clone());
            } else {
                failures.push(format!(
                    "metric {name} (used by {first_use}) has no series: no service exports it"
                ));
            }
        }
    }

    report.push(format!(
        "{} PromQL panel queries (x2: All and one value), {} alert rules, {} metric names; \
         {} Prometheus variables",
        prom_queries.len(),
        rules.len(),
        names.len(),
        variables
            .iter()
            .filter(|v| v.ds.as_deref() == Some("prometheus"))
            .count()
    ));
    report.push(format!("alert expressions now: {}", alert_data.join(", ")));
    report.push(format!(
        "empty, allowed (events not caused): {empty_allowed:#?}"
    ));
    report.push(format!(
        "metrics without series, allowed: {not_caused_seen:?}"
    ));
    eprintln!("{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}\nlogs in {}",
        failures.len(),
        failures.join("\n"),
        stack.dir.display()
    );
    prom.stop().await;
    stack.stop().await;
    eprintln!("total {:?}", t0.elapsed());
}

// =============================================================================================
// 2. LogQL fields in the real log lines
// =============================================================================================

/// A label or field matcher: `name op "value"`.
#[derive(Debug, Clone)]
struct Matcher {
    name: String,
    op: String,
    value: String,
}

impl Matcher {
    fn matches(&self, actual: &str) -> bool {
        match self.op.as_str() {
            "=" => actual == self.value,
            "!=" => actual != self.value,
            "=~" | "!~" => {
                let re = Regex::new(&format!("^(?:{})$", self.value))
                    .unwrap_or_else(|e| panic!("bad regex {:?}: {e}", self.value));
                re.is_match(actual) == (self.op == "=~")
            }
            op => panic!("unknown matcher op {op}"),
        }
    }
}

/// The parts of a LogQL query that name labels and fields.
#[derive(Debug, Clone, Default)]
struct LogQuery {
    selector: Vec<Matcher>,
    line_filters: Vec<(String, String)>,
    json: bool,
    field_filters: Vec<Matcher>,
    group_by: Vec<String>,
}

/// Reads `"…"` (with escapes) at the start of `s`: the value and the rest.
fn read_string(s: &str) -> Option<(String, &str)> {
    let rest = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                let (_, n) = chars.next()?;
                out.push(n);
            }
            '"' => return Some((out, &rest[i + 1..])),
            c => out.push(c),
        }
    }
    None
}

/// `name op "value"` at the start of `s`.
fn read_matcher(s: &str) -> Option<(Matcher, &str)> {
    let s = s.trim_start();
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let name = &s[..end];
    let s = s[end..].trim_start();
    let op = ["=~", "!~", "!=", "="]
        .into_iter()
        .find(|op| s.starts_with(op))?;
    let (value, rest) = read_string(s[op.len()..].trim_start())?;
    Some((
        Matcher {
            name: name.to_string(),
            op: op.to_string(),
            value,
        },
        rest,
    ))
}

fn parse_logql(expr: &str) -> LogQuery {
    let mut q = LogQuery::default();
    let open = expr
        .find('{')
        .unwrap_or_else(|| panic!("no stream selector: {expr}"));
    let mut s = &expr[open + 1..];
    loop {
        s = s.trim_start().trim_start_matches(',').trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            s = rest;
            break;
        }
        let (m, rest) = read_matcher(s).unwrap_or_else(|| panic!("bad selector in {expr}"));
        q.selector.push(m);
        s = rest;
    }
    loop {
        s = s.trim_start();
        if let Some(op) = ["|=", "!=", "|~", "!~"]
            .into_iter()
            .find(|o| s.starts_with(o))
        {
            let (v, rest) = read_string(s[2..].trim_start())
                .unwrap_or_else(|| panic!("bad line filter in {expr}"));
            q.line_filters.push((op.to_string(), v));
            s = rest;
        } else if let Some(rest) = s.strip_prefix('|') {
            let rest = rest.trim_start();
            if let Some(after) = rest.strip_prefix("json") {
                q.json = true;
                s = after;
            } else if let Some((m, after)) = read_matcher(rest) {
                q.field_filters.push(m);
                s = after;
            } else {
                panic!("unsupported LogQL stage in {expr}: |{rest}");
            }
        } else {
            break;
        }
    }
    let by = Regex::new(r"\b(?:by|without)\s*\(([^)]*)\)").unwrap();
    for c in by.captures_iter(expr) {
        q.group_by.extend(
            c[1].split(',')
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty()),
        );
    }
    q
}

/// One log line of one service's file.
struct LogLine {
    file: String,
    raw: String,
    fields: serde_json::Map<String, Value>,
}

impl LogLine {
    fn field(&self, name: &str) -> String {
        match self.fields.get(name) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        }
    }
}

/// Promtail's config: the stream labels it attaches, and which of them come from gpuq's JSON
/// fields (label -> field).
struct Promtail {
    labels: BTreeSet<String>,
    from_json: BTreeMap<String, String>,
}

fn promtail() -> Promtail {
    let text = std::fs::read_to_string(repo_root().join("loki/promtail.yml")).unwrap();
    let v: Value = serde_yaml::from_str(&text).unwrap();
    let mut labels = BTreeSet::new();
    let mut extracted: BTreeMap<String, String> = BTreeMap::new();
    let mut from_json = BTreeMap::new();
    for sc in v["scrape_configs"].as_array().into_iter().flatten() {
        for rc in sc["relabel_configs"].as_array().into_iter().flatten() {
            if let Some(t) = rc["target_label"].as_str() {
                labels.insert(t.to_string());
            }
        }
        for stage in sc["pipeline_stages"].as_array().into_iter().flatten() {
            if let Some(exprs) = stage["json"]["expressions"].as_object() {
                for (k, e) in exprs {
                    let src = e.as_str().filter(|s| !s.is_empty()).unwrap_or(k);
                    extracted.insert(k.clone(), src.to_string());
                }
            }
            if let Some(ls) = stage["labels"].as_object() {
                for (k, src) in ls {
                    let key = src.as_str().filter(|s| !s.is_empty()).unwrap_or(k);
                    labels.insert(k.clone());
                    if let Some(field) = extracted.get(key) {
                        from_json.insert(k.clone(), field.clone());
                    }
                }
            }
        }
    }
    Promtail { labels, from_json }
}

impl LogQuery {
    /// Runs the query's selection over the lines as Loki would over Promtail's streams: the
    /// selector sees only stream labels (absent = ""), the line filters the raw line, the field
    /// filters the JSON fields.
    fn select<'a>(&self, lines: &'a [LogLine], p: &Promtail) -> Vec<&'a LogLine> {
        lines
            .iter()
            .filter(|l| {
                self.selector.iter().all(|m| {
                    let v = p
                        .from_json
                        .get(&m.name)
                        .map(|f| l.field(f))
                        .unwrap_or_default();
                    m.matches(&v)
                })
            })
            .filter(|l| {
                self.line_filters.iter().all(|(op, v)| match op.as_str() {
                    "|=" => l.raw.contains(v.as_str()),
                    "!=" => !l.raw.contains(v.as_str()),
                    "|~" | "!~" => Regex::new(v).unwrap().is_match(&l.raw) == (op == "|~"),
                    _ => unreachable!(),
                })
            })
            .filter(|l| {
                self.field_filters
                    .iter()
                    .all(|m| m.matches(&l.field(&m.name)))
            })
            .collect()
    }
}

/// Every line of the stack's service logs; the harness's own `restart N` notes are skipped,
/// anything else that is not a JSON object is an error.
fn read_logs(dir: &Path, services: &[String]) -> (Vec<LogLine>, Vec<String>) {
    let mut lines = vec![];
    let mut problems = vec![];
    for s in services {
        let text = std::fs::read_to_string(dir.join(format!("{s}.log"))).unwrap_or_default();
        if text.is_empty() {
            problems.push(format!("{s}.log is empty"));
        }
        for raw in text.lines() {
            if raw.starts_with("restart ") || raw.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Value>(raw) {
                Ok(Value::Object(fields)) => lines.push(LogLine {
                    file: s.clone(),
                    raw: raw.to_string(),
                    fields,
                }),
                _ => problems.push(format!("{s}.log: not a JSON object: {raw}")),
            }
        }
    }
    (lines, problems)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_field_a_logql_query_uses_is_in_the_services_json_log_lines() {
    let (queries, variables) = dashboard_queries();
    let loki: Vec<&PanelQuery> = queries.iter().filter(|q| q.ds == "loki").collect();
    assert!(!loki.is_empty(), "no LogQL query in the dashboards");
    let pt = promtail();

    let stack = Stack::start(StackOptions {
        fault_injection: true,
        env: vec![("GPUQ_DELIVERY_LIMIT".into(), "2".into())],
        ..Default::default()
    })
    .await
    .unwrap();
    stack
        .wait_engines_healthy(3, Duration::from_secs(30))
        .await
        .unwrap();
    // Successes, then a retried job and a dead letter, then a worker crash (an error line).
    // One batch at a time, on free GPUs (see `workload`).
    let mut ids = stack
        .submit_many(
            8,
            8,
            &json!({"kind": "simulate", "params": {"duration_ms": 50}}),
        )
        .await
        .unwrap();
    stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    let retried = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 50, "fail_times": 1}}))
        .await
        .unwrap();
    let poison = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"always_fail": true}}))
        .await
        .unwrap();
    ids.extend([retried, poison]);
    stack
        .wait_final(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    stack.arm_fault(2, "crash_mid_task", 1).await.unwrap();
    let crash = stack
        .submit_many(
            4,
            4,
            &json!({"kind": "simulate", "params": {"duration_ms": 400}}),
        )
        .await
        .unwrap();
    stack
        .wait_final(&crash, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(stack.workers[2].restarts() > 0, "worker-3 did not crash");
    let dir = stack.dir.clone();
    stack.stop().await;

    let services: Vec<String> = ["gateway", "manager", "worker-1", "worker-2", "worker-3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (lines, mut failures) = read_logs(&dir, &services);

    // Every line: the fields every query relies on, the right service name, a known level.
    for l in &lines {
        for f in ["timestamp", "level", "service", "target", "message"] {
            if !l.fields.get(f).is_some_and(Value::is_string) {
                failures.push(format!("{}: no string {f}: {}", l.file, l.raw));
            }
        }
        let want_service = l.file.split('-').next().unwrap();
        if l.field("service") != want_service {
            failures.push(format!(
                "{}: service is not {want_service}: {}",
                l.file, l.raw
            ));
        }
        if !["trace", "debug", "info", "warn", "error"].contains(&l.field("level").as_str()) {
            failures.push(format!("{}: unknown level: {}", l.file, l.raw));
        }
        let wid = l.field("worker_id");
        if l.file.starts_with("worker-") && !wid.is_empty() && wid != l.file {
            failures.push(format!("{}: worker_id {wid}: {}", l.file, l.raw));
        }
    }

    // Every LogQL query: each label and field it names is in the lines it selects from, and,
    // run over the real lines with "All" selected and with each concrete value of its
    // variables, it finds lines.
    let worker_var = variables
        .iter()
        .find(|v| v.name == "worker" && v.ds.as_deref() == Some("loki"));
    let worker_all = worker_var
        .and_then(|v| v.all_value.clone())
        .unwrap_or_else(|| ".*".into());
    let mut worker_values: BTreeSet<String> = BTreeSet::new();
    for v in &variables {
        if v.ds.as_deref() != Some("loki") || v.kind != "query" {
            continue;
        }
        let (selector, label) = label_values_query(&v.query)
            .unwrap_or_else(|| panic!("{} variable {}: {}", v.file, v.name, v.query));
        if !pt.labels.contains(&label) {
            failures.push(format!(
                "{} variable {}: {label} is not a Promtail label",
                v.file, v.name
            ));
        }
        let q = parse_logql(&selector);
        let vals: BTreeSet<String> = q
            .select(&lines, &pt)
            .iter()
            .map(|l| {
                pt.from_json
                    .get(&label)
                    .map(|f| l.field(f))
                    .unwrap_or_default()
            })
            .filter(|s| !s.is_empty())
            .collect();
        if v.name == "worker" {
            worker_values = vals.clone();
        }
        if vals.is_empty() {
            failures.push(format!(
                "{} variable {}: no values in the logs",
                v.file, v.name
            ));
        }
    }
    let want_workers: BTreeSet<String> = ["worker-1", "worker-2", "worker-3"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if worker_var.is_some() && worker_values != want_workers {
        failures.push(format!(
            "the worker variable finds {worker_values:?}, expected {want_workers:?}"
        ));
    }
    let job_id = retried.to_string();
    let mut fields_used: BTreeSet<String> = BTreeSet::new();
    for pq in &loki {
        let where_ = format!("{} / {}", pq.file, pq.panel);
        let mut runs: Vec<(String, HashMap<&str, String>)> = vec![];
        let mut base: HashMap<&str, String> = HashMap::new();
        base.insert("__interval", "1m".into());
        base.insert("__rate_interval", "1m".into());
        base.insert("job_id", job_id.clone());
        let mut all = base.clone();
        all.insert("worker", worker_all.clone());
        runs.push(("All".into(), all));
        if pq.expr.contains("$worker") {
            for w in &want_workers {
                let mut one = base.clone();
                one.insert("worker", w.clone());
                runs.push((format!("worker={w}"), one));
            }
        }
        for (which, vals) in runs {
            let q = parse_logql(&substitute(&pq.expr, &vals));
            // Labels in the selector and groupings are stream labels (Promtail's); fields after
            // `| json` are the line's own.
            for m in &q.selector {
                fields_used.insert(m.name.clone());
                if !pt.labels.contains(&m.name) {
                    failures.push(format!("{where_}: {} is not a Promtail label", m.name));
                }
            }
            for g in &q.group_by {
                fields_used.insert(g.clone());
                if !pt.labels.contains(g) {
                    failures.push(format!("{where_}: groups by {g}, not a Promtail label"));
                }
            }
            if !q.field_filters.is_empty() && !q.json {
                failures.push(format!("{where_}: filters fields without | json"));
            }
            for m in &q.field_filters {
                fields_used.insert(m.name.clone());
            }
            // The lines the selector's service matchers allow: every field the query names
            // must occur among them.
            let of_services: Vec<&LogLine> = lines
                .iter()
                .filter(|l| {
                    q.selector
                        .iter()
                        .filter(|m| m.name == "service")
                        .all(|m| m.matches(&l.field("service")))
                })
                .collect();
            let named: BTreeSet<&String> = q
                .selector
                .iter()
                .map(|m| pt.from_json.get(&m.name).unwrap_or(&m.name))
                .chain(q.group_by.iter().map(|g| pt.from_json.get(g).unwrap_or(g)))
                .chain(q.field_filters.iter().map(|m| &m.name))
                .collect();
            for f in named {
                if !of_services
                    .iter()
                    .any(|l| l.fields.contains_key(f.as_str()))
                {
                    failures.push(format!(
                        "{where_} ({which}): field {f} is in none of the {} lines it selects from",
                        of_services.len()
                    ));
                }
            }
            let hits = q.select(&lines, &pt);
            if hits.is_empty() {
                failures.push(format!("{where_} ({which}): finds no line: {}", pq.expr));
            }
            if q.field_filters.iter().any(|m| m.name == "job_id") {
                // One job's lines: its retried attempt shows up as started, retried, started,
                // finished.
                if hits.len() < 3 || hits.iter().any(|l| l.field("job_id") != job_id) {
                    failures.push(format!(
                        "{where_}: job {job_id}: {} lines: {:?}",
                        hits.len(),
                        hits.iter().map(|l| &l.raw).collect::<Vec<_>>()
                    ));
                }
            }
        }
    }
    for f in ["job_id", "level", "service", "worker_id"] {
        if !fields_used.contains(f) {
            failures.push(format!(
                "no LogQL query uses {f} (the Logs dashboard should)"
            ));
        }
    }

    // Worker lines without a worker_id (e.g. written before the worker knows its id) must not
    // vanish from the worker panels when "All" workers are selected.
    let worker_lines: Vec<&LogLine> = lines
        .iter()
        .filter(|l| l.field("service") == "worker")
        .collect();
    let without: Vec<&LogLine> = worker_lines
        .iter()
        .copied()
        .filter(|l| l.field("worker_id").is_empty())
        .collect();
    let all_workers = Matcher {
        name: "worker_id".into(),
        op: "=~".into(),
        value: worker_all.clone(),
    };
    if !without.is_empty() && !all_workers.matches("") {
        failures.push(format!(
            "{} of {} worker lines have no worker_id, and the worker variable's \"All\" value \
             {worker_all:?} hides them, e.g. {}",
            without.len(),
            worker_lines.len(),
            without[0].raw
        ));
    }

    // Promtail: only low-cardinality fields become stream labels. Measured on the real lines:
    // a label taken from the JSON has a handful of values; a field with many values (job_id,
    // timestamp, message) is never a label.
    let mut distinct: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for l in &lines {
        for k in l.fields.keys() {
            distinct.entry(k.clone()).or_default().insert(l.field(k));
        }
    }
    for (label, field) in &pt.from_json {
        let n = distinct.get(field).map_or(0, BTreeSet::len);
        if n > 10 {
            failures.push(format!(
                "Promtail makes {field} a label; it took {n} values in one short run"
            ));
        }
        if n == 0 {
            failures.push(format!(
                "Promtail label {label} comes from field {field}, which no line has"
            ));
        }
    }
    for (field, values) in &distinct {
        if values.len() > 10 && pt.from_json.values().any(|f| f == field) {
            failures.push(format!(
                "high-cardinality field {field} is a Promtail label"
            ));
        }
    }
    for high in ["job_id", "timestamp", "message"] {
        if pt.labels.contains(high) {
            failures.push(format!("Promtail makes {high} a label"));
        }
        let n = distinct.get(high).map_or(0, BTreeSet::len);
        assert!(
            n > 10,
            "{high}: only {n} values; the run is too small to judge"
        );
    }
    eprintln!(
        "{} log lines; {} LogQL queries; fields used {fields_used:?}; Promtail labels {:?}; \
         label values {:?}; {} of {} worker lines without worker_id",
        lines.len(),
        loki.len(),
        pt.labels,
        pt.from_json
            .values()
            .map(|f| (f, distinct.get(f).map_or(0, BTreeSet::len)))
            .collect::<Vec<_>>(),
        without.len(),
        worker_lines.len()
    );
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}\nlogs in {}",
        failures.len(),
        failures.join("\n"),
        dir.display()
    );
}

// =============================================================================================
// 3. The status page in headless Chromium
// =============================================================================================

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools protocol session with one page.
struct Cdp {
    ws: Ws,
    next: u64,
    events: Vec<Value>,
}

impl Cdp {
    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        use tokio_tungstenite::tungstenite::Message;
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::Text(msg.into())).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .with_context(|| format!("{method}: no answer in 30 s"))?
                .context("DevTools connection closed")??;
            let Message::Text(text) = msg else {
                continue;
            };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Evaluates JavaScript in the page; its value (by value).
    async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            bail!("{expression}: {ex}");
        }
        Ok(r["result"]["value"].clone())
    }

    fn events(&self, method: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e["method"] == method)
            .collect()
    }
}

/// Headless Chromium in its own process group (killed as a whole when dropped).
struct Chromium {
    child: Child,
    pgid: i32,
    port: u16,
}

impl Chromium {
    async fn launch(dir: &Path) -> anyhow::Result<Chromium> {
        let bin = Path::new("/usr/bin/chromium");
        if !bin.exists() {
            bail!("/usr/bin/chromium is missing: install Debian's chromium (scripts/test.sh does)");
        }
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile)?;
        let log = std::fs::File::create(dir.join("chromium.log"))?;
        let child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--window-size=1400,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("starting chromium")?;
        let pgid = child.id().context("chromium pid")? as i32;
        let mut c = Chromium {
            child,
            pgid,
            port: 0,
        };
        // Chromium writes the port it chose to DevToolsActivePort in its profile.
        let file = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                c.port = port;
                return Ok(c);
            }
            if let Ok(Some(status)) = c.child.try_wait() {
                bail!(
                    "chromium exited ({status}); see {}",
                    dir.join("chromium.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("chromium opened no DevTools port in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A DevTools session with the browser's first page.
    async fn page(&self) -> anyhow::Result<Cdp> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let url = loop {
            let list: Value = reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port))
                .await?
                .json()
                .await?;
            if let Some(u) = list
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            {
                break u.to_string();
            }
            if Instant::now() > deadline {
                bail!("chromium has no page: {list}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        Ok(Cdp {
            ws,
            next: 0,
            events: vec![],
        })
    }

    fn kill(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the page shows now: engines and GPUs with their states, read from the DOM.
const UI_STATE_JS: &str = r#"(() => ({
  marker: window.__gpuqTestMarker || null,
  updates: Number(document.body.dataset.updates || 0),
  conn: (document.querySelector('#conn') || {dataset: {}}).dataset.mode || null,
  innerHeight: window.innerHeight,
  queues: [...document.querySelectorAll('#queues tr[data-queue]')].map(r => r.dataset.queue),
  jobs: [...document.querySelectorAll('#recent-jobs tr[data-job]')].map(r => ({
    id: r.dataset.job, status: (r.querySelector('.st') || {dataset: {}}).dataset.status || null,
  })),
  engines: [...document.querySelectorAll('#engines .engine')].map(e => {
    const r = e.getBoundingClientRect();
    return {
      id: e.dataset.engine, state: e.dataset.state,
      badge: (e.querySelector('.top .badge') || {}).textContent || '',
      text: e.innerText, top: r.top, height: r.height,
      gpus: [...e.querySelectorAll('.gpu')].map(g => ({
        gpu: g.dataset.gpu, state: g.dataset.state, health: g.dataset.health,
        badge: (g.querySelector('.badge') || {}).textContent || '',
        why: (g.querySelector('.why') || {}).textContent || '',
        height: g.getBoundingClientRect().height,
      })),
    };
  }),
}))()"#;

fn gpu_of<'a>(ui: &'a Value, engine: &str, gpu: &str) -> Option<&'a Value> {
    ui["engines"]
        .as_array()?
        .iter()
        .find(|e| e["id"] == engine)?["gpus"]
        .as_array()?
        .iter()
        .find(|g| g["gpu"] == gpu)
}

fn note_not_ready(e: &anyhow::Error) {
    eprintln!(
        "page not ready yet: {}",
        e.to_string().lines().last().unwrap_or("")
    );
}

async fn wait_ui(
    page: &mut Cdp,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        // Right after navigation the document may not exist yet: a failed look counts as
        // "not shown yet" until the deadline.
        let ui = match page.eval(UI_STATE_JS).await {
            Ok(ui) => ui,
            Err(e) if Instant::now() <= deadline => {
                note_not_ready(&e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(e.context(format!("the page never showed {what}"))),
        };
        if pred(&ui) {
            return Ok(ui);
        }
        if Instant::now() > deadline {
            bail!("the page never showed {what} in {timeout:?}; it shows {ui:#}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_page_shows_every_engine_and_gpu_and_a_fault_without_reloading() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    stack
        .wait_engines_healthy(3, Duration::from_secs(30))
        .await
        .unwrap();
    let mut chromium = Chromium::launch(&stack.dir).await.unwrap();
    let mut page = chromium.page().await.unwrap();
    for m in ["Page.enable", "Runtime.enable"] {
        page.call(m, json!({})).await.unwrap();
    }
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await
    .unwrap();
    let url = format!("{}/ui", stack.manager_url);
    let nav = page
        .call("Page.navigate", json!({"url": url}))
        .await
        .unwrap();
    assert!(nav.get("errorText").is_none(), "navigating to {url}: {nav}");

    // Every engine, each with both GPUs, all healthy, on the live stream.
    let engines = ["worker-1", "worker-2", "worker-3"];
    let ui = wait_ui(
        &mut page,
        "three healthy engines with two healthy GPUs each, live",
        Duration::from_secs(30),
        |ui| {
            ui["conn"] == "sse"
                && engines.iter().all(|e| {
                    ["0", "1"]
                        .iter()
                        .all(|g| gpu_of(ui, e, g).is_some_and(|g| g["health"] == "healthy"))
                })
        },
    )
    .await
    .unwrap();
    let height = ui["innerHeight"].as_f64().unwrap_or(0.0);
    for e in engines {
        let card = ui["engines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == e)
            .unwrap();
        assert_eq!(card["state"], "healthy", "{card:#}");
        assert_eq!(card["badge"], "healthy", "{card:#}");
        let text = card["text"].as_str().unwrap_or("");
        assert!(
            text.contains(e) && text.contains("GPU 0") && text.contains("GPU 1"),
            "{text}"
        );
        let top = card["top"].as_f64().unwrap_or(f64::MAX);
        assert!(
            card["height"].as_f64().unwrap_or(0.0) > 0.0 && top < height,
            "engine {e} is not on the first screen: {card:#}"
        );
        for g in card["gpus"].as_array().unwrap() {
            assert_eq!(g["badge"], "healthy", "{g:#}");
            assert!(g["height"].as_f64().unwrap_or(0.0) > 0.0, "{g:#}");
        }
    }

    // A state change, seen by the same page load: a marker set now survives (no reload), the
    // page keeps rendering updates, and the overheated GPU turns unhealthy.
    let marker = Uuid::new_v4().to_string();
    page.eval(&format!("window.__gpuqTestMarker = {marker:?}; true"))
        .await
        .unwrap();
    let before = page.eval(UI_STATE_JS).await.unwrap();
    stack.gpu_fault("worker-2", 1, "overheat").await.unwrap();
    let after = wait_ui(
        &mut page,
        "GPU 1 of worker-2 unhealthy",
        Duration::from_secs(20),
        |ui| gpu_of(ui, "worker-2", "1").is_some_and(|g| g["health"] == "unhealthy"),
    )
    .await
    .unwrap();
    assert_eq!(after["marker"], json!(marker), "the page was reloaded");
    assert!(
        after["updates"].as_u64() > before["updates"].as_u64(),
        "{before:#} -> {after:#}"
    );
    let g = gpu_of(&after, "worker-2", "1").unwrap();
    assert_eq!(g["badge"], "unhealthy", "{g:#}");
    assert_eq!(g["state"], "unhealthy", "{g:#}");
    assert!(
        g["why"].as_str().unwrap_or("").contains("overheat"),
        "the page does not say why: {g:#}"
    );
    assert_eq!(
        gpu_of(&after, "worker-2", "0").map(|g| g["health"].clone()),
        Some(json!("healthy"))
    );
    let top_level_navigations = page
        .events("Page.frameNavigated")
        .iter()
        .filter(|e| e["params"]["frame"]["parentId"].is_null())
        .count();
    assert_eq!(top_level_navigations, 1, "one page load only");
    let exceptions = page.events("Runtime.exceptionThrown");
    assert!(exceptions.is_empty(), "the page threw: {exceptions:#?}");

    // Jobs run meanwhile show up too, with the queue they went through.
    let ids = stack
        .submit_many(
            3,
            3,
            &json!({"kind": "simulate", "params": {"duration_ms": 50}}),
        )
        .await
        .unwrap();
    stack
        .wait_final(&ids, Duration::from_secs(30))
        .await
        .unwrap();
    let queue = format!("{}.jobs.default", stack.prefix);
    let shown = wait_ui(
        &mut page,
        "the three jobs succeeded and the jobs queue",
        Duration::from_secs(20),
        |ui| {
            ui["queues"]
                .as_array()
                .is_some_and(|q| q.contains(&json!(queue)))
                && ids.iter().all(|id| {
                    ui["jobs"].as_array().is_some_and(|j| {
                        j.iter()
                            .any(|j| j["id"] == id.to_string() && j["status"] == "succeeded")
                    })
                })
        },
    )
    .await
    .unwrap();
    assert_eq!(shown["marker"], json!(marker), "the page was reloaded");
    assert_eq!(
        gpu_of(&shown, "worker-2", "1").map(|g| g["health"].clone()),
        Some(json!("unhealthy"))
    );

    // The screenshot, with the fault on it.
    let shot = page
        .call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": false}),
        )
        .await
        .unwrap();
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap())
        .unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000);
    let artifacts = repo_root().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    std::fs::write(artifacts.join("ui.png"), &png).unwrap();
    std::fs::write(stack.dir.join("ui.png"), &png).unwrap();
    eprintln!(
        "screenshot: {} ({} bytes)",
        artifacts.join("ui.png").display(),
        png.len()
    );

    chromium.kill();
    let _ = chromium.child.wait().await;
    stack.stop().await;
}
