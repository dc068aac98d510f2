//! Headless Chromium over the DevTools protocol: open a page, evaluate, screenshot.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A DevTools protocol session with one page.
pub struct Cdp {
    pub ws: Ws,
    pub next: u64,
    pub events: Vec<Value>,
}

impl Cdp {
    pub async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        use tokio_tungstenite::tungstenite::Message;
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::Text(msg.into())).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .with_context(|| format!("{method}: no answer in 30 s"))?
                .context("DevTools connection closed")??;
            let Message::Text(text) = msg else {
                continue;
            };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Evaluates JavaScript in the page; its value (by value).
    pub async fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            bail!("{expression}: {ex}");
        }
        Ok(r["result"]["value"].clone())
    }

    pub fn events(&self, method: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|e| e["method"] == method)
            .collect()
    }
}

/// Headless Chromium in its own process group (killed as a whole when dropped).
pub struct Chromium {
    pub child: Child,
    pub pgid: i32,
    pub port: u16,
}

impl Chromium {
    pub async fn launch(dir: &Path) -> anyhow::Result<Chromium> {
        let bin = Path::new("/usr/bin/chromium");
        if !bin.exists() {
            bail!("/usr/bin/chromium is missing: install Debian's chromium (scripts/test.sh does)");
        }
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile)?;
        let log = std::fs::File::create(dir.join("chromium.log"))?;
        let child = Command::new(bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--window-size=1400,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("starting chromium")?;
        let pgid = child.id().context("chromium pid")? as i32;
        let mut c = Chromium {
            child,
            pgid,
            port: 0,
        };
        // Chromium writes the port it chose to DevToolsActivePort in its profile.
        let file = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                c.port = port;
                return Ok(c);
            }
            if let Ok(Some(status)) = c.child.try_wait() {
                bail!(
                    "chromium exited ({status}); see {}",
                    dir.join("chromium.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("chromium opened no DevTools port in 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A DevTools session with the browser's first page.
    pub async fn page(&self) -> anyhow::Result<Cdp> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let url = loop {
            let list: Value = reqwest::get(format!("http://127.0.0.1:{}/json/list", self.port))
                .await?
                .json()
                .await?;
            if let Some(u) = list
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            {
                break u.to_string();
            }
            if Instant::now() > deadline {
                bail!("chromium has no page: {list}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        Ok(Cdp {
            ws,
            next: 0,
            events: vec![],
        })
    }

    pub fn kill(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the page shows now: engines and GPUs with their states, read from the DOM.
pub const UI_STATE_JS: &str = r#"(() => ({
  marker: window.__gpuqTestMarker || null,
  updates: Number(document.body.dataset.updates || 0),
  conn: (document.querySelector('#conn') || {dataset: {}}).dataset.mode || null,
  innerHeight: window.innerHeight,
  queues: [...document.querySelectorAll('#queues tr[data-queue]')].map(r => r.dataset.queue),
  jobs: [...document.querySelectorAll('#recent-jobs tr[data-job]')].map(r => ({
    id: r.dataset.job, status: (r.querySelector('.st') || {dataset: {}}).dataset.status || null,
  })),
  engines: [...document.querySelectorAll('#engines .engine')].map(e => {
    const r = e.getBoundingClientRect();
    return {
      id: e.dataset.engine, state: e.dataset.state,
      badge: (e.querySelector('.top .badge') || {}).textContent || '',
      text: e.innerText, top: r.top, height: r.height,
      gpus: [...e.querySelectorAll('.gpu')].map(g => ({
        gpu: g.dataset.gpu, state: g.dataset.state, health: g.dataset.health,
        badge: (g.querySelector('.badge') || {}).textContent || '',
        why: (g.querySelector('.why') || {}).textContent || '',
        height: g.getBoundingClientRect().height,
      })),
    };
  }),
}))()"#;

pub fn gpu_of<'a>(ui: &'a Value, engine: &str, gpu: &str) -> Option<&'a Value> {
    ui["engines"]
        .as_array()?
        .iter()
        .find(|e| e["id"] == engine)?["gpus"]
        .as_array()?
        .iter()
        .find(|g| g["gpu"] == gpu)
}

pub fn note_not_ready(e: &anyhow::Error) {
    eprintln!(
        "page not ready yet: {}",
        e.to_string().lines().last().unwrap_or("")
    );
}

pub async fn wait_ui(
    page: &mut Cdp,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        // Right after navigation the document may not exist yet: a failed look counts as
        // "not shown yet" until the deadline.
        let ui = match page.eval(UI_STATE_JS).await {
            Ok(ui) => ui,
            Err(e) if Instant::now() <= deadline => {
                note_not_ready(&e);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(e) => return Err(e.context(format!("the page never showed {what}"))),
        };
        if pred(&ui) {
            return Ok(ui);
        }
        if Instant::now() > deadline {
            bail!("the page never showed {what} in {timeout:?}; it shows {ui:#}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
