//! Each service's Redis handle heals after an authentication failure, against a real
//! `redis-server` of the test's own (a free loopback port, no data on disk): the gateway's `Kv`,
//! the worker's `Coordinator` and the manager's `Registry` log in as an ACL user; the user is
//! deleted (Redis closes its connections, and every reconnect now fails with WRONGPASS), then
//! made again. redis-rs's `ConnectionManager` alone never retries an authentication failure:
//! without `coord::conn`'s rebuild, the handles stay cut off after the user is back.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpuq_common::coord::keys::Keys;
use gpuq_common::coord::kv::Kv;
use gpuq_common::coord::lease::Coordinator;
use gpuq_common::coord::registry::Registry;
use gpuq_common::coord::{CoordError, CoordResult};

const USER: &str = "gpuq-reconnect";
const PASSWORD: &str = "reconnect-test-password";

/// A throwaway `redis-server` on 127.0.0.1; killed (by its pid) when dropped.
struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test.sh installs redis-server)");
        let server = Server {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.admin().is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// A plain connection as the default user (no password on this server).
    fn admin(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(format!("redis://127.0.0.1:{}/0", self.port))?.get_connection()
    }

    fn acl(&self, args: &[&str]) {
        let mut c = self.admin().expect("the admin connection");
        redis::cmd("ACL")
            .arg(args)
            .query::<redis::Value>(&mut c)
            .unwrap_or_else(|e| panic!("ACL {args:?}: {e}"));
    }

    fn add_user(&self) {
        let pass = format!(">{PASSWORD}");
        self.acl(&[
            "SETUSER", USER, "reset", "on", &pass, "~gpuq:*", "&gpuq:*", "+@all",
        ]);
    }

    fn url(&self) -> String {
        format!("redis://{USER}:{PASSWORD}@127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The three services' handles, each pinged the way its service checks readiness.
struct Handles {
    kv: Kv,
    lease: Coordinator,
    registry: Registry,
}

impl Handles {
    async fn pings(&self) -> [(&'static str, CoordResult<()>); 3] {
        [
            ("gateway Kv", self.kv.ping().await),
            ("worker Coordinator", self.lease.ping().await),
            ("manager Registry", self.registry.ping().await),
        ]
    }
}

fn is_auth_failure(e: &CoordError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("auth") || text.contains("wrongpass")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_handle_reconnects_once_its_acl_user_works_again() {
    let server = Server::start();
    server.add_user();
    let keys = Keys::new("gpuq:reconnect");
    let handles = Handles {
        kv: Kv::lazy(&server.url()).unwrap(),
        lease: Coordinator::connect(&server.url(), keys.clone(), "w".into(), 10_000)
            .await
            .expect("the worker connects while its user exists"),
        registry: Registry::lazy(&server.url(), keys).unwrap(),
    };
    for (name, r) in handles.pings().await {
        r.unwrap_or_else(|e| panic!("{name} before: {e}"));
    }

    // Redis closes the deleted user's connections; each handle reconnects and is refused, again
    // and again for 2 s (the rebuilds back off meanwhile).
    server.acl(&["DELUSER", USER]);
    let deleted = Instant::now();
    let deadline = deleted + Duration::from_secs(10);
    let mut refused = [false; 3];
    while refused != [true; 3] || deleted.elapsed() < Duration::from_secs(2) {
        assert!(
            Instant::now() < deadline,
            "not every handle saw its login refused within 10 s: {refused:?}"
        );
        for (i, (_, r)) in handles.pings().await.into_iter().enumerate() {
            refused[i] |= r.as_ref().is_err_and(is_auth_failure);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The user is back: within a few backoff steps every handle answers again.
    server.add_user();
    let back = Instant::now();
    let deadline = back + Duration::from_secs(15);
    loop {
        let pings = handles.pings().await;
        if pings.iter().all(|(_, r)| r.is_ok()) {
            break;
        }
        let errors: Vec<String> = pings
            .iter()
            .filter_map(|(n, r)| r.as_ref().err().map(|e| format!("{n}: {e}")))
            .collect();
        assert!(
            Instant::now() < deadline,
            "15 s after the user was made again, still failing: {errors:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "every handle answered {} ms after the user was back",
        back.elapsed().as_millis()
    );
}
