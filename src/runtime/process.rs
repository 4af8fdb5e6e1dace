//! Process-wide set-up: signals, the allocator's arenas, and what a lost cluster peer means.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::RuntimeError;

/// SIGTERM or Ctrl-C sets the returned flag: the sources stop reading, the dataflow finishes what was read
/// (a sink commits it with its offsets), and the pipeline returns, so tally exits 0. A second signal exits
/// at once with status 1. In cluster mode every process needs the signal: the dataflow completes only when
/// all sources have stopped.
pub fn stop_on_signals() -> Result<Arc<AtomicBool>, RuntimeError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        // Registered first, so it sees the flag as the previous signal left it.
        signal_hook::flag::register_conditional_shutdown(signal, 1, shutdown.clone())?;
        signal_hook::flag::register(signal, shutdown.clone())?;
    }
    Ok(shutdown)
}

/// With mimalloc serving Rust, glibc's malloc serves only librdkafka's threads, which it spreads over an
/// arena each: measured with the benchmark (10M events, `-w 1`), RSS then drifted up by about 15 MB over
/// 14M records, and with `MALLOC_ARENA_MAX=1` it stayed flat. glibc reads that variable only at start-up,
/// so tally re-executes itself once with it set (same pid, arguments and streams). A value set by the user
/// wins; if the re-exec fails, tally runs on as it is.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn one_glibc_arena() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return;
    }
    if let Ok(exe) = std::env::current_exe() {
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("MALLOC_ARENA_MAX", "1")
            .exec();
        eprintln!("tally: re-executing with MALLOC_ARENA_MAX=1 failed ({err}); running on");
    }
}

/// Logs to stderr, filtered by `TALLY_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("TALLY_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
}

/// Timely has no recovery from a lost cluster peer: its network threads panic ("timely communication
/// error: ... socket closed"), and the process then exits with a cascade of panics. This says what happened
/// and what to do, once, before them.
pub fn explain_lost_peers() {
    let default = std::panic::take_hook();
    let said = AtomicBool::new(false);
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied());
        if msg.is_some_and(|m| m.starts_with("timely communication error"))
            && !said.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::error!(
                cause = msg.unwrap_or_default(),
                "lost the connection to another process of the cluster (it exited or the network failed); the \
                 cluster cannot continue without it, so this process exits too: restart every process"
            );
        }
        default(info);
    }));
}

/// Lowers the calling thread's scheduling priority to `nice` (on Linux, niceness is per thread). For
/// background threads (HTTP readers, sink writers) that should yield the cores to the dataflow's workers;
/// a failure is logged and changes nothing else.
pub fn yield_to_workers(nice: i32) {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
        tracing::warn!(nice, error = %e, "cannot lower this thread's priority");
    }
}
