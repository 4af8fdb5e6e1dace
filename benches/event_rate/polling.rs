//! HTTP under load: wrk's clients polling `GET /` while tally drains the topic, then against the
//! caught-up view, to see what polling costs the drain and what latency the pollers get.

use std::process::{Child, Command, Stdio};

/// A running wrk.
pub(crate) struct Wrk(Child);

/// What wrk reported.
#[derive(Debug, Default)]
pub(crate) struct WrkStats {
    pub(crate) requests_per_s: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// `Non-2xx or 3xx responses` (a 503 while catching up counts here).
    pub(crate) non_2xx: u64,
    /// wrk's socket error line, if any (`connect 0, read 0, write 0, timeout 7`).
    pub(crate) socket_errors: String,
}

impl Wrk {
    /// `wrk -t2 -c<clients> -d<secs>s --latency http://<http>/`.
    pub(crate) fn start(http: &str, clients: usize, secs: u64) -> Result<Wrk, String> {
        Command::new("wrk")
            .args([
                "-t2",
                &format!("-c{clients}"),
                &format!("-d{secs}s"),
                "--timeout",
                "10s",
                "--latency",
            ])
            .arg(format!("http://{http}/"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map(Wrk)
            .map_err(|e| format!("wrk: {e} (scripts/bench-deps installs it)"))
    }

    /// Stops it now (SIGINT, on which wrk prints its report) and reads the report.
    pub(crate) fn stop(self) -> WrkStats {
        let _ = Command::new("kill").args(["-INT", &self.0.id().to_string()]).status();
        self.finish()
    }

    /// Waits for its duration to end and reads the report.
    pub(crate) fn finish(self) -> WrkStats {
        let out = self
            .0
            .wait_with_output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        parse(&out)
    }
}

/// `512.00us`, `3.50ms`, `1.20s` -> milliseconds.
fn millis(text: &str) -> f64 {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else {
        (text, f64::NAN)
    };
    number.parse::<f64>().map_or(f64::NAN, |n| n * factor)
}

fn parse(out: &str) -> WrkStats {
    let mut stats = WrkStats {
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        ..WrkStats::default()
    };
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(v)) => stats.p50_ms = millis(v),
            (Some("99%"), Some(v)) => stats.p99_ms = millis(v),
            (Some("Requests/sec:"), Some(v)) => stats.requests_per_s = v.parse().unwrap_or(f64::NAN),
            _ => {}
        }
        if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            stats.non_2xx = n.trim().parse().unwrap_or(0);
        }
        if let Some(e) = line.strip_prefix("Socket errors:") {
            stats.socket_errors = e.trim().to_owned();
        }
    }
    stats
}
