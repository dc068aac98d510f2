//! RabbitMQ in compose: one cluster from the mounted configuration, a consumer timeout
//! above the longest job, and a least-privilege user for each service.

// Test scenarios read as one story from top to bottom: exempt from the workspace's
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

use gpuq_common::topology::Topology;
use lapin::types::AMQPValue;

use super::*;

/// `key = value` lines of rabbitmq.conf.
fn rabbitmq_conf() -> BTreeMap<String, String> {
    key_values("deploy/rabbitmq/rabbitmq.conf")
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
