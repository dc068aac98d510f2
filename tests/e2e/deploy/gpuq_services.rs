//! The gpuq services in compose: an environment their config loader accepts, distinct
//! workers, secrets from the env file, the env examples, the GPU override.

use super::*;

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
