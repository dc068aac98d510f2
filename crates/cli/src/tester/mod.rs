//! `gpuq tester`: cause the failures gpuq exists to survive and judge the outcome. Interactive
//! (the original menu), `run` (one scenario, scripted) and `chaos` (random faults and outages).

pub mod chaos;
pub mod events;
pub mod flow;
pub mod interactive;
pub mod run;
pub mod scenario;
pub mod verdict;

use std::io::IsTerminal;

use anyhow::bail;

use crate::cli::{TesterArgs, TesterCmd};
use crate::output::show_progress;
use crate::{Ctx, Exit};

pub async fn run(ctx: &Ctx, a: &TesterArgs) -> anyhow::Result<Exit> {
    let verdict = match &a.cmd {
        None => {
            if !std::io::stdin().is_terminal() {
                bail!(
                    "the interactive tester needs a terminal; use `gpuq tester run --worker N --scenario S` or `gpuq tester chaos`"
                );
            }
            return interactive::interactive(ctx, a).await;
        }
        Some(TesterCmd::Run(r)) => {
            let plan = run::RunPlan {
                worker: r.worker,
                scenario: r.scenario,
                count: r.count,
                jobs: r.jobs,
                duration_ms: r.duration_ms,
                fail_probability: r.fail_probability,
                timeout: r.timeout,
                settle: r.settle,
                concurrency: r.concurrency,
                visible: show_progress(r.json),
                quiet: r.json,
            };
            (run::run_plan(ctx, &plan).await?, r.json)
        }
        Some(TesterCmd::Chaos(c)) => (chaos::chaos(ctx, c).await?, c.json),
    };
    let (v, json) = verdict;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", v.render());
    }
    Ok(if v.pass { Exit::Ok } else { Exit::Failed })
}
