//! The real `tally` binary as a child process.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http::http_get;

/// A child process killed (and reaped) on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `tally` process; killed on drop.
pub struct Tally {
    /// The process.
    pub child: Child,
    /// The HTTP address it announced.
    pub http: String,
}

impl Tally {
    /// Starts `exe <args>` (the test's `env!("CARGO_BIN_EXE_tally")`) with HTTP on an ephemeral port and
    /// waits for it to announce the address.
    pub fn spawn(exe: impl AsRef<Path>, args: &[&str]) -> Tally {
        let mut child = Command::new(exe.as_ref())
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .env("TALLY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tally");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).expect("tally announces its address");
        // Keep draining stdout (timely reports cluster connection retries there).
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let http = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split('/').next())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        Tally { child, http }
    }

    /// `GET path`: (status, headers, body).
    pub fn get(&self, path: &str) -> (u16, String, String) {
        http_get(&self.http, path)
    }

    /// Polls `GET path` until the body equals `expected` (parsed JSON), or fails with the last body seen.
    pub fn wait_for_json(&self, path: &str, expected: &serde_json::Value, timeout: Duration) -> String {
        let mut last = String::new();
        let equal = crate::poll_until(timeout, Duration::from_millis(50), || {
            let (status, _, body) = self.get(path);
            if status != 200 {
                last = format!("{status} {body}");
                return None;
            }
            if serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| &v == expected) {
                return Some(body);
            }
            last = body;
            None
        });
        equal.unwrap_or_else(|| {
            let (_, _, health) = self.get("/health");
            panic!("timed out waiting for {path} to equal\n  {expected}\nlast body:\n  {last}\nhealth: {health}")
        })
    }

    /// Waits until `metric` reaches `value` (metrics update per batch, after the view may already show it).
    pub fn wait_for_metric(&self, metric: &str, value: f64, timeout: Duration) {
        let reached = crate::poll_until(timeout, Duration::from_millis(50), || {
            (self.metric(metric) >= value).then_some(())
        });
        assert!(
            reached.is_some(),
            "{metric} stayed at {} (< {value})",
            self.metric(metric)
        );
    }

    /// The value of the sample `name_and_labels` (exactly as Prometheus text writes it), 0 if absent.
    pub fn metric(&self, name_and_labels: &str) -> f64 {
        let (_, _, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name_and_labels)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// SIGTERM, then waits (at most 15 s) for tally to exit; returns its status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill(1)");
        assert!(term.success(), "kill -TERM failed");
        let sent = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, sent.elapsed());
            }
            assert!(
                sent.elapsed() < Duration::from_secs(15),
                "tally still running 15 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// kill -9, and reap it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
