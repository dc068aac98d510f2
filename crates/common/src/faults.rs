//! The fault scenarios of the original tester menu (0–4): what the worker's `POST /admin/faults`
//! arms and what the CLI's tester offers.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Normal,
    ErrorBeforeAck,
    CrashMidTask,
    DuplicateAfterComplete,
    CrashAfterComplete,
}

impl Scenario {
    /// In menu order: the index is the scenario's number.
    pub const ALL: [Scenario; 5] = [
        Scenario::Normal,
        Scenario::ErrorBeforeAck,
        Scenario::CrashMidTask,
        Scenario::DuplicateAfterComplete,
        Scenario::CrashAfterComplete,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Normal => "normal",
            Scenario::ErrorBeforeAck => "error_before_ack",
            Scenario::CrashMidTask => "crash_mid_task",
            Scenario::DuplicateAfterComplete => "duplicate_after_complete",
            Scenario::CrashAfterComplete => "crash_after_complete",
        }
    }

    pub fn number(self) -> usize {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }

    /// What happens, in the words of the original menu.
    pub fn describe(self) -> &'static str {
        match self {
            Scenario::Normal => "the job completes normally",
            Scenario::ErrorBeforeAck => "the job fails with an error; nacked, then retried",
            Scenario::CrashMidTask => "the worker dies while the job runs; redelivered elsewhere",
            Scenario::DuplicateAfterComplete => {
                "result stored, then the ack is lost; the redelivery is suppressed"
            }
            Scenario::CrashAfterComplete => {
                "result stored, then the worker dies before the ack; the redelivery is suppressed"
            }
        }
    }

    /// Kills the worker process (it comes back under its supervisor).
    pub fn crashes(self) -> bool {
        matches!(self, Scenario::CrashMidTask | Scenario::CrashAfterComplete)
    }

    /// By name or by menu number (0–4).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if let Ok(n) = s.parse::<usize>() {
            return Self::ALL.get(n).copied();
        }
        let s = s.to_ascii_lowercase().replace('-', "_");
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|s| s.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse_by_number_or_name() {
        assert_eq!(Scenario::parse("2"), Some(Scenario::CrashMidTask));
        assert_eq!(
            Scenario::parse("crash-mid-task"),
            Some(Scenario::CrashMidTask)
        );
        assert_eq!(
            Scenario::parse(" duplicate_after_complete "),
            Some(Scenario::DuplicateAfterComplete)
        );
        assert_eq!(Scenario::parse("5"), None);
        assert_eq!(Scenario::parse("explode"), None);
        for (i, s) in Scenario::ALL.iter().enumerate() {
            assert_eq!(s.number(), i);
            assert_eq!(Scenario::parse(s.as_str()), Some(*s));
        }
    }
}
