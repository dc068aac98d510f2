//! Issue 16's least privilege on the real stack: every service of these stacks (and of the
//! whole suite) logs in as its own RabbitMQ and Redis user (scripts/stack-access.sh), a job still
//! runs, and the users cannot do what their service does not need. The per-service URLs come
//! from scripts/test.sh (`stack.sh credentials`); without them these tests fail, naming them.

use std::time::Duration;

use gpuq_common::JobStatus;
use gpuq_common::topology::access_refused;
use gpuq_e2e::access::{least_privilege, required_service_url};
use gpuq_e2e::{Stack, StackOptions};
use lapin::options::{BasicConsumeOptions, BasicGetOptions};
use lapin::types::{FieldTable, ShortString};
use serde_json::json;
use uuid::Uuid;

/// A stack of one worker, every service as its own user, that has run one job.
async fn stack_that_ran_a_job() -> Stack {
    for service in ["gateway", "worker", "manager"] {
        required_service_url("AMQP_URLS", service);
        required_service_url("REDIS_URL", service);
    }
    assert!(least_privilege());
    let stack = Stack::start(StackOptions {
        workers: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let id = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 5}}))
        .await
        .unwrap();
    let r = stack.wait_one(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
    stack
}

/// A channel on a connection as `service`'s broker user.
async fn channel_as(service: &str) -> (lapin::Connection, lapin::Channel) {
    let urls: Vec<String> = required_service_url("AMQP_URLS", service)
        .split(',')
        .map(String::from)
        .collect();
    let (conn, _) = gpuq_common::amqp::connect_any(&urls, &format!("gpuq-e2e as {service}"))
        .await
        .unwrap_or_else(|e| panic!("{service}'s broker user cannot log in: {e:#}"));
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

async fn consume(ch: &lapin::Channel, queue: &str) -> lapin::Result<lapin::Consumer> {
    ch.basic_consume(
        ShortString::from(queue.to_string()),
        ShortString::from("e2e-probe"),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
}

#[tokio::test]
async fn the_gateways_broker_user_cannot_consume_or_get_a_job_queue() {
    let stack = stack_that_ran_a_job().await;
    let jobs = format!("{}.jobs.default", stack.prefix);
    let dead = format!("{}.dead", stack.prefix);
    for queue in [&jobs, &dead] {
        let (conn, ch) = channel_as("gateway").await;
        let refused = consume(&ch, queue).await.err();
        assert!(
            refused.as_ref().is_some_and(access_refused),
            "the gateway's user consumes {queue}: {refused:?}"
        );
        let (_c2, ch) = channel_as("gateway").await;
        let got = ch
            .basic_get(
                ShortString::from(queue.as_str()),
                BasicGetOptions::default(),
            )
            .await
            .err();
        assert!(
            got.as_ref().is_some_and(access_refused),
            "the gateway's user gets from {queue}: {got:?}"
        );
        let _ = conn.close(200, "OK".into()).await;
    }
    // The refusal is the user's, not the queue's: the worker's user may consume it.
    let (conn, ch) = channel_as("worker").await;
    let consumer = consume(&ch, &jobs).await;
    assert!(consumer.is_ok(), "the worker's user: {consumer:?}");
    let _ = conn.close(200, "OK".into()).await;
    // And the manager's user consumes dead letters only.
    let (conn, ch) = channel_as("manager").await;
    let refused = consume(&ch, &jobs).await.err();
    assert!(
        refused.as_ref().is_some_and(access_refused),
        "the manager's user consumes {jobs}: {refused:?}"
    );
    let _ = conn.close(200, "OK".into()).await;
    stack.stop().await;
}

/// `cmd` as `conn`'s user; the error code of a refusal (e.g. `NOPERM`), `None` when it ran.
async fn refusal(conn: &mut redis::aio::MultiplexedConnection, cmd: &redis::Cmd) -> Option<String> {
    match cmd.query_async::<redis::Value>(conn).await {
        Ok(_) => None,
        Err(e) => Some(e.code().unwrap_or("(no code)").to_string() + ": " + &e.to_string()),
    }
}

#[tokio::test]
async fn a_workers_redis_user_cannot_flush_or_touch_keys_outside_gpuq() {
    let stack = stack_that_ran_a_job().await;
    let client = redis::Client::open(required_service_url("REDIS_URL", "worker")).unwrap();
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("the worker's Redis user logs in");
    let probe = Uuid::new_v4().simple().to_string();
    // Keys under gpuq: (the default prefix) and under the stack's prefix (gpuq-t…) work.
    for key in [
        format!("gpuq:e2e-probe:{probe}"),
        format!("{}:e2e-probe:{probe}", stack.prefix),
    ] {
        let set = redis::cmd("SET").arg(&key).arg(1).arg("EX").arg(60).clone();
        assert_eq!(refusal(&mut c, &set).await, None, "SET {key}");
        let del = redis::cmd("DEL").arg(&key).clone();
        assert_eq!(refusal(&mut c, &del).await, None, "DEL {key}");
    }
    let outside = format!("e2e-probe:{probe}");
    for cmd in [
        redis::cmd("FLUSHALL").clone(),
        redis::cmd("FLUSHDB").clone(),
        redis::cmd("KEYS").arg("*").clone(),
        redis::cmd("CONFIG").arg("GET").arg("*").clone(),
        redis::cmd("SET").arg(&outside).arg(1).clone(),
        redis::cmd("GET").arg(&outside).clone(),
        redis::cmd("EVAL")
            .arg("return redis.call('SET', KEYS[1], 1)")
            .arg(1)
            .arg(&outside)
            .clone(),
    ] {
        let answer = refusal(&mut c, &cmd).await;
        assert!(
            answer.as_deref().is_some_and(|a| a.starts_with("NOPERM")),
            "{:?} as the worker's user: {answer:?}",
            String::from_utf8_lossy(&cmd.get_packed_command())
        );
    }
    // Nothing of it happened: the key outside is absent (read as the admin).
    let admin = redis::Client::open(gpuq_e2e::test_env("GPUQ_TEST_REDIS_URL")).unwrap();
    let mut a = admin.get_multiplexed_async_connection().await.unwrap();
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&outside)
        .query_async(&mut a)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    stack.stop().await;
}
