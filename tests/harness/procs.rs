//! Service processes under a restart loop, like `scripts/dev.sh` runs them: a process that dies
//! (crash injection, SIGKILL) is started again after a short pause and the restart is counted.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::Mutex;

pub struct Supervised {
    pub name: String,
    stopping: Arc<AtomicBool>,
    restarts: Arc<AtomicU32>,
    child: Arc<Mutex<Option<Child>>>,
    paused: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

fn start(bin: &Path, env: &[(String, String)], log: &Path) -> std::io::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    Command::new(bin)
        // A knob of the test process, not a setting: the services would log it as an unknown
        // GPUQ_ variable (they got the store it selects in GPUQ_STORE_URL).
        .env_remove(crate::TEST_STORE_ENV)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
}

impl Supervised {
    pub fn spawn(
        name: &str,
        bin: &Path,
        env: Vec<(String, String)>,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        if !bin.exists() {
            anyhow::bail!(
                "{} is missing: run `cargo build --workspace --bins` first",
                bin.display()
            );
        }
        let log: PathBuf = dir.join(format!("{name}.log"));
        let child = Arc::new(Mutex::new(Some(start(bin, &env, &log)?)));
        let stopping = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let restarts = Arc::new(AtomicU32::new(0));
        let task = {
            let (child, stopping, paused, restarts) = (
                child.clone(),
                stopping.clone(),
                paused.clone(),
                restarts.clone(),
            );
            let bin = bin.to_path_buf();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    let mut guard = child.lock().await;
                    let exited = match guard.as_mut() {
                        Some(c) => c.try_wait().ok().flatten().map(|s| s.to_string()),
                        None => Some("not started".into()),
                    };
                    if let Some(how) = exited
                        && !paused.load(Ordering::SeqCst)
                        && !stopping.load(Ordering::SeqCst)
                    {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let n = restarts.fetch_add(1, Ordering::SeqCst) + 1;
                        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&log) {
                            use std::io::Write;
                            let _ = writeln!(f, "restart {n} (the process ended: {how})");
                        }
                        *guard = start(&bin, &env, &log).ok();
                    }
                }
            })
        };
        Ok(Self {
            name: name.to_string(),
            stopping,
            restarts,
            child,
            paused,
            task: Some(task),
        })
    }

    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::SeqCst)
    }

    pub async fn pid(&self) -> Option<u32> {
        self.child.lock().await.as_ref().and_then(|c| c.id())
    }

    /// Sends a signal to the current process (the restart loop brings it back unless paused).
    pub async fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid().await {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGKILL and keep it down until `resume`.
    pub async fn kill_and_hold(&self) {
        self.paused.store(true, Ordering::SeqCst);
        let mut g = self.child.lock().await;
        if let Some(c) = g.as_mut() {
            let _ = c.kill().await;
        }
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// SIGTERM, up to 10 s to stop, then SIGKILL; no restart.
    pub async fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let mut g = self.child.lock().await;
        if let Some(c) = g.as_mut() {
            if let Some(pid) = c.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(10), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Ok(mut g) = self.child.try_lock()
            && let Some(c) = g.as_mut()
        {
            let _ = c.start_kill();
        }
    }
}
