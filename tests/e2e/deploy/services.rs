//! The compose files' services: the names and ports one service gives another, published
//! ports, mounted files, healthchecks and restart policies, dependencies, pinned images.

use super::*;

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
