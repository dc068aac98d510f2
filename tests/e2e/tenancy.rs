//! Issue 15's tenants on the real stack: a tenant's `submit` key sees only its own jobs on every
//! gateway route (another tenant's job is a 404, exactly like a missing one), an admin key sees
//! all; a tenant over its rate or its cap on unfinished jobs gets 429 with `Retry-After` while
//! other tenants flow; a tenant at its GPU quota runs no more GPUs at once than the quota.

// A tenant-isolation test walks every route in turn and reads as one story: exempt from the
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use gpuq_common::{JobRecord, JobStatus};
use gpuq_e2e::{Stack, StackOptions, eventually};
use serde_json::{Value, json};
use uuid::Uuid;

/// One tenant's (or the admin's) view of the gateway, recording which routes it used.
struct Client<'a> {
    stack: &'a Stack,
    key: String,
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

impl Client<'_> {
    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Answer {
        self.call_with(method, path, body, None).await
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        idempotency_key: Option<&str>,
    ) -> Answer {
        let url = format!("{}{path}", self.stack.gateway_url);
        let mut rb = match method {
            "get" => self.stack.http.get(url),
            _ => self.stack.http.post(url),
        }
        .bearer_auth(&self.key);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        if let Some(k) = idempotency_key {
            rb = rb.header("Idempotency-Key", k);
        }
        let r = rb.send().await.unwrap();
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let body = r.json().await.unwrap_or(Value::Null);
        Answer {
            status,
            retry_after,
            body,
        }
    }

    async fn submit(&self, body: &Value) -> Answer {
        self.call("post", "/v1/jobs", Some(body)).await
    }

    async fn submit_ok(&self, body: &Value) -> Uuid {
        let a = self.submit(body).await;
        assert_eq!(a.status, 202, "{}", a.body);
        a.body["id"].as_str().unwrap().parse().unwrap()
    }

    async fn listed(&self, path: &str) -> HashSet<Uuid> {
        let a = self.call("get", path, None).await;
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        a.body["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().parse().unwrap())
            .collect()
    }
}

fn client<'a>(stack: &'a Stack, tenant: &str) -> Client<'a> {
    Client {
        stack,
        key: stack.key_of(tenant).to_string(),
    }
}

fn admin(stack: &Stack) -> Client<'_> {
    Client {
        stack,
        key: stack.api_key.clone(),
    }
}

fn long_job() -> Value {
    json!({"kind": "simulate", "params": {"duration_ms": 60_000}})
}

/// The gateway's `/v1` routes, from its OpenAPI document (which a unit test keeps equal to the
/// routes it serves): a new route is not covered until this test exercises it.
async fn v1_routes(stack: &Stack) -> BTreeSet<(String, String)> {
    let doc = stack
        .get_json(&format!("{}/openapi.json", stack.gateway_url), None)
        .await;
    let mut routes = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if path.starts_with("/v1/") {
            for method in ops.as_object().unwrap().keys() {
                routes.insert((method.clone(), path.clone()));
            }
        }
    }
    routes
}

/// A batch and its array belong to the tenant that submitted them: B neither lists nor cancels
/// A's array (404, like an array nobody made), and the same batch Idempotency-Key from B makes
/// B's own jobs.
async fn arrays_are_the_tenants(
    stack: &Stack,
    a: &Client<'_>,
    b: &Client<'_>,
    cover: &mut impl FnMut(&str, &str) -> bool,
) {
    let batch =
        json!({"jobs": [{"kind": "simulate", "params": {"duration_ms": 60_000}, "array": 3}]});
    let ids = |answer: &Answer| -> Vec<Uuid> {
        assert_eq!(answer.status, 202, "{}", answer.body);
        answer.body["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().parse().unwrap())
            .collect()
    };
    let of_a = ids(&a
        .call_with("post", "/v1/jobs/batch", Some(&batch), Some("sweep"))
        .await);
    cover("post", "/v1/jobs/batch");
    let array = of_a[0];
    let by_array = format!("/v1/jobs?array={array}");
    assert_eq!(a.listed(&by_array).await, of_a.iter().copied().collect());
    assert!(
        b.listed(&by_array).await.is_empty(),
        "B lists none of A's array"
    );
    let cancel = format!("/v1/jobs/{array}/cancel?array=true");
    let theirs = b.call("post", &cancel, None).await;
    let nobodys = b
        .call(
            "post",
            &format!("/v1/jobs/{}/cancel?array=true", Uuid::now_v7()),
            None,
        )
        .await;
    assert_eq!(theirs.status, 404, "{}", theirs.body);
    assert_eq!(theirs.body["error"]["code"], nobodys.body["error"]["code"]);
    let of_b = ids(&b
        .call_with("post", "/v1/jobs/batch", Some(&batch), Some("sweep"))
        .await);
    assert!(
        of_b.iter().all(|id| !of_a.contains(id)),
        "batch keys are per tenant"
    );
    for id in &of_a {
        let r = stack.store.get(*id).await.unwrap().unwrap();
        assert!(!r.status.is_final() && r.tenant == "team-a", "{r:?}");
    }
    let done = a.call("post", &cancel, None).await;
    assert_eq!(done.status, 200, "{}", done.body);
    assert_eq!(
        done.body["cancelled"].as_array().unwrap().len(),
        3,
        "{}",
        done.body
    );
    let own = b
        .call(
            "post",
            &format!("/v1/jobs/{}/cancel?array=true", of_b[0]),
            None,
        )
        .await;
    assert_eq!(own.status, 200, "{}", own.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_b_cannot_get_list_cancel_wait_redrive_or_collide_with_tenant_a_jobs_admin_can() {
    let stack = Stack::start(StackOptions::default()).await.unwrap();
    let (a, b, root) = (
        client(&stack, "team-a"),
        client(&stack, "team-b"),
        admin(&stack),
    );
    let mut covered: BTreeSet<(String, String)> = BTreeSet::new();
    let mut cover = |m: &str, p: &str| covered.insert((m.to_string(), p.to_string()));

    // A's jobs: one that runs a minute (with an idempotency key), one dead-lettered.
    let running = a
        .call_with("post", "/v1/jobs", Some(&long_job()), Some("same-key"))
        .await;
    assert_eq!(running.status, 202, "{}", running.body);
    let running: Uuid = running.body["id"].as_str().unwrap().parse().unwrap();
    cover("post", "/v1/jobs");
    let dead = a
        .submit_ok(&json!({"kind": "simulate", "params": {"always_fail": true}}))
        .await;
    let r = stack.wait_one(dead, Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.status, JobStatus::DeadLettered, "{r:?}");
    assert_eq!(r.tenant, "team-a", "the record names its tenant: {r:?}");
    let b_job = b
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 1}}))
        .await;

    // B sees nothing of A's: every route answers as if the job did not exist.
    let missing = Uuid::now_v7();
    for id in [running, dead] {
        for (method, path, route) in [
            ("get", format!("/v1/jobs/{id}"), "/v1/jobs/{id}"),
            ("get", format!("/v1/jobs/{id}?wait=1s"), "/v1/jobs/{id}"),
            (
                "post",
                format!("/v1/jobs/{id}/cancel"),
                "/v1/jobs/{id}/cancel",
            ),
            (
                "get",
                format!("/v1/jobs/{id}/events"),
                "/v1/jobs/{id}/events",
            ),
            (
                "get",
                format!("/v1/jobs/{id}/events?format=json"),
                "/v1/jobs/{id}/events",
            ),
            (
                "post",
                format!("/v1/dead-letters/{id}/retry"),
                "/v1/dead-letters/{id}/retry",
            ),
        ] {
            let theirs = b.call(method, &path, None).await;
            let nobodys = b
                .call(
                    method,
                    &path.replace(&id.to_string(), &missing.to_string()),
                    None,
                )
                .await;
            assert_eq!(theirs.status, 404, "B {method} {path}: {}", theirs.body);
            assert_eq!(
                theirs.body["error"]["code"], nobodys.body["error"]["code"],
                "another tenant's job looks exactly like a missing one"
            );
            cover(method, route);
        }
    }
    let b_sees = b.listed("/v1/jobs?limit=1000").await;
    cover("get", "/v1/jobs");
    assert!(b_sees.contains(&b_job) && !b_sees.contains(&running) && !b_sees.contains(&dead));
    for status in ["queued", "running", "dead_lettered"] {
        let page = b.listed(&format!("/v1/jobs?status={status}")).await;
        assert!(
            !page.contains(&running) && !page.contains(&dead),
            "{status}"
        );
    }
    assert!(b.listed("/v1/dead-letters").await.is_empty());
    cover("get", "/v1/dead-letters");
    // The same Idempotency-Key and body from B makes B's own job, not a replay of A's.
    let again = b
        .call_with("post", "/v1/jobs", Some(&long_job()), Some("same-key"))
        .await;
    assert_eq!(again.status, 202, "{}", again.body);
    let b_long: Uuid = again.body["id"].as_str().unwrap().parse().unwrap();
    assert_ne!(b_long, running, "idempotency keys are per tenant");
    let replay = a
        .call_with("post", "/v1/jobs", Some(&long_job()), Some("same-key"))
        .await;
    assert_eq!(
        replay.status, 200,
        "A's retry is still a replay: {}",
        replay.body
    );
    assert_eq!(replay.body["id"], json!(running));

    // A sees its own, and not B's.
    let a_sees = a.listed("/v1/jobs?limit=1000").await;
    assert!(a_sees.contains(&running) && a_sees.contains(&dead) && !a_sees.contains(&b_job));
    assert_eq!(a.listed("/v1/dead-letters").await, HashSet::from([dead]));
    let log = a
        .call("get", &format!("/v1/jobs/{dead}/events?format=json"), None)
        .await;
    assert_eq!(log.status, 200, "{}", log.body);
    assert_eq!(
        log.body["events"].as_array().unwrap().last().unwrap()["kind"],
        "final"
    );
    let mine = a.call("get", &format!("/v1/jobs/{running}"), None).await;
    assert_eq!(mine.status, 200);
    assert_eq!(mine.body["tenant"], "team-a");

    // Admin sees and acts on every tenant's jobs.
    let all = root.listed("/v1/jobs?limit=1000").await;
    assert!(
        [running, dead, b_job, b_long]
            .iter()
            .all(|id| all.contains(id))
    );
    assert!(root.listed("/v1/dead-letters").await.contains(&dead));
    let got = root.call("get", &format!("/v1/jobs/{dead}"), None).await;
    assert_eq!(got.body["tenant"], "team-a");
    let redriven = root
        .call("post", &format!("/v1/dead-letters/{dead}/retry"), None)
        .await;
    assert_eq!(redriven.status, 202, "{}", redriven.body);
    let cancelled = root
        .call("post", &format!("/v1/jobs/{running}/cancel"), None)
        .await;
    assert_eq!(cancelled.status, 200, "{}", cancelled.body);
    assert_eq!(cancelled.body["status"], "cancelled");
    // A tenant cancels its own.
    let own = b
        .call("post", &format!("/v1/jobs/{b_long}/cancel"), None)
        .await;
    assert_eq!(own.status, 200, "{}", own.body);

    // What B tried did nothing to A's jobs.
    let r = stack.store.get(running).await.unwrap().unwrap();
    assert_eq!(
        r.status,
        JobStatus::Cancelled,
        "cancelled by the admin only"
    );
    arrays_are_the_tenants(&stack, &a, &b, &mut cover).await;
    assert_eq!(
        covered,
        v1_routes(&stack).await,
        "every /v1 route is covered"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_above_a_tenants_rate_or_unfinished_cap_gets_429_with_retry_after_others_flow() {
    let stack = Stack::start(StackOptions {
        env: vec![(
            "GPUQ_TENANT_LIMITS".into(),
            "team-b:rate=2:burst=5,team-c:max_queued=3".into(),
        )],
        ..Default::default()
    })
    .await
    .unwrap();
    let (a, b, c) = (
        client(&stack, "team-a"),
        client(&stack, "team-b"),
        client(&stack, "team-c"),
    );
    let quick = json!({"kind": "simulate", "params": {"duration_ms": 1}});
    let (b_answers, a_answers) = tokio::join!(
        futures_util::future::join_all((0..20).map(|_| b.submit(&quick))),
        futures_util::future::join_all((0..20).map(|_| a.submit(&quick))),
    );
    let accepted = b_answers.iter().filter(|x| x.status == 202).count();
    assert!(
        (5..=6).contains(&accepted),
        "a burst of 5 (and at most one refill) passes: {accepted}"
    );
    for x in b_answers.iter().filter(|x| x.status != 202) {
        assert_eq!(x.status, 429, "{}", x.body);
        assert_eq!(x.body["error"]["code"], "too_many_requests");
        let after: u64 = x.retry_after.as_deref().unwrap().parse().unwrap();
        assert!((1..=2).contains(&after), "Retry-After {after}");
    }
    assert!(
        a_answers.iter().all(|x| x.status == 202),
        "another tenant is unaffected"
    );
    // After Retry-After, B is served again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(b.submit(&quick).await.status, 202);

    // C may have 3 unfinished jobs: the 4th waits until one ends.
    let mut long = vec![];
    for _ in 0..3 {
        long.push(c.submit_ok(&long_job()).await);
    }
    let fourth = c.submit(&long_job()).await;
    assert_eq!(fourth.status, 429, "{}", fourth.body);
    assert!(fourth.retry_after.is_some());
    assert_eq!(a.submit(&quick).await.status, 202, "A still submits");
    let cancel = c
        .call("post", &format!("/v1/jobs/{}/cancel", long[0]), None)
        .await;
    assert_eq!(cancel.status, 200);
    eventually(
        "C may submit again once a job ended",
        Duration::from_secs(5),
        || async { c.submit(&quick).await.status == 202 },
    )
    .await;

    let metrics = stack.gateway_client().metrics().await.unwrap();
    let count = |tenant: &str, outcome: &str| -> f64 {
        let labels = [
            format!("tenant=\"{tenant}\""),
            format!("outcome=\"{outcome}\""),
        ];
        metrics
            .lines()
            .filter(|l| l.starts_with("gpuq_tenant_submissions_total{"))
            .filter(|l| labels.iter().all(|want| l.contains(want.as_str())))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(count("team-b", "rate") >= 14.0, "{metrics}");
    assert!(count("team-c", "max_queued") >= 1.0);
    assert!(count("team-a", "accepted") >= 21.0);
    for id in &long[1..] {
        c.call("post", &format!("/v1/jobs/{id}/cancel"), None).await;
    }
    stack.stop().await;
}

/// The most GPUs `records` ran at one instant.
fn peak_gpus(records: &[&JobRecord]) -> u32 {
    let mut edges: Vec<(i64, i64)> = vec![];
    for r in records {
        let n = i64::from(r.gpus_requested);
        edges.push((r.started_at.unwrap(), n));
        edges.push((r.finished_at.unwrap(), -n));
    }
    // An end and a start at the same millisecond do not overlap.
    edges.sort();
    let (mut now, mut peak) = (0i64, 0i64);
    for (_, d) in edges {
        now += d;
        peak = peak.max(now);
    }
    u32::try_from(peak).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_at_its_gpu_quota_runs_no_more_at_once_while_other_tenants_jobs_flow() {
    let stack = Stack::start_healthy(StackOptions {
        env: vec![("GPUQ_TENANT_LIMITS".into(), "team-a:max_gpus=2".into())],
        ..Default::default()
    })
    .await;
    let (a, b) = (client(&stack, "team-a"), client(&stack, "team-b"));
    // A job that could never run under the quota is refused at once.
    let too_big = a
        .submit(&json!({"kind": "simulate", "params": {"duration_ms": 1}, "gpus": 3}))
        .await;
    assert_eq!(too_big.status, 422, "{}", too_big.body);
    assert!(
        too_big.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quota")
    );

    // Six GPUs in the fleet; A may use two of them at once.
    let job = json!({"kind": "simulate", "params": {"duration_ms": 1500}});
    let started = Instant::now();
    let mut a_ids = vec![];
    for _ in 0..8 {
        a_ids.push(a.submit_ok(&job).await);
    }
    let mut b_ids = vec![];
    for _ in 0..8 {
        b_ids.push(b.submit_ok(&job).await);
    }
    let b_records = stack
        .wait_final(&b_ids, Duration::from_secs(60))
        .await
        .unwrap();
    let b_done = started.elapsed();
    let a_records = stack
        .wait_final(&a_ids, Duration::from_secs(90))
        .await
        .unwrap();
    for r in a_records.iter().chain(&b_records) {
        assert_eq!(r.status, JobStatus::Succeeded, "{r:?}");
        assert_eq!(
            r.attempts, 1,
            "waiting for the quota burns no attempt: {r:?}"
        );
    }
    let a_peak = peak_gpus(&a_records.iter().collect::<Vec<_>>());
    let b_peak = peak_gpus(&b_records.iter().collect::<Vec<_>>());
    eprintln!("peak GPUs: A {a_peak} (quota 2), B {b_peak}; B done after {b_done:?}");
    assert!(
        a_peak <= 2,
        "A ran {a_peak} GPUs at once over its quota of 2"
    );
    assert_eq!(a_peak, 2, "A used its quota");
    assert!(
        b_peak >= 3,
        "B's jobs flowed past A's waiting ones: peak {b_peak}"
    );
    // 8 jobs of 1.5 s on the 4 GPUs A leaves free: two rounds, not A's eight-round queue.
    assert!(
        b_done < Duration::from_secs(9),
        "B's jobs waited behind A's: {b_done:?}"
    );
    let waits = stack.workers_metric("gpuq_tenant_quota_waits_total").await;
    assert!(waits >= 1.0, "the quota made A's jobs wait: {waits}");
    stack.stop().await;
}
