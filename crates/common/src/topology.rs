//! Queue topology: the names of every exchange and queue, and their idempotent declaration.
//! `<prefix>.jobs` (direct, routing key = pool) → `<prefix>.jobs.<pool>` quorum queues, which
//! dead-letter at least once through `<prefix>.dlx` into the `<prefix>.dead` quorum queue.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::Settings;

/// Header a gpuq service sets when it dead-letters a job itself (e.g. `unschedulable`).
pub const REASON_HEADER: &str = "x-gpuq-reason";
/// Header carrying the last error a worker saw, for the dead-letter record.
pub const ERROR_HEADER: &str = "x-gpuq-error";
/// Attempts a job had before a re-drive from the dead letters (attempt numbers go on counting,
/// the delivery budget starts afresh).
pub const ATTEMPT_OFFSET_HEADER: &str = "x-gpuq-attempt-offset";
/// Names one drive of a job through the queue (absent on the first; a fresh id per re-drive).
/// At-least-once dead-lettering may deliver a dead letter twice; the manager records a dead
/// letter only while the job is still on its drive (`JobStore::finish_drive`), so a late copy of
/// an old one cannot undo a re-drive.
pub const DRIVE_HEADER: &str = "x-gpuq-drive";
/// The drive a message without `DRIVE_HEADER` belongs to: the job's first.
pub const FIRST_DRIVE: &str = "0";

/// Names derived from a prefix, so tests can isolate themselves on one cluster.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
    pub delivery_limit: u32,
    pub queue_ttl_ms: u64,
    pub max_queue_length: u64,
}

impl Topology {
    pub fn from_settings(s: &Settings) -> Self {
        Self {
            prefix: s.queue_prefix.clone(),
            delivery_limit: s.delivery_limit,
            queue_ttl_ms: s.queue_ttl_s.saturating_mul(1000),
            max_queue_length: s.max_queue_length,
        }
    }
    pub fn jobs_exchange(&self) -> String {
        format!("{}.jobs", self.prefix)
    }
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }
    pub fn pool_queue(&self, pool: &str) -> String {
        format!("{}.jobs.{pool}", self.prefix)
    }

    /// Arguments of a pool queue. Declaring with other arguments than an existing queue's fails,
    /// so these change only with a new prefix or a migration.
    pub fn pool_queue_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        let s = |v: &str| AMQPValue::LongString(LongString::from(v));
        args.insert("x-queue-type".into(), s("quorum"));
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(self.delivery_limit as i32),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            s(&self.dead_letter_exchange()),
        );
        args.insert("x-dead-letter-strategy".into(), s("at-least-once"));
        args.insert("x-overflow".into(), s("reject-publish"));
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(self.queue_ttl_ms as i64),
        );
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(self.max_queue_length as i64),
        );
        args
    }

    /// Declares the exchanges, the dead queue and the given pools' queues. Safe to repeat.
    pub async fn declare(&self, channel: &Channel, pools: &[String]) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(
                ShortString::from(self.jobs_exchange()),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                ShortString::from(self.dead_letter_exchange()),
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        let mut dead_args = FieldTable::default();
        dead_args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        let qopts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(ShortString::from(self.dead_queue()), qopts, dead_args)
            .await?;
        channel
            .queue_bind(
                ShortString::from(self.dead_queue()),
                ShortString::from(self.dead_letter_exchange()),
                ShortString::from(""),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for pool in pools {
            self.declare_pool(channel, pool).await?;
        }
        Ok(())
    }

    /// Declares a pool's queue and binds it to the jobs exchange.
    async fn declare_pool(&self, channel: &Channel, pool: &str) -> lapin::Result<()> {
        let qopts = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .queue_declare(
                ShortString::from(self.pool_queue(pool)),
                qopts,
                self.pool_queue_args(),
            )
            .await?;
        channel
            .queue_bind(
                ShortString::from(self.pool_queue(pool)),
                ShortString::from(self.jobs_exchange()),
                ShortString::from(pool),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Makes sure a pool's queue exists, declaring it when the broker lets this user; `false`
    /// when it is missing and the broker refuses (ACCESS_REFUSED). RabbitMQ lets only a user who
    /// may read (consume) a queue create it with a dead-letter exchange, so under least
    /// privilege the gateway and the manager leave the pool queues to the workers that serve
    /// them (docs/production.md). A passive declare first: a refused declare closes its channel,
    /// which the client logs as an error, and the queue exists nearly always.
    pub async fn declare_pool_if_permitted(
        &self,
        connection: &Connection,
        pool: &str,
    ) -> lapin::Result<bool> {
        let channel = connection.create_channel().await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let exists = channel
            .queue_declare(
                ShortString::from(self.pool_queue(pool)),
                passive,
                FieldTable::default(),
            )
            .await;
        match exists {
            Ok(_) => {
                // Best effort: the channel served its purpose either way.
                let _ = channel.close(200, ShortString::from("OK")).await;
                return Ok(true);
            }
            // NOT_FOUND (and the channel is closed): declare it.
            Err(e) if protocol_code(&e) == Some(404) => {}
            Err(e) => return Err(e),
        }
        let channel = connection.create_channel().await?;
        match self.declare_pool(&channel, pool).await {
            Ok(()) => {
                let _ = channel.close(200, ShortString::from("OK")).await;
                Ok(true)
            }
            Err(e) if access_refused(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// The reply code of a broker's channel or connection close (403 ACCESS_REFUSED, 404
/// NOT_FOUND, …); `None` for other errors.
fn protocol_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

/// True for the broker's ACCESS_REFUSED (403): the user lacks a permission.
pub fn access_refused(e: &lapin::Error) -> bool {
    protocol_code(e) == Some(403)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let t = Topology::from_settings(&Settings {
            queue_prefix: "t1".into(),
            ..Settings::default()
        });
        assert_eq!(t.jobs_exchange(), "t1.jobs");
        assert_eq!(t.pool_queue("h100"), "t1.jobs.h100");
        assert_eq!(t.dead_queue(), "t1.dead");
        let args = t.pool_queue_args();
        let inner = args.inner();
        assert_eq!(
            inner.get("x-overflow"),
            Some(&AMQPValue::LongString("reject-publish".into()))
        );
        assert_eq!(
            inner.get("x-dead-letter-strategy"),
            Some(&AMQPValue::LongString("at-least-once".into()))
        );
    }
}
