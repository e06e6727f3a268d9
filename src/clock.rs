//! The appliance's clock: monotonic milliseconds since the process started.
//!
//! The pure core never reads a clock: the runtime stamps every observation with [`Clock::now`]
//! and passes the time in. Tests drive the core with plain numbers instead.

use std::time::Instant;

use crate::model::Millis;

/// Monotonic milliseconds since the clock was made.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    /// Milliseconds since the start.
    pub fn now(&self) -> Millis {
        self.start.elapsed().as_millis() as Millis
    }

    /// The instant of a given clock time (to sleep until it).
    pub fn instant(&self, at: Millis) -> Instant {
        self.start + std::time::Duration::from_millis(at)
    }
}
