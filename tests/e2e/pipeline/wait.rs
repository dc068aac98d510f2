//! `GET /v1/jobs/{id}?wait=`: a read that waits for the job's end (in the MongoDB pass too).

use std::time::{Duration, Instant};

use gpuq_common::JobStatus;
use gpuq_e2e::{Stack, StackOptions};
use serde_json::json;

/// `GET /v1/jobs/{id}?wait=` answers as soon as the job is final (within 100 ms of its final
/// record), and at the end of the wait with the status then when it is not.
#[tokio::test(flavor = "multi_thread")]
async fn a_read_with_wait_answers_once_the_job_is_final() {
    let stack = Stack::start(StackOptions {
        workers: 1,
        manager: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let client = stack.gateway_client();
    let id = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 800}}))
        .await
        .unwrap();
    // When the final record is readable: plain reads every 10 ms beside the waiting one (the
    // worker stamps `finished_at` before its store write, which a slow store makes long).
    let readable = async {
        let give_up = Instant::now() + Duration::from_secs(25);
        loop {
            assert!(Instant::now() < give_up, "job {id} not final within 25 s");
            if let Ok(r) = client.job(id).await
                && r.status.is_final()
            {
                return gpuq_common::job::now_ms();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let waited = async {
        let r = client.job_wait(id, Duration::from_secs(20)).await.unwrap();
        (r, gpuq_common::job::now_ms())
    };
    let ((r, answered_ms), readable_ms) = tokio::join!(waited, readable);
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    let late = answered_ms - readable_ms;
    let after_end = answered_ms - r.finished_at.expect("a final record has its end");
    assert!(
        late <= 100,
        "answered {late} ms after the final record was readable ({after_end} ms after the job ended)"
    );

    let long = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 5000}}))
        .await
        .unwrap();
    let asked = Instant::now();
    let r = client.job_wait(long, Duration::from_secs(1)).await.unwrap();
    assert!(!r.status.is_final(), "{r:?}");
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(950) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let bad = stack
        .auth(
            stack
                .http
                .get(format!("{}/v1/jobs/{long}?wait=soon", stack.gateway_url)),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    eprintln!("?wait= answered {late} ms after the final record was readable");
    stack.stop().await;
}
