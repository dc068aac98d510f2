//! What the live heartbeats say about a pool: the engines serving it now, and the ones that were
//! seen but have no heartbeat at the moment. Read by the worker (can any engine ever place this
//! job?) and by the gateway (do the pool's workers run with fault injection?).

use super::conn::Conn;
use redis::AsyncCommands;

use super::CoordResult;
use super::keys::Keys;
use crate::engine::Heartbeat;

/// The engines of one pool, by their heartbeats in Redis.
pub struct PoolView {
    /// Heartbeats of live engines that consume the pool.
    pub live: Vec<Heartbeat>,
    /// Engines ever seen (of any pool) with no heartbeat now.
    pub away: Vec<String>,
}

/// One `SMEMBERS` and one `MGET`: the live engines of `pool` and the absent ones.
pub async fn pool_view(c: &mut Conn, keys: &Keys, pool: &str) -> CoordResult<PoolView> {
    let engines: Vec<String> = c.smembers(keys.engines()).await?;
    if engines.is_empty() {
        return Ok(PoolView {
            live: vec![],
            away: vec![],
        });
    }
    let names: Vec<String> = engines.iter().map(|e| keys.engine(e)).collect();
    let beats: Vec<Option<String>> = redis::cmd("MGET").arg(&names).query_async(c).await?;
    let away = engines
        .iter()
        .zip(&beats)
        .filter(|(_, b)| b.is_none())
        .map(|(e, _)| e.clone())
        .collect();
    let live = beats
        .into_iter()
        .flatten()
        .filter_map(|s| serde_json::from_str::<Heartbeat>(&s).ok())
        .filter(|hb| hb.pools.iter().any(|p| p == pool))
        .collect();
    Ok(PoolView { live, away })
}
