//! The async runtime a hub or agent process runs on, and how many worker threads it gets.

/// Worker threads when none are configured: one on a machine with at most two CPUs, one per
/// CPU above that.
///
/// rna's relay hands every packet between tasks (UDP socket → QUIC connection → stream →
/// TCP socket). On two CPUs, which the process shares with the kernel's network processing
/// and with the programs on either end, a second worker thread mostly adds cross-thread
/// wake-ups: measured on a 2-CPU machine (docs/performance.md), one worker moved a single
/// stream 25–45 % faster at a quarter less CPU per byte, with the same connection rate.
/// With more CPUs, work across many agents and streams spreads over all of them.
/// `available_parallelism` honours CPU affinity and cgroup CPU quotas (containers).
pub fn default_worker_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus <= 2 {
        1
    } else {
        cpus
    }
}

/// Most worker threads a process may be configured with.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Builds the runtime for `worker_threads` workers (blocking work, such as reading files,
/// still gets its own threads).
///
/// One worker gets tokio's current-thread scheduler: every task runs on the thread that
/// drives the runtime (`block_on`), which also owns the I/O driver. The multi-threaded
/// scheduler with one worker keeps the `block_on` future on a second thread and hands
/// wake-ups between the two; with one thread a packet's arrival and the tasks it wakes are
/// one wake-up of one thread (measured in docs/performance.md, "L1 with curl: one thread").
pub fn build(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = worker_threads.clamp(1, MAX_WORKER_THREADS);
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder.thread_name("rna-worker").enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_follows_the_cpus() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = default_worker_threads();
        if cpus <= 2 {
            assert_eq!(n, 1);
        } else {
            assert_eq!(n, cpus);
        }
    }

    #[test]
    fn the_runtime_has_the_workers_asked_for() {
        for n in [1, 3] {
            let rt = build(n).unwrap();
            assert_eq!(rt.metrics().num_workers(), n);
        }
    }

    #[test]
    fn one_worker_is_the_current_thread_scheduler() {
        use tokio::runtime::RuntimeFlavor;
        for (asked, flavor) in [
            (0, RuntimeFlavor::CurrentThread),
            (1, RuntimeFlavor::CurrentThread),
            (2, RuntimeFlavor::MultiThread),
        ] {
            let rt = build(asked).unwrap();
            assert_eq!(
                rt.handle().runtime_flavor(),
                flavor,
                "{asked} workers asked"
            );
        }
    }

    #[test]
    fn the_current_thread_runtime_runs_spawned_and_blocking_work() {
        // The hub spawns its tasks and does blocking work (files, state writes that wait
        // on the runtime through `Handle::block_on`) from inside `block_on`.
        let rt = build(1).unwrap();
        let answer = rt.block_on(async {
            let handle = tokio::runtime::Handle::current();
            let spawned = tokio::spawn(async { 20 });
            let blocking = tokio::task::spawn_blocking(move || {
                handle.block_on(async {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    22
                })
            });
            spawned.await.unwrap() + blocking.await.unwrap()
        });
        assert_eq!(answer, 42);
    }
}
