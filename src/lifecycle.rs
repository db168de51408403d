//! One lifecycle for the whole appliance (mini-redis's shape): a stop
//! token whose children every part takes (signaling, the Redis backend,
//! the listeners, the relay shards), the set of tasks stop waits for, and
//! the drain state, whose progress is announced by those that hold a drain
//! open (an allocation ending, a room closing) instead of being polled.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The stop token, the tasks, the drain.
#[derive(Clone, Default)]
pub struct Lifecycle {
    stop: CancellationToken,
    tasks: TaskTracker,
    pub drain: Arc<Drain>,
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// A token cancelled when the appliance stops (or by its holder,
    /// alone).
    pub fn child(&self) -> CancellationToken {
        self.stop.child_token()
    }

    /// Runs `task` as one of those stop waits for.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task);
    }

    /// The task set, for parts that spawn per connection.
    pub fn tasks(&self) -> TaskTracker {
        self.tasks.clone()
    }

    /// Cancels every token and waits up to `grace` for every task; false
    /// when some did not end in time.
    pub async fn stop(&self, grace: Duration) -> bool {
        self.stop.cancel();
        self.tasks.close();
        tokio::time::timeout(grace, self.tasks.wait()).await.is_ok()
    }
}

/// Draining: new allocations and joins are refused (or sent elsewhere)
/// while calls in progress go on, until none is left.
#[derive(Debug, Default)]
pub struct Drain {
    /// Read by the TURN core and signaling (a plain flag: the core knows
    /// no runtime).
    flag: Arc<AtomicBool>,
    progress: Notify,
}

impl Drain {
    /// The flag the TURN core and signaling read.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    pub fn is_draining(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    /// Starts a drain; false if one had started.
    pub fn start(&self) -> bool {
        let started = !self.flag.swap(true, Ordering::Relaxed);
        self.progress.notify_waiters();
        started
    }

    /// Something that holds a drain open has ended (an allocation, a
    /// room): whoever waits for the drain's end looks again.
    pub fn progressed(&self) {
        if self.is_draining() {
            self.progress.notify_waiters();
        }
    }

    /// Resolves once `done` holds, checked at start and at every progress.
    pub async fn until(&self, done: impl Fn() -> bool) {
        loop {
            // Registered before the check, so progress in between is seen.
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if done() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn a_drain_ends_on_progress_not_on_a_poll() {
        let drain = Arc::new(Drain::default());
        assert!(drain.start() && !drain.start());
        let left = Arc::new(AtomicUsize::new(2));
        let waiter = {
            let (drain, left) = (drain.clone(), left.clone());
            tokio::spawn(async move { drain.until(|| left.load(Ordering::Relaxed) == 0).await })
        };
        left.store(1, Ordering::Relaxed);
        drain.progressed();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        left.store(0, Ordering::Relaxed);
        drain.progressed();
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the drain's end is noticed at once")
            .unwrap();
    }

    #[tokio::test]
    async fn stop_cancels_children_and_waits_for_the_tasks() {
        let life = Lifecycle::new();
        let child = life.child();
        let ended = Arc::new(AtomicBool::new(false));
        {
            let ended = ended.clone();
            life.spawn(async move {
                child.cancelled().await;
                ended.store(true, Ordering::Relaxed);
            });
        }
        assert!(life.stop(Duration::from_secs(1)).await);
        assert!(ended.load(Ordering::Relaxed));
    }
}
