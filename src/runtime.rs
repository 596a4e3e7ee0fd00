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

/// Builds the multi-threaded runtime with `worker_threads` workers (blocking work, such as
/// reading files, still gets its own threads).
pub fn build(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.clamp(1, MAX_WORKER_THREADS))
        .thread_name("rna-worker")
        .enable_all()
        .build()
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
}
