//! The services' HTTP servers under hostile or careless clients, on the real binaries: a client
//! that trickles its request head is cut off at the header-read timeout, and thousands of idle
//! connections do not keep a normal client from submitting.

use std::time::{Duration, Instant};

use gpuq_e2e::{Stack, StackOptions};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The servers' header-read timeout (`gpuq_common::http::Limits::default`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A gateway with one worker and no manager.
async fn gateway_stack() -> Stack {
    Stack::start(StackOptions {
        workers: 1,
        manager: false,
        ..Default::default()
    })
    .await
    .unwrap()
}

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_sending_its_headers_a_byte_a_second_is_cut_off_at_the_header_timeout() {
    let stack = gateway_stack().await;
    let mut slow = TcpStream::connect(addr_of(&stack.gateway_url))
        .await
        .unwrap();
    let started = Instant::now();
    let head = b"POST /v1/jobs HTTP/1.1\r\nhost: gateway\r\nx-slow: ".repeat(4);
    let mut cut_off = None;
    for byte in head {
        let mut buf = [0u8; 256];
        // A closed connection reads 0 bytes (or fails) at once; an open one times out.
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await
        {
            cut_off = Some(started.elapsed());
            break;
        }
        if slow.write_all(&[byte]).await.is_err() {
            cut_off = Some(started.elapsed());
            break;
        }
    }
    let cut_off = cut_off.expect("the trickling client was never cut off");
    assert!(
        cut_off >= HEADER_TIMEOUT - Duration::from_secs(1)
            && cut_off <= HEADER_TIMEOUT + Duration::from_secs(3),
        "cut off after {cut_off:?}, the header timeout is {HEADER_TIMEOUT:?}"
    );
    eprintln!("a client trickling its head was cut off after {cut_off:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn five_thousand_idle_connections_do_not_stop_a_normal_client_from_submitting() {
    let stack = gateway_stack().await;
    let addr = addr_of(&stack.gateway_url);
    let mut idle = Vec::with_capacity(5000);
    for _ in 0..5000 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    let started = Instant::now();
    let id = stack
        .submit_ok(&json!({"kind": "simulate", "params": {"duration_ms": 10}}))
        .await
        .expect("a submission with 5000 idle connections open");
    let answered = started.elapsed();
    let r = stack.wait_one(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(r.status, gpuq_common::JobStatus::Succeeded, "{r:?}");
    assert!(
        answered < Duration::from_secs(5),
        "answered after {answered:?}"
    );
    eprintln!("with 5000 idle connections open, a submission was answered in {answered:?}");
    drop(idle);
    stack.stop().await;
}
