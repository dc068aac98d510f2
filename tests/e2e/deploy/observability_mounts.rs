//! The observability configs (Prometheus, Loki, Promtail, Grafana) point into the mounts
//! compose gives them.

// Test scenarios read as one story from top to bottom: exempt from the workspace's
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

use super::*;

#[test]
fn observability_configs_point_into_their_mounts() {
    let c = main_compose();
    let mut errors = Vec::new();
    let svc = |n: &str| {
        c.services
            .get(n)
            .unwrap_or_else(|| panic!("no {n} service"))
    };
    let flag = |s: &Value, f: &str| {
        str_list(s.get("command"))
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{f}=")).map(String::from))
            .unwrap_or_else(|| panic!("{f} missing from the command"))
    };

    // Prometheus: its config and every rule file, relative to the config's directory.
    let prom = svc("prometheus");
    let cfg = flag(prom, "--config.file");
    match resolve(prom, &cfg) {
        Resolved::Repo(p) if p.ends_with("deploy/prometheus/prometheus.yml") => {}
        _ => errors.push(format!(
            "prometheus: {cfg} is not deploy/prometheus/prometheus.yml"
        )),
    }
    let dir = cfg
        .rsplit_once('/')
        .map(|(d, _)| d.to_string())
        .unwrap_or_default();
    for rule in str_list(yaml("deploy/prometheus/prometheus.yml").get("rule_files")) {
        let path = if rule.starts_with('/') {
            rule.clone()
        } else {
            format!("{dir}/{rule}")
        };
        match resolve(prom, &path) {
            Resolved::Repo(p) if p.is_file() => {}
            _ => errors.push(format!(
                "prometheus: rule file {path} is not mounted from the repository"
            )),
        }
    }
    if !matches!(
        resolve(prom, &flag(prom, "--storage.tsdb.path")),
        Resolved::Volume(_)
    ) {
        errors.push("prometheus: its TSDB is not on a named volume".into());
    }

    // Grafana: provisioning, and the dashboards that the provider reads.
    let grafana = svc("grafana");
    match resolve(grafana, "/etc/grafana/provisioning") {
        Resolved::Repo(p) if p.ends_with("grafana/provisioning") => {}
        _ => errors.push("grafana: /etc/grafana/provisioning is not grafana/provisioning".into()),
    }
    let providers = yaml("grafana/provisioning/dashboards/dashboards.yml");
    for p in providers["providers"].as_sequence().expect("providers") {
        let path = scalar(&p["options"]["path"]);
        match resolve(grafana, &path) {
            Resolved::Repo(dir) if dir.is_dir() => {
                let n = std::fs::read_dir(&dir).unwrap().filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json"))
                });
                if n.count() == 0 {
                    errors.push(format!("grafana: {} holds no dashboard", dir.display()));
                }
            }
            _ => errors.push(format!(
                "grafana: dashboard provider path {path} is not mounted from the repository"
            )),
        }
    }
    let genv = env_of(grafana);
    if genv.get("GF_AUTH_ANONYMOUS_ENABLED").map(String::as_str) != Some("true")
        || genv.get("GF_AUTH_ANONYMOUS_ORG_ROLE").map(String::as_str) != Some("Viewer")
    {
        errors.push("grafana: anonymous access should be enabled as Viewer".into());
    }

    // Loki: its config, and every directory it writes on the named volume.
    let loki = svc("loki");
    let cfg = flag(loki, "-config.file");
    match resolve(loki, &cfg) {
        Resolved::Repo(p) if p.ends_with("loki/loki.yml") => {}
        _ => errors.push(format!("loki: {cfg} is not loki/loki.yml")),
    }
    let loki_cfg = yaml("loki/loki.yml");
    let mut stack = vec![(String::new(), &loki_cfg)];
    while let Some((key, v)) = stack.pop() {
        match v {
            Value::Mapping(m) => stack.extend(m.iter().map(|(k, v)| (scalar(k), v))),
            Value::Sequence(s) => stack.extend(s.iter().map(|v| (key.clone(), v))),
            Value::String(path)
                if path.starts_with('/')
                    && (key.ends_with("directory")
                        || key.ends_with("prefix")
                        || key.ends_with("location"))
                    && !matches!(resolve(loki, path), Resolved::Volume(_)) =>
            {
                errors.push(format!("loki: {key} = {path} is not on a named volume"));
            }
            _ => {}
        }
    }
    if let Some(port) = loki_cfg
        .get("server")
        .and_then(|s| s.get("http_listen_port"))
        && !container_ports(loki).contains(&scalar(port).parse().unwrap_or(0))
    {
        errors.push(format!(
            "loki listens on {} but compose does not expose it",
            scalar(port)
        ));
    }

    // Promtail: its config, its positions on a volume, and its /ready port in the healthcheck.
    let promtail = svc("promtail");
    let cfg = flag(promtail, "-config.file");
    match resolve(promtail, &cfg) {
        Resolved::Repo(p) if p.ends_with("loki/promtail.yml") => {}
        _ => errors.push(format!("promtail: {cfg} is not loki/promtail.yml")),
    }
    let pt = yaml("loki/promtail.yml");
    if let Some(pos) = pt
        .get("positions")
        .and_then(|p| p.get("filename"))
        .map(scalar)
        && !matches!(resolve(promtail, &pos), Resolved::Volume(_))
    {
        errors.push(format!(
            "promtail: positions {pos} are not on a named volume (logs would ship twice)"
        ));
    }
    let port = pt
        .get("server")
        .and_then(|s| s.get("http_listen_port"))
        .map(scalar)
        .unwrap_or_else(|| "80".into());
    let health = str_list(promtail.get("healthcheck").and_then(|h| h.get("test"))).join(" ");
    if !health.contains(&format!("/dev/tcp/127.0.0.1/{port}")) {
        errors.push(format!(
            "promtail listens on {port}, its healthcheck probes {health:?}"
        ));
    }
    // Least privilege: the containers' log files, read-only; never the Docker socket (root on
    // the host). The scrape paths are checked against this mount in tests/e2e/monitoring/.
    let logs = "/var/lib/docker/containers";
    let read_only = |v: &Value| match v {
        Value::Mapping(_) => v.get("read_only").and_then(Value::as_bool) == Some(true),
        _ => scalar(v).ends_with(":ro"),
    };
    let vols = promtail.get("volumes").and_then(Value::as_sequence);
    if !vols.into_iter().flatten().any(|v| {
        let src = match v {
            Value::Mapping(_) => v.get("source").map(scalar).unwrap_or_default(),
            _ => scalar(v).split(':').next().unwrap_or_default().to_string(),
        };
        src == logs && read_only(v)
    }) {
        errors.push(format!("promtail: {logs} is not mounted read-only"));
    }
    if mounts(promtail)
        .iter()
        .any(|(src, _, _)| src.ends_with("docker.sock"))
    {
        errors.push("promtail: the Docker socket is mounted (root on the host)".into());
    }
    assert_no_errors("observability mounts", errors);
}
