//! `gpuq submit`: build a job from flags, submit it, and with `--wait` follow it to a final
//! status.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use gpuq_common::job::JobKind;
use gpuq_common::{JobRecord, JobStatus};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use uuid::Uuid;

use crate::cli::{KindArg, SubmitArgs};
use crate::{Ctx, Exit};
use gpuq_client::gateway::{Gateway, ListParams, SubmitBody};

/// The request body the flags describe.
pub fn build_body(a: &SubmitArgs) -> anyhow::Result<SubmitBody> {
    let kind = match a.kind {
        KindArg::Simulate => JobKind::Simulate,
        KindArg::Command => JobKind::Command,
    };
    let sim_flags = a.duration_ms.is_some()
        || a.progress_steps.is_some()
        || a.fail_times.is_some()
        || a.fail_probability.is_some()
        || a.always_fail;
    let cmd_flags = a.program.is_some()
        || !a.args.is_empty()
        || !a.env.is_empty()
        || a.timeout_s.is_some()
        || !a.trailing.is_empty();
    let params = if let Some(raw) = &a.params {
        if sim_flags || cmd_flags {
            bail!("--params replaces the kind's own flags; give one or the other");
        }
        let v: Value = serde_json::from_str(raw).context("--params is not valid JSON")?;
        if !v.is_object() {
            bail!("--params must be a JSON object");
        }
        v
    } else {
        match kind {
            JobKind::Simulate => {
                if cmd_flags {
                    bail!(
                        "--program, --arg, --env, --timeout-s and `-- args` are for --kind command"
                    );
                }
                let mut p = Map::new();
                p.insert("duration_ms".into(), json!(a.duration_ms.unwrap_or(0)));
                if let Some(v) = a.progress_steps {
                    p.insert("progress_steps".into(), json!(v));
                }
                if let Some(v) = a.fail_times {
                    p.insert("fail_times".into(), json!(v));
                }
                if let Some(v) = a.fail_probability {
                    p.insert("fail_probability".into(), json!(v));
                }
                if a.always_fail {
                    p.insert("always_fail".into(), json!(true));
                }
                Value::Object(p)
            }
            JobKind::Command => {
                if sim_flags {
                    bail!(
                        "--duration-ms, --progress-steps and the fail flags are for --kind simulate"
                    );
                }
                let Some(program) = &a.program else {
                    bail!("--kind command needs --program NAME (or --params)");
                };
                let args: Vec<&String> = a.args.iter().chain(&a.trailing).collect();
                let env: BTreeMap<&str, &str> = a
                    .env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let mut p = Map::new();
                p.insert("program".into(), json!(program));
                p.insert("args".into(), json!(args));
                p.insert("env".into(), json!(env));
                if let Some(t) = a.timeout_s {
                    p.insert("timeout_s".into(), json!(t));
                }
                Value::Object(p)
            }
        }
    };
    Ok(SubmitBody {
        kind,
        params,
        gpus: a.gpus,
        min_gpu_memory_mb: a.min_gpu_memory_mb,
        pool: a.pool.clone(),
        ttl_s: a.ttl_s,
        array: a.array,
    })
}

pub async fn run(ctx: &Ctx, a: &SubmitArgs) -> anyhow::Result<Exit> {
    let body = build_body(a)?;
    let gw = ctx.gateway();
    if body.array.is_some() {
        return run_array(&gw, a, body).await;
    }
    let sub = gw.submit(&body, a.idempotency_key.as_deref()).await?;
    if !a.wait {
        if a.json {
            println!("{}", serde_json::to_string(&sub)?);
        } else if sub.replayed {
            println!("{} (an earlier job with this idempotency key)", sub.id);
        } else {
            println!("{}", sub.id);
        }
        return Ok(Exit::Ok);
    }
    if !a.json {
        println!("{}", sub.id);
    }
    // Follow the job's events to its end, then read its record; without an event log (an older
    // gateway), long-poll the record.
    let followed = crate::watch::until_final(&gw, sub.id, a.timeout).await;
    let rec = match followed {
        Some(_) => Some(gw.job(sub.id).await?),
        None => wait_one(&gw, sub.id, a.timeout).await?,
    };
    let Some(rec) = rec.filter(|r| r.status.is_final()) else {
        bail!("job {} is not final after {:?}", sub.id, a.timeout);
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rec)?);
    } else {
        print!("{}", render_outcome(&rec));
    }
    Ok(exit_for(rec.status))
}

/// `submit --array`: the array through the batch route; its ids one a line, the first naming
/// the array. With `--wait`, until every job of it is final (exit 0 only if all succeeded).
async fn run_array(gw: &Gateway, a: &SubmitArgs, body: SubmitBody) -> anyhow::Result<Exit> {
    let batch = gw
        .submit_batch(std::slice::from_ref(&body), a.idempotency_key.as_deref())
        .await?;
    let array_id = batch
        .jobs
        .first()
        .map(|j| j.id)
        .context("the gateway answered no job")?;
    if a.json && !a.wait {
        println!("{}", serde_json::to_string(&batch)?);
        return Ok(Exit::Ok);
    }
    if !a.json {
        for job in &batch.jobs {
            println!("{}", job.id);
        }
    }
    if !a.wait {
        return Ok(Exit::Ok);
    }
    let deadline = Instant::now() + a.timeout;
    let params = ListParams {
        array: Some(array_id),
        limit: Some(gpuq_common::store::MAX_PAGE),
        ..ListParams::default()
    };
    let jobs = loop {
        let jobs = gw.list_all(params.clone(), None).await?;
        if jobs.len() >= batch.jobs.len() && jobs.iter().all(|j| j.status.is_final()) {
            break jobs;
        }
        if Instant::now() >= deadline {
            bail!("array {array_id} is not final after {:?}", a.timeout);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&jobs)?);
    } else {
        print!("{}", crate::jobs::render_table(&jobs, false));
    }
    let all_succeeded = jobs.iter().all(|j| j.status == JobStatus::Succeeded);
    Ok(exit_for(if all_succeeded {
        JobStatus::Succeeded
    } else {
        JobStatus::Failed
    }))
}

/// Exit 0 for a succeeded job, 1 for any other final status.
pub fn exit_for(status: JobStatus) -> Exit {
    if status == JobStatus::Succeeded {
        Exit::Ok
    } else {
        Exit::Failed
    }
}

/// The longest single `?wait=` read: under the HTTP client's 30 s timeout.
const LONG_POLL: Duration = Duration::from_secs(20);

/// Reads one job with `?wait=` (the gateway answers once it is final) until it is final;
/// `None` on timeout. Falls back to polling (20 ms, growing to 250 ms) when answers come early.
pub async fn wait_one(
    gw: &Gateway,
    id: Uuid,
    timeout: Duration,
) -> anyhow::Result<Option<JobRecord>> {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(20);
    let mut transient = 0u32;
    loop {
        // The gateway holds the read until the job is final (`?wait=`), up to 20 s a call.
        let asked = Instant::now();
        let wait = deadline.saturating_duration_since(asked).min(LONG_POLL);
        match gw.job_wait(id, wait).await {
            Ok(rec) if rec.status.is_final() => return Ok(Some(rec)),
            Ok(_) => transient = 0,
            Err(e) if e.is_transient() && transient < 10 => transient += 1,
            Err(e) => return Err(e).context(format!("reading job {id}")),
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        // An answer well before the wait was over (an error, a gateway that does not hold
        // reads): back off instead of spinning.
        if now - asked < wait / 2 {
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = (interval * 3 / 2).min(Duration::from_millis(250));
        }
    }
}

/// The final status, attempts, worker, GPUs, result and error.
pub fn render_outcome(rec: &JobRecord) -> String {
    let mut s = format!("status:    {}\n", rec.status.as_str());
    s.push_str(&format!("attempts:  {}\n", rec.attempts));
    s.push_str(&format!(
        "worker:    {}\n",
        rec.worker.as_deref().unwrap_or("-")
    ));
    s.push_str(&format!("gpus:      {:?}\n", rec.gpus));
    if let (Some(start), Some(end)) = (rec.started_at, rec.finished_at) {
        s.push_str(&format!(
            "ran:       {} (submit to final {})\n",
            crate::output::fmt_ms(end - start),
            crate::output::fmt_ms(end - rec.created_at)
        ));
    }
    s.push_str(&format!(
        "result:    {}\n",
        rec.result
            .as_ref()
            .map(Value::to_string)
            .unwrap_or_else(|| "-".into())
    ));
    s.push_str(&format!(
        "error:     {}\n",
        rec.error.as_deref().unwrap_or("-")
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn body(args: &[&str]) -> anyhow::Result<SubmitBody> {
        let mut argv = vec!["gpuq", "submit"];
        argv.extend_from_slice(args);
        let Command::Submit(a) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not submit")
        };
        build_body(&a)
    }

    #[test]
    fn simulate_flags_become_params() {
        let b = body(&["--duration-ms", "100", "--fail-times", "2", "--gpus", "2"]).unwrap();
        assert_eq!(b.kind, JobKind::Simulate);
        assert_eq!(b.params, json!({"duration_ms": 100, "fail_times": 2}));
        assert_eq!(b.gpus, Some(2));
        let wire = serde_json::to_value(&b).unwrap();
        assert_eq!(
            wire,
            json!({"kind":"simulate","params":{"duration_ms":100,"fail_times":2},"gpus":2})
        );
    }

    #[test]
    fn command_args_come_from_flags_and_after_the_double_dash() {
        let b = body(&[
            "--kind",
            "command",
            "--program",
            "nvidia-smi",
            "--arg",
            "-L",
            "--env",
            "A=1=2",
            "--timeout-s",
            "5",
            "--",
            "--extra",
            "x",
        ])
        .unwrap();
        assert_eq!(
            b.params,
            json!({"program":"nvidia-smi","args":["-L","--extra","x"],"env":{"A":"1=2"},"timeout_s":5})
        );
    }

    #[test]
    fn flags_of_the_other_kind_and_bad_params_are_refused() {
        assert!(body(&["--program", "x"]).is_err());
        assert!(body(&["--kind", "command", "--duration-ms", "5", "--program", "x"]).is_err());
        assert!(body(&["--kind", "command"]).is_err());
        assert!(body(&["--params", "[1]"]).is_err());
        assert!(body(&["--params", "{\"duration_ms\":1}", "--duration-ms", "2"]).is_err());
        let raw = body(&["--params", "{\"duration_ms\":1,\"always_fail\":true}"]).unwrap();
        assert_eq!(raw.params, json!({"duration_ms":1,"always_fail":true}));
    }

    #[test]
    fn an_array_is_a_range_from_zero_or_a_count() {
        assert_eq!(body(&["--array", "0-99"]).unwrap().array, Some(100));
        assert_eq!(body(&["--array", "7"]).unwrap().array, Some(7));
        assert_eq!(body(&[]).unwrap().array, None);
        let wire = serde_json::to_value(body(&["--array", "0-1"]).unwrap()).unwrap();
        assert_eq!(wire["array"], json!(2));
        for bad in ["5-9", "0-1000", "0", "x", "1-"] {
            let argv = ["gpuq", "submit", "--array", bad];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_a_succeeded_job_exits_zero() {
        assert_eq!(exit_for(JobStatus::Succeeded), Exit::Ok);
        assert_eq!(exit_for(JobStatus::DeadLettered), Exit::Failed);
        assert_eq!(exit_for(JobStatus::Cancelled), Exit::Failed);
    }
}
