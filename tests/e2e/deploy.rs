//! Static checks of the production shape (issue 6): docker-compose.yml with its GPU override,
//! docker-compose.worker.yml, the .env examples, deploy/Dockerfile, the RabbitMQ configuration
//! and the observability configs that compose mounts. No Docker engine is needed: the files are
//! parsed, compose's `${VAR}` interpolation is applied with the example values, and the
//! environment of every gpuq service goes through the real config loader. The tools
//! (`docker compose config`, hadolint, a throwaway RabbitMQ node) run in scripts/checks/compose.sh.

// Test scenarios read as one story from top to bottom: exempt from the workspace's
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use gpuq_common::Settings;
use gpuq_common::topology::Topology;
use lapin::types::AMQPValue;
use serde_yaml::Value;

// ------------------------------------------------------------------------------------------------
// Reading the files

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub(crate) fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(rel: &str) -> Value {
    let mut value: Value =
        serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"));
    // serde_yaml leaves the `<<` keys of a merged-in anchor unmerged: repeat until none is left.
    for _ in 0..8 {
        value
            .apply_merge()
            .unwrap_or_else(|e| panic!("{rel}: bad merge key: {e}"));
        if !has_merge_key(&value) {
            return value;
        }
    }
    panic!("{rel}: merge keys nested too deep");
}

fn has_merge_key(v: &Value) -> bool {
    match v {
        Value::Mapping(m) => m.contains_key("<<") || m.values().any(has_merge_key),
        Value::Sequence(s) => s.iter().any(has_merge_key),
        _ => false,
    }
}

/// KEY=VALUE lines of an env file (comments and blank lines skipped, quotes removed).
fn dotenv(rel: &str) -> BTreeMap<String, String> {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{rel}: {l:?} is not KEY=VALUE"));
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            (k.trim().to_string(), v.to_string())
        })
        .collect()
}

/// Secrets are left empty in the examples (compose refuses to start until they are set).
fn is_secret_name(name: &str) -> bool {
    ["PASSWORD", "COOKIE", "TOKEN", "KEYS", "SECRET"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// The example env with its empty secrets filled in, as a user's .env would be.
fn example_env(rel: &str) -> BTreeMap<String, String> {
    dotenv(rel)
        .into_iter()
        .map(|(k, v)| {
            if v.is_empty() && is_secret_name(&k) {
                let filled = format!("t0{}", k.to_ascii_lowercase().replace('_', "0"));
                (k, filled)
            } else {
                (k, v)
            }
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// A compose project, as Docker Compose itself reads it

/// A variable the compose files use, and whether they require it (`${X:?…}`).
#[derive(Debug)]
struct VarRef {
    name: String,
    required: bool,
}

pub(crate) struct Compose {
    label: String,
    pub(crate) services: BTreeMap<String, Value>,
    volumes: BTreeSet<String>,
    refs: Vec<VarRef>,
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).unwrap_or_default(),
    }
}

/// `docker compose … config --format json` (and `--variables`) of `files` with `env_file`'s
/// values (its empty secrets filled in, as a user's `.env` would be): the files merged,
/// interpolated and in canonical form, by Compose itself. The process environment is left out,
/// so that nothing of the test's own shell leaks in.
pub(crate) fn compose(files: &[&str], env_file: &str) -> Compose {
    let dir = tempfile::tempdir().unwrap();
    let env_path = dir.path().join("env");
    let env: String = example_env(env_file)
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect();
    std::fs::write(&env_path, env).unwrap();
    let run = |extra: &[&str]| -> serde_json::Value {
        let (program, first) = compose_command();
        let mut cmd = Command::new(program);
        cmd.args(first)
            .arg("--project-directory")
            .arg(root())
            .arg("--env-file")
            .arg(&env_path);
        for f in files {
            cmd.arg("-f").arg(root().join(f));
        }
        cmd.arg("config").args(extra).args(["--format", "json"]);
        cmd.env_clear();
        for keep in ["PATH", "HOME", "DOCKER_CONFIG"] {
            if let Ok(v) = std::env::var(keep) {
                cmd.env(keep, v);
            }
        }
        let out = cmd.output().expect("run docker compose config");
        assert!(
            out.status.success(),
            "docker compose config of {files:?} with {env_file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("compose config prints JSON")
    };
    let config: Value = serde_yaml::to_value(run(&[])).expect("JSON is YAML");
    let services = config
        .get("services")
        .and_then(Value::as_mapping)
        .unwrap_or_else(|| panic!("{files:?}: no services"))
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_string(), v.clone()))
        .collect();
    let volumes = config
        .get("volumes")
        .and_then(Value::as_mapping)
        .map(|m| {
            m.keys()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let refs = run(&["--variables"])
        .as_object()
        .expect("variables are an object")
        .values()
        .map(|v| VarRef {
            name: v["Name"].as_str().unwrap_or_default().to_string(),
            required: v["Required"].as_bool().unwrap_or(false),
        })
        .collect();
    Compose {
        label: files.join(" + "),
        services,
        volumes,
        refs,
    }
}

/// Docker Compose v2 as scripts/lib.sh's find_compose finds it: the docker CLI plugin, else
/// `docker-compose`, else the copy installed under GPUQ_TOOLS_DIR.
fn compose_command() -> (String, Vec<String>) {
    let works = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("docker", &["compose"]) {
        return ("docker".into(), vec!["compose".into()]);
    }
    if works("docker-compose", &[]) {
        return ("docker-compose".into(), vec![]);
    }
    let tools = std::env::var("GPUQ_TOOLS_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/gpuq-tools",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    (format!("{tools}/bin/docker-compose"), vec![])
}

fn main_compose() -> Compose {
    compose(&["docker-compose.yml"], ".env.example")
}

fn gpu_compose() -> Compose {
    compose(
        &["docker-compose.yml", "docker-compose.gpu.yml"],
        ".env.example",
    )
}

fn worker_host_compose() -> Compose {
    compose(
        &["docker-compose.worker.yml"],
        "deploy/worker-host.env.example",
    )
}

fn all_composes() -> Vec<Compose> {
    vec![main_compose(), gpu_compose(), worker_host_compose()]
}

pub(crate) fn env_of(service: &Value) -> BTreeMap<String, String> {
    service
        .get("environment")
        .and_then(Value::as_mapping)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.as_str().unwrap().to_string(), scalar(v)))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn str_list(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Sequence(s)) => s.iter().map(scalar).collect(),
        Some(Value::String(s)) => s.split_whitespace().map(String::from).collect(),
        _ => Vec::new(),
    }
}

/// Services that run the gpuq image (built from deploy/Dockerfile).
pub(crate) fn is_gpuq(service: &Value) -> bool {
    service
        .get("build")
        .and_then(|b| b.get("dockerfile"))
        .and_then(Value::as_str)
        == Some("deploy/Dockerfile")
}

fn gpuq_binary(service: &Value) -> String {
    str_list(service.get("command"))
        .first()
        .cloned()
        .unwrap_or_else(|| "gpuq-gateway".into())
}

pub(crate) fn settings_of(service: &Value) -> Result<Settings, String> {
    Settings::from_sources(&env_of(service)).map_err(|e| e.to_string())
}

fn port_of_bind(bind: &str) -> u16 {
    bind.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("bind address {bind:?} has no port"))
}

/// The port a gpuq service's HTTP server listens on, from its own settings.
fn gpuq_listen_port(service: &Value) -> Option<u16> {
    let s = settings_of(service).ok()?;
    match gpuq_binary(service).as_str() {
        "gpuq-gateway" => Some(port_of_bind(&s.gateway_bind)),
        "gpuq-manager" => Some(port_of_bind(&s.manager_bind)),
        "gpuq-worker" => Some(port_of_bind(&s.worker_bind)),
        _ => None,
    }
}

struct Published {
    host_ip: String,
    host_port: u16,
    container_port: u16,
}

fn published_ports(service: &Value) -> Vec<Published> {
    let Some(Value::Sequence(ports)) = service.get("ports") else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|p| match p {
            Value::Mapping(_) => Published {
                host_ip: p
                    .get("host_ip")
                    .map(scalar)
                    .unwrap_or_else(|| "0.0.0.0".into()),
                host_port: scalar(p.get("published").expect("published"))
                    .parse()
                    .expect("port"),
                container_port: scalar(p.get("target").expect("target"))
                    .parse()
                    .expect("port"),
            },
            _ => {
                let s = scalar(p);
                let s = s.split('/').next().unwrap();
                let parts: Vec<&str> = s.rsplitn(3, ':').collect();
                let num = |x: &str| {
                    x.parse::<u16>()
                        .unwrap_or_else(|_| panic!("port {s:?}: {x:?} is not one port (no ranges)"))
                };
                match parts.as_slice() {
                    [c, h, ip] => Published {
                        host_ip: ip.to_string(),
                        host_port: num(h),
                        container_port: num(c),
                    },
                    [c, h] => Published {
                        host_ip: "0.0.0.0".into(),
                        host_port: num(h),
                        container_port: num(c),
                    },
                    _ => panic!("port {s:?} publishes no host port"),
                }
            }
        })
        .collect()
}

/// Every port the service's container listens on, as far as the compose file tells.
fn container_ports(service: &Value) -> BTreeSet<u16> {
    let mut ports: BTreeSet<u16> = published_ports(service)
        .iter()
        .map(|p| p.container_port)
        .collect();
    for e in str_list(service.get("expose")) {
        ports.insert(e.parse().unwrap_or_else(|_| panic!("expose {e:?}")));
    }
    if is_gpuq(service) {
        ports.extend(gpuq_listen_port(service));
    }
    ports
}

/// (source, target, is_bind) of each volume of a service.
pub(crate) fn mounts(service: &Value) -> Vec<(String, String, bool)> {
    let Some(Value::Sequence(vols)) = service.get("volumes") else {
        return Vec::new();
    };
    vols.iter()
        .map(|v| match v {
            Value::Mapping(_) => {
                let mut src = v.get("source").map(scalar).unwrap_or_default();
                let tgt = v.get("target").map(scalar).unwrap_or_default();
                let bind = v.get("type").map(scalar).as_deref() == Some("bind");
                // Compose makes a relative bind source absolute: give back the file's `./…`.
                if bind && let Ok(rel) = Path::new(&src).strip_prefix(root()) {
                    src = format!("./{}", rel.display());
                }
                (src, tgt, bind)
            }
            _ => {
                let s = scalar(v);
                let parts: Vec<&str> = s.split(':').collect();
                let (src, tgt) = match parts.as_slice() {
                    [t] => ("", *t),
                    [s, t, ..] => (*s, *t),
                    _ => unreachable!(),
                };
                let bind = src.starts_with('.') || src.starts_with('/') || src.starts_with('~');
                (src.to_string(), tgt.to_string(), bind)
            }
        })
        .collect()
}

enum Resolved {
    /// A path of the repository (bind mount from `./…`).
    Repo(PathBuf),
    /// Inside a named volume.
    Volume(String),
    /// Host path outside the repository, or not mounted at all.
    Other,
}

/// Where a container path of a service comes from (longest mount target that contains it).
fn resolve(service: &Value, container_path: &str) -> Resolved {
    let mut best: Option<(usize, Resolved)> = None;
    for (src, tgt, bind) in mounts(service) {
        let tgt = tgt.trim_end_matches('/');
        let rest = if container_path == tgt {
            Some("")
        } else {
            container_path.strip_prefix(&format!("{tgt}/"))
        };
        let Some(rest) = rest else { continue };
        if best.as_ref().is_some_and(|(len, _)| *len >= tgt.len()) {
            continue;
        }
        let r = if bind && src.starts_with('.') {
            let mut p = root().join(src.trim_start_matches("./"));
            if !rest.is_empty() {
                p = p.join(rest);
            }
            Resolved::Repo(p)
        } else if !bind {
            Resolved::Volume(src)
        } else {
            Resolved::Other
        };
        best = Some((tgt.len(), r));
    }
    best.map(|(_, r)| r).unwrap_or(Resolved::Other)
}

/// `host:port` of every `scheme://…` URL in a value (comma or space separated lists too).
fn url_endpoints(value: &str) -> Vec<(String, u16, String)> {
    value
        .split([',', ' '])
        .filter_map(|item| {
            let (scheme, rest) = item.split_once("://")?;
            let authority = rest.split(['/', '?', '#']).next()?;
            let hostport = authority.rsplit('@').next()?;
            let (host, port) = match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().ok()?),
                None => (
                    hostport.to_string(),
                    match scheme {
                        "http" => 80,
                        "https" => 443,
                        "amqp" => 5672,
                        "redis" => 6379,
                        "mongodb" => 27017,
                        _ => return None,
                    },
                ),
            };
            Some((host, port, item.to_string()))
        })
        .collect()
}

fn user_of_url(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    Some(userinfo.split(':').next()?.to_string())
}

/// The service a host name designates: its service name or its `hostname:`.
fn service_by_host<'a>(c: &'a Compose, host: &str) -> Option<(&'a String, &'a Value)> {
    c.services.iter().find(|(name, s)| {
        name.as_str() == host || s.get("hostname").and_then(Value::as_str) == Some(host)
    })
}

fn check_endpoint(c: &Compose, who: &str, host: &str, port: u16, errors: &mut Vec<String>) {
    match service_by_host(c, host) {
        None => errors.push(format!(
            "{who} names {host}:{port}, but {host} is no service"
        )),
        Some((name, s)) => {
            let ports = container_ports(s);
            if !ports.contains(&port) {
                errors.push(format!(
                    "{who} names {host}:{port}, but {name} listens on {ports:?} (expose it)"
                ));
            }
        }
    }
}

fn assert_no_errors(what: &str, errors: Vec<String>) {
    let mut seen = BTreeSet::new();
    let errors: Vec<String> = errors
        .into_iter()
        .filter(|e| seen.insert(e.clone()))
        .collect();
    assert!(errors.is_empty(), "{what}:\n  - {}", errors.join("\n  - "));
}

/// Parses compose durations such as `60s`, `1m30s`, `1m0s`, `500ms`.
fn duration_s(s: &str) -> f64 {
    let mut total = 0.0;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let n: f64 = num.parse().unwrap_or_else(|_| panic!("duration {s:?}"));
        num.clear();
        let unit = if c == 'm' && chars.peek() == Some(&'s') {
            chars.next();
            0.001
        } else {
            match c {
                'h' => 3600.0,
                'm' => 60.0,
                's' => 1.0,
                _ => panic!("duration {s:?}: unit {c:?}"),
            }
        };
        total += n * unit;
    }
    assert!(num.is_empty(), "duration {s:?} lacks a unit");
    total
}

/// `key = value` lines of rabbitmq.conf.
fn rabbitmq_conf() -> BTreeMap<String, String> {
    read("deploy/rabbitmq/rabbitmq.conf")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("rabbitmq.conf: {l:?}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

fn json_file(rel: &str) -> serde_json::Value {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not JSON: {e}"))
}

/// `NAME=value` assignments at the top of a shell script.
fn shell_var(rel: &str, name: &str) -> String {
    read(rel)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("{rel} sets no {name}"))
        .trim_matches('"')
        .to_string()
}

/// What a service's own broker user must be allowed (`true`) and refused (`false`): (permission,
/// 0 configure, 1 write, 2 read; a resource's name). Least privilege, as docs/production.md's
/// table explains: RabbitMQ asks configure to declare, write on an exchange to publish and on a
/// queue to bind it, read on an exchange to bind from it and on a queue to consume or get.
fn broker_needs(binary: &str, topo: &Topology, pools: &[String]) -> Vec<(usize, String, bool)> {
    const CONFIGURE: usize = 0;
    const WRITE: usize = 1;
    const READ: usize = 2;
    let (jobs, dlx, dead) = (
        topo.jobs_exchange(),
        topo.dead_letter_exchange(),
        topo.dead_queue(),
    );
    let default_queue = topo.pool_queue("default");
    // Every service declares the exchanges and the dead queue, and binds the latter.
    let mut v: Vec<(usize, String, bool)> = [&jobs, &dlx, &dead]
        .into_iter()
        .map(|n| (CONFIGURE, n.clone(), true))
        .chain([(WRITE, dead.clone(), true), (READ, dlx.clone(), true)])
        .collect();
    match binary {
        // Publishes jobs and re-drives; reads (consumes) no queue, creates no pool queue.
        "gpuq-gateway" => v.extend([
            (WRITE, jobs.clone(), true),
            (READ, jobs.clone(), true),
            (READ, default_queue.clone(), false),
            (READ, dead.clone(), false),
            (CONFIGURE, default_queue, false),
            (WRITE, dlx, false),
        ]),
        // Declares and consumes its pools, gives jobs back, dead-letters; never reads dead letters.
        "gpuq-worker" => {
            for q in pools.iter().map(|p| topo.pool_queue(p)) {
                v.extend([
                    (CONFIGURE, q.clone(), true),
                    (WRITE, q.clone(), true),
                    (READ, q, true),
                ]);
            }
            v.extend([
                (WRITE, jobs.clone(), true),
                (READ, jobs, true),
                (WRITE, dlx, true),
                (READ, dead, false),
            ]);
        }
        // Consumes dead letters; publishes nothing, reads no job queue.
        "gpuq-manager" => v.extend([
            (READ, dead, true),
            (READ, default_queue.clone(), false),
            (CONFIGURE, default_queue, false),
            (WRITE, jobs, false),
            (WRITE, dlx, false),
        ]),
        other => panic!("no broker needs known for {other}"),
    }
    v
}

// ------------------------------------------------------------------------------------------------
// Compose: services, names, ports, mounts, health, images

#[test]
fn every_service_that_another_names_exists_and_listens_on_the_named_port() {
    for c in [main_compose(), gpu_compose()] {
        let mut errors = Vec::new();
        for (name, s) in &c.services {
            if let Some(Value::Mapping(deps)) = s.get("depends_on") {
                for dep in deps.keys().filter_map(Value::as_str) {
                    if !c.services.contains_key(dep) {
                        errors.push(format!("{name} depends on {dep}, which is no service"));
                    }
                }
            }
            for dep in str_list(s.get("depends_on")) {
                if !c.services.contains_key(&dep) {
                    errors.push(format!("{name} depends on {dep}, which is no service"));
                }
            }
            for (key, value) in env_of(s) {
                for (host, port, _) in url_endpoints(&value) {
                    check_endpoint(&c, &format!("{name}'s {key}"), &host, port, &mut errors);
                }
            }
        }

        // Prometheus targets (and the `engine` label of worker targets = that worker's id).
        let prom = yaml("deploy/prometheus/prometheus.yml");
        for job in prom["scrape_configs"]
            .as_sequence()
            .expect("scrape_configs")
        {
            let job_name = scalar(&job["job_name"]);
            for sc in job["static_configs"].as_sequence().into_iter().flatten() {
                for target in str_list(sc.get("targets")) {
                    let (host, port) = target.rsplit_once(':').expect("host:port target");
                    let port: u16 = port.parse().expect("target port");
                    let who = format!("prometheus job {job_name}");
                    check_endpoint(&c, &who, host, port, &mut errors);
                    if let (Some(engine), Some((_, s))) = (
                        sc.get("labels").and_then(|l| l.get("engine")),
                        service_by_host(&c, host),
                    ) {
                        let id = env_of(s).get("GPUQ_WORKER_ID").cloned().unwrap_or_default();
                        if scalar(engine) != id {
                            errors.push(format!(
                                "{who}: target {target} has engine={} but its GPUQ_WORKER_ID is {id:?}",
                                scalar(engine)
                            ));
                        }
                    }
                }
            }
        }

        // Grafana data sources.
        let ds = yaml("grafana/provisioning/datasources/datasources.yml");
        for d in ds["datasources"].as_sequence().expect("datasources") {
            for (host, port, _) in url_endpoints(&scalar(&d["url"])) {
                let who = format!("grafana data source {}", scalar(&d["name"]));
                check_endpoint(&c, &who, &host, port, &mut errors);
            }
        }

        // Promtail's Loki.
        let pt = yaml("loki/promtail.yml");
        for client in pt["clients"].as_sequence().expect("promtail clients") {
            for (host, port, _) in url_endpoints(&scalar(&client["url"])) {
                check_endpoint(&c, "promtail's client", &host, port, &mut errors);
            }
        }
        assert_no_errors(&c.label, errors);
    }
}

#[test]
fn each_host_port_is_published_once() {
    for c in all_composes() {
        let mut seen: BTreeMap<u16, String> = BTreeMap::new();
        let mut errors = Vec::new();
        for (name, s) in &c.services {
            for p in published_ports(s) {
                if let Some(other) = seen.insert(p.host_port, name.clone()) {
                    errors.push(format!(
                        "host port {} is published by {other} and {name}",
                        p.host_port
                    ));
                }
                if !container_ports(s).contains(&p.container_port) {
                    errors.push(format!(
                        "{name} publishes container port {}, which nothing there listens on",
                        p.container_port
                    ));
                }
            }
        }
        assert_no_errors(&c.label, errors);
    }
}

#[test]
fn published_ports_listen_on_the_configured_address_only() {
    // The ports of the main stack are reachable from this host only unless PUBLISH_ADDRESS says
    // otherwise; a bare "8080:8080" would bind every interface.
    let c = main_compose();
    let want = example_env(".env.example")["PUBLISH_ADDRESS"].clone();
    let mut errors = Vec::new();
    for (name, s) in &c.services {
        for p in published_ports(s) {
            if p.host_ip != want {
                errors.push(format!(
                    "{name} publishes {} on {} (want PUBLISH_ADDRESS = {want})",
                    p.host_port, p.host_ip
                ));
            }
        }
    }
    assert_no_errors(&c.label, errors);
}

#[test]
fn every_file_mounted_from_the_repository_exists() {
    for c in all_composes() {
        let mut errors = Vec::new();
        for (name, s) in &c.services {
            for (src, tgt, bind) in mounts(s) {
                if bind && src.starts_with('.') {
                    let path = root().join(src.trim_start_matches("./"));
                    if !path.exists() {
                        errors.push(format!(
                            "{name} mounts {src} at {tgt}: no such file or directory"
                        ));
                    }
                } else if !bind && !src.is_empty() && !c.volumes.contains(&src) {
                    errors.push(format!(
                        "{name} mounts volume {src}, which the top-level volumes lack"
                    ));
                }
            }
            if let Some(b) = s.get("build") {
                let ctx = root().join(scalar(&b["context"]).trim_start_matches("./"));
                let file = ctx.join(scalar(&b["dockerfile"]));
                if !file.is_file() {
                    errors.push(format!(
                        "{name} builds from {}, which does not exist",
                        file.display()
                    ));
                }
            }
        }
        assert_no_errors(&c.label, errors);
    }
}

#[test]
fn every_service_has_a_healthcheck_and_a_restart_policy() {
    for c in all_composes() {
        let mut errors = Vec::new();
        for (name, s) in &c.services {
            let test = str_list(s.get("healthcheck").and_then(|h| h.get("test")));
            if test.is_empty() || test[0] == "NONE" || s["healthcheck"].get("disable").is_some() {
                errors.push(format!("{name} has no healthcheck"));
            }
            match s.get("restart").map(scalar).as_deref() {
                Some("always" | "unless-stopped" | "on-failure") => {}
                other => errors.push(format!("{name}: restart is {other:?}")),
            }
            if s.get("logging").is_none()
                && c.label != "docker-compose.yml + docker-compose.gpu.yml"
            {
                errors.push(format!("{name} has no logging options (rotation)"));
            }
        }
        assert_no_errors(&c.label, errors);
    }
}

#[test]
fn dependencies_wait_for_health_and_gpuq_services_wait_for_every_backend() {
    let c = main_compose();
    let mut errors = Vec::new();
    for (name, s) in &c.services {
        let deps = s
            .get("depends_on")
            .and_then(Value::as_mapping)
            .cloned()
            .unwrap_or_default();
        for (dep, cond) in &deps {
            let dep = dep.as_str().unwrap();
            if cond.get("condition").map(scalar).as_deref() != Some("service_healthy") {
                errors.push(format!("{name} starts before {dep} is healthy"));
            }
        }
        if is_gpuq(s) {
            for backend in ["rabbitmq1", "rabbitmq2", "rabbitmq3", "redis", "mongodb"] {
                if !deps.contains_key(backend) {
                    errors.push(format!("{name} does not wait for {backend}"));
                }
            }
        }
    }
    assert_no_errors(&c.label, errors);
}

#[test]
fn every_image_is_pinned_to_a_version() {
    for c in all_composes() {
        let mut errors = Vec::new();
        for (name, s) in &c.services {
            let Some(image) = s.get("image").map(scalar) else {
                errors.push(format!("{name} names no image"));
                continue;
            };
            if image.contains('@') {
                continue; // a digest pins it
            }
            let tag = image.rsplit_once(':').filter(|(repo, _)| !repo.is_empty());
            match tag {
                None => errors.push(format!("{name}: image {image} has no tag")),
                Some((_, "latest")) => errors.push(format!("{name}: image {image} is :latest")),
                Some((_, tag))
                    if s.get("build").is_none() && !tag.chars().any(|ch| ch.is_ascii_digit()) =>
                {
                    errors.push(format!("{name}: image {image} has no version in its tag"))
                }
                _ => {}
            }
        }
        assert_no_errors(&c.label, errors);
    }
}

// ------------------------------------------------------------------------------------------------
// Compose: the gpuq services and their configuration

#[test]
fn each_gpuq_service_gets_an_environment_its_config_loader_accepts() {
    for c in all_composes() {
        let gpuq: Vec<_> = c.services.iter().filter(|(_, s)| is_gpuq(s)).collect();
        assert!(!gpuq.is_empty(), "{}: no gpuq service", c.label);
        let mut errors = Vec::new();
        for (name, s) in gpuq {
            let env = env_of(s);
            let unknown = Settings::unknown_env_keys(env.keys());
            if !unknown.is_empty() {
                errors.push(format!("{name}: unknown settings {unknown:?}"));
            }
            let settings = match Settings::from_sources(&env) {
                Ok(settings) => settings,
                Err(e) => {
                    errors.push(format!(
                        "{name}: the config loader refuses its environment: {e}"
                    ));
                    continue;
                }
            };
            let binary = gpuq_binary(s);
            use gpuq_common::config::{GatewayConfig, ManagerConfig, WorkerConfig, startup};
            let section = match binary.as_str() {
                "gpuq-gateway" => startup::load::<GatewayConfig>(&env).map(drop),
                "gpuq-manager" => startup::load::<ManagerConfig>(&env).map(drop),
                "gpuq-worker" => startup::load::<WorkerConfig>(&env).map(drop),
                other => panic!("{name} runs {other}, no gpuq service"),
            };
            if let Err(e) = section {
                errors.push(format!("{name}: {binary} refuses its environment: {e}"));
            }
            let port = gpuq_listen_port(s)
                .unwrap_or_else(|| panic!("{name} runs {binary}, no gpuq service"));
            let health = str_list(s.get("healthcheck").and_then(|h| h.get("test"))).join(" ");
            if !health.contains(&format!("http://127.0.0.1:{port}/healthz")) {
                errors.push(format!(
                    "{name} listens on {port} but its healthcheck is {health:?}"
                ));
            }
            if settings.amqp_url_list().len() < 3 && c.label != "docker-compose.worker.yml" {
                errors.push(format!(
                    "{name} knows {} broker node(s), not all three",
                    settings.amqp_url_list().len()
                ));
            }
            if !settings.store_url.starts_with("mongodb") {
                errors.push(format!(
                    "{name} stores results in {:?}, not MongoDB",
                    settings.store_url
                ));
            }
            if settings.log_format != "json" {
                errors.push(format!(
                    "{name} logs {}: Promtail and Loki want json",
                    settings.log_format
                ));
            }
            if settings.admin_token.is_empty() {
                errors.push(format!("{name} has no admin token"));
            }
            match binary.as_str() {
                "gpuq-gateway" if settings.api_key_list().is_empty() => {
                    errors.push(format!("{name}: the gateway has no API key"))
                }
                "gpuq-manager" if settings.rabbitmq_mgmt_url_list().len() < 3 => errors.push(
                    format!("{name}: the manager reads queue depths from fewer than 3 nodes"),
                ),
                "gpuq-worker" => {
                    if settings.worker_id.is_empty() {
                        errors.push(format!("{name} has no GPUQ_WORKER_ID"));
                    }
                    if settings.manager_url.is_empty() {
                        errors.push(format!("{name} has no GPUQ_MANAGER_URL"));
                    }
                    if c.label != "docker-compose.worker.yml" {
                        let (host, aport, _) = url_endpoints(&settings.worker_admin_url())
                            .into_iter()
                            .next()
                            .unwrap_or_else(|| panic!("{name}: advertise URL"));
                        if service_by_host(&c, &host).map(|(n, _)| n) != Some(name) || aport != port
                        {
                            errors.push(format!(
                                "{name} advertises {} but is {name}:{port}",
                                settings.worker_admin_url()
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        assert_no_errors(&c.label, errors);
    }
}

#[test]
fn workers_have_distinct_ids_restart_always_and_outlast_their_shutdown_grace() {
    for c in all_composes() {
        let mut ids = BTreeSet::new();
        let mut errors = Vec::new();
        for (name, s) in c
            .services
            .iter()
            .filter(|(_, s)| is_gpuq(s) && gpuq_binary(s) == "gpuq-worker")
        {
            let settings = settings_of(s).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !ids.insert(settings.worker_id.clone()) {
                errors.push(format!(
                    "{name}: worker id {} is used twice",
                    settings.worker_id
                ));
            }
            if s.get("restart").map(scalar).as_deref() != Some("always") {
                errors.push(format!("{name}: a worker must restart: always"));
            }
            let grace = s
                .get("stop_grace_period")
                .map(|g| duration_s(&scalar(g)))
                .unwrap_or(10.0);
            if grace <= settings.shutdown_grace_s as f64 + 5.0 {
                errors.push(format!(
                    "{name}: stop_grace_period {grace}s leaves no time past GPUQ_SHUTDOWN_GRACE_S={}",
                    settings.shutdown_grace_s
                ));
            }
        }
        assert_no_errors(&c.label, errors);
    }
}

#[test]
fn secrets_come_from_the_env_file_and_are_not_committed() {
    let mut errors = Vec::new();
    let gitignore = read(".gitignore");
    if !gitignore
        .lines()
        .any(|l| matches!(l.trim(), ".env" | "/.env"))
    {
        errors.push(".gitignore does not list .env".to_string());
    }
    for (file, example) in [
        (".env.example", ".env.example"),
        (
            "deploy/worker-host.env.example",
            "deploy/worker-host.env.example",
        ),
    ] {
        for (k, v) in dotenv(example) {
            if is_secret_name(&k) && !v.is_empty() {
                errors.push(format!(
                    "{file}: {k} holds a value; secrets stay empty in examples"
                ));
            }
        }
    }
    // Every environment value whose name says secret is an interpolation from .env, required.
    for file in [
        "docker-compose.yml",
        "docker-compose.gpu.yml",
        "docker-compose.worker.yml",
    ] {
        let raw: Value = serde_yaml::from_str(&read(file)).unwrap();
        let mut stack = vec![&raw];
        while let Some(v) = stack.pop() {
            match v {
                Value::Mapping(m) => {
                    for (k, v) in m {
                        let secret_key = k.as_str().is_some_and(|k| {
                            is_secret_name(k) || k.ends_with("_PASS") || k == "REDISCLI_AUTH"
                        });
                        if secret_key && !scalar(v).starts_with("${") {
                            errors.push(format!(
                                "{file}: {} is not taken from .env",
                                k.as_str().unwrap()
                            ));
                        }
                        stack.push(v);
                    }
                }
                Value::Sequence(s) => stack.extend(s),
                _ => {}
            }
        }
    }
    assert_no_errors("secrets", errors);
}

#[test]
fn the_env_examples_name_every_variable_the_compose_files_use_and_no_unknown_setting() {
    let mut errors = Vec::new();
    for (files, example) in [
        (
            vec!["docker-compose.yml", "docker-compose.gpu.yml"],
            ".env.example",
        ),
        (
            vec!["docker-compose.worker.yml"],
            "deploy/worker-host.env.example",
        ),
    ] {
        let c = compose(&files, example);
        let known = dotenv(example);
        for r in &c.refs {
            if !known.contains_key(&r.name) {
                errors.push(format!(
                    "{files:?} use ${{{}}}, which {example} does not list",
                    r.name
                ));
            }
            // The one-liner of docs/production.md fills the empty secrets by their names.
            if example == ".env.example" && r.required && !is_secret_name(&r.name) {
                errors.push(format!(
                    "{files:?}: required ${{{}}} is not named like a secret",
                    r.name
                ));
            }
        }
        let unknown = Settings::unknown_env_keys(known.keys());
        if !unknown.is_empty() {
            errors.push(format!("{example}: unknown gpuq settings {unknown:?}"));
        }
    }
    assert_no_errors("env examples", errors);
}

#[test]
fn the_gpu_override_gives_each_worker_its_own_nvidia_gpu() {
    let main = main_compose();
    let gpu = gpu_compose();
    let mut errors = Vec::new();
    let mut devices = BTreeMap::new();
    for (name, _) in main
        .services
        .iter()
        .filter(|(_, s)| is_gpuq(s) && gpuq_binary(s) == "gpuq-worker")
    {
        let s = &gpu.services[name];
        let Some(Value::Sequence(reqs)) = s
            .get("deploy")
            .and_then(|d| d.get("resources"))
            .and_then(|r| r.get("reservations"))
            .and_then(|r| r.get("devices"))
        else {
            errors.push(format!(
                "{name} reserves no device in docker-compose.gpu.yml"
            ));
            continue;
        };
        for req in reqs {
            if req.get("driver").map(scalar).as_deref() != Some("nvidia") {
                errors.push(format!("{name}: device driver is not nvidia"));
            }
            if !str_list(req.get("capabilities")).contains(&"gpu".to_string()) {
                errors.push(format!("{name}: device capabilities lack gpu"));
            }
            if req.get("count").is_some() {
                errors.push(format!(
                    "{name}: count would let workers share GPUs; name device_ids"
                ));
            }
            for id in str_list(req.get("device_ids")) {
                if let Some(other) = devices.insert(id.clone(), name.clone()) {
                    errors.push(format!("GPU {id} goes to both {other} and {name}"));
                }
            }
        }
        let settings = settings_of(s).unwrap_or_else(|e| panic!("{name} with GPUs: {e}"));
        if settings.gpus != "nvml" {
            errors.push(format!("{name} with GPUs runs GPUQ_GPUS={}", settings.gpus));
        }
    }
    assert_no_errors("docker-compose.gpu.yml", errors);
}

// ------------------------------------------------------------------------------------------------
// RabbitMQ

fn rabbitmq_services(c: &Compose) -> Vec<(&String, &Value)> {
    c.services
        .iter()
        .filter(|(_, s)| {
            s.get("image")
                .map(scalar)
                .is_some_and(|i| i.starts_with("rabbitmq:"))
        })
        .collect()
}

#[test]
fn rabbitmq_nodes_form_one_cluster_from_the_mounted_configuration() {
    let c = main_compose();
    let conf = rabbitmq_conf();
    let mut errors = Vec::new();
    let nodes: BTreeSet<String> = conf
        .iter()
        .filter(|(k, _)| k.starts_with("cluster_formation.classic_config.nodes."))
        .map(|(_, v)| v.clone())
        .collect();
    if conf
        .get("cluster_formation.peer_discovery_backend")
        .map(String::as_str)
        != Some("classic_config")
    {
        errors.push("rabbitmq.conf: peer discovery is not classic_config".into());
    }
    let rabbits = rabbitmq_services(&c);
    if rabbits.len() != 3 {
        errors.push(format!("{} RabbitMQ services, want 3", rabbits.len()));
    }
    let mut cookies = BTreeSet::new();
    let mut names = BTreeSet::new();
    let mut data_volumes: BTreeMap<String, String> = BTreeMap::new();
    for (name, s) in &rabbits {
        let env = env_of(s);
        let host = s.get("hostname").map(scalar).unwrap_or_default();
        let node = env
            .get("RABBITMQ_NODENAME")
            .cloned()
            .unwrap_or(format!("rabbit@{host}"));
        if node != format!("rabbit@{host}") {
            errors.push(format!(
                "{name}: node {node} does not match its hostname {host:?}"
            ));
        }
        names.insert(node);
        cookies.insert(
            env.get("RABBITMQ_ERLANG_COOKIE")
                .cloned()
                .unwrap_or_default(),
        );
        for var in ["RABBITMQ_CONFIG_FILE", "RABBITMQ_ENABLED_PLUGINS_FILE"] {
            let path = env.get(var).cloned().unwrap_or_default();
            match resolve(s, &path) {
                Resolved::Repo(p) if p.is_file() => {}
                _ => errors.push(format!(
                    "{name}: {var}={path} is not a file mounted from the repository"
                )),
            }
        }
        if let Resolved::Repo(p) = resolve(
            s,
            &env.get("RABBITMQ_CONFIG_FILE").cloned().unwrap_or_default(),
        ) && !p.ends_with("deploy/rabbitmq/rabbitmq.conf")
        {
            errors.push(format!(
                "{name} reads {} instead of deploy/rabbitmq/rabbitmq.conf",
                p.display()
            ));
        }
        let entry = str_list(s.get("entrypoint"));
        let script = entry
            .iter()
            .find(|a| a.ends_with(".sh"))
            .cloned()
            .unwrap_or_default();
        match resolve(s, &script) {
            Resolved::Repo(p) if p.ends_with("deploy/rabbitmq/gpuq-entrypoint.sh") => {}
            _ => errors.push(format!(
                "{name}: entrypoint {entry:?} is not deploy/rabbitmq/gpuq-entrypoint.sh"
            )),
        }
        let template = shell_var("deploy/rabbitmq/gpuq-entrypoint.sh", "TEMPLATE");
        match resolve(s, &template) {
            Resolved::Repo(p) if p.ends_with("deploy/rabbitmq/definitions.json") => {}
            _ => errors.push(format!("{name}: the entrypoint's template {template} is not deploy/rabbitmq/definitions.json")),
        }
        match resolve(s, "/var/lib/rabbitmq") {
            Resolved::Volume(v) => {
                if let Some(other) = data_volumes.insert(v.clone(), (*name).clone()) {
                    errors.push(format!("{other} and {name} share the data volume {v}"));
                }
            }
            _ => errors.push(format!(
                "{name}: /var/lib/rabbitmq is not on a named volume"
            )),
        }
    }
    if names != nodes {
        errors.push(format!(
            "rabbitmq.conf lists {nodes:?}, compose runs {names:?}"
        ));
    }
    if cookies.len() != 1 || cookies.contains("") {
        errors.push("the RabbitMQ nodes do not share one Erlang cookie".into());
    }
    let rendered = shell_var("deploy/rabbitmq/gpuq-entrypoint.sh", "RENDERED");
    if conf.get("load_definitions") != Some(&rendered) {
        errors.push(format!(
            "rabbitmq.conf loads {:?}, the entrypoint renders {rendered}",
            conf.get("load_definitions")
        ));
    }
    if read("deploy/rabbitmq/enabled_plugins")
        .split(['[', ']', ',', '.', ' ', '\n'])
        .all(|p| p != "rabbitmq_prometheus")
    {
        errors.push("enabled_plugins lacks rabbitmq_prometheus".into());
    }
    // Every gpuq service fails over across all three nodes.
    for (name, s) in c.services.iter().filter(|(_, s)| is_gpuq(s)) {
        let settings = settings_of(s).unwrap();
        let hosts: BTreeSet<String> = settings
            .amqp_url_list()
            .iter()
            .flat_map(|u| url_endpoints(u))
            .filter_map(|(h, _, _)| service_by_host(&c, &h).map(|(n, _)| n.clone()))
            .collect();
        let all: BTreeSet<String> = rabbits.iter().map(|(n, _)| (*n).clone()).collect();
        if hosts != all {
            errors.push(format!(
                "{name} connects to {hosts:?}, not every node {all:?}"
            ));
        }
    }
    assert_no_errors("RabbitMQ cluster", errors);
}

#[test]
fn rabbitmq_consumer_timeout_outlasts_the_longest_job() {
    let conf = rabbitmq_conf();
    let timeout_ms: u64 = conf
        .get("consumer_timeout")
        .expect("rabbitmq.conf sets consumer_timeout")
        .parse()
        .expect("consumer_timeout is a number of milliseconds");
    for c in all_composes() {
        for (name, s) in c
            .services
            .iter()
            .filter(|(_, s)| is_gpuq(s) && gpuq_binary(s) == "gpuq-worker")
        {
            let settings = settings_of(s).unwrap();
            // The job's run time, plus time to take the lease and store the result.
            let need_ms = settings.job_timeout_s * 1000 + 10 * 60 * 1000;
            assert!(
                timeout_ms >= need_ms,
                "{}: {name} runs jobs for up to {} s; consumer_timeout {timeout_ms} ms would \
                 redeliver them mid-run (raise it to at least {need_ms})",
                c.label,
                settings.job_timeout_s
            );
        }
    }
}

#[test]
fn rabbitmq_definitions_give_each_services_user_only_what_it_needs() {
    let defs = json_file("deploy/rabbitmq/definitions.json");
    let c = main_compose();
    let mut errors = Vec::new();
    let users: BTreeMap<String, Vec<String>> = defs["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| {
            let tags = match &u["tags"] {
                serde_json::Value::Array(a) => a
                    .iter()
                    .filter_map(|t| t.as_str())
                    .map(String::from)
                    .collect(),
                serde_json::Value::String(s) => s.split(',').map(String::from).collect(),
                _ => Vec::new(),
            };
            (u["name"].as_str().unwrap().to_string(), tags)
        })
        .collect();
    if users.contains_key("guest") {
        errors.push("definitions create the guest user".into());
    }
    // Passwords: placeholders the entrypoint fills, never a committed hash.
    let script = read("deploy/rabbitmq/gpuq-entrypoint.sh");
    for u in defs["users"].as_array().unwrap() {
        let hash = u["password_hash"].as_str().unwrap_or_default();
        // @<NAME>_HASH@, where NAME is a password the entrypoint hashes (its PASSWORDS).
        let name = hash
            .trim_matches('@')
            .strip_suffix("_HASH")
            .unwrap_or_default();
        let listed = script
            .lines()
            .skip_while(|l| !l.starts_with("PASSWORDS=("))
            .take_while(|l| !l.is_empty())
            .any(|l| l.split([' ', '(', ')']).any(|w| w == name));
        if !(hash.starts_with('@') && hash.ends_with("_HASH@") && !name.is_empty() && listed) {
            errors.push(format!(
                "user {}: password_hash {hash:?} is not a placeholder the entrypoint fills",
                u["name"]
            ));
        }
        if u.get("password").is_some() {
            errors.push(format!("user {} has a clear-text password", u["name"]));
        }
    }
    let perms: BTreeMap<String, [String; 3]> = defs["permissions"]
        .as_array()
        .expect("permissions")
        .iter()
        .filter(|p| p["vhost"] == "/")
        .map(|p| {
            let get = |k: &str| p[k].as_str().unwrap_or_default().to_string();
            (get("user"), [get("configure"), get("write"), get("read")])
        })
        .collect();
    let exchanges: BTreeMap<String, (String, bool)> = defs["exchanges"]
        .as_array()
        .expect("exchanges")
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                (
                    e["type"].as_str().unwrap().to_string(),
                    e["durable"].as_bool().unwrap_or(false),
                ),
            )
        })
        .collect();
    if !defs["vhosts"]
        .as_array()
        .expect("vhosts")
        .iter()
        .any(|v| v["name"] == "/")
    {
        errors.push("definitions declare no vhost /".into());
    }

    for (name, s) in c.services.iter().filter(|(_, s)| is_gpuq(s)) {
        let settings = settings_of(s).unwrap();
        let topo = Topology::from_settings(&settings);
        let mut urls = settings.amqp_url_list();
        for u in &urls {
            if !u.ends_with("/%2f") {
                errors.push(format!("{name}: {u} does not use vhost /"));
            }
        }
        // Only the manager reads the management API (the others keep the default, unused).
        let mgmt = if gpuq_binary(s) == "gpuq-manager" {
            settings.rabbitmq_mgmt_url_list()
        } else {
            Vec::new()
        };
        urls.extend(mgmt.iter().cloned());
        for url in &urls {
            let user = user_of_url(url).unwrap_or_default();
            let Some(tags) = users.get(&user) else {
                errors.push(format!(
                    "{name} logs in as {user:?}, whom the definitions lack"
                ));
                continue;
            };
            if mgmt.contains(url)
                && !tags
                    .iter()
                    .any(|t| matches!(t.as_str(), "management" | "monitoring" | "administrator"))
            {
                errors.push(format!(
                    "{name} reads the management API as {user}, who lacks a management tag"
                ));
            }
            if tags.iter().any(|t| t == "administrator") {
                errors.push(format!(
                    "{name} logs in as administrator {user}: use the gpuq user"
                ));
            }
            let binary = gpuq_binary(s);
            if user != binary {
                errors.push(format!(
                    "{name} logs in as {user}: each service has its own user, {binary}"
                ));
            }
            let Some(p) = perms.get(&user) else {
                errors.push(format!("{user} has no permissions on vhost /"));
                continue;
            };
            for (perm, resource, allowed) in
                broker_needs(&binary, &topo, &settings.worker_pool_list())
            {
                let kind = ["configure", "write", "read"][perm];
                let granted = regex::Regex::new(&p[perm])
                    .map(|r| r.is_match(&resource))
                    .unwrap_or(false);
                if granted != allowed {
                    errors.push(format!(
                        "{user} ({kind} {:?}) {} {kind} {resource}; it must {}",
                        p[perm],
                        if granted { "may" } else { "may not" },
                        if allowed { "be allowed" } else { "be refused" }
                    ));
                }
            }
        }
        for (exchange, kind) in [
            (topo.jobs_exchange(), "direct"),
            (topo.dead_letter_exchange(), "fanout"),
        ] {
            match exchanges.get(&exchange) {
                Some((k, true)) if k == kind => {}
                other => errors.push(format!(
                    "exchange {exchange}: definitions say {other:?}, gpuq declares a durable {kind}"
                )),
            }
        }
        // Queues are left to the services (declared once all three nodes run, so with three
        // replicas); any queue the definitions do declare must match what the services declare.
        for q in defs["queues"].as_array().into_iter().flatten() {
            let qname = q["name"].as_str().unwrap_or_default();
            let want = if qname == topo.dead_queue() {
                BTreeMap::from([("x-queue-type".to_string(), serde_json::json!("quorum"))])
            } else if let Some(pool) = qname.strip_prefix(&format!("{}.jobs.", topo.prefix)) {
                let _ = pool;
                topo.pool_queue_args()
                    .inner()
                    .iter()
                    .map(|(k, v)| {
                        let v = match v {
                            AMQPValue::LongString(s) => {
                                serde_json::json!(String::from_utf8_lossy(s.as_bytes()))
                            }
                            AMQPValue::LongInt(i) => serde_json::json!(i),
                            AMQPValue::LongLongInt(i) => serde_json::json!(i),
                            other => serde_json::json!(format!("{other:?}")),
                        };
                        (k.to_string(), v)
                    })
                    .collect()
            } else {
                errors.push(format!(
                    "definitions declare queue {qname}, which gpuq does not use"
                ));
                continue;
            };
            let got: BTreeMap<String, serde_json::Value> = q["arguments"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default();
            if got != want {
                errors.push(format!(
                    "queue {qname}: definitions {got:?}, the services declare {want:?}"
                ));
            }
        }
    }
    assert_no_errors("deploy/rabbitmq/definitions.json", errors);
}

/// Least privilege in Redis: each gpuq service logs in as its own ACL user, which the redis
/// service defines (`--user …`) with gpuq's keys and channels only and nothing of @dangerous.
#[test]
fn redis_gives_each_service_a_user_with_gpuq_keys_only_and_no_dangerous_command() {
    let c = main_compose();
    let mut errors = Vec::new();
    let command = str_list(c.services.get("redis").expect("redis").get("command"));
    // `--user NAME RULE…`: every word up to the next `--option` (Redis reads an argument with
    // spaces as one word, so each rule is an argument of its own).
    let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut args = command.iter().peekable();
    while let Some(arg) = args.next() {
        if arg != "--user" {
            continue;
        }
        let mut words = vec![];
        while let Some(w) = args.next_if(|w| !w.starts_with("--")) {
            if w.contains(' ') {
                errors.push(format!(
                    "redis: {w:?} holds a space (Redis reads it as one word)"
                ));
            }
            words.push(w.clone());
        }
        if let Some((name, rules)) = words.split_first() {
            users.insert(name.clone(), rules.to_vec());
        }
    }
    for (name, s) in c.services.iter().filter(|(_, s)| is_gpuq(s)) {
        let settings = settings_of(s).unwrap();
        let binary = gpuq_binary(s);
        let user = user_of_url(&settings.redis_url).unwrap_or_default();
        if user != binary {
            errors.push(format!(
                "{name} logs in to Redis as {user:?}: each service has its own user, {binary}"
            ));
        }
        let Some(rules) = users.get(&user) else {
            errors.push(format!("{name}: redis defines no user {user:?}"));
            continue;
        };
        let has = |w: &str| rules.iter().any(|r| r == w);
        for want in ["on", "~gpuq:*", "resetchannels", "&gpuq:*", "-@all"] {
            if !has(want) {
                errors.push(format!("{user}: the rules lack {want}: {rules:?}"));
            }
        }
        if rules.last().map(String::as_str) != Some("-@dangerous") {
            errors.push(format!(
                "{user}: the rules must end with -@dangerous: {rules:?}"
            ));
        }
        for r in rules {
            let broad = (r.starts_with('~') || r.starts_with('%')) && !r.ends_with("gpuq:*")
                || (r.starts_with('&') && r != "&gpuq:*")
                || matches!(
                    r.as_str(),
                    "allkeys" | "allchannels" | "allcommands" | "nopass"
                )
                || (r.starts_with("+@") && r != "+@connection");
            if broad {
                errors.push(format!("{user}: {r} reaches beyond what it needs"));
            }
        }
        if !rules.iter().any(|r| r.starts_with('>')) {
            errors.push(format!("{user} has no password"));
        }
    }
    assert_no_errors("the redis service's users", errors);
}

// ------------------------------------------------------------------------------------------------
// Observability configs, as mounted

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
    // the host). The scrape paths are checked against this mount in tests/e2e/monitoring.rs.
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

// ------------------------------------------------------------------------------------------------
// The image

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            if !cur.trim().is_empty() {
                out.push(cur.trim().to_string());
            }
            cur.clear();
        }
    }
    out
}

fn workspace_members() -> Vec<String> {
    let toml = read("Cargo.toml");
    let start = toml.find("members").expect("workspace members");
    let list = &toml[start..toml[start..].find(']').map(|e| start + e).unwrap()];
    list.split('"')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

fn binaries_of(member: &str) -> Vec<String> {
    let manifest = read(&format!("{member}/Cargo.toml"));
    let mut bins = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(v) = line.strip_prefix("name") {
            bins.push(
                v.trim_start_matches([' ', '='])
                    .trim()
                    .trim_matches('"')
                    .to_string(),
            );
        }
    }
    bins
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_with_a_healthcheck_and_pinned_bases() {
    let lines = dockerfile();
    let mut errors = Vec::new();
    let mut stages = Vec::new();
    let mut last_stage_start = 0;
    // The ARGs before the first FROM, with their defaults: what a user's build takes.
    let args: Vec<(String, String)> = lines
        .iter()
        .take_while(|l| !l.starts_with("FROM "))
        .filter_map(|l| l.strip_prefix("ARG ")?.split_once('='))
        .map(|(k, v)| (format!("${{{k}}}"), v.to_string()))
        .collect();
    for (i, l) in lines.iter().enumerate() {
        let Some(rest) = l.strip_prefix("FROM ") else {
            continue;
        };
        last_stage_start = i;
        let words: Vec<&str> = rest
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let image = args
            .iter()
            .fold(words[0].to_string(), |w, (k, v)| w.replace(k, v));
        let image = image.as_str();
        if image == "scratch" {
            if let Some(p) = words.iter().position(|w| w.eq_ignore_ascii_case("AS")) {
                stages.push(words[p + 1].to_string());
            }
            continue;
        }
        if let Some(alias) = words
            .iter()
            .position(|w| w.eq_ignore_ascii_case("AS"))
            .map(|p| words[p + 1])
        {
            stages.push(alias.to_string());
        }
        if stages.iter().any(|s| s == image) || image.contains('@') {
            continue;
        }
        match image.rsplit_once(':') {
            Some((_, tag)) if tag != "latest" && tag.chars().any(|c| c.is_ascii_digit()) => {}
            _ => errors.push(format!("FROM {image} is not pinned to a version")),
        }
    }
    if stages.len() < 2 {
        errors.push(format!(
            "{} named stage(s): the image is not multi-stage",
            stages.len()
        ));
    }
    let last = &lines[last_stage_start..];
    match last.iter().rev().find_map(|l| l.strip_prefix("USER ")) {
        Some(user) if !matches!(user.split(':').next().unwrap().trim(), "root" | "0") => {}
        other => errors.push(format!(
            "the runtime stage runs as {other:?}, not an unprivileged user"
        )),
    }
    match last.iter().find(|l| l.starts_with("HEALTHCHECK ")) {
        Some(h) if h.contains("/healthz") => {}
        other => errors.push(format!("the runtime stage's HEALTHCHECK is {other:?}")),
    }
    if !last
        .iter()
        .any(|l| l.starts_with("LABEL ") && l.contains("org.opencontainers.image"))
    {
        errors.push("the runtime stage has no OCI labels".into());
    }
    assert_no_errors("deploy/Dockerfile", errors);
}

#[test]
fn the_dockerfile_caches_dependencies_for_every_member_and_installs_every_binary() {
    let lines = dockerfile();
    let text = lines.join("\n");
    let mut errors = Vec::new();
    let first_run = lines
        .iter()
        .position(|l| l.starts_with("RUN "))
        .expect("a RUN");
    let dep_copies: Vec<&String> = lines[..first_run]
        .iter()
        .filter(|l| l.starts_with("COPY "))
        .collect();
    let copied = |path: &str| {
        dep_copies
            .iter()
            .any(|l| l.split_whitespace().any(|w| w == path))
    };
    for path in ["Cargo.toml", "Cargo.lock"] {
        if !copied(path) {
            errors.push(format!("the dependency layer does not copy {path}"));
        }
    }
    let mut binaries = BTreeSet::new();
    for member in workspace_members() {
        if !copied(&format!("{member}/Cargo.toml")) {
            errors.push(format!(
                "the dependency layer does not copy {member}/Cargo.toml"
            ));
        }
        binaries.extend(binaries_of(&member));
    }
    if lines[first_run..]
        .iter()
        .filter(|l| l.contains("cargo build --release --locked --bins"))
        .count()
        < 2
    {
        errors.push(
            "want `cargo build --release --locked --bins` for the dependencies and for gpuq".into(),
        );
    }
    for bin in ["gpuq-gateway", "gpuq-worker", "gpuq-manager", "gpuq"] {
        if !binaries.contains(bin) {
            errors.push(format!("no workspace member builds {bin}"));
        }
    }
    for bin in &binaries {
        if !text.contains(&format!("target/release/{bin} "))
            && !text.contains(&format!("target/release/{bin}\n"))
        {
            errors.push(format!("the image does not take {bin} from the build"));
        }
    }
    // The runtime takes /out of the `binaries` stage, which is the builder's unless
    // BINARIES=host (scripts/compose.sh) says otherwise.
    if !text.contains("COPY --from=binaries /out/ /usr/local/bin/")
        || !text.contains("ARG BINARIES=source")
        || !text.contains("FROM builder AS binaries-source")
        || !text.contains("FROM binaries-${BINARIES} AS binaries")
    {
        errors.push("the builder's binaries do not land in /usr/local/bin by default".into());
    }
    assert_no_errors("deploy/Dockerfile", errors);
}

#[test]
fn the_dockerignore_lets_in_everything_the_dockerfile_copies_and_nothing_secret() {
    let rules: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    assert_eq!(
        rules.first().map(String::as_str),
        Some("*"),
        ".dockerignore should start by excluding everything"
    );
    let allowed: Vec<&str> = rules.iter().filter_map(|r| r.strip_prefix('!')).collect();
    let mut errors = Vec::new();
    for l in dockerfile()
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = l
            .split_whitespace()
            .skip(1)
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in &words[..words.len() - 1] {
            let ok = allowed.iter().any(|a| {
                let a = a.trim_end_matches('/');
                *src == a || src.starts_with(&format!("{a}/"))
            });
            if !ok {
                errors.push(format!(
                    "COPY {src}: .dockerignore keeps it out of the build context"
                ));
            }
        }
    }
    for a in &allowed {
        if a.contains(".env") {
            errors.push(format!(".dockerignore lets in {a}"));
        }
    }
    assert_no_errors(".dockerignore", errors);
}

// ------------------------------------------------------------------------------------------------
// The test's own helpers

#[test]
fn the_helpers_read_durations_urls_and_prefixes() {
    assert_eq!(duration_s("1m30s"), 90.0);
    assert_eq!(duration_s("500ms"), 0.5);
    assert_eq!(
        url_endpoints("amqp://u:p@r1:5672/%2f,http://m:8090")
            .into_iter()
            .map(|(h, p, _)| (h, p))
            .collect::<Vec<_>>(),
        vec![("r1".to_string(), 5672), ("m".to_string(), 8090)]
    );
}
