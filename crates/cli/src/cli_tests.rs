use super::*;
use clap::CommandFactory;

fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("gpuq").chain(args.iter().copied()))
}

#[test]
fn the_command_line_definition_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn connection_flags_are_global() {
    let cli = parse(&[
        "jobs",
        "list",
        "--gateway-url",
        "http://g:1",
        "--api-key",
        "k",
    ])
    .unwrap();
    assert_eq!(cli.conn.gateway_url.as_deref(), Some("http://g:1"));
    assert_eq!(cli.conn.api_key.as_deref(), Some("k"));
}

#[test]
fn submit_takes_simulate_and_wait_flags() {
    let cli = parse(&[
        "submit",
        "--kind",
        "simulate",
        "--duration-ms",
        "100",
        "--wait",
        "--timeout",
        "90s",
    ])
    .unwrap();
    let Command::Submit(a) = cli.command else {
        panic!()
    };
    assert_eq!(a.kind, KindArg::Simulate);
    assert_eq!(a.duration_ms, Some(100));
    assert!(a.wait);
    assert_eq!(a.timeout, Duration::from_secs(90));
    assert!(parse(&["submit", "--kind", "teleport"]).is_err());
    assert!(parse(&["submit", "--env", "novalue"]).is_err());
}

#[test]
fn jobs_list_checks_the_status_name() {
    let cli = parse(&[
        "jobs",
        "list",
        "--status",
        "dead_lettered",
        "--limit",
        "5",
        "--all",
    ])
    .unwrap();
    let Command::Jobs {
        cmd: JobsCmd::List(a),
    } = cli.command
    else {
        panic!()
    };
    assert_eq!(a.status, Some(JobStatus::DeadLettered));
    assert_eq!(a.limit, 5);
    assert!(a.all);
    let err = parse(&["jobs", "list", "--status", "done"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("one of queued, running"), "{err}");
    assert!(parse(&["jobs", "get", "not-a-uuid"]).is_err());
}

#[test]
fn engines_take_an_optional_action_and_gpu_faults_a_known_fault() {
    let cli = parse(&["engines", "--json"]).unwrap();
    let Command::Engines(a) = cli.command else {
        panic!()
    };
    assert!(a.json && a.action.is_none());
    let cli = parse(&["engines", "drain", "worker-2"]).unwrap();
    let Command::Engines(a) = cli.command else {
        panic!()
    };
    assert!(matches!(a.action, Some(EngineAction::Drain { ref id }) if id == "worker-2"));
    let cli = parse(&["gpus", "fault", "worker-1", "0", "ecc"]).unwrap();
    let Command::Gpus {
        cmd: GpusCmd::Fault { gpu, fault, .. },
    } = cli.command
    else {
        panic!()
    };
    assert_eq!((gpu, fault), (0, GpuFault::Ecc));
    assert!(parse(&["gpus", "fault", "worker-1", "0", "melt"]).is_err());
}

#[test]
fn bench_has_its_defaults() {
    let cli = parse(&["bench", "--jobs", "2000"]).unwrap();
    let Command::Bench(a) = cli.command else {
        panic!()
    };
    assert_eq!(
        (a.jobs, a.concurrency, a.duration_ms, a.rate),
        (2000, 64, 0, None)
    );
    assert_eq!(a.timeout, Duration::from_secs(120));
    assert!(parse(&["bench"]).is_err(), "--jobs is required");
}

#[test]
fn tester_run_takes_a_scenario_by_name_or_number() {
    let cli = parse(&[
        "tester",
        "run",
        "--worker",
        "2",
        "--scenario",
        "crash_mid_task",
        "--jobs",
        "100",
    ])
    .unwrap();
    let Command::Tester(t) = cli.command else {
        panic!()
    };
    let Some(TesterCmd::Run(r)) = t.cmd else {
        panic!()
    };
    assert_eq!(
        (r.worker, r.scenario, r.jobs, r.count),
        (2, Scenario::CrashMidTask, 100, 1)
    );
    assert_eq!(r.duration_ms, 200);
    let cli = parse(&["tester", "run", "--worker", "1", "--scenario", "4"]).unwrap();
    let Command::Tester(t) = cli.command else {
        panic!()
    };
    let Some(TesterCmd::Run(r)) = t.cmd else {
        panic!()
    };
    assert_eq!(r.scenario, Scenario::CrashAfterComplete);
    assert!(parse(&["tester", "run", "--worker", "1", "--scenario", "9"]).is_err());
    let cli = parse(&["tester"]).unwrap();
    let Command::Tester(t) = cli.command else {
        panic!()
    };
    assert!(t.cmd.is_none());
}

#[test]
fn tester_chaos_reads_durations() {
    let cli = parse(&[
        "tester",
        "chaos",
        "--duration",
        "2m",
        "--rate",
        "5",
        "--no-stack",
    ])
    .unwrap();
    let Command::Tester(t) = cli.command else {
        panic!()
    };
    let Some(TesterCmd::Chaos(c)) = t.cmd else {
        panic!()
    };
    assert_eq!(c.duration, Duration::from_secs(120));
    assert_eq!(c.rate, 5.0);
    assert!(c.no_stack);
}

#[test]
fn durations_take_units() {
    assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
    assert!(parse_duration("soon").is_err());
    assert!(parse_duration("5d").is_err());
}

#[test]
fn admin_worker_token_derives_the_engines_credential_from_the_fleet_secret() {
    let cli = parse(&["admin", "worker-token", "worker-1", "--worker-secret", "s3"]).unwrap();
    let Command::Admin {
        cmd: AdminCmd::WorkerToken {
            engine_id,
            worker_secret,
        },
    } = cli.command
    else {
        panic!("not admin worker-token: {:?}", cli.command);
    };
    let token = crate::worker_token(&engine_id, &worker_secret).unwrap();
    assert_eq!(token.len(), 64);
    assert!(gpuq_common::credentials::verify_worker_token(
        &gpuq_common::config::Secret::new("s3"),
        "worker-1",
        &token
    ));
    assert!(crate::worker_token("worker-1", "").is_err(), "no secret");
    assert!(
        crate::worker_token("bad id", "s3").is_err(),
        "not an engine id"
    );
}

#[test]
fn the_read_token_is_a_global_connection_flag() {
    let cli = parse(&["engines", "--read-token", "r"]).unwrap();
    assert_eq!(cli.conn.read_token.as_deref(), Some("r"));
}
