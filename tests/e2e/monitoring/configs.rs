//! The Prometheus configs, the Grafana provisioning, the Loki and Promtail configs and the alert
//! rules.

use super::*;

pub(super) fn check_prometheus_configs(errors: &mut Vec<String>) {
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
pub(super) fn check_grafana_provisioning(errors: &mut Vec<String>) -> BTreeMap<String, String> {
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
pub(super) fn check_loki_and_promtail(errors: &mut Vec<String>) -> BTreeSet<String> {
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

pub(super) fn check_alerts(errors: &mut Vec<String>, k: &Known) {
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
