//! The production shape with TLS on every connection, live: `docker-compose.yml` with
//! `docker-compose.tls.yml` (`scripts/compose.sh init --tls`) on the stand-in images, driven
//! through its published ports with the CA that `init --tls` made. `#[ignore]`d in the main
//! pass; scripts/test.sh's compose phase runs them after `compose::`'s tests, on a fresh stack
//! made from the same env file with TLS on (`down -v`, `init --tls`, `up --local-images`). By
//! hand:
//!
//!   scripts/compose.sh init --tls && scripts/compose.sh up --local-images
//!   cargo nextest run --workspace -E 'test(/^compose_tls::/)' --run-ignored only

use std::path::Path;
use std::time::{Duration, Instant};

use gpuq_common::tls::{Trust, http_client_builder_trusting};
use serde_json::{Value, json};

use crate::compose::ComposeStack;
use crate::tls::{host_port, plaintext_answer};

/// The stack of `.dev/compose.env`, which must be the TLS shape, reached trusting its CA.
fn tls_stack() -> (ComposeStack, Trust) {
    let mut stack = ComposeStack::load();
    let ca = stack
        .env
        .get("GPUQ_TLS_CA_FILE")
        .expect("the compose stack runs without TLS: scripts/compose.sh init --tls, then up");
    let trust = Trust::with_ca_file(Path::new(ca)).expect("the CA of init --tls");
    stack.http = http_client_builder_trusting(&trust)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    (stack, trust)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the TLS compose stack: run by scripts/test.sh's compose phase"]
async fn a_job_submitted_over_https_with_the_generated_ca_succeeds_and_plain_http_gets_no_answer() {
    let (stack, trust) = tls_stack();
    let gateway = stack.get("GPUQ_GATEWAY_URL").to_string();
    assert!(gateway.starts_with("https://"), "{gateway}");

    // Every service answers HTTPS with a certificate of the generated CA, and only with it.
    let trusting = http_client_builder_trusting(&trust).build().unwrap();
    let untrusting = http_client_builder_trusting(&Trust::default())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut services = vec![gateway.clone(), stack.get("GPUQ_MANAGER_URL").to_string()];
    services.extend(stack.worker_urls());
    for url in &services {
        let ok = trusting.get(format!("{url}/healthz")).send().await;
        assert!(ok.is_ok_and(|r| r.status().is_success()), "{url}/healthz");
        let e = untrusting.get(format!("{url}/healthz")).send().await;
        assert!(
            e.is_err_and(|e| e.is_connect()),
            "{url}: trusted without the CA"
        );
        let answer =
            plaintext_answer(&host_port(url), b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert!(
            !answer.starts_with(b"HTTP/"),
            "{url}: plain HTTP answered {answer:?}"
        );
    }

    // A job: HTTPS in, AMQPS to a worker, its lease in Redis over TLS, its record in MongoDB
    // over TLS, and back out over HTTPS.
    let t0 = Instant::now();
    let id = stack
        .submit(&json!({"kind": "simulate", "params": {"duration_ms": 200}}))
        .await;
    let deadline = t0 + Duration::from_secs(90);
    let record = loop {
        let r: Value = trusting
            .get(format!("{gateway}/v1/jobs/{id}"))
            .bearer_auth(stack.get("GPUQ_API_KEY"))
            .send()
            .await
            .expect("the gateway answers over HTTPS")
            .json()
            .await
            .expect("a JSON record");
        if !matches!(r["status"].as_str(), Some("queued" | "running")) {
            break r;
        }
        assert!(Instant::now() < deadline, "job {id} not done in 90 s: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(record["status"], "succeeded", "{record}");
    eprintln!(
        "submit to succeeded over TLS: {} ms",
        t0.elapsed().as_millis()
    );

    let mongo = mongodb::Client::with_uri_str(stack.get("GPUQ_COMPOSE_MONGODB_URL"))
        .await
        .unwrap();
    let stored = mongo
        .database("gpuq")
        .collection::<mongodb::bson::Document>("jobs")
        .find_one(mongodb::bson::doc! { "_id": id.to_string() })
        .await
        .expect("MongoDB answers over TLS with the CA")
        .expect("the job is stored");
    assert_eq!(stored.get_str("status"), Ok("succeeded"), "{stored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the TLS compose stack: run by scripts/test.sh's compose phase"]
async fn rabbitmq_redis_and_mongodb_serve_only_tls_and_every_service_connects_over_it() {
    let (stack, trust) = tls_stack();

    // RabbitMQ: every client connection of the cluster is TLS, and the services' own users hold
    // them; a plaintext AMQP client on the AMQP port gets no AMQP answer.
    let connections = stack
        .rabbitmq("/connections")
        .await
        .expect("the management API answers");
    let connections = connections.as_array().expect("a list");
    let users: Vec<&str> = connections
        .iter()
        .filter_map(|c| c["user"].as_str())
        .collect();
    for user in ["gpuq-gateway", "gpuq-manager", "gpuq-worker"] {
        assert!(users.contains(&user), "no connection of {user}: {users:?}");
    }
    for c in connections {
        assert_eq!(c["ssl"], true, "a plaintext AMQP connection: {c}");
    }
    let amqps = stack.get("GPUQ_COMPOSE_AMQP_URL").to_string();
    assert!(amqps.starts_with("amqps://"), "{amqps}");
    gpuq_common::amqp::connect_any_trusting(std::slice::from_ref(&amqps), "gpuq-e2e-tls", &trust)
        .await
        .expect("AMQP over TLS with the CA");
    let plain = amqps.replacen("amqps://", "amqp://", 1);
    let refused = gpuq_common::amqp::connect_any(std::slice::from_ref(&plain), "gpuq-e2e-plain");
    assert!(
        refused.await.is_err(),
        "{plain}: a plaintext AMQP connection opened"
    );
    let answer = plaintext_answer(&host_port(&amqps), b"AMQP\x00\x00\x09\x01").await;
    assert!(
        answer.is_empty() || answer[0] == 21,
        "plaintext AMQP answered {answer:?}"
    );

    // Redis listens on TLS only: the services' ACL users are connected, so over TLS.
    let rediss = stack.get("GPUQ_COMPOSE_REDIS_URL").to_string();
    assert!(rediss.starts_with("rediss://"), "{rediss}");
    let client = gpuq_common::coord::conn::client_trusting(&rediss, &trust).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .unwrap();
    for user in ["gpuq-gateway", "gpuq-manager", "gpuq-worker"] {
        assert!(
            list.contains(&format!(" user={user} ")),
            "{user} is not connected:\n{list}"
        );
    }
    let answer = plaintext_answer(&host_port(&rediss), b"PING\r\n").await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("PONG"),
        "plaintext PING answered"
    );

    // MongoDB: TLS with the CA works (the other test reads a job through it); plaintext is
    // refused.
    let tls_url = stack.get("GPUQ_COMPOSE_MONGODB_URL").to_string();
    let plain =
        tls_url.split("&tls=").next().unwrap().to_string() + "&serverSelectionTimeoutMS=3000";
    let plain = mongodb::Client::with_uri_str(&plain).await.unwrap();
    let ping = plain
        .database("gpuq")
        .run_command(mongodb::bson::doc! {"ping": 1})
        .await;
    assert!(ping.is_err(), "MongoDB answered a plaintext client");
}
