//! `gpuq jobs get|list|cancel` and `gpuq dead-letters list|retry`.

use gpuq_common::JobRecord;
use gpuq_common::store::MAX_PAGE;
use serde_json::Value;

use crate::cli::{DeadLettersCmd, JobsCmd, ListArgs};
use crate::output::{Table, fmt_ms, fmt_ts, or_dash, truncate};
use crate::{Ctx, Exit};
use gpuq_client::gateway::{Gateway, ListParams};

pub async fn run(ctx: &Ctx, cmd: &JobsCmd) -> anyhow::Result<Exit> {
    let gw = ctx.gateway();
    match cmd {
        JobsCmd::Get { id, json } => {
            let rec = gw.job(*id).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&rec)?);
            } else {
                print!("{}", render_record(&rec));
            }
        }
        JobsCmd::List(a) => list(&gw, a).await?,
        JobsCmd::Cancel {
            id,
            array: true,
            json,
        } => {
            let done = gw.cancel_array(*id).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                println!(
                    "array {}: {} cancelled, {} final already",
                    done.array_id,
                    done.cancelled.len(),
                    done.already_final
                );
            }
        }
        JobsCmd::Cancel { id, json, .. } => {
            let rec = gw.cancel(*id).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&rec)?);
            } else {
                println!("{} {}", rec.id, rec.status.as_str());
            }
        }
    }
    Ok(Exit::Ok)
}

async fn list(gw: &Gateway, a: &ListArgs) -> anyhow::Result<()> {
    let params = ListParams {
        status: a.status,
        pool: a.pool.clone(),
        array: a.array,
        limit: Some(if a.all {
            MAX_PAGE
        } else {
            a.limit.clamp(1, MAX_PAGE)
        }),
        cursor: None,
    };
    let (jobs, next) = if a.all {
        (gw.list_all(params, None).await?, None)
    } else {
        let page = gw.list(&params).await?;
        (page.jobs, page.next_cursor)
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"jobs": jobs, "next_cursor": next}))?
        );
    } else {
        print!("{}", render_table(&jobs, false));
        if let Some(c) = next {
            eprintln!("(more: --all, or the next page after {c})");
        }
    }
    Ok(())
}

pub async fn run_dead_letters(ctx: &Ctx, cmd: &DeadLettersCmd) -> anyhow::Result<Exit> {
    let gw = ctx.gateway();
    match cmd {
        DeadLettersCmd::List { limit, all, json } => {
            let mut jobs = Vec::new();
            let mut cursor = None;
            let page_size = if *all {
                MAX_PAGE
            } else {
                (*limit).clamp(1, MAX_PAGE)
            };
            let next = loop {
                let page = gw.dead_letters(Some(page_size), cursor).await?;
                jobs.extend(page.jobs);
                match page.next_cursor {
                    Some(c) if *all => cursor = Some(c),
                    other => break other,
                }
            };
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"jobs": jobs, "next_cursor": next})
                    )?
                );
            } else {
                print!("{}", render_table(&jobs, true));
                if let Some(c) = next {
                    eprintln!("(more: --all, or the next page after {c})");
                }
            }
        }
        DeadLettersCmd::Retry { id } => {
            let sub = gw.retry_dead_letter(*id).await?;
            println!("{} {}", sub.id, sub.status.as_str());
        }
    }
    Ok(Exit::Ok)
}

/// One row per job; `errors` puts the error (the dead-letter reason) in the last column.
pub fn render_table(jobs: &[JobRecord], errors: bool) -> String {
    let last = if errors { "ERROR" } else { "RESULT/ERROR" };
    let mut t = Table::new(&[
        "ID", "STATUS", "KIND", "POOL", "ATTEMPTS", "WORKER", "GPUS", "CREATED", "TOOK", last,
    ]);
    for j in jobs {
        let took = j.finished_at.map(|f| fmt_ms(f - j.created_at));
        let tail = match (&j.error, &j.result) {
            (Some(e), _) => e.clone(),
            (None, Some(r)) if !errors => r.to_string(),
            _ => "-".into(),
        };
        t.row(vec![
            j.id.to_string(),
            j.status.as_str().into(),
            j.kind.as_str().into(),
            j.pool.clone(),
            j.attempts.to_string(),
            or_dash(j.worker.as_deref()),
            gpus(&j.gpus),
            fmt_ts(j.created_at),
            or_dash(took),
            truncate(&tail, 60),
        ]);
    }
    if t.is_empty() {
        return "(no jobs)\n".into();
    }
    t.render()
}

fn gpus(g: &[u32]) -> String {
    if g.is_empty() {
        "-".into()
    } else {
        g.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    }
}

/// Every field of one job, one per line.
pub fn render_record(r: &JobRecord) -> String {
    let json = |v: &Option<Value>| {
        v.as_ref()
            .map(Value::to_string)
            .unwrap_or_else(|| "-".into())
    };
    let ts = |t: Option<i64>| t.map(fmt_ts).unwrap_or_else(|| "-".into());
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<13}{v}\n"));
    line("id", r.id.to_string());
    line("status", r.status.as_str().into());
    line("kind", r.kind.as_str().into());
    line("params", r.params.to_string());
    line("pool", r.pool.clone());
    line(
        "gpus",
        format!(
            "{} requested{}; ran on [{}]",
            r.gpus_requested,
            r.min_gpu_memory_mb
                .map(|m| format!(", ≥{m} MB each"))
                .unwrap_or_default(),
            gpus(&r.gpus)
        ),
    );
    line("attempts", r.attempts.to_string());
    line("worker", or_dash(r.worker.as_deref()));
    line("created", fmt_ts(r.created_at));
    line("started", ts(r.started_at));
    line("finished", ts(r.finished_at));
    if let Some(f) = r.finished_at {
        let ran = r
            .started_at
            .map(|s| format!(", last attempt {}", fmt_ms(f - s)));
        line(
            "took",
            format!(
                "{} submit to final{}",
                fmt_ms(f - r.created_at),
                ran.unwrap_or_default()
            ),
        );
    }
    line("result", json(&r.result));
    line("error", or_dash(r.error.as_deref()));
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use gpuq_common::JobStatus;
    use gpuq_common::job::JobKind;
    use uuid::Uuid;

    pub(crate) fn record(
        status: JobStatus,
        created: i64,
        started: Option<i64>,
        finished: Option<i64>,
    ) -> JobRecord {
        JobRecord {
            id: Uuid::now_v7(),
            tenant: "default".into(),
            kind: JobKind::Simulate,
            params: serde_json::json!({"duration_ms": 100}),
            pool: "default".into(),
            gpus_requested: 1,
            min_gpu_memory_mb: None,
            status,
            attempts: 1,
            worker: Some("worker-2".into()),
            gpus: vec![1],
            result: Some(serde_json::json!({"ok": true})),
            error: None,
            created_at: created,
            started_at: started,
            finished_at: finished,
            progress: None,
            array_id: None,
            array_index: None,
        }
    }

    #[test]
    fn a_job_table_has_one_row_per_job() {
        let mut dead = record(JobStatus::DeadLettered, 0, Some(10), Some(1_500));
        dead.error = Some("delivery_limit: boom".into());
        dead.attempts = 5;
        let ok = record(JobStatus::Succeeded, 0, Some(5), Some(120));
        let out = render_table(&[ok.clone(), dead.clone()], false);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID "));
        assert!(
            lines[1].contains("succeeded")
                && lines[1].contains("120ms")
                && lines[1].contains("{\"ok\":true}")
        );
        assert!(lines[2].contains("dead_lettered") && lines[2].ends_with("delivery_limit: boom"));
        assert_eq!(render_table(&[], false), "(no jobs)\n");
    }

    #[test]
    fn a_record_shows_every_field() {
        let r = record(JobStatus::Succeeded, 1_000, Some(1_010), Some(1_120));
        let out = render_record(&r);
        assert!(out.contains("status       succeeded\n"), "{out}");
        assert!(out.contains("worker       worker-2\n"));
        assert!(out.contains("1 requested; ran on [1]"));
        assert!(out.contains("took         120ms submit to final, last attempt 110ms"));
        assert!(out.contains("error        -\n"));
    }
}
