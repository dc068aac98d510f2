//! Static checks of docker-compose.tls.yml (issue 16): merged onto docker-compose.yml by Compose
//! itself (`docker compose config`), it keeps every URL but its scheme, gives every service the
//! TLS files that `scripts/compose.sh init --tls` makes (scripts/compose-tls.sh), and turns
//! plaintext off on RabbitMQ, Redis and MongoDB.

use std::collections::BTreeMap;

use gpuq_common::config::{Common, GatewayConfig};
use serde_yaml::Value;

use crate::deploy::{compose, env_of, is_gpuq, mounts, read, settings_of, str_list};

fn tls_compose() -> crate::deploy::Compose {
    compose(
        &["docker-compose.yml", "docker-compose.tls.yml"],
        ".env.example",
    )
}

/// The files compose-tls.sh makes in .tls/: the CA, SERVICE.pem and SERVICE.key for each of its
/// services, mongod's key file and Prometheus's configuration.
fn files_made_by_init() -> Vec<String> {
    let script = read("scripts/compose-tls.sh");
    let services = script
        .lines()
        .find_map(|l| l.strip_prefix("TLS_SERVICES=("))
        .and_then(|l| l.strip_suffix(')'))
        .expect("compose-tls.sh lists TLS_SERVICES");
    let mut files = vec![
        "ca.pem".into(),
        "mongodb-key.pem".into(),
        "prometheus.yml".into(),
    ];
    for s in services.split_whitespace() {
        files.extend([format!("{s}.pem"), format!("{s}.key")]);
    }
    files
}

/// `(container path → ./.tls/ file)` of a service's mounts from .tls/.
fn tls_mounts(service: &Value) -> BTreeMap<String, String> {
    mounts(service)
        .into_iter()
        .filter_map(|(src, tgt, _)| Some((tgt, src.strip_prefix("./.tls/")?.to_string())))
        .collect()
}

#[test]
fn the_tls_override_keeps_every_url_of_the_compose_file_but_its_scheme() {
    let plain = compose(&["docker-compose.yml"], ".env.example");
    let tls = tls_compose();
    let mut checked = 0;
    for (name, service) in plain.services.iter().filter(|(_, s)| is_gpuq(s)) {
        let before = env_of(service);
        let after = env_of(&tls.services[name]);
        for (key, value) in &before {
            let expected = match key.as_str() {
                "GPUQ_AMQP_URLS" => value.replace("amqp://", "amqps://"),
                "GPUQ_REDIS_URL" => value.replacen("redis://", "rediss://", 1),
                "GPUQ_STORE_URL" => format!("{value}&tls=true"),
                "GPUQ_MANAGER_URL" | "GPUQ_WORKER_ADVERTISE_URL" => {
                    value.replacen("http://", "https://", 1)
                }
                _ => value.clone(),
            };
            assert_eq!(after.get(key), Some(&expected), "{name}: {key}");
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} settings compared");
}

#[test]
fn every_gpuq_service_serves_https_with_its_own_certificate_and_trusts_the_ca() {
    let c = tls_compose();
    let made = files_made_by_init();
    for (name, service) in c.services.iter().filter(|(_, s)| is_gpuq(s)) {
        let settings = settings_of(service).unwrap_or_else(|e| panic!("{name}: {e}"));
        let common = Common::from_settings(&settings).unwrap();
        let (cert, key) = common.tls.server.clone().expect("HTTPS");
        let ca = common.tls.ca_file.clone().expect("a CA file");
        assert!(
            common
                .store_url
                .ends_with("&tls=true&tlsCAFile=/etc/gpuq/tls/ca.pem")
        );
        let files = tls_mounts(service);
        for path in [&cert, &key, &ca] {
            let file = files
                .get(path.to_str().unwrap())
                .unwrap_or_else(|| panic!("{name}: {} is not mounted from .tls/", path.display()));
            assert!(made.contains(file), "{name}: init --tls makes no {file}");
        }
        assert_eq!(
            files[cert.to_str().unwrap()],
            format!("{name}.pem"),
            "{name}"
        );
        let health = str_list(service.get("healthcheck").and_then(|h| h.get("test"))).join(" ");
        assert!(
            health.contains("--cacert /etc/gpuq/tls/ca.pem https://localhost:"),
            "{name}: {health}"
        );
    }
    GatewayConfig::from_settings(&settings_of(&c.services["gateway"]).unwrap()).unwrap();
}

#[test]
fn redis_mongodb_and_rabbitmq_take_tls_in_place_of_plaintext() {
    let c = tls_compose();
    let made = files_made_by_init();
    let redis = str_list(c.services["redis"].get("command")).join(" ");
    assert!(redis.contains("--port 0 --tls-port 6379"), "{redis}");
    // The plain command whole (its ACL users included), then TLS.
    let plain = compose(&["docker-compose.yml"], ".env.example");
    let plain_redis = str_list(plain.services["redis"].get("command")).join(" ");
    assert!(redis.starts_with(&plain_redis), "{plain_redis}\n{redis}");
    let mongo = str_list(c.services["mongodb"].get("command")).join(" ");
    assert!(mongo.contains("--tlsMode requireTLS"), "{mongo}");
    for name in ["redis", "mongodb", "rabbitmq1", "rabbitmq2", "rabbitmq3"] {
        let service = &c.services[name];
        let files = tls_mounts(service);
        assert_eq!(
            files.get("/etc/gpuq/tls/ca.pem").map(String::as_str),
            Some("ca.pem")
        );
        assert!(
            files.values().all(|f| made.contains(f)),
            "{name}: {files:?}"
        );
        let health = str_list(service.get("healthcheck").and_then(|h| h.get("test"))).join(" ");
        if name != "rabbitmq1" && name != "rabbitmq2" && name != "rabbitmq3" {
            assert!(health.contains("--tls"), "{name}: {health}");
        } else {
            assert_eq!(files["/etc/gpuq/tls/server.pem"], format!("{name}.pem"));
            let conf = mounts(service)
                .into_iter()
                .find(|(_, tgt, _)| tgt.starts_with("/etc/rabbitmq/conf.d/"))
                .unwrap_or_else(|| panic!("{name}: no conf.d file"));
            assert_eq!(conf.0, "./deploy/rabbitmq/tls.conf");
        }
    }
    let conf = read("deploy/rabbitmq/tls.conf");
    for line in [
        "listeners.tcp = none",
        "listeners.ssl.default = 5672",
        "ssl_options.certfile = /etc/gpuq/tls/server.pem",
        "ssl_options.keyfile = /etc/gpuq/tls/server.key",
        "ssl_options.cacertfile = /etc/gpuq/tls/ca.pem",
    ] {
        assert!(
            conf.lines().any(|l| l.trim() == line),
            "tls.conf lacks {line:?}"
        );
    }
}
