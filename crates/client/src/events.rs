//! A job's event log from the gateway: a page at a time (`Gateway::events_page`), or followed
//! live over SSE (`Gateway::follow`) — reconnecting by itself with `Last-Event-ID` when the
//! connection drops or the gateway restarts, so the caller sees every event once, in order,
//! until the `final` one.

use std::collections::VecDeque;
use std::time::Duration;

use gpuq_common::events::{EventKind, EventPage, JobEvent};
use reqwest::Method;
use tokio::time::Instant;
use uuid::Uuid;

use crate::endpoint::ClientError;
use crate::gateway::Gateway;

/// One SSE event as sent: its `id:`, `event:` and (joined) `data:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// Turns the bytes of an SSE stream, in chunks cut anywhere, into events (comments skipped,
/// `\r\n` and `\n` line ends, multi-line `data:`).
#[derive(Debug, Default)]
pub struct SseParser {
    buf: String,
    /// The start of a UTF-8 character cut by the chunking, kept for the next chunk.
    partial: Vec<u8>,
}

impl SseParser {
    /// `push` for raw bytes: a character cut between two chunks is decoded whole.
    pub fn push_bytes(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.partial.extend_from_slice(chunk);
        let bytes = std::mem::take(&mut self.partial);
        let text = match std::str::from_utf8(&bytes) {
            Ok(s) => s.to_string(),
            // An incomplete character at the end: decode up to it, keep it.
            Err(e) if e.error_len().is_none() => {
                let (whole, rest) = bytes.split_at(e.valid_up_to());
                self.partial = rest.to_vec();
                String::from_utf8_lossy(whole).into_owned()
            }
            Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
        };
        self.push(&text)
    }

    pub fn push(&mut self, chunk: &str) -> Vec<SseEvent> {
        self.buf.push_str(chunk);
        if self.buf.contains('\r') {
            // A `\r` at the very end may be the first half of a `\r\n` cut by the chunking.
            let held = self.buf.ends_with('\r');
            if held {
                self.buf.pop();
            }
            self.buf = self.buf.replace("\r\n", "\n").replace('\r', "\n");
            if held {
                self.buf.push('\r');
            }
        }
        let mut out = vec![];
        while let Some(end) = self.buf.find("\n\n") {
            let block: String = self.buf.drain(..end + 2).collect();
            let mut e = SseEvent {
                id: None,
                event: None,
                data: String::new(),
            };
            let mut has_data = false;
            for line in block.lines() {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => e.id = Some(value.to_string()),
                    "event" => e.event = Some(value.to_string()),
                    "data" => {
                        if has_data {
                            e.data.push('\n');
                        }
                        e.data.push_str(value);
                        has_data = true;
                    }
                    _ => {} // a comment (`:` keep-alive) or an unknown field
                }
            }
            if has_data {
                out.push(e);
            }
        }
        out
    }
}

/// How long a follower keeps trying to reach the gateway without one good connection.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(120);

/// A job's events, live: see the module's documentation.
pub struct EventFollower {
    gw: Gateway,
    job: Uuid,
    last: u64,
    resp: Option<reqwest::Response>,
    parser: SseParser,
    ready: VecDeque<JobEvent>,
    done: bool,
    backoff: Duration,
    /// When the connection was last lost (for `GIVE_UP_AFTER`).
    lost_since: Option<Instant>,
    /// Connections made so far (the first, then every reconnection).
    pub connections: u32,
}

impl Gateway {
    /// `GET /v1/jobs/{id}/events?format=json`: up to `limit` events after `from`.
    pub async fn events_page(
        &self,
        id: Uuid,
        from: u64,
        limit: u32,
    ) -> Result<EventPage, ClientError> {
        let path = format!("/v1/jobs/{id}/events?format=json&from={from}&limit={limit}");
        self.ep
            .json(self.ep.request(Method::GET, &path), &path)
            .await
    }

    /// Follows job `id`'s events after offset `from` (0: from the start).
    pub fn follow(&self, id: Uuid, from: u64) -> EventFollower {
        EventFollower {
            gw: self.clone(),
            job: id,
            last: from,
            resp: None,
            parser: SseParser::default(),
            ready: VecDeque::new(),
            done: false,
            backoff: Duration::from_millis(200),
            lost_since: None,
            connections: 0,
        }
    }
}

impl EventFollower {
    /// The next event; `None` once the `final` event was returned.
    pub async fn next(&mut self) -> Result<Option<JobEvent>, ClientError> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                self.last = e.offset;
                if e.kind == EventKind::Final {
                    self.done = true;
                    self.ready.clear();
                }
                return Ok(Some(e));
            }
            if self.done {
                return Ok(None);
            }
            match self.read().await {
                Ok(()) => {}
                Err(e) if e.is_transient() => self.lost(e).await?,
                Err(e) => return Err(e),
            }
        }
    }

    /// The offset of the last event returned.
    pub fn last_offset(&self) -> u64 {
        self.last
    }

    /// Reads one chunk (connecting first if needed) into `ready`.
    async fn read(&mut self) -> Result<(), ClientError> {
        if self.resp.is_none() {
            self.resp = Some(self.connect().await?);
            self.connections += 1;
            self.lost_since = None;
            self.backoff = Duration::from_millis(200);
        }
        let ep = &self.gw.ep;
        let path = format!("/v1/jobs/{}/events", self.job);
        let resp = self.resp.as_mut().expect("connected");
        match resp.chunk().await {
            Ok(Some(bytes)) => {
                for e in self.parser.push_bytes(&bytes) {
                    let event: JobEvent =
                        serde_json::from_str(&e.data).map_err(|err| ClientError::Protocol {
                            service: "gateway",
                            url: ep.url(&path),
                            detail: format!("an event that is not a job event: {err}"),
                        })?;
                    // A reconnection never repeats what was returned.
                    if event.offset > self.last {
                        self.ready.push_back(event);
                    }
                }
                Ok(())
            }
            // The server ended the stream before the final event: a gateway stopping (resume
            // after the last event), or nothing more will come (the final event is behind us).
            Ok(None) => {
                self.resp = None;
                self.parser = SseParser::default();
                let page = self.gw.events_page(self.job, self.last, 1).await?;
                if page.events.is_empty() && page.status.is_final() {
                    self.done = true;
                } else {
                    // Not hammering a gateway that keeps closing streams.
                    tokio::time::sleep(self.backoff).await;
                }
                Ok(())
            }
            Err(source) => {
                self.resp = None;
                self.parser = SseParser::default();
                Err(ClientError::Transport {
                    service: "gateway",
                    url: ep.url(&path),
                    source,
                })
            }
        }
    }

    async fn connect(&self) -> Result<reqwest::Response, ClientError> {
        let ep = &self.gw.ep;
        let path = format!("/v1/jobs/{}/events", self.job);
        let rb = ep
            .request(Method::GET, &path)
            .header("Accept", "text/event-stream")
            .header("Last-Event-ID", self.last.to_string())
            // A stream lasts as long as the job: no whole-request timeout.
            .timeout(Duration::from_secs(24 * 3600));
        ep.send(rb, &path).await
    }

    /// A lost connection: wait (growing to 5 s) and let `next` reconnect, unless it has been
    /// lost for `GIVE_UP_AFTER`.
    async fn lost(&mut self, e: ClientError) -> Result<(), ClientError> {
        self.resp = None;
        let since = *self.lost_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= GIVE_UP_AFTER {
            return Err(e);
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_cut_between_chunks_is_decoded_whole() {
        let wire = "id: 1\nevent: output\ndata: épreuve 训练 🚀\n\n".as_bytes();
        for cut in 0..wire.len() {
            let mut p = SseParser::default();
            let mut got = p.push_bytes(&wire[..cut]);
            got.extend(p.push_bytes(&wire[cut..]));
            assert_eq!(got.len(), 1, "cut at {cut}");
            assert_eq!(got[0].data, "épreuve 训练 🚀", "cut at byte {cut}");
        }
    }

    #[test]
    fn events_cut_anywhere_come_out_whole_and_comments_are_skipped() {
        let wire = ": keep-alive\n\nid: 1\nevent: output\ndata: {\"a\":1}\n\nid: 2\r\nevent: final\r\ndata: one\r\ndata: two\r\n\r\n";
        for cut in 0..wire.len() {
            if !wire.is_char_boundary(cut) {
                continue;
            }
            let mut p = SseParser::default();
            let mut got = p.push(&wire[..cut]);
            got.extend(p.push(&wire[cut..]));
            assert_eq!(got.len(), 2, "cut at {cut}: {got:?}");
            assert_eq!(got[0].id.as_deref(), Some("1"));
            assert_eq!(got[0].event.as_deref(), Some("output"));
            assert_eq!(got[0].data, "{\"a\":1}");
            assert_eq!(got[1].event.as_deref(), Some("final"));
            assert_eq!(got[1].data, "one\ntwo", "cut at {cut}");
        }
    }
}
