//! The one way turnkey counts an event: a relaxed add on an atomic that
//! the metrics module reads at scrape time. The `uncounted` feature
//! (benchmarks only) compiles counting away, to measure what the counters
//! cost; gauges (values that go up and down) are not counters and are
//! always kept.

use std::sync::atomic::AtomicU64;

/// Counts one event.
#[inline]
pub fn inc(c: &AtomicU64) {
    #[cfg(not(feature = "uncounted"))]
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    #[cfg(feature = "uncounted")]
    let _ = c;
}

/// Counts `n` (bytes, say).
#[inline]
pub fn add(c: &AtomicU64, n: usize) {
    #[cfg(not(feature = "uncounted"))]
    c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    #[cfg(feature = "uncounted")]
    let _ = (c, n);
}
