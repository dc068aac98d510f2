//! Least privilege in the suites: each service of a stack logs in to RabbitMQ and Redis as its
//! own user (`scripts/stack.sh credentials`, exported by `scripts/test.sh` as
//! `GPUQ_TEST_AMQP_URLS_<SERVICE>`, `GPUQ_TEST_REDIS_URL_<SERVICE>` and the manager's
//! `GPUQ_TEST_RABBITMQ_MGMT_URLS_MANAGER`). Without them the services get the admin URLs. The
//! harness itself (queue depths, cleanup) and the tests' own checks keep the admin URLs.

use std::collections::BTreeMap;

use gpuq_common::Settings;
use gpuq_common::topology::Topology;

use crate::env::admin_amqp_urls;

/// The services that have users of their own.
pub const SERVICES: [&str; 3] = ["gateway", "worker", "manager"];

/// `GPUQ_TEST_<what>_<SERVICE>`, e.g. `service_var("AMQP_URLS", "gateway")`.
pub fn service_var(what: &str, service: &str) -> String {
    format!("GPUQ_TEST_{what}_{}", service.to_ascii_uppercase())
}

/// The environment that makes `service` log in as its own users, as far as `scripts/test.sh`
/// provides them (appended after the base environment, so it wins).
pub fn service_env(service: &str) -> Vec<(String, String)> {
    let mut env = vec![];
    for (what, var) in [
        ("AMQP_URLS", "GPUQ_AMQP_URLS"),
        ("REDIS_URL", "GPUQ_REDIS_URL"),
        ("RABBITMQ_MGMT_URLS", "GPUQ_RABBITMQ_MGMT_URLS"),
    ] {
        if let Ok(v) = std::env::var(service_var(what, service)) {
            env.push((var.to_string(), v));
        }
    }
    env
}

/// True when the services run as their own users.
pub fn least_privilege() -> bool {
    SERVICES
        .iter()
        .any(|s| std::env::var(service_var("AMQP_URLS", s)).is_ok())
}

/// A per-service URL a test needs: panics, naming where it comes from, when it is missing.
pub fn required_service_url(what: &str, service: &str) -> String {
    let var = service_var(what, service);
    std::env::var(&var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: scripts/test.sh exports it from `scripts/stack.sh credentials` \
             (the {service}'s own user); export it likewise to run this test by hand"
        )
    })
}

/// Declares a stack's exchanges, dead queue and `default` pool queue as the admin, as an
/// operator provisions them (compose: deploy/rabbitmq/definitions.json). Under least privilege
/// only a pool's workers may create its queue (RabbitMQ asks for read on a queue declared with a
/// dead-letter exchange), so a stack without workers would have nowhere to put jobs. `env` is
/// the stack's base environment: the queues get the arguments the services declare them with.
/// Nothing to do when the services run as the admin (they declare it all themselves).
pub async fn provision_topology(env: &[(String, String)]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if !least_privilege() {
        return Ok(());
    }
    provision(env)
        .await
        .context("provisioning the stack's queues as the admin")
}

async fn provision(env: &[(String, String)]) -> anyhow::Result<()> {
    let map: BTreeMap<String, String> = env.iter().cloned().collect();
    let settings = Settings::from_sources(&map)?;
    let topology = Topology::from_settings(&settings);
    let urls = admin_amqp_urls();
    let (conn, _) = gpuq_common::amqp::connect_any(&urls, "gpuq-e2e-provision").await?;
    let ch = conn.create_channel().await?;
    topology.declare(&ch, &["default".to_string()]).await?;
    let _ = conn.close(200, "OK".into()).await;
    Ok(())
}
