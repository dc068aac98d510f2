//! The box a `command` job runs in (Linux). Jobs are other people's code, so each attempt gets:
//! - the job user (`GPUQ_JOB_USER`), never the worker's: it cannot read the worker's files, and
//!   the worker is non-dumpable (`harden_self`), so no job reads its environment or memory;
//! - a fresh private working directory (`HOME`, and `TMPDIR` inside it), removed afterwards;
//! - an environment built from scratch: a fixed base, then the job's `env` minus the names
//!   `gpuq_common::job_env` refuses;
//! - resource limits (open files, processes, file size, no core dumps, address space if set);
//! - its own cgroup where the worker can make one (v2, else v1's `pids`): the job's whole process
//!   tree is killed through it, so `setsid` or a double fork leaves nothing behind. Where no
//!   cgroup can be made the worker says so at start and kills the process group instead.
//!
//! The child joins its cgroup, takes its limits and drops to the job user between fork and exec
//! (`pre_exec`), with nothing but system calls on prepared buffers.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gpuq_common::config::JobSandboxConfig;
use gpuq_common::job::JobId;
use nix::fcntl::OFlag;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Pid, Uid, User};

/// The PATH every job starts with.
pub const JOB_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The user jobs run as.
#[derive(Debug, Clone)]
pub struct JobUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Which cgroup hierarchy holds the jobs' cgroups.
#[derive(Debug, Clone, PartialEq)]
enum Cgroups {
    /// cgroup v2: `cgroup.kill` where the kernel has it.
    V2(PathBuf),
    /// cgroup v1's `pids` controller: forks are stopped with `pids.max`, then every member killed.
    V1Pids(PathBuf),
}

/// The worker's side: made once at start.
#[derive(Debug)]
pub struct Sandbox {
    config: JobSandboxConfig,
    /// `None`: jobs run as the worker's user (`GPUQ_JOB_USER` empty).
    user: Option<JobUser>,
    /// Why jobs cannot run here at all (a job user configured but unusable), if so.
    unusable: Option<String>,
    /// This process's parent cgroup of its jobs' cgroups; `None`: process groups only.
    cgroups: Option<Cgroups>,
}

impl Sandbox {
    /// Resolves the job user, prepares the jobs' directory and finds a cgroup hierarchy; says at
    /// start what the box is made of, and what it lacks.
    pub fn start(config: &JobSandboxConfig, engine_id: &str) -> Self {
        let mut unusable = None;
        let user = if config.user.is_empty() {
            tracing::warn!(
                "GPUQ_JOB_USER is empty: command jobs run as the worker's own user (a single-user machine only)"
            );
            None
        } else {
            match resolve_user(&config.user) {
                Ok(u) => Some(u),
                Err(e) => {
                    tracing::error!(user = %config.user, error.message = %e, "command jobs cannot run on this worker");
                    unusable = Some(e);
                    None
                }
            }
        };
        if let Err(e) = prepare_base(&config.dir) {
            let e = format!(
                "cannot prepare the jobs' directory {}: {e}",
                config.dir.display()
            );
            tracing::error!(error.message = %e, "command jobs cannot run on this worker");
            unusable.get_or_insert(e);
        }
        let cgroups = match find_cgroups(engine_id) {
            Ok(c) => {
                tracing::info!(cgroups = ?c, "command jobs run in cgroups of their own");
                if !favors_dynamic_cgroups() {
                    tracing::warn!(
                        "the cgroup hierarchy is not mounted with favordynmods: moving each job into its cgroup waits for an RCU grace period (~7 ms more per job start here); `mount -o remount,favordynmods <cgroup mount>` (kernel 6.0+) removes it"
                    );
                }
                Some(c)
            }
            Err(e) => {
                tracing::warn!(
                    reason = %e,
                    "no cgroup for jobs here: a job's process group is killed, a process that leaves it (setsid) is not"
                );
                None
            }
        };
        Self {
            config: config.clone(),
            user,
            unusable,
            cgroups,
        }
    }

    /// What a job's `result` and the logs say about the box.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "user": self.user.as_ref().map(|u| u.name.as_str()),
            "cgroup": match &self.cgroups {
                Some(Cgroups::V2(_)) => "v2",
                Some(Cgroups::V1Pids(_)) => "v1-pids",
                None => "none (process group)",
            },
        })
    }

    /// The box of one attempt: its directory and cgroup made, its child's setup prepared.
    pub fn enter(&self, job: JobId, attempt: u32) -> Result<JobBox, String> {
        if let Some(why) = &self.unusable {
            return Err(why.clone());
        }
        let dir = self.config.dir.join(format!("{job}-{attempt}"));
        let _ = std::fs::remove_dir_all(&dir);
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot make {}: {e}", tmp.display()))?;
        for d in [&dir, &tmp] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("cannot restrict {}: {e}", d.display()))?;
            if let Some(u) = &self.user {
                nix::unistd::chown(d, Some(u.uid), Some(u.gid))
                    .map_err(|e| format!("cannot give {} to {}: {e}", d.display(), u.name))?;
            }
        }
        let cgroup = match &self.cgroups {
            Some(c) => Some(JobCgroup::make(c, &format!("{job}-{attempt}"))?),
            None => None,
        };
        let join = cgroup
            .as_ref()
            .map(|c| CString::new(c.procs_file().as_os_str().as_bytes()).expect("no NUL"));
        Ok(JobBox {
            dir,
            tmp,
            user: self.user.clone(),
            cgroup,
            join,
            limits: self.limits(),
            closed: false,
        })
    }

    fn limits(&self) -> Vec<(Resource, u64)> {
        let c = &self.config;
        let mut l = vec![(Resource::RLIMIT_CORE, 0)];
        for (r, v) in [
            (Resource::RLIMIT_NOFILE, c.max_open_files),
            (Resource::RLIMIT_NPROC, c.max_processes),
            (Resource::RLIMIT_FSIZE, c.max_file_bytes),
            (Resource::RLIMIT_AS, c.memory_bytes),
        ] {
            if v > 0 {
                l.push((r, v));
            }
        }
        l
    }

    /// Removes this process's parent cgroup (at shutdown; empty by then).
    pub fn close(&self) {
        if let Some(Cgroups::V2(p) | Cgroups::V1Pids(p)) = &self.cgroups {
            let _ = std::fs::remove_dir(p);
        }
    }
}

/// One attempt's box.
#[derive(Debug)]
pub struct JobBox {
    dir: PathBuf,
    tmp: PathBuf,
    user: Option<JobUser>,
    cgroup: Option<JobCgroup>,
    /// The cgroup's `cgroup.procs`, ready for the child.
    join: Option<CString>,
    limits: Vec<(Resource, u64)>,
    /// Set by `close`; a box dropped without it (its run abandoned) is cleaned up in `drop`.
    closed: bool,
}

impl JobBox {
    /// Puts the engine's command in the box: working directory, environment base (the caller
    /// adds the job's own variables after it), limits, cgroup and user.
    pub fn apply(&self, cmd: &mut tokio::process::Command) {
        let name = self.user.as_ref().map_or_else(
            || {
                User::from_uid(Uid::current())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_default()
            },
            |u| u.name.clone(),
        );
        cmd.current_dir(&self.dir)
            .env_clear()
            .env("PATH", JOB_PATH)
            .env("HOME", &self.dir)
            .env("TMPDIR", &self.tmp)
            .env("USER", &name)
            .env("LOGNAME", &name)
            .env("LANG", "C.UTF-8");
        let join = self.join.clone();
        let limits = self.limits.clone();
        let ids = self.user.as_ref().map(|u| (u.uid, u.gid));
        // SAFETY: runs in the child between fork and exec; it only makes system calls on data
        // prepared before the fork (no allocation, no lock).
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || child_setup(join.as_deref(), &limits, ids));
        }
    }

    /// Kills everything the job started: its cgroup, and its process group.
    pub fn kill_all(&self, pgid: u32) {
        if let Some(c) = &self.cgroup {
            c.kill();
        }
        if pgid > 0 {
            let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
        }
    }

    /// After the run: nothing of the job is left running, its cgroup and directory are removed.
    pub async fn close(mut self, pgid: u32) {
        self.closed = true;
        self.kill_all(pgid);
        if let Some(c) = &self.cgroup {
            c.remove().await;
        }
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
        if let Ok(Err(e)) = removed {
            tracing::warn!(dir = %self.dir.display(), error.message = %e, "could not remove the job's directory");
        }
    }
}

impl Drop for JobBox {
    fn drop(&mut self) {
        if self.closed {
            return;
        }
        if let Some(c) = &self.cgroup {
            c.kill();
            let _ = std::fs::remove_dir(&c.dir);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The child's side, between fork and exec.
fn child_setup(
    join: Option<&std::ffi::CStr>,
    limits: &[(Resource, u64)],
    ids: Option<(Uid, Gid)>,
) -> std::io::Result<()> {
    if let Some(procs) = join {
        // "0" is this process. The fd closes when dropped.
        let fd = nix::fcntl::open(procs, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
        if nix::unistd::write(&fd, b"0")? != 1 {
            return Err(std::io::Error::other(
                "joining the job's cgroup: short write",
            ));
        }
    }
    for &(r, v) in limits {
        setrlimit(r, v, v)?;
    }
    if let Some((uid, gid)) = ids {
        nix::unistd::setgroups(&[])?;
        nix::unistd::setgid(gid)?;
        nix::unistd::setuid(uid)?;
    }
    Ok(())
}

/// Makes the worker non-dumpable: no process of another user, nor of its own user without
/// privilege (a job run as the worker's user), can read its `/proc` environment or memory.
pub fn harden_self() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error.message = %e, "could not make the worker non-dumpable");
    }
}

fn resolve_user(name: &str) -> Result<JobUser, String> {
    let u = User::from_name(name)
        .map_err(|e| format!("cannot look up user {name}: {e}"))?
        .ok_or_else(|| {
            format!("no user {name} on this machine (create it: useradd --system {name})")
        })?;
    if u.uid.is_root() {
        return Err(format!("job user {name} is root"));
    }
    let me = Uid::effective();
    if !me.is_root() {
        return Err(format!(
            "the worker runs as uid {me}, not root: it cannot start jobs as {name}"
        ));
    }
    Ok(JobUser {
        name: name.to_string(),
        uid: u.uid,
        gid: u.gid,
    })
}

/// The jobs' parent directory: only its owner lists it; each job gets into its own.
fn prepare_base(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
}

/// This process's cgroup for its jobs, under the one it runs in: v2 first, then v1's `pids`.
fn find_cgroups(engine_id: &str) -> Result<Cgroups, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let prefix = format!("gpuq-{engine_id}-");
    let name = format!("{prefix}{}", std::process::id());
    let mut tried = vec![];
    let v2_path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_start_matches('/').to_string());
    if let Some(rel) = &v2_path {
        for mount in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
            let base = Path::new(mount).join(rel);
            if !base.join("cgroup.procs").exists()
                || !Path::new(mount).join("cgroup.procs").exists()
            {
                continue;
            }
            let dir = base.join(&name);
            match make_parent(&dir) {
                Ok(()) => {
                    sweep_dead(&base, &prefix);
                    return Ok(Cgroups::V2(dir));
                }
                Err(e) => tried.push(format!("{}: {e}", dir.display())),
            }
        }
    }
    let pids = own.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
        ctl.split(',')
            .any(|c| c == "pids")
            .then(|| path.trim_start_matches('/').to_string())
    });
    if let Some(rel) = pids {
        let base = Path::new("/sys/fs/cgroup/pids").join(rel);
        let dir = base.join(&name);
        match make_parent(&dir) {
            Ok(()) => {
                sweep_dead(&base, &prefix);
                return Ok(Cgroups::V1Pids(dir));
            }
            Err(e) => tried.push(format!("{}: {e}", dir.display())),
        }
    }
    if tried.is_empty() {
        tried.push("no writable cgroup v2 or v1 pids hierarchy".into());
    }
    Err(tried.join("; "))
}

/// Whether a cgroup mount says `favordynmods`: the kernel then keeps cgroup migrations (each
/// job's move into its cgroup) free of the RCU grace period they otherwise wait for.
fn favors_dynamic_cgroups() -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.contains(" cgroup") && l.contains("favordynmods"))
    })
}

/// Removes what earlier processes of this engine that died without `Sandbox::close` (a crash, a
/// kill -9) left under `base`: their jobs' cgroups, emptied by the kernel as the jobs ended, and
/// their own. A cgroup that still holds a process is not removable, and is left.
fn sweep_dead(base: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid as u32 == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if let Ok(jobs) = std::fs::read_dir(e.path()) {
            for j in jobs.flatten().filter(|j| j.path().is_dir()) {
                let _ = std::fs::remove_dir(j.path());
            }
        }
        let _ = std::fs::remove_dir(e.path());
    }
}

fn make_parent(dir: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// One attempt's cgroup.
#[derive(Debug)]
struct JobCgroup {
    dir: PathBuf,
    v1: bool,
}

impl JobCgroup {
    fn make(parent: &Cgroups, name: &str) -> Result<Self, String> {
        let (p, v1) = match parent {
            Cgroups::V2(p) => (p, false),
            Cgroups::V1Pids(p) => (p, true),
        };
        let dir = p.join(name);
        make_parent(&dir).map_err(|e| format!("cannot make cgroup {}: {e}", dir.display()))?;
        Ok(Self { dir, v1 })
    }

    fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn members(&self) -> Vec<i32> {
        std::fs::read_to_string(self.procs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kills every member: `cgroup.kill` where there is one, else forks are stopped (v1's
    /// `pids.max` 0) and the members killed until none is left.
    fn kill(&self) {
        if !self.v1 && std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        if self.v1 {
            let _ = std::fs::write(self.dir.join("pids.max"), "0");
        }
        for _ in 0..100 {
            let members = self.members();
            if members.is_empty() {
                return;
            }
            for pid in members {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    /// Removes the cgroup once its killed members are gone (a moment after SIGKILL).
    async fn remove(&self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            self.kill();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(cgroup = %self.dir.display(), "could not remove the job's cgroup");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> JobSandboxConfig {
        JobSandboxConfig {
            user: String::new(),
            dir: dir.to_path_buf(),
            max_open_files: 64,
            max_processes: 0,
            max_file_bytes: 1 << 20,
            memory_bytes: 0,
        }
    }

    #[tokio::test]
    async fn an_attempt_gets_a_private_directory_limits_and_an_environment_from_scratch() {
        let base = std::env::temp_dir().join(format!("gpuq-sandbox-test-{}", std::process::id()));
        let sandbox = Sandbox::start(&config(&base), "unit");
        let job = uuid::Uuid::now_v7();
        let jb = sandbox.enter(job, 1).unwrap();
        let dir = base.join(format!("{job}-1"));
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.args([
            "-c",
            "pwd; echo $HOME $TMPDIR $PATH; ulimit -n; ulimit -c; env | wc -l",
        ])
        .env("SECRET_OF_THE_WORKER", "x");
        jb.apply(&mut cmd);
        let out = cmd.output().await.unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], dir.to_str().unwrap(), "{text}");
        assert_eq!(
            lines[1],
            format!("{} {} {JOB_PATH}", dir.display(), dir.join("tmp").display()),
            "{text}"
        );
        assert_eq!(lines[2], "64", "{text}");
        assert_eq!(lines[3], "0", "{text}");
        // PATH HOME TMPDIR USER LOGNAME LANG PWD SHLVL (sh's own) — nothing of the worker's.
        assert!(lines[4].trim().parse::<u32>().unwrap() <= 9, "{text}");
        jb.close(0).await;
        assert!(!dir.exists());
        sandbox.close();
        let _ = std::fs::remove_dir_all(&base);
    }
}
