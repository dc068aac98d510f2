//! The interactive tester, like the original: choose a worker, then a scenario, then how many
//! jobs; watch it happen; read the verdict; again until `q`.

use std::io::{BufRead, Write};

use crate::cli::TesterArgs;
use crate::output::show_progress;
use crate::tester::run::{RunPlan, run_plan};
use crate::tester::scenario::Scenario;
use crate::{Ctx, Exit};

/// One answer at a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice<T> {
    Pick(T),
    Quit,
    /// Not understood; the message says why. Ask again.
    Again(String),
}

fn quit(input: &str) -> bool {
    matches!(
        input.trim().to_ascii_lowercase().as_str(),
        "q" | "quit" | "exit"
    )
}

/// `1`..=`workers`, or `q`.
pub fn parse_worker(input: &str, workers: usize) -> Choice<usize> {
    if quit(input) {
        return Choice::Quit;
    }
    match input.trim().parse::<usize>() {
        Ok(n) if (1..=workers).contains(&n) => Choice::Pick(n),
        _ => Choice::Again(format!("choose a worker from 1 to {workers}, or q")),
    }
}

/// `0`..=`4` or a scenario name, or `q`.
pub fn parse_scenario(input: &str) -> Choice<Scenario> {
    if quit(input) {
        return Choice::Quit;
    }
    match Scenario::parse(input) {
        Some(s) => Choice::Pick(s),
        None => Choice::Again("choose a scenario from 0 to 4, or q".into()),
    }
}

/// A positive number of jobs; empty means `default`.
pub fn parse_jobs(input: &str, default: u32) -> Choice<u32> {
    if quit(input) {
        return Choice::Quit;
    }
    let t = input.trim();
    if t.is_empty() {
        return Choice::Pick(default);
    }
    match t.parse::<u32>() {
        Ok(n) if (1..=100_000).contains(&n) => Choice::Pick(n),
        _ => Choice::Again("enter a number of jobs from 1 to 100000".into()),
    }
}

/// The menu text.
pub fn menu(workers: &[(String, String)]) -> String {
    let mut s = String::from(
        "\ngpuq tester: cause a fault, watch the fleet recover, get a verdict (q quits)\n\nworkers\n",
    );
    for (i, (name, url)) in workers.iter().enumerate() {
        s.push_str(&format!("  {}  {name} ({url})\n", i + 1));
    }
    s.push_str("scenarios\n");
    for sc in Scenario::ALL {
        s.push_str(&format!(
            "  {}  {:<26}{}\n",
            sc.number(),
            sc.as_str(),
            sc.describe()
        ));
    }
    s
}

/// Prompts until `parse` picks a value or the person quits (or input ends).
fn ask<T>(
    input: &mut impl BufRead,
    out: &mut impl Write,
    prompt: &str,
    parse: impl Fn(&str) -> Choice<T>,
) -> std::io::Result<Option<T>> {
    loop {
        write!(out, "{prompt}")?;
        out.flush()?;
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        match parse(&line) {
            Choice::Pick(v) => return Ok(Some(v)),
            Choice::Quit => return Ok(None),
            Choice::Again(msg) => writeln!(out, "  {msg}")?,
        }
    }
}

pub async fn interactive(ctx: &Ctx, a: &TesterArgs) -> anyhow::Result<Exit> {
    let workers: Vec<(String, String)> = ctx
        .workers()
        .iter()
        .map(|w| (w.name.clone(), w.base().to_string()))
        .collect();
    if workers.is_empty() {
        anyhow::bail!("GPUQ_WORKER_URLS names no worker");
    }
    let mut any_failed = false;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        print!("{}", menu(&workers));
        let mut input = stdin.lock();
        let n = workers.len();
        let Some(worker) = ask(&mut input, &mut out, &format!("worker [1-{n}]: "), |s| {
            parse_worker(s, n)
        })?
        else {
            break;
        };
        let Some(scenario) = ask(&mut input, &mut out, "scenario [0-4]: ", parse_scenario)? else {
            break;
        };
        let Some(jobs) = ask(&mut input, &mut out, "jobs [10]: ", |s| parse_jobs(s, 10))? else {
            break;
        };
        drop(input);
        let plan = RunPlan {
            worker,
            scenario,
            count: 1,
            jobs,
            duration_ms: a.duration_ms,
            fail_probability: None,
            timeout: a.timeout,
            settle: std::time::Duration::from_secs(3),
            concurrency: 16,
            visible: show_progress(false),
            quiet: false,
        };
        match run_plan(ctx, &plan).await {
            Ok(v) => {
                any_failed |= !v.pass;
                println!("\n{}", v.render());
            }
            Err(e) => println!("\nerror: {e:#}"),
        }
    }
    Ok(if any_failed { Exit::Failed } else { Exit::Ok })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn menu_answers_are_parsed() {
        assert_eq!(parse_worker("2\n", 3), Choice::Pick(2));
        assert!(matches!(parse_worker("4", 3), Choice::Again(_)));
        assert!(matches!(parse_worker("0", 3), Choice::Again(_)));
        assert_eq!(parse_worker("Q\n", 3), Choice::Quit);
        assert_eq!(
            parse_scenario("3"),
            Choice::Pick(Scenario::DuplicateAfterComplete)
        );
        assert_eq!(
            parse_scenario("crash_mid_task"),
            Choice::Pick(Scenario::CrashMidTask)
        );
        assert!(matches!(parse_scenario("9"), Choice::Again(_)));
        assert_eq!(parse_jobs("\n", 10), Choice::Pick(10));
        assert_eq!(parse_jobs(" 100 ", 10), Choice::Pick(100));
        assert!(matches!(parse_jobs("0", 10), Choice::Again(_)));
        assert_eq!(parse_jobs("quit", 10), Choice::Quit);
    }

    #[test]
    fn a_prompt_asks_again_until_it_understands() {
        let mut input = std::io::Cursor::new("x\n7\n2\n");
        let mut out = Vec::new();
        let got = ask(&mut input, &mut out, "worker: ", |s| parse_worker(s, 3)).unwrap();
        assert_eq!(got, Some(2));
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches("worker: ").count(), 3);
        assert!(text.contains("choose a worker from 1 to 3"));
        let mut eof = std::io::Cursor::new("");
        assert_eq!(
            ask(&mut eof, &mut Vec::new(), "w: ", |s| parse_worker(s, 3)).unwrap(),
            None
        );
    }

    #[test]
    fn the_menu_lists_workers_and_the_five_scenarios() {
        let m = menu(&[("worker-1".into(), "http://127.0.0.1:9001".into())]);
        assert!(m.contains("  1  worker-1 (http://127.0.0.1:9001)"));
        assert!(m.contains("  4  crash_after_complete"));
        assert!(m.contains("  0  normal"));
    }
}
