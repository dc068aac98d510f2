//! Fault injection for the tester: arm the next N jobs this worker takes with a scenario from the
//! original tester menu. Off unless the worker runs with `GPUQ_FAULT_INJECTION=true`.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use gpuq_common::faults::Scenario;

/// `scenario` as a name or a number.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ArmRequest {
    #[schema(value_type = String, example = "crash_mid_task")]
    pub scenario: serde_json::Value,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Armed {
    pub scenario: Scenario,
    pub remaining: u32,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FaultsView {
    pub enabled: bool,
    pub armed: Vec<Armed>,
}

pub struct Faults {
    enabled: bool,
    queue: Mutex<VecDeque<Armed>>,
}

impl Faults {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            queue: Mutex::new(VecDeque::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Arms `count` jobs with `scenario`, after what is armed already.
    pub fn arm(&self, scenario: Scenario, count: u32) {
        if count > 0 {
            self.queue.lock().expect("faults").push_back(Armed {
                scenario,
                remaining: count,
            });
        }
    }

    pub fn clear(&self) {
        self.queue.lock().expect("faults").clear();
    }

    /// The scenario for the next job taken (Normal when nothing is armed).
    pub fn take(&self) -> Scenario {
        if !self.enabled {
            return Scenario::Normal;
        }
        let mut q = self.queue.lock().expect("faults");
        let Some(front) = q.front_mut() else {
            return Scenario::Normal;
        };
        let s = front.scenario;
        front.remaining -= 1;
        if front.remaining == 0 {
            q.pop_front();
        }
        s
    }

    pub fn view(&self) -> FaultsView {
        FaultsView {
            enabled: self.enabled,
            armed: self.queue.lock().expect("faults").iter().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armed_faults_hit_the_next_jobs_in_order() {
        let f = Faults::new(true);
        f.arm(Scenario::CrashMidTask, 1);
        f.arm(Scenario::ErrorBeforeAck, 2);
        assert_eq!(f.take(), Scenario::CrashMidTask);
        assert_eq!(f.view().armed[0].remaining, 2);
        assert_eq!(f.take(), Scenario::ErrorBeforeAck);
        assert_eq!(f.take(), Scenario::ErrorBeforeAck);
        assert_eq!(f.take(), Scenario::Normal);
    }

    #[test]
    fn a_worker_without_fault_injection_never_faults() {
        let f = Faults::new(false);
        f.arm(Scenario::CrashMidTask, 1);
        assert_eq!(f.take(), Scenario::Normal);
    }

    #[test]
    fn scenarios_parse_by_menu_number_or_name() {
        assert_eq!(Scenario::parse("2"), Some(Scenario::CrashMidTask));
        assert_eq!(
            Scenario::parse("duplicate_after_complete"),
            Some(Scenario::DuplicateAfterComplete)
        );
        assert_eq!(Scenario::parse("7"), None);
    }
}
