//! Where a process's threads spent a stretch of wall time, from the kernel's per-thread scheduler
//! statistics (`/proc/<pid>/task/<tid>/schedstat`: nanoseconds on a CPU, nanoseconds runnable but waiting
//! for one). On a 2-core machine shared with the broker, a thread that is slow because it waits for a core
//! and one that is slow because it computes look the same by wall time; this tells them apart.

use std::collections::BTreeMap;

/// Per thread id: its name and its cumulative (on-CPU, waiting-for-CPU) nanoseconds.
#[derive(Clone, Default)]
pub(crate) struct Snapshot(BTreeMap<String, (String, u64, u64)>);

/// `pid` is a process id or `self`.
pub(crate) fn snapshot(pid: &str) -> Snapshot {
    let mut threads = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Snapshot(threads);
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_owned();
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        let mut f = stat.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        let (run, wait) = (f.next().unwrap_or(0), f.next().unwrap_or(0));
        threads.insert(task.file_name().to_string_lossy().into_owned(), (name, run, wait));
    }
    Snapshot(threads)
}

/// Seconds on a CPU and waiting for one between two snapshots, summed per thread group. A thread's group is
/// its name up to the first `-` or digit (`timely:work-0` -> `timely:work`, `rdk:broker1` -> `rdk:broker`);
/// threads that started in between count from zero.
pub(crate) fn between(before: &Snapshot, after: &Snapshot) -> BTreeMap<String, (f64, f64)> {
    let mut groups: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (tid, (name, run, wait)) in &after.0 {
        let (run0, wait0) = before.0.get(tid).map_or((0, 0), |(_, r, w)| (*r, *w));
        let group = name
            .split(|c: char| c == '-' || c.is_ascii_digit())
            .next()
            .unwrap_or("")
            .to_owned();
        let g = groups.entry(group).or_default();
        g.0 += run.saturating_sub(run0) as f64 / 1e9;
        g.1 += wait.saturating_sub(wait0) as f64 / 1e9;
    }
    groups
}

/// `group: a s on CPU + b s waiting, ...` with each as a share of `wall_s`, largest first.
pub(crate) fn describe(groups: &BTreeMap<String, (f64, f64)>, wall_s: f64) -> String {
    let mut v: Vec<_> = groups.iter().filter(|(_, (run, wait))| run + wait > 0.001).collect();
    v.sort_by(|a, b| (b.1 .0 + b.1 .1).total_cmp(&(a.1 .0 + a.1 .1)));
    v.iter()
        .map(|(g, (run, wait))| {
            format!(
                "{g} {:.0}% on a CPU + {:.0}% waiting for one",
                run / wall_s * 100.0,
                wait / wall_s * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
