//! Where a test runs: the environment scripts/test.sh sets, the checkout and its binaries, the
//! store a stack gets, free ports, and polling.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// Polls `check` every 50 ms until it holds; panics after `timeout`, naming `what`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Required environment, set by `scripts/test.sh`.
pub fn test_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: run the suites through scripts/test.sh (it starts the local stack)"
        )
    })
}

/// The native stack's TLS files (scripts/stack.sh makes them beside its CA): the CA
/// `GPUQ_TEST_TLS_CA` names, and the server certificate and key it signed (for `localhost` and
/// 127.0.0.1), which the TLS tests' services serve HTTPS with too.
#[derive(Debug, Clone)]
pub struct TestTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestTls {
    /// The settings of a service that serves HTTPS with the stack's certificate and trusts its CA.
    pub fn service_env(&self) -> Vec<(String, String)> {
        [
            ("GPUQ_TLS_CERT_FILE", &self.cert),
            ("GPUQ_TLS_KEY_FILE", &self.key),
            ("GPUQ_TLS_CA_FILE", &self.ca),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.display().to_string()))
        .collect()
    }
}

/// The stack's TLS files; panics with what is missing (scripts/test.sh sets the variable,
/// scripts/stack.sh up makes the files).
pub fn test_tls() -> TestTls {
    let ca = PathBuf::from(test_env("GPUQ_TEST_TLS_CA"));
    let tls = TestTls {
        cert: ca.with_file_name("server.pem"),
        key: ca.with_file_name("server.key"),
        ca,
    };
    for f in [&tls.ca, &tls.cert, &tls.key] {
        assert!(
            f.is_file(),
            "{} is missing: scripts/stack.sh up makes the stack's TLS files",
            f.display()
        );
    }
    tls
}

/// The broker URLs of the admin (`GPUQ_TEST_AMQP_URLS`): what the harness and the tests' own
/// checks use; the services may log in as their own users (`access`).
pub fn admin_amqp_urls() -> Vec<String> {
    test_env("GPUQ_TEST_AMQP_URLS")
        .split(',')
        .map(String::from)
        .collect()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

pub fn bin_dir() -> PathBuf {
    std::env::var("GPUQ_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join("target/debug"))
}

/// Selects every stack's store: unset or `sqlite`, a SQLite file in the stack's directory;
/// `mongodb`, a database named after the stack's prefix on the server `GPUQ_TEST_MONGODB_URL`
/// names. `scripts/test.sh` runs the pipeline suite a second time with `mongodb`.
pub const TEST_STORE_ENV: &str = "GPUQ_TEST_STORE";

/// The store the services get: the harness's, unless `GPUQ_BENCH_SERVICES_STORE=own` gives them
/// a SQLite file of their own that they make themselves. The harness makes its store with this
/// build's schema (indexes, counters' triggers), which every later write pays whichever build
/// writes it; an A/B against an older build (`GPUQ_BIN_DIR`) lets it make its own schema.
pub fn services_store(store_url: &str, dir: &Path) -> String {
    match std::env::var("GPUQ_BENCH_SERVICES_STORE").as_deref() {
        Ok("own") => format!("sqlite://{}", dir.join("services.db").display()),
        _ => store_url.to_string(),
    }
}

/// The `GPUQ_STORE_URL` of a stack with this prefix and directory, as `GPUQ_TEST_STORE` selects.
pub fn test_store_url(prefix: &str, dir: &Path) -> String {
    match std::env::var(TEST_STORE_ENV).as_deref() {
        Err(std::env::VarError::NotPresent) | Ok("" | "sqlite") => {
            format!("sqlite://{}", dir.join("gpuq.db").display())
        }
        // Commits not synced to the disk (the many-engines benchmark's comparison).
        Ok("sqlite-normal") => format!(
            "sqlite://{}?synchronous=normal",
            dir.join("gpuq.db").display()
        ),
        Ok("mongodb") => mongodb_url_with_database(&test_env("GPUQ_TEST_MONGODB_URL"), prefix),
        other => panic!("{TEST_STORE_ENV}={other:?}: use sqlite, sqlite-normal or mongodb"),
    }
}

/// `url`, a MongoDB server (with or without a database and options), naming database `db`
/// instead. Credentials keep authenticating where they did: against the URL's database (or
/// `admin`) unless its `authSource` says otherwise.
pub fn mongodb_url_with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query).filter(|q| !q.is_empty())),
        None => (url, None),
    };
    let (scheme, rest) = base
        .split_once("://")
        .unwrap_or_else(|| panic!("{url:?} is not a mongodb:// URL"));
    let (hosts, old_db) = rest.split_once('/').unwrap_or((rest, ""));
    let mut params: Vec<String> = query.map(String::from).into_iter().collect();
    let has_auth_source = query.is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.to_ascii_lowercase().starts_with("authsource="))
    });
    if hosts.contains('@') && !has_auth_source {
        let source = if old_db.is_empty() { "admin" } else { old_db };
        params.push(format!("authSource={source}"));
    }
    if params.is_empty() {
        format!("{scheme}://{hosts}/{db}")
    } else {
        format!("{scheme}://{hosts}/{db}?{}", params.join("&"))
    }
}

/// Where test processes reserve the ports they hand out (see `free_port`).
const PORT_RESERVATIONS: &str = "/tmp/gpuq-e2e-ports";
/// Ports handed out: below Linux's ephemeral range (32768–60999), so no outgoing connection
/// takes one, and above the local stack's own (RabbitMQ's distribution ports are 25672–25674).
const TEST_PORTS: std::ops::Range<u16> = 26_000..32_000;
/// A reservation older than this belongs to a test run that is over.
const RESERVATION_TTL: Duration = Duration::from_secs(30 * 60);

/// A port for a service a test spawns. Suites run in parallel processes: a port found free by
/// binding port 0 and letting go could be handed to another test's service before ours binds
/// it, and then our readiness check talks to theirs. Each port is therefore reserved with a
/// file made with `create_new` (atomic across processes) and checked free by binding it.
pub fn free_port() -> u16 {
    std::fs::create_dir_all(PORT_RESERVATIONS).expect("the port reservation directory");
    let span = u128::from(TEST_PORTS.end - TEST_PORTS.start);
    let start = (Uuid::new_v4().as_u128() % span) as u16;
    for i in 0..(TEST_PORTS.end - TEST_PORTS.start) {
        let port = TEST_PORTS.start + (start + i) % (TEST_PORTS.end - TEST_PORTS.start);
        let file = PathBuf::from(PORT_RESERVATIONS).join(port.to_string());
        let stale = std::fs::metadata(&file)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() > RESERVATION_TTL);
        if stale {
            let _ = std::fs::remove_file(&file);
        }
        if std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&file)
            .is_err()
        {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {TEST_PORTS:?} (reservations in {PORT_RESERVATIONS})");
}

#[cfg(test)]
mod tests {
    use super::mongodb_url_with_database as with_db;

    #[test]
    fn a_mongodb_url_gets_the_database_in_place_of_its_own_and_keeps_its_options() {
        assert_eq!(
            with_db("mongodb://127.0.0.1:21017", "t1"),
            "mongodb://127.0.0.1:21017/t1"
        );
        assert_eq!(
            with_db("mongodb://127.0.0.1:21017/", "t1"),
            "mongodb://127.0.0.1:21017/t1"
        );
        assert_eq!(
            with_db("mongodb://a:1,b:2/gpuq?replicaSet=rs0&w=majority", "t2"),
            "mongodb://a:1,b:2/t2?replicaSet=rs0&w=majority"
        );
        assert_eq!(
            with_db("mongodb+srv://cluster.example/?retryWrites=true", "t3"),
            "mongodb+srv://cluster.example/t3?retryWrites=true"
        );
    }

    #[test]
    fn credentials_keep_authenticating_against_the_database_they_did() {
        assert_eq!(
            with_db("mongodb://u:p@h:1/gpuq?w=1", "t1"),
            "mongodb://u:p@h:1/t1?w=1&authSource=gpuq"
        );
        assert_eq!(
            with_db("mongodb://u:p@h:1", "t1"),
            "mongodb://u:p@h:1/t1?authSource=admin"
        );
        assert_eq!(
            with_db("mongodb://u:p@h:1/gpuq?authSource=users", "t1"),
            "mongodb://u:p@h:1/t1?authSource=users"
        );
    }
}
