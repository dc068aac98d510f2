//! GPU slots: which GPUs of this worker are free, busy or unavailable, and placement of a job
//! that asks for `n` GPUs with at least `min_memory_mb` each. Every change is published on a
//! watch channel so the consumer can open or close its gate.

use std::sync::Mutex;

use gpuq_common::engine::GpuHealth;
use tokio::sync::watch;
use uuid::Uuid;

#[derive(Debug, Clone)]
struct Slot {
    index: u32,
    memory_total_mb: u64,
    health: GpuHealth,
    job: Option<Uuid>,
}

/// Capacity seen by the consumer: free schedulable GPUs and how many could ever be healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    pub free: u32,
    pub busy: u32,
    pub schedulable: u32,
    pub total: u32,
}

/// Why a job cannot be placed right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoPlacement {
    /// Enough GPUs exist here, but not enough are free and healthy now.
    Busy,
    /// This worker could never place it (too many GPUs or too much memory asked).
    Never,
    /// This job already holds GPUs here: a redelivery of a job this process is still running
    /// (its first delivery's channel dropped). It must not run a second time.
    AlreadyHere,
}

pub struct Slots {
    slots: Mutex<Vec<Slot>>,
    tx: watch::Sender<Capacity>,
}

impl Slots {
    /// `gpus`: (index, memory in MB) of each GPU; all start healthy and free.
    pub fn new(gpus: &[(u32, u64)]) -> Self {
        let slots: Vec<Slot> = gpus
            .iter()
            .map(|&(index, memory_total_mb)| Slot {
                index,
                memory_total_mb,
                health: GpuHealth::Healthy,
                job: None,
            })
            .collect();
        let (tx, _) = watch::channel(capacity(&slots));
        Self {
            slots: Mutex::new(slots),
            tx,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Capacity> {
        self.tx.subscribe()
    }

    pub fn capacity(&self) -> Capacity {
        capacity(&self.slots.lock().expect("slots"))
    }

    /// Reserves `n` free healthy GPUs with at least `min_memory_mb` each, lowest indices first.
    pub fn reserve(&self, job: Uuid, n: u32, min_memory_mb: u64) -> Result<Vec<u32>, NoPlacement> {
        let mut slots = self.slots.lock().expect("slots");
        if slots.iter().any(|s| s.job == Some(job)) {
            return Err(NoPlacement::AlreadyHere);
        }
        let fits = |s: &Slot| s.memory_total_mb >= min_memory_mb;
        if slots.iter().filter(|s| fits(s)).count() < n as usize {
            return Err(NoPlacement::Never);
        }
        let chosen: Vec<usize> = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.job.is_none() && s.health == GpuHealth::Healthy && fits(s))
            .map(|(i, _)| i)
            .take(n as usize)
            .collect();
        if chosen.len() < n as usize {
            return Err(NoPlacement::Busy);
        }
        for &i in &chosen {
            slots[i].job = Some(job);
        }
        let out = chosen.iter().map(|&i| slots[i].index).collect();
        self.publish(&slots);
        Ok(out)
    }

    /// Frees the GPUs a job held.
    pub fn release(&self, job: Uuid) {
        let mut slots = self.slots.lock().expect("slots");
        for s in slots.iter_mut().filter(|s| s.job == Some(job)) {
            s.job = None;
        }
        self.publish(&slots);
    }

    /// Records the latest health of each GPU (index → health).
    pub fn set_health(&self, health: &[(u32, GpuHealth)]) {
        let mut slots = self.slots.lock().expect("slots");
        for &(index, h) in health {
            if let Some(s) = slots.iter_mut().find(|s| s.index == index) {
                s.health = h;
            }
        }
        self.publish(&slots);
    }

    /// The job each GPU runs.
    pub fn jobs(&self) -> Vec<(u32, Option<Uuid>)> {
        self.slots
            .lock()
            .expect("slots")
            .iter()
            .map(|s| (s.index, s.job))
            .collect()
    }

    /// Jobs running on a GPU that is now unhealthy.
    pub fn jobs_on_unhealthy(&self) -> Vec<Uuid> {
        let slots = self.slots.lock().expect("slots");
        let mut out: Vec<Uuid> = slots
            .iter()
            .filter(|s| s.health == GpuHealth::Unhealthy)
            .filter_map(|s| s.job)
            .collect();
        out.dedup();
        out
    }

    fn publish(&self, slots: &[Slot]) {
        let c = capacity(slots);
        self.tx.send_if_modified(|old| {
            let changed = *old != c;
            *old = c;
            changed
        });
    }
}

fn capacity(slots: &[Slot]) -> Capacity {
    let healthy = |s: &&Slot| s.health == GpuHealth::Healthy;
    Capacity {
        free: slots
            .iter()
            .filter(healthy)
            .filter(|s| s.job.is_none())
            .count() as u32,
        busy: slots.iter().filter(|s| s.job.is_some()).count() as u32,
        schedulable: slots.iter().filter(healthy).count() as u32,
        total: slots.len() as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_get_distinct_free_healthy_gpus_and_give_them_back() {
        let slots = Slots::new(&[(0, 16_000), (1, 16_000), (2, 80_000)]);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(slots.reserve(a, 2, 0).unwrap(), vec![0, 1]);
        assert_eq!(slots.reserve(b, 2, 0), Err(NoPlacement::Busy));
        assert_eq!(slots.reserve(b, 4, 0), Err(NoPlacement::Never));
        assert_eq!(slots.reserve(b, 1, 40_000).unwrap(), vec![2]);
        assert_eq!(slots.capacity().free, 0);
        // A job that holds GPUs here gets no second set, even when some are free.
        slots.release(b);
        assert_eq!(slots.reserve(a, 1, 0), Err(NoPlacement::AlreadyHere));
        assert_eq!(slots.jobs(), vec![(0, Some(a)), (1, Some(a)), (2, None)]);
        slots.release(a);
        assert_eq!(slots.capacity().free, 3);
    }

    #[test]
    fn unhealthy_gpus_take_no_jobs_until_they_recover() {
        let slots = Slots::new(&[(0, 1000), (1, 1000)]);
        let mut rx = slots.subscribe();
        slots.set_health(&[(0, GpuHealth::Unhealthy), (1, GpuHealth::Degraded)]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().free, 0);
        assert_eq!(slots.reserve(Uuid::now_v7(), 1, 0), Err(NoPlacement::Busy));
        slots.set_health(&[(1, GpuHealth::Healthy)]);
        assert_eq!(slots.reserve(Uuid::now_v7(), 1, 0).unwrap(), vec![1]);
    }
}
