//! A real Prometheus (Debian's `prometheus`) for one stack: started on a free port with the
//! alert rules, queried over its HTTP API, stopped with the test.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use gpuq_e2e::{Stack, free_port, repo_root};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

pub struct Prometheus {
    pub child: Child,
    pub url: String,
    pub http: reqwest::Client,
    pub log: PathBuf,
}

/// One sample of an instant query: its labels and its value as Prometheus wrote it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: Value,
    pub value: String,
}

impl Sample {
    pub fn number(&self) -> f64 {
        match self.value.as_str() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or(f64::NAN),
        }
    }
}

pub fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

pub fn port_of(url: &str) -> u16 {
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
    pub async fn start(stack: &Stack) -> anyhow::Result<Prometheus> {
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
            http: gpuq_common::tls::http_client_builder()
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
    pub async fn api(&self, path: &str, params: &[(&str, String)]) -> anyhow::Result<Value> {
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
    pub async fn query(&self, expr: &str) -> anyhow::Result<Vec<Sample>> {
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
    pub async fn wait_for(&self, expr: &str, timeout: Duration) -> anyhow::Result<Vec<Sample>> {
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
    pub async fn series(&self, name: &str) -> anyhow::Result<usize> {
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
    pub async fn wait_two_scrapes_after(&self, t: f64) -> anyhow::Result<()> {
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

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}
