//! A memory line of `/proc/<pid>/status` (`VmHWM:` peak, `VmRSS:` now), in MB: shared by the benches.

/// `pid` is a process id, or `self`.
pub(crate) fn status_mb(pid: &str, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}
