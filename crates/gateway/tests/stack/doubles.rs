//! Stand-ins for the two slow things a submission may meet: a broker whose confirms are held up
//! on the way back (`HoldingRelay`), and a store that answers an insert late (`SlowFirstInsert`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use gpuq_common::job::{FinalOutcome, JobId, JobRecord, JobStatus};
use gpuq_common::store::{FinishOutcome, JobPage, JobStore, ListQuery, StartOutcome, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

/// A TCP relay to a broker node. Client to broker, bytes pass at once; broker to client, they
/// wait in the relay while it holds: a publish reaches the queue, its confirm does not come back.
/// It runs on a thread of its own, so it keeps relaying while a test's runtime is blocked.
pub struct HoldingRelay {
    pub addr: SocketAddr,
    hold: watch::Sender<bool>,
}

impl HoldingRelay {
    pub fn start(upstream: String) -> Self {
        let (hold, held) = watch::channel(false);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(relay(client, upstream.clone(), held.clone()));
                }
            });
        });
        Self {
            addr: addr_rx.recv().unwrap(),
            hold,
        }
    }

    /// Holds (true) or releases (false) what the broker sends.
    pub fn hold(&self, on: bool) {
        self.hold.send_replace(on);
    }
}

async fn relay(client: TcpStream, upstream: String, mut held: watch::Receiver<bool>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let up = tokio::io::copy(&mut client_rx, &mut server_tx);
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match server_rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if held.wait_for(|h| !*h).await.is_err() {
                return;
            }
            if client_tx.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        () = down => {}
    }
}

/// A store whose first owned insert is written at once but answered only after `release`: a
/// submission stalled longer than its idempotency claim's pending window.
pub struct SlowFirstInsert {
    inner: Arc<dyn JobStore>,
    first: AtomicBool,
    /// Notified once the first insert is written.
    pub stored: Notify,
    release: Notify,
}

impl SlowFirstInsert {
    pub fn new(inner: Arc<dyn JobStore>) -> Self {
        Self {
            inner,
            first: AtomicBool::new(true),
            stored: Notify::new(),
            release: Notify::new(),
        }
    }

    /// Lets the stalled insert answer.
    pub fn release(&self) {
        self.release.notify_one();
    }
}

#[async_trait]
impl JobStore for SlowFirstInsert {
    async fn insert(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.inner.insert(job).await
    }
    async fn insert_owned(&self, job: &JobRecord, owner: &str) -> Result<(), StoreError> {
        let result = self.inner.insert_owned(job, owner).await;
        if self.first.swap(false, Ordering::SeqCst) {
            self.stored.notify_one();
            self.release.notified().await;
        }
        result
    }
    async fn insert_many(
        &self,
        jobs: &[JobRecord],
        owner: Option<&str>,
    ) -> Result<Vec<JobId>, StoreError> {
        self.inner.insert_many(jobs, owner).await
    }
    async fn adopt(&self, id: JobId, owner: &str) -> Result<Option<JobStatus>, StoreError> {
        self.inner.adopt(id, owner).await
    }
    async fn withdraw(&self, id: JobId, owner: Option<&str>) -> Result<bool, StoreError> {
        self.inner.withdraw(id, owner).await
    }
    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.inner.get(id).await
    }
    async fn list(&self, query: &ListQuery) -> Result<JobPage, StoreError> {
        self.inner.list(query).await
    }
    async fn start_attempt(&self, job: &JobRecord) -> Result<StartOutcome, StoreError> {
        self.inner.start_attempt(job).await
    }
    async fn record_error(&self, id: JobId, attempt: u32, error: &str) -> Result<(), StoreError> {
        self.inner.record_error(id, attempt, error).await
    }
    async fn finish(&self, id: JobId, outcome: &FinalOutcome) -> Result<FinishOutcome, StoreError> {
        self.inner.finish(id, outcome).await
    }
    async fn finish_drive(
        &self,
        id: JobId,
        drive: &str,
        outcome: &FinalOutcome,
    ) -> Result<FinishOutcome, StoreError> {
        self.inner.finish_drive(id, drive, outcome).await
    }
    async fn reset_for_retry(&self, id: JobId, drive: &str) -> Result<bool, StoreError> {
        self.inner.reset_for_retry(id, drive).await
    }
    async fn count_by_status(&self) -> Result<BTreeMap<JobStatus, u64>, StoreError> {
        self.inner.count_by_status().await
    }
    async fn delete_final_before(&self, cutoff_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.inner.delete_final_before(cutoff_ms, limit).await
    }
    async fn count_active_by_tenant(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        self.inner.count_active_by_tenant().await
    }
    async fn append_events(
        &self,
        id: JobId,
        events: &[gpuq_common::events::NewEvent],
    ) -> Result<u64, StoreError> {
        self.inner.append_events(id, events).await
    }
    async fn events(
        &self,
        id: JobId,
        after: u64,
        limit: u32,
    ) -> Result<Vec<gpuq_common::events::JobEvent>, StoreError> {
        self.inner.events(id, after, limit).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}
