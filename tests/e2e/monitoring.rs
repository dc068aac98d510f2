//! Static checks of the monitoring configuration, starting no service: the Prometheus configs and
//! alert rules (promtool), the alert rules' unit tests, the Grafana provisioning and dashboards,
//! the Loki and Promtail configs, and a cross-check of every metric name, label and variable a
//! dashboard or an alert uses against the families gpuq registers (`metrics::catalog`), the
//! labels the Prometheus configs attach, and what RabbitMQ 3.10's prometheus plugin exports.
//! The live evaluation of every expression is `observability::`'s.
#![allow(clippy::too_many_lines)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use gpuq_common::metrics::{Kind, catalog};
use gpuq_e2e::repo_root;
use regex::Regex;
use serde_json::{Value, json};

/// Metrics of the Rust prometheus crate's process collector (every gpuq service).
const PROCESS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
];
/// Verified on the /metrics endpoint (aggregated) of RabbitMQ 3.10.8's prometheus plugin.
const RABBITMQ: &[&str] = &[
    "rabbitmq_alarms_file_descriptor_limit",
    "rabbitmq_alarms_free_disk_space_watermark",
    "rabbitmq_alarms_memory_used_watermark",
    "rabbitmq_build_info",
    "rabbitmq_identity_info",
    "rabbitmq_channels",
    "rabbitmq_connections",
    "rabbitmq_consumers",
    "rabbitmq_queues",
    "rabbitmq_queue_messages",
    "rabbitmq_queue_messages_ready",
    "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers",
    "rabbitmq_global_consumers",
    "rabbitmq_global_publishers",
    "rabbitmq_global_messages_received_total",
    "rabbitmq_global_messages_routed_total",
    "rabbitmq_global_messages_confirmed_total",
    "rabbitmq_global_messages_delivered_total",
    "rabbitmq_global_messages_redelivered_total",
    "rabbitmq_global_messages_acknowledged_total",
    "rabbitmq_global_messages_dead_lettered_delivery_limit_total",
    "rabbitmq_global_messages_dead_lettered_expired_total",
    "rabbitmq_global_messages_dead_lettered_rejected_total",
    "rabbitmq_global_messages_dead_lettered_maxlen_total",
    "rabbitmq_global_messages_unroutable_dropped_total",
    "rabbitmq_global_messages_unroutable_returned_total",
    "rabbitmq_disk_space_available_bytes",
    "rabbitmq_process_resident_memory_bytes",
    "rabbitmq_resident_memory_limit_bytes",
    "rabbitmq_raft_term_total",
    "rabbitmq_erlang_uptime_seconds",
];
const OTHER: &[&str] = &["up"];
/// Attached by the Prometheus configs.
const TARGET_LABELS: &[&str] = &["job", "instance", "engine"];
const JOBS: &[&str] = &["gpuq-gateway", "gpuq-manager", "gpuq-worker", "rabbitmq"];
/// Fields of gpuq's JSON log lines (crates/common/src/telemetry.rs) that LogQL may filter on.
const LOG_FIELDS: &[&str] = &[
    "timestamp",
    "level",
    "service",
    "target",
    "message",
    "job_id",
    "worker_id",
];
const ALLOWED_VARS: &[&str] = &[
    "__rate_interval",
    "__interval",
    "engine",
    "pool",
    "worker",
    "job_id",
];
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
];
const ALERTS: &[&str] = &[
    "GpuqTargetDown",
    "GpuqEngineOffline",
    "GpuqGpuUnhealthy",
    "GpuqDeadLettersGrowing",
    "GpuqBacklogWithoutConsumers",
    "GpuqJobQueueWaitHigh",
    "GpuqWorkerRestarting",
];

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("a valid pattern")
}

/// A YAML or JSON file of the checkout as JSON values (`None` and an error when unreadable).
fn load(errors: &mut Vec<String>, rel: &str) -> Value {
    let text = match std::fs::read_to_string(repo_root().join(rel)) {
        Ok(t) => t,
        Err(e) => {
            errors.push(format!("{rel}: cannot read: {e}"));
            return Value::Null;
        }
    };
    let parsed = if rel.ends_with(".json") {
        serde_json::from_str(&text).map_err(|e| e.to_string())
    } else {
        serde_yaml::from_str(&text).map_err(|e| e.to_string())
    };
    parsed.unwrap_or_else(|e| {
        errors.push(format!("{rel}: not valid: {e}"));
        Value::Null
    })
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// What gpuq defines and what the Prometheus and Promtail configs attach.
struct Known {
    /// Family name → its labels.
    labels_of: BTreeMap<String, BTreeSet<String>>,
    histograms: BTreeSet<String>,
    stream_labels: BTreeSet<String>,
    datasources: BTreeMap<String, String>,
}

impl Known {
    /// The families every gpuq service registers (`metrics::catalog`), with these Promtail
    /// labels and Grafana datasources.
    fn of_catalog(stream_labels: BTreeSet<String>, datasources: BTreeMap<String, String>) -> Self {
        let families = catalog();
        Self {
            labels_of: families
                .iter()
                .map(|f| (f.name.clone(), f.labels.iter().cloned().collect()))
                .collect(),
            histograms: families
                .iter()
                .filter(|f| f.kind == Kind::Histogram)
                .map(|f| f.name.clone())
                .collect(),
            stream_labels,
            datasources,
        }
    }

    fn defined(&self, name: &str) -> bool {
        self.labels_of.contains_key(name)
    }

    /// `x_bucket`, `x_sum`, `x_count` of a histogram `x`.
    fn histogram_series(&self, name: &str) -> Option<String> {
        let base = re(r"_(bucket|sum|count)$").replace(name, "").into_owned();
        (base != name && self.histograms.contains(&base)).then_some(base)
    }
}

/// One PromQL expression's metric names, label matchers and job names.
fn check_promql(errors: &mut Vec<String>, k: &Known, wher: &str, expr: &str) {
    let selector = re(r"([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}");
    let matcher = re(r#"(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)""#);
    for cap in selector.captures_iter(expr) {
        let metric = cap.get(1).map_or("", |m| m.as_str());
        for m in matcher.captures_iter(&cap[2]) {
            let (label, op, value) = (&m[1], &m[2], &m[3]);
            if label == "job" && (op == "=" || op == "=~") {
                let pat = if op == "=~" {
                    value.replace("\\\\", "\\")
                } else {
                    regex::escape(value)
                };
                let full = Regex::new(&format!("^(?:{pat})$"));
                if !full.is_ok_and(|r| JOBS.iter().any(|j| r.is_match(j))) {
                    errors.push(format!(
                        "{wher}: job matcher {label}{op}\"{value}\" matches no scrape job"
                    ));
                }
            }
            let base = k.histogram_series(metric);
            if !k.defined(metric) && base.is_none() {
                continue; // not gpuq's (or unknown: reported below)
            }
            let family = base.as_deref().unwrap_or(metric);
            let mut known = k.labels_of.get(family).cloned().unwrap_or_default();
            known.extend(TARGET_LABELS.iter().map(|l| l.to_string()));
            if metric.ends_with("_bucket") {
                known.insert("le".into());
            }
            if !known.contains(label) {
                errors.push(format!(
                    "{wher}: {metric} has no label {label:?} (it has {known:?})"
                ));
            }
        }
    }
    // Metric names: drop strings, selectors, ranges and grouping clauses; what is left and is
    // not a function call, keyword or number is a metric name.
    let mut rest = re(r#""(?:[^"\\]|\\.)*""#)
        .replace_all(expr, "\"\"")
        .into_owned();
    rest = re(r"\{[^}]*\}").replace_all(&rest, " ").into_owned();
    rest = re(r"\[[^\]]*\]").replace_all(&rest, " ").into_owned();
    rest = re(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
        .replace_all(&rest, " ")
        .into_owned();
    for cap in re(r"([a-zA-Z_:][\w:]*)(\s*\()?").captures_iter(&rest) {
        let m = cap.get(1).expect("a name");
        let before = rest[..m.start()].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.') {
            continue; // inside a number or a longer name
        }
        let name = m.as_str();
        if cap.get(2).is_some() || KEYWORDS.contains(&name) {
            continue;
        }
        if name.starts_with("gpuq_") {
            if !k.defined(name) && k.histogram_series(name).is_none() {
                errors.push(format!(
                    "{wher}: metric {name} is not a family any gpuq service registers"
                ));
            }
        } else if !PROCESS.contains(&name) && !RABBITMQ.contains(&name) && !OTHER.contains(&name) {
            errors.push(format!(
                "{wher}: metric {name} is neither gpuq's, process_*, up, nor a verified RabbitMQ \
                 3.10 plugin metric"
            ));
        }
    }
}

fn variables(expr: &str) -> BTreeSet<String> {
    re(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]")
        .captures_iter(expr)
        .filter_map(|c| c.get(1).or(c.get(2)).or(c.get(3)))
        .map(|m| m.as_str().to_string())
        .collect()
}

fn substitute(expr: &str) -> String {
    re(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]")
        .replace_all(expr, |c: &regex::Captures| {
            let name = c
                .get(1)
                .or(c.get(2))
                .or(c.get(3))
                .map_or("", |m| m.as_str());
            match name {
                "__rate_interval" | "__interval" => "1m",
                "engine" | "pool" | "worker" => ".*",
                "job_id" => "0190a5e2-0000-7000-8000-000000000000",
                _ => "x",
            }
            .to_string()
        })
        .into_owned()
}

fn check_prometheus_configs(errors: &mut Vec<String>) {
    let expected = [
        (
            "deploy/prometheus/prometheus.yml",
            json!({
                "gpuq-gateway": ["gateway:8080"], "gpuq-manager": ["manager:8090"],
                "gpuq-worker": ["worker1:9001", "worker2:9001", "worker3:9001"],
                "rabbitmq": ["rabbitmq1:15692", "rabbitmq2:15692", "rabbitmq3:15692"]}),
        ),
        (
            "deploy/prometheus/prometheus.local.yml",
            json!({
                "gpuq-gateway": ["127.0.0.1:8080"], "gpuq-manager": ["127.0.0.1:8090"],
                "gpuq-worker": ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"],
                "rabbitmq": ["127.0.0.1:15692", "127.0.0.1:15693", "127.0.0.1:15694"]}),
        ),
    ];
    let mut engine_labels = BTreeSet::new();
    for (rel, want) in expected {
        let cfg = load(errors, rel);
        if cfg["rule_files"] != json!(["alerts.yml"]) {
            errors.push(format!(
                "{rel}: rule_files must be [alerts.yml] (relative to the config's directory)"
            ));
        }
        let mut got = serde_json::Map::new();
        let mut engines = vec![];
        for sc in arr(&cfg["scrape_configs"]) {
            let mut targets = vec![];
            for st in arr(&sc["static_configs"]) {
                targets.extend(arr(&st["targets"]).iter().cloned());
                if sc["job_name"] == "gpuq-worker" {
                    engines.push(st["labels"]["engine"].as_str().map(String::from));
                }
            }
            got.insert(s(&sc["job_name"]).to_string(), Value::Array(targets));
        }
        if Value::Object(got.clone()) != want {
            errors.push(format!(
                "{rel}: scrape jobs/targets {got:?} differ from {want}"
            ));
        }
        let distinct: BTreeSet<_> = engines.iter().flatten().collect();
        if engines.contains(&None) || distinct.len() != 3 {
            errors.push(format!(
                "{rel}: every gpuq-worker target needs its own `engine` label, got {engines:?}"
            ));
        }
        engine_labels.insert(format!("{engines:?}"));
    }
    if engine_labels.len() > 1 {
        errors.push(format!(
            "the Prometheus configs label workers differently: {engine_labels:?}"
        ));
    }
}

/// The provisioned datasources (uid → type).
fn check_grafana_provisioning(errors: &mut Vec<String>) -> BTreeMap<String, String> {
    let ds = load(errors, "grafana/provisioning/datasources/datasources.yml");
    let uids: BTreeMap<String, String> = arr(&ds["datasources"])
        .iter()
        .map(|d| (s(&d["uid"]).to_string(), s(&d["type"]).to_string()))
        .collect();
    let want: BTreeMap<String, String> = [("prometheus", "prometheus"), ("loki", "loki")]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    if uids != want {
        errors.push(format!(
            "datasources.yml: want uids prometheus (prometheus) and loki (loki), got {uids:?}"
        ));
    }
    let urls: BTreeMap<&str, &str> = arr(&ds["datasources"])
        .iter()
        .map(|d| (s(&d["uid"]), s(&d["url"])))
        .collect();
    if urls.get("prometheus") != Some(&"http://prometheus:9090")
        || urls.get("loki") != Some(&"http://loki:3100")
    {
        errors.push(format!("datasources.yml: unexpected URLs {urls:?}"));
    }
    let prov = load(errors, "grafana/provisioning/dashboards/dashboards.yml");
    let paths: Vec<&str> = arr(&prov["providers"])
        .iter()
        .map(|p| s(&p["options"]["path"]))
        .collect();
    if paths != ["/var/lib/grafana/dashboards"] {
        errors.push(format!(
            "dashboards.yml: one file provider at /var/lib/grafana/dashboards expected, got {paths:?}"
        ));
    }
    uids
}

/// The Promtail stream labels.
fn check_loki_and_promtail(errors: &mut Vec<String>) -> BTreeSet<String> {
    let loki = load(errors, "loki/loki.yml");
    let schemas: Vec<String> = arr(&loki["schema_config"]["configs"])
        .iter()
        .map(|c| format!("{}/{}", s(&c["store"]), s(&c["schema"])))
        .collect();
    if schemas.last().map(String::as_str) != Some("tsdb/v13") {
        errors.push(format!(
            "loki.yml: the newest schema must be tsdb/v13, got {schemas:?}"
        ));
    }
    if loki["compactor"]["retention_enabled"] != json!(true)
        || loki["limits_config"]["retention_period"].is_null()
    {
        errors.push(
            "loki.yml: retention must be enabled (compactor.retention_enabled, retention_period)"
                .into(),
        );
    }
    if loki["server"]["http_listen_port"] != json!(3100) {
        errors.push("loki.yml: Loki must listen on 3100".into());
    }
    let pt = load(errors, "loki/promtail.yml");
    let mut stream_labels = BTreeSet::new();
    let mut json_fields = BTreeSet::new();
    for sc in arr(&pt["scrape_configs"]) {
        // Docker's json-file logs from their read-only mount (docker-compose.yml), not the
        // Docker API: no socket, no service discovery.
        if !arr(&sc["docker_sd_configs"]).is_empty() {
            errors.push("promtail.yml: no docker_sd_configs (they need the Docker socket)".into());
        }
        for st in arr(&sc["static_configs"]) {
            let path = s(&st["labels"]["__path__"]);
            if !path.starts_with("/var/lib/docker/containers/") || !path.ends_with("-json.log") {
                errors.push(format!(
                    "promtail.yml: {path:?} is not Docker's json-file logs under /var/lib/docker/containers"
                ));
            }
        }
        for rc in arr(&sc["relabel_configs"]) {
            if let Some(t) = rc["target_label"].as_str() {
                stream_labels.insert(t.to_string());
            }
        }
        for stage in arr(&sc["pipeline_stages"]) {
            if let Some(exprs) = stage["json"]["expressions"].as_object() {
                json_fields.extend(exprs.keys().cloned());
            }
            if let Some(labels) = stage["labels"].as_object() {
                stream_labels.extend(labels.keys().cloned());
            }
        }
    }
    let clients: Vec<&str> = arr(&pt["clients"]).iter().map(|c| s(&c["url"])).collect();
    if clients != ["http://loki:3100/loki/api/v1/push"] {
        errors.push(
            "promtail.yml: the one client must push to http://loki:3100/loki/api/v1/push".into(),
        );
    }
    for want in ["level", "service", "worker_id", "job_id", "message"] {
        if !json_fields.contains(want) {
            errors.push(format!(
                "promtail.yml: the json stage must extract {want}, got {json_fields:?}"
            ));
        }
    }
    for want in ["level", "service", "worker_id"] {
        if !stream_labels.contains(want) {
            errors.push(format!(
                "promtail.yml: {want} must be a label, got {stream_labels:?}"
            ));
        }
    }
    for high in ["job_id", "message", "timestamp"] {
        if stream_labels.contains(high) {
            errors.push(format!(
                "promtail.yml: {high} must never be a label (one stream per value)"
            ));
        }
    }
    stream_labels
}

fn check_alerts(errors: &mut Vec<String>, k: &Known) {
    let rules = load(errors, "deploy/prometheus/alerts.yml");
    let mut names = vec![];
    for group in arr(&rules["groups"]) {
        for r in arr(&group["rules"]) {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("");
            let wher = format!("alerts.yml {name}");
            names.push(name.to_string());
            if r.get("alert").is_some() {
                if r["for"].is_null() {
                    errors.push(format!("{wher}: needs a `for`"));
                }
                if !["critical", "warning", "info"].contains(&s(&r["labels"]["severity"])) {
                    errors.push(format!(
                        "{wher}: needs a severity label (critical, warning or info)"
                    ));
                }
                let ann = &r["annotations"];
                if s(&ann["summary"]).is_empty() || s(&ann["description"]).is_empty() {
                    errors.push(format!("{wher}: needs summary and description annotations"));
                }
            }
            if !variables(s(&r["expr"])).is_empty() {
                errors.push(format!(
                    "{wher}: an alert expression cannot use dashboard variables"
                ));
            }
            check_promql(errors, k, &wher, s(&r["expr"]));
        }
    }
    for want in ALERTS {
        if !names.iter().any(|n| n == want) {
            errors.push(format!("alerts.yml: alert {want} is missing"));
        }
    }
    // Every alert has a unit test that fires it and one where it stays quiet.
    let tests = load(errors, "deploy/prometheus/alerts_test.yml");
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for t in arr(&tests["tests"]) {
        for a in arr(&t["alert_rule_test"]) {
            let set = if arr(&a["exp_alerts"]).is_empty() {
                &mut quiet
            } else {
                &mut fires
            };
            set.insert(s(&a["alertname"]).to_string());
        }
    }
    for name in &names {
        if !fires.contains(name) {
            errors.push(format!("alerts_test.yml: no test case fires {name}"));
        }
        if !quiet.contains(name) {
            errors.push(format!(
                "alerts_test.yml: no test case checks that {name} stays quiet"
            ));
        }
    }
}

/// The datasource uid a reference names, if it is a provisioned one of the right type.
fn datasource(errors: &mut Vec<String>, k: &Known, wher: &str, r: &Value) -> Option<String> {
    let uid = r["uid"].as_str().filter(|u| k.datasources.contains_key(*u));
    let Some(uid) = uid else {
        errors.push(format!(
            "{wher}: datasource {r} is not a provisioned uid {:?}",
            k.datasources.keys()
        ));
        return None;
    };
    if let Some(t) = r["type"].as_str()
        && t != k.datasources[uid]
    {
        errors.push(format!(
            "{wher}: datasource type {t} != provisioned {}",
            k.datasources[uid]
        ));
    }
    Some(uid.to_string())
}

/// The dashboard's variables (checked).
fn check_variables(errors: &mut Vec<String>, k: &Known, rel: &str, d: &Value) -> BTreeSet<String> {
    let mut defined = BTreeSet::new();
    for v in arr(&d["templating"]["list"]) {
        let name = s(&v["name"]);
        defined.insert(name.to_string());
        if !ALLOWED_VARS.contains(&name) {
            errors.push(format!(
                "{rel}: variable {name:?} is not one of {ALLOWED_VARS:?}"
            ));
        }
        if v["type"] != "query" {
            continue;
        }
        let wher = format!("{rel} variable {name}");
        let vds = datasource(errors, k, &wher, &v["datasource"]);
        let q = if v["query"].is_object() {
            s(&v["query"]["query"])
        } else {
            s(&v["query"])
        };
        let Some(m) = re(r"^\s*label_values\(\s*(.*?)\s*,\s*(\w+)\s*\)\s*$").captures(q) else {
            errors.push(format!(
                "{wher}: query {q:?} is not label_values(<selector>, <label>)"
            ));
            continue;
        };
        match vds.as_deref() {
            Some("prometheus") => {
                check_promql(errors, k, &wher, &m[1]);
                let metric = re(r"^[a-zA-Z_:][\w:]*")
                    .find(&m[1])
                    .map_or("", |x| x.as_str());
                let has = k.labels_of.get(metric).is_some_and(|l| l.contains(&m[2]))
                    || TARGET_LABELS.contains(&&m[2]);
                if !has {
                    errors.push(format!("{wher}: {} has no label {:?}", &m[1], &m[2]));
                }
            }
            Some("loki") if !k.stream_labels.contains(&m[2]) => {
                errors.push(format!("{wher}: {:?} is not a Promtail label", &m[2]));
            }
            _ => {}
        }
    }
    defined
}

fn check_loki_query(errors: &mut Vec<String>, k: &Known, wher: &str, expr: &str) {
    for sel in re(r"\{([^}]*)\}").captures_iter(expr) {
        for l in re(r#"(\w+)\s*(?:=~|!~|!=|=)\s*""#).captures_iter(&sel[1]) {
            if !k.stream_labels.contains(&l[1]) {
                errors.push(format!(
                    "{wher}: stream selector label {:?} is not a Promtail label {:?}",
                    &l[1], k.stream_labels
                ));
            }
        }
    }
    if let Some((_, after)) = expr.split_once("| json") {
        for f in re(r"\|\s*(\w+)\s*(?:=~|!~|!=|=)").captures_iter(after) {
            if !LOG_FIELDS.contains(&&f[1]) {
                errors.push(format!(
                    "{wher}: filters on {:?}, not a field of gpuq's log lines",
                    &f[1]
                ));
            }
        }
    }
    for group in re(r"\b(?:by|without)\s*\(([^)]*)\)").captures_iter(expr) {
        for l in re(r"\w+").find_iter(&group[1]) {
            if !k.stream_labels.contains(l.as_str()) {
                errors.push(format!(
                    "{wher}: groups by {:?}, not a Promtail label",
                    l.as_str()
                ));
            }
        }
    }
}

/// Checks every dashboard; answers each PromQL expression as a recording rule (variables
/// substituted), for promtool to parse.
fn check_dashboards(errors: &mut Vec<String>, k: &Known) -> Vec<Value> {
    let mut recording = vec![];
    let (mut uids, mut titles) = (BTreeMap::new(), BTreeMap::new());
    let dir = repo_root().join("grafana/dashboards");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("grafana/dashboards")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".json"))
        .collect();
    files.sort();
    for want in ["overview.json", "engines.json", "logs.json"] {
        if !files.iter().any(|f| f == want) {
            errors.push(format!("grafana/dashboards/{want} is missing"));
        }
    }
    for fname in &files {
        let rel = format!("grafana/dashboards/{fname}");
        let d = load(errors, &rel);
        for (key, seen) in [("uid", &mut uids), ("title", &mut titles)] {
            match d[key].as_str() {
                None | Some("") => errors.push(format!("{rel}: has no {key}")),
                Some(v) => {
                    if let Some(other) = seen.insert(v.to_string(), rel.clone()) {
                        errors.push(format!("{rel}: {key} {v:?} is also used by {other}"));
                    }
                }
            }
        }
        if d["schemaVersion"].as_u64().is_none_or(|v| v < 36) {
            errors.push(format!(
                "{rel}: schemaVersion {} (want 36 or later)",
                d["schemaVersion"]
            ));
        }
        let defined_vars = check_variables(errors, k, &rel, &d);
        let mut panels = vec![];
        for p in arr(&d["panels"]) {
            panels.push(p);
            panels.extend(arr(&p["panels"])); // collapsed rows keep their panels inside
        }
        let (mut ids, mut panel_titles) = (BTreeSet::new(), BTreeSet::new());
        for p in panels {
            if !ids.insert(p["id"].to_string()) {
                errors.push(format!("{rel}: panel id {} is used twice", p["id"]));
            }
            if p["type"] == "row" {
                continue;
            }
            let title = s(&p["title"]);
            let wher = format!("{rel} panel {title:?}");
            if title.is_empty() || !panel_titles.insert(title.to_string()) {
                errors.push(format!("{wher}: panel titles must be present and unique"));
            }
            let panel_ds = datasource(errors, k, &wher, &p["datasource"]);
            if arr(&p["targets"]).is_empty() {
                errors.push(format!("{wher}: has no query"));
            }
            for t in arr(&p["targets"]) {
                let expr = s(&t["expr"]);
                let target_ds = if t["datasource"].is_null() {
                    &p["datasource"]
                } else {
                    &t["datasource"]
                };
                let tds = datasource(errors, k, &wher, target_ds).or(panel_ds.clone());
                if expr.trim().is_empty() {
                    errors.push(format!("{wher}: target {} has no expr", t["refId"]));
                    continue;
                }
                let used = variables(expr);
                for v in &used {
                    if !ALLOWED_VARS.contains(&v.as_str()) {
                        errors.push(format!(
                            "{wher}: uses variable ${v}; only {ALLOWED_VARS:?} may be used"
                        ));
                    } else if !v.starts_with("__") && !defined_vars.contains(v) {
                        errors.push(format!(
                            "{wher}: uses ${v}, which the dashboard does not define"
                        ));
                    }
                }
                match tds.as_deref() {
                    Some("prometheus") => {
                        check_promql(errors, k, &wher, expr);
                        recording.push(json!({
                            "record": format!("gpuq:dashboard_expr_{}", recording.len()),
                            "expr": substitute(expr),
                            "labels": {"source": format!("{fname}: {title}")},
                        }));
                    }
                    Some("loki") => check_loki_query(errors, k, &wher, expr),
                    _ => {}
                }
            }
        }
    }
    recording
}

/// Runs promtool with `args` in the checkout; its complaints, if it fails.
fn promtool(args: &[&str]) -> Option<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("promtool (Debian package prometheus) is installed by scripts/test.sh");
    (!out.status.success()).then(|| {
        format!(
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn promtool_accepts_the_prometheus_configs_the_alert_rules_and_their_unit_tests() {
    let failures: Vec<String> = [
        vec!["check", "config", "deploy/prometheus/prometheus.yml"],
        vec!["check", "config", "deploy/prometheus/prometheus.local.yml"],
        vec!["check", "rules", "deploy/prometheus/alerts.yml"],
        vec!["test", "rules", "deploy/prometheus/alerts_test.yml"],
    ]
    .iter()
    .filter_map(|args| promtool(args))
    .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn dashboards_alerts_and_log_configs_use_only_what_gpuq_prometheus_and_promtail_provide() {
    let mut errors = vec![];
    let stream_labels = check_loki_and_promtail(&mut errors);
    let datasources = check_grafana_provisioning(&mut errors);
    let known = Known::of_catalog(stream_labels, datasources);
    assert!(
        !known.histograms.is_empty(),
        "the metric catalog lists no histogram"
    );
    check_prometheus_configs(&mut errors);
    check_alerts(&mut errors, &known);
    let recording = check_dashboards(&mut errors, &known);
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // promtool parses every dashboard PromQL expression, as a recording rule.
    assert!(
        !recording.is_empty(),
        "no dashboard PromQL expression found"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard_exprs.yml");
    let rules = json!({"groups": [{"name": "dashboard-expressions", "rules": recording}]});
    std::fs::write(&file, serde_yaml::to_string(&rules).unwrap()).unwrap();
    if let Some(complaint) = promtool(&["check", "rules", file.to_str().unwrap()]) {
        panic!("{complaint}");
    }
}

#[test]
fn the_promql_check_finds_unknown_metrics_labels_and_jobs() {
    let known = Known::of_catalog(BTreeSet::new(), BTreeMap::new());
    let mut errors = vec![];
    let good = r#"sum by (pool) (rate(gpuq_jobs_started_total{pool=~"$pool", job="gpuq-worker"}[5m])) > 0.5e1"#;
    check_promql(&mut errors, &known, "good", good);
    assert!(errors.is_empty(), "{errors:?}");
    for (bad, why) in [
        ("rate(gpuq_jobs_startd_total[5m])", "gpuq_jobs_startd_total"),
        (
            "gpuq_jobs_started_total{colour=\"red\"}",
            "no label \"colour\"",
        ),
        ("up{job=\"gpuq-gateways\"}", "matches no scrape job"),
        ("node_load1", "node_load1"),
    ] {
        let mut errors = vec![];
        check_promql(&mut errors, &known, "bad", bad);
        assert!(errors.iter().any(|e| e.contains(why)), "{bad}: {errors:?}");
    }
}
