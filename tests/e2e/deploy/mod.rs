//! Static checks of the production shape (issue 6): docker-compose.yml with its GPU override,
//! docker-compose.worker.yml, the .env examples, deploy/Dockerfile, the RabbitMQ configuration
//! and the observability configs that compose mounts. No Docker engine is needed: the files are
//! parsed, compose's `${VAR}` interpolation is applied with the example values, and the
//! environment of every gpuq service goes through the real config loader. The tools
//! (`docker compose config`, hadolint, a throwaway RabbitMQ node) run in scripts/checks/compose.sh.

//!
//! One file per theme: the compose services, the gpuq services' configuration, RabbitMQ, Redis,
//! the observability mounts and the image. The readers of the files and of a compose project,
//! which they share, are here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use gpuq_common::Settings;
use serde_yaml::Value;

mod gpuq_services;
mod image;
mod observability_mounts;
mod rabbitmq;
mod redis;
mod services;

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

/// `key = value` lines of a file in the repository (comments and blank lines skipped, both
/// sides trimmed): rabbitmq.conf, env files.
fn key_values(rel: &str) -> BTreeMap<String, String> {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{rel}: {l:?} is not KEY=VALUE"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// KEY=VALUE lines of an env file, quotes around a value removed.
fn dotenv(rel: &str) -> BTreeMap<String, String> {
    key_values(rel)
        .into_iter()
        .map(|(k, v)| {
            let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some(unquoted) => unquoted.to_string(),
                None => v,
            };
            (k, v)
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
