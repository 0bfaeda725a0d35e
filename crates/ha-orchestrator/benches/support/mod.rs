//! What every benchmark of this package prints its figures with.
#![allow(dead_code, clippy::print_stdout)] // each bench uses its own part; a bench prints

use std::time::Duration;

/// The median; sorts `samples`.
pub(crate) fn median(samples: &mut [Duration]) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

/// The largest sample (zero for none).
pub(crate) fn max(samples: &[Duration]) -> Duration {
    samples.iter().copied().max().unwrap_or_default()
}

/// Milliseconds, to two decimals.
pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// One `name value unit` line.
pub(crate) fn report(name: &str, value: f64, unit: &str) {
    println!("{name} {value} {unit}");
}

/// One `target …: met | NOT met` line.
pub(crate) fn target(what: &str, met: bool) {
    println!("target {what}: {}", if met { "met" } else { "NOT met" });
}
