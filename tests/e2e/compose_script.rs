//! `scripts/compose.sh` refuses bad input before it starts anything: no engine needed, so these
//! run in the main pass (the live compose tests are in `compose.rs`).

use std::process::Command;

use gpuq_e2e::repo_root;

/// Runs `scripts/compose.sh ARGS` with `env`, no engine reachable and none to start. Returns
/// (exit code, the `compose.sh:` lines of stderr).
fn compose_sh(args: &[&str], env: &[(&str, &str)]) -> (i32, Vec<String>) {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/compose.sh"))
        .args(args)
        .env("DOCKER_HOST", "unix:///nonexistent/docker.sock")
        .env("GPUQ_DOCKERD", "/nonexistent/dockerd")
        .envs(env.iter().copied())
        .output()
        .expect("bash runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reasons = stderr
        .lines()
        .filter(|l| l.starts_with("compose.sh: "))
        .map(String::from)
        .collect();
    (out.status.code().unwrap_or(-1), reasons)
}

/// `compose.sh ARGS` failed with exit code 1 and exactly one reason, which mentions `want`.
fn assert_refused(args: &[&str], env_file: &str, want: &[&str]) {
    let (code, reasons) = compose_sh(args, &[("GPUQ_COMPOSE_ENV_FILE", env_file)]);
    assert_eq!(code, 1, "{args:?} exited {code}: {reasons:?}");
    assert_eq!(reasons.len(), 1, "one line of reason: {reasons:?}");
    for w in want {
        assert!(
            reasons[0].contains(w),
            "{:?} does not mention {w:?}",
            reasons[0]
        );
    }
}

/// An env file as `compose.sh init` writes it, in a fresh directory, with `PUBLISH_ADDRESS`.
fn initialised_env(publish: &str) -> (tempdir::Dir, String) {
    let dir = tempdir::Dir::new();
    let path = dir.0.join(".env");
    let path_s = path.to_str().unwrap().to_string();
    let (code, reasons) = compose_sh(&["init"], &[("GPUQ_COMPOSE_ENV_FILE", &path_s)]);
    assert_eq!(code, 0, "init: {reasons:?}");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "PUBLISH_ADDRESS=127.0.0.1",
            &format!("PUBLISH_ADDRESS={publish}"),
        ),
    )
    .unwrap();
    (dir, path_s)
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let p =
                std::env::temp_dir().join(format!("gpuq-compose-test-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn init_writes_every_secret_and_never_overwrites_an_env_file() {
    let (_dir, path) = initialised_env("127.0.0.1");
    let text = std::fs::read_to_string(&path).unwrap();
    for key in [
        "RABBITMQ_ERLANG_COOKIE",
        "RABBITMQ_GATEWAY_PASSWORD",
        "RABBITMQ_WORKER_PASSWORD",
        "RABBITMQ_MANAGER_PASSWORD",
        "REDIS_PASSWORD",
        "REDIS_GATEWAY_PASSWORD",
        "REDIS_WORKER_PASSWORD",
        "REDIS_MANAGER_PASSWORD",
        "MONGO_GPUQ_PASSWORD",
        "GPUQ_API_KEYS",
        "GPUQ_ADMIN_TOKEN",
        "GPUQ_READ_TOKEN",
        "GPUQ_WORKER_SECRET",
        "GRAFANA_ADMIN_PASSWORD",
    ] {
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing"));
        assert!(
            value.len() >= 32 && value.chars().all(|c| c.is_ascii_hexdigit()),
            "{key}={value:?} is not a generated secret"
        );
    }
    // Each worker's credential is derived from the fleet secret, as the manager checks it.
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} missing"))
            .to_string()
    };
    let fleet = gpuq_common::config::Secret::new(value("GPUQ_WORKER_SECRET"));
    for n in 1..=3 {
        let token = value(&format!("WORKER{n}_TOKEN"));
        assert!(
            gpuq_common::credentials::verify_worker_token(&fleet, &format!("worker-{n}"), &token),
            "WORKER{n}_TOKEN={token:?} is not worker-{n}'s credential"
        );
    }
    let before = text.clone();
    assert_refused(&["init"], &path, &["not overwritten"]);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
}

#[test]
fn up_without_an_env_file_says_to_run_init() {
    let dir = tempdir::Dir::new();
    let path = dir.0.join(".env");
    assert_refused(
        &["up", "--local-images"],
        path.to_str().unwrap(),
        &["compose.sh init"],
    );
}

#[test]
fn up_with_a_half_filled_env_file_names_the_missing_setting() {
    let (_dir, path) = initialised_env("127.0.0.1");
    let text = std::fs::read_to_string(&path).unwrap();
    let half: String = text
        .lines()
        .map(|l| {
            if l.starts_with("REDIS_PASSWORD=") {
                "REDIS_PASSWORD="
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&path, half).unwrap();
    assert_refused(&["up", "--local-images"], &path, &["REDIS_PASSWORD"]);
}

#[test]
fn up_with_a_published_port_taken_names_the_port_before_starting_anything() {
    // The public-image shape publishes on PUBLISH_ADDRESS: a loopback address of this test's own.
    let (_dir, path) = initialised_env("127.0.0.3");
    let _held = std::net::TcpListener::bind("127.0.0.3:8080").expect("127.0.0.3:8080 is free");
    assert_refused(&["up"], &path, &["127.0.0.3:8080", "gateway"]);
}

#[test]
fn up_without_a_docker_engine_says_so() {
    // Published on a loopback address of this test's own, so no port of a running stack is in
    // the way of the engine check.
    let (_dir, path) = initialised_env("127.0.0.4");
    assert_refused(&["up"], &path, &["no Docker engine"]);
}
