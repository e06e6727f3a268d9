//! The lab clock: milliseconds since the lab started, shared by every simulated server.

use std::time::Instant;

use crate::power::Millis;

/// Milliseconds since the lab started.
#[derive(Debug, Clone, Copy)]
pub struct LabClock {
    start: Instant,
}

impl LabClock {
    /// A clock starting now.
    pub fn start() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    /// Lab time now.
    pub fn now(&self) -> Millis {
        self.start.elapsed().as_millis() as Millis
    }
}
