//! TLS end to end on the native stack's TLS listeners (scripts/stack.sh: AMQPS on 5681-5683,
//! Redis TLS on 6380, its dev CA; scripts/test.sh names them in `GPUQ_TEST_TLS_CA`,
//! `GPUQ_TEST_AMQPS_URLS`, `GPUQ_TEST_REDISS_URL`): the gateway, manager and workers serve HTTPS
//! with the stack's certificate and reach the broker and Redis only over TLS.

use std::time::Duration;

use gpuq_common::JobStatus;
use gpuq_common::tls::{Trust, http_client_builder_trusting};
use gpuq_e2e::{Stack, StackOptions, test_env, test_tls};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a server answers a plaintext client that writes `hello` on `addr`, until it closes the
/// connection or 3 s pass.
pub(crate) async fn plaintext_answer(addr: &str, hello: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{addr}: {e}"));
    let _ = s.write_all(hello).await;
    let mut answer = vec![];
    let mut buf = [0u8; 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    answer
}

/// `host:port` of a URL like `amqps://user:pass@127.0.0.1:5681/%2f`.
pub(crate) fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_string()
}

#[tokio::test]
async fn tls_jobs_flow_over_amqps_and_rediss_and_the_services_serve_https_with_the_stack_ca() {
    let tls = test_tls();
    let amqps = test_env("GPUQ_TEST_AMQPS_URLS");
    let rediss = test_env("GPUQ_TEST_REDISS_URL");
    let stack = Stack::start_healthy(StackOptions {
        https: true,
        env: vec![
            ("GPUQ_AMQP_URLS".into(), amqps.clone()),
            ("GPUQ_REDIS_URL".into(), rediss.clone()),
        ],
        ..StackOptions::default()
    })
    .await;
    assert!(stack.gateway_url.starts_with("https://"));

    // Jobs: HTTPS to the gateway, AMQPS to the workers, leases and results through Redis TLS.
    let mut ids = vec![];
    for i in 0..6 {
        ids.push(
            stack
                .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 50 + i}}))
                .await
                .unwrap(),
        );
    }
    for id in &ids {
        let r = stack
            .wait_one(*id, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("job {id}: {e}"));
        assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    }
    stack.assert_each_started_once(ids.len()).await;
    // Every service connected to the broker through an amqps:// node.
    for service in ["gateway", "manager", "worker-1"] {
        let connected: Vec<String> = stack
            .log_lines(service)
            .into_iter()
            .filter(|l| l.contains("connected to broker"))
            .collect();
        assert!(
            !connected.is_empty() && connected.iter().all(|l| l.contains("amqps://")),
            "{service}: {connected:?}"
        );
    }

    // The CLI over HTTPS with the CA (GPUQ_TLS_CA_FILE), and the manager calling a worker's
    // HTTPS admin URL (a GPU fault, proxied).
    let out = stack.cli_ok(&["engines"]).await;
    assert!(out.contains("worker-1"), "{out}");
    let manager = stack.manager_client();
    let gpu = manager.gpu_fault("worker-1", 0, "overheat").await.unwrap();
    assert_eq!(gpu["index"], 0, "{gpu}");
    manager.gpu_fault("worker-1", 0, "clear").await.unwrap();

    // Without the CA the client refuses the services' certificate.
    let untrusting = http_client_builder_trusting(&Trust::default())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let e = untrusting
        .get(format!("{}/healthz", stack.gateway_url))
        .send()
        .await
        .expect_err("the stack's certificate is trusted without its CA");
    assert!(e.is_connect(), "{e:?}");
    let trusting = http_client_builder_trusting(&Trust::with_ca_file(&tls.ca).unwrap())
        .build()
        .unwrap();
    let ok = trusting
        .get(format!("{}/healthz", stack.gateway_url))
        .send()
        .await
        .unwrap();
    assert!(ok.status().is_success());
    // Plain HTTP on the gateway's HTTPS port gets no HTTP answer.
    let gateway = host_port(&stack.gateway_url);
    let answer = plaintext_answer(&gateway, b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");

    // Plaintext clients on the broker's and Redis's TLS ports: refused, not served.
    for url in amqps.split(',') {
        let answer = plaintext_answer(&host_port(url), b"AMQP\x00\x00\x09\x01").await;
        // A plaintext broker answers a Connection.Start frame (type 1) or its own protocol
        // header; a TLS listener closes, at most with a TLS alert record (type 21).
        assert!(
            answer.is_empty() || answer[0] == 21,
            "{url}: a plaintext AMQP handshake was answered with {answer:?}"
        );
        let plain = url.replacen("amqps://", "amqp://", 1);
        let refused =
            gpuq_common::amqp::connect_any(std::slice::from_ref(&plain), "gpuq-e2e-plain").await;
        assert!(
            refused.is_err(),
            "{plain}: a plaintext AMQP connection opened"
        );
    }
    let answer = plaintext_answer(&host_port(&rediss), b"PING\r\n").await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("PONG"),
        "{rediss}: a plaintext PING was answered with {answer:?}"
    );
    stack.stop().await;
}
