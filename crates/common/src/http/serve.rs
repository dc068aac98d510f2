//! The HTTP server of every gpuq service: the router on hyper, with the limits an endpoint on a
//! shared network needs, and a graceful stop.
//! - **Header-read timeout**: a client must send a request's whole head within it, or the
//!   connection is closed (a slow-loris client cannot hold a connection by trickling bytes); a
//!   new connection that sends nothing at all is closed after it too.
//! - **Idle timeout**: a connection on which nothing was read or written for this long is
//!   closed (an idle keep-alive connection, a client that stopped reading).
//! - **A cap on open connections**: past it, new connections wait in the kernel's backlog instead
//!   of taking file descriptors the service needs for its broker, Redis and store.
//! - **HTTPS** when given a TLS acceptor (`tls::server_acceptor`): the handshake must be done
//!   within the header-read timeout, counted from the connection's start, so a client that
//!   never finishes it is cut off like one that never sends its head; every other limit holds
//!   as for HTTP.
//! - **Graceful stop**: on `shutdown` it stops accepting, lets each connection finish the
//!   request in flight, and gives up on connections still open after the drain time (a stream
//!   that never ends, a client that never reads).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls::TlsAcceptor;

/// The server's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// How long a stop waits for open connections.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            // Longer than the event streams' keep-alive (10 s), which counts as activity.
            idle_timeout: Duration::from_secs(60),
            // Containers cannot raise open files above 20000; the rest is the service's own.
            max_connections: 10_000,
            drain: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then drains (see the module's doc); HTTPS when
/// `tls` is given.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted:
                    // pause instead of spinning.
                    tracing::warn!(error.message = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            // A connection that sends nothing is not worth a task and a permit for long.
            // (`peek` waits for a byte; `readable` may answer at once for a fresh socket.)
            let mut byte = [0u8; 1];
            let first = tokio::time::timeout(limits.header_read_timeout, stream.peek(&mut byte));
            if !matches!(first.await, Ok(Ok(n)) if n > 0) {
                return;
            }
            let stream = IdleTimeout::new(stream, limits.idle_timeout);
            match tls {
                None => serve_connection(stream, service, limits, stop).await,
                Some(acceptor) => {
                    let deadline = started + limits.header_read_timeout;
                    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(stream, service, limits, stop).await,
                        Ok(Err(e)) => tracing::debug!(error.message = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake not done in time"),
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(limits.drain, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the drain time; closing them"
        );
    }
}

/// HTTP/1.1 on one accepted connection (plain or TLS) until it ends or `stop`, when the request
/// in flight is finished first.
async fn serve_connection<I>(
    io: I,
    service: TowerToHyperService<Router>,
    limits: Limits,
    stop: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error.message = %e, "connection ended with an error");
    }
}

/// A connection that fails its reads once nothing was read or written for `idle`.
struct IdleTimeout {
    inner: TcpStream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl IdleTimeout {
    fn new(inner: TcpStream, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }

    fn active(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.idle);
    }
}

impl AsyncRead for IdleTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.active();
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::ErrorKind::TimedOut.into())),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for IdleTimeout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn start(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "ok" }));
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, app, limits, None, stop.clone()));
        (addr, stop)
    }

    async fn get_root(addr: std::net::SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_client_trickling_its_headers_is_cut_off_at_the_header_timeout() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let mut closed = false;
        for byte in b"GET / HTTP/1.1\r\nhost: slow\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*byte]).await.is_err() {
                closed = true;
                break;
            }
            // Closed by the server: a read answers 0 (or an error) at once.
            let mut buf = [0u8; 64];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf)).await
                && n == 0
            {
                closed = true;
                break;
            }
        }
        assert!(closed, "the trickling client was never cut off");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "cut off only after {:?}",
            started.elapsed()
        );
        assert!(get_root(addr).await.ends_with("ok"), "others are served");
        stop.cancel();
    }

    #[tokio::test]
    async fn idle_connections_beyond_the_cap_wait_and_do_not_stop_the_service() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(800),
            max_connections: 50,
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        // Twice the cap: the ones over it wait in the listen backlog (kept under the kernel's
        // smallest `somaxconn`, 128, or their SYNs would be dropped and retried for a minute).
        let mut idle = vec![];
        for _ in 0..100 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // The idle ones time out and free their places: a normal client gets its answer.
        let answered = tokio::time::timeout(Duration::from_secs(10), get_root(addr)).await;
        assert!(answered.is_ok_and(|r| r.ends_with("ok")));
        stop.cancel();
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
        let limits = Limits {
            idle_timeout: Duration::from_millis(600),
            ..Limits::default()
        };
        let (addr, stop) = start(limits).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("ok"));
        // Kept alive, then idle: closed within the idle timeout (and a little).
        let started = Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
        assert!(started.elapsed() >= Duration::from_millis(500));
        stop.cancel();
    }

    /// An HTTPS server on loopback with a throwaway CA: its address, its stop, the CA file.
    async fn start_https(
        limits: Limits,
        dir: &std::path::Path,
    ) -> (std::net::SocketAddr, CancellationToken, std::path::PathBuf) {
        let (ca, cert, key) = crate::tls::test_certs(dir);
        let acceptor = crate::tls::server_acceptor(&cert, &key).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "ok" }));
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, app, limits, Some(acceptor), stop.clone()));
        (addr, stop, ca)
    }

    /// GET / over TLS, trusting `ca`.
    async fn get_root_https(
        addr: std::net::SocketAddr,
        ca: &std::path::Path,
    ) -> std::io::Result<String> {
        let trust = crate::tls::Trust::with_ca_file(ca).unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(trust.client_config()));
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut s = connector.connect(name, tcp).await?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn https_is_served_to_a_client_that_trusts_the_ca_and_plain_http_gets_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, stop, ca) = start_https(Limits::default(), dir.path()).await;
        assert!(get_root_https(addr, &ca).await.unwrap().ends_with("ok"));
        // Another CA: the client refuses the server's certificate.
        let other = tempfile::tempdir().unwrap();
        let (other_ca, _, _) = crate::tls::test_certs(other.path());
        let e = get_root_https(addr, &other_ca).await.unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        // Plain HTTP on the HTTPS port: no HTTP answer.
        let mut out = String::new();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let _ = s.read_to_string(&mut out).await;
        assert!(!out.contains("HTTP/1.1 200"), "{out}");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_the_tls_handshake_is_cut_off_at_the_header_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            header_read_timeout: Duration::from_millis(500),
            ..Limits::default()
        };
        let (addr, stop, ca) = start_https(limits, dir.path()).await;
        // The first bytes of a ClientHello record, then nothing.
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(3), stalled.read(&mut buf)).await;
        assert!(matches!(closed, Ok(Ok(0) | Err(_))), "{closed:?}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "cut off only after {:?}",
            started.elapsed()
        );
        assert!(get_root_https(addr, &ca).await.unwrap().ends_with("ok"));
        stop.cancel();
    }

    #[tokio::test]
    async fn a_stop_finishes_the_request_in_flight_and_returns() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "done"
            }),
        );
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, app, Limits::default(), None, stop.clone()));
        let request = tokio::spawn(get_root(addr));
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.cancel();
        assert!(request.await.unwrap().ends_with("done"));
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns after the drain")
            .unwrap();
    }
}
