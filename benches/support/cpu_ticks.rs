//! CPU time from `/proc/<pid>/stat`: shared by the benches.

/// User + system CPU time of `pid` (a process id, `self` or `thread-self`) in clock ticks (USER_HZ, 100
/// per second on Linux); 0 if it is gone.
pub(crate) fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces), from the state: utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}
