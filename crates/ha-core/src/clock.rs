//! A clock that keeps counting while the machine is suspended.

use std::time::Duration;

/// `CLOCK_BOOTTIME` (Linux, Android): monotonic, system-wide, and counting suspended time,
/// unlike `CLOCK_MONOTONIC`, on which `std` and tokio measure time. The elector bounds
/// leadership on it too, and the PostgreSQL agent's watchdog (another process on the same
/// host) reads deadlines on it. `None` elsewhere, or where it cannot be read.
pub fn boottime() -> Option<Duration> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use nix::time::{ClockId, clock_gettime};
        let now = clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?;
        let secs = u64::try_from(now.tv_sec()).ok()?;
        let nanos = u32::try_from(now.tv_nsec()).ok()?;
        Some(Duration::new(secs, nanos))
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        None
    }
}
