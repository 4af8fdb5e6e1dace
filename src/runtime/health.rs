//! What `/health` reports, truthfully: `stopping` once SIGTERM arrived; `catching_up` until every source of this process has read up to
//! the high watermarks it saw when it connected AND every view shows a timestamp at or after that;
//! `degraded` once caught up if a source has not heard from the broker for `stale_after`, a sink's last
//! commit failed, or the last dead-letter write failed; `ok` otherwise. Anything but `ok` answers 503, so
//! a Kubernetes readiness probe works as is. Until the first catch-up the views answer 503 too (unless
//! partial views are asked for), so a partial view never looks complete.
//!
//! In a cluster each process knows its own sources: process 0, which serves, reports on its own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::clock::epoch_now;

/// A source's state as its worker last reported it.
#[derive(Debug)]
pub struct SourceHealth {
    topic: String,
    worker: usize,
    /// The timestamp at which the source had read every partition to the high watermark it saw when it
    /// connected; 0 until then.
    caught_up_at: AtomicU64,
    /// When the source last heard from the broker (a message, a connection, a statistics report naming a
    /// broker that is up), epoch ms; 0 never.
    last_heard_ms: AtomicU64,
    /// Messages between what it has read and the high watermarks it saw at connect.
    behind: AtomicU64,
}

impl SourceHealth {
    /// The source has read up to the start watermarks; its records so far are at or before `time`.
    pub fn caught_up(&self, time: u64) {
        let _ = self
            .caught_up_at
            .compare_exchange(0, time.max(1), Ordering::Relaxed, Ordering::Relaxed);
        self.behind.store(0, Ordering::Relaxed);
    }

    /// How many messages it still has to read to reach the start watermarks.
    pub fn behind(&self, messages: u64) {
        self.behind.store(messages, Ordering::Relaxed);
    }

    /// The broker answered just now.
    pub fn heard(&self) {
        self.last_heard_ms.store(epoch_now(1), Ordering::Relaxed);
    }
}

/// The process's health, shared by sources, sinks, the dead-letter file and HTTP.
#[derive(Debug)]
pub struct Health {
    started_ms: u64,
    stale_after: Duration,
    sources: Mutex<Vec<Arc<SourceHealth>>>,
    /// Per sink: the last commit's error, `None` once one succeeds.
    sinks: Mutex<BTreeMap<&'static str, Option<String>>>,
    dead_letter_failures: AtomicU64,
    dead_letter_failing: AtomicBool,
    /// Latched once caught up: a later outage is `degraded`, never a rebuild.
    ready: AtomicBool,
    /// Set at SIGTERM: the process is draining and should get no new traffic.
    stopping: AtomicBool,
}

/// `ok`, `catching_up` or `degraded`, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// `ok`, `catching_up` or `degraded`.
    pub status: &'static str,
    /// What keeps it from `ok`.
    pub reasons: Vec<String>,
    /// Messages still to read to reach the watermarks seen at start.
    pub behind: u64,
    /// Whether the views have caught up once (they are then served).
    pub ready: bool,
}

impl Health {
    /// A source that has not heard from the broker for `stale_after` makes the process `degraded`.
    pub fn new(stale_after: Duration) -> Self {
        Health {
            started_ms: epoch_now(1),
            stale_after,
            sources: Mutex::default(),
            sinks: Mutex::default(),
            dead_letter_failures: AtomicU64::new(0),
            dead_letter_failing: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        }
    }

    /// Registers one worker's source.
    pub fn source(&self, topic: &str, worker: usize) -> Arc<SourceHealth> {
        let s = Arc::new(SourceHealth {
            topic: topic.to_owned(),
            worker,
            caught_up_at: AtomicU64::new(0),
            last_heard_ms: AtomicU64::new(0),
            behind: AtomicU64::new(0),
        });
        self.sources.lock().unwrap_or_else(|p| p.into_inner()).push(s.clone());
        s
    }

    /// The process is shutting down: `/health` says `stopping` (503) from now on.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// A sink's commit failed (`Some(error)`) or succeeded (`None`).
    pub fn sink(&self, name: &'static str, error: Option<String>) {
        self.sinks.lock().unwrap_or_else(|p| p.into_inner()).insert(name, error);
    }

    /// A dead-letter write failed (`false`) or succeeded (`true`).
    pub fn dead_letter(&self, written: bool) {
        if !written {
            self.dead_letter_failures.fetch_add(1, Ordering::Relaxed);
        }
        self.dead_letter_failing.store(!written, Ordering::Relaxed);
    }

    /// Failed dead-letter writes since start.
    pub fn dead_letter_failures(&self) -> u64 {
        self.dead_letter_failures.load(Ordering::Relaxed)
    }

    /// The status now, given the closed timestamp each view shows (`None`: not published yet).
    pub fn status(&self, views: &[(&str, Option<u64>)]) -> Status {
        let now = epoch_now(1);
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut reasons = Vec::new();
        let mut behind = 0;
        let mut caught_up_at = 0;
        let mut caught_up = true;
        for s in &sources {
            let at = s.caught_up_at.load(Ordering::Relaxed);
            if at == 0 {
                caught_up = false;
                let n = s.behind.load(Ordering::Relaxed);
                behind += n;
                reasons.push(format!(
                    "source {} worker {}: {n} messages behind the start watermarks",
                    s.topic, s.worker
                ));
            }
            caught_up_at = caught_up_at.max(at);
            let heard = s.last_heard_ms.load(Ordering::Relaxed);
            let silent_ms = now.saturating_sub(if heard == 0 { self.started_ms } else { heard });
            if silent_ms > self.stale_after.as_millis() as u64 {
                let since = if heard == 0 {
                    "no broker reached since start"
                } else {
                    "no word from the broker"
                };
                reasons.push(format!(
                    "source {} worker {}: {since} for {} s",
                    s.topic,
                    s.worker,
                    silent_ms / 1000
                ));
            }
        }
        if caught_up && !self.ready.load(Ordering::Relaxed) {
            let lagging: Vec<&str> = views
                .iter()
                .filter(|(_, as_of)| as_of.is_none_or(|t| t < caught_up_at))
                .map(|(p, _)| *p)
                .collect();
            if lagging.is_empty() {
                self.ready.store(true, Ordering::Relaxed);
            } else {
                reasons.push(format!(
                    "views {lagging:?} do not show the caught-up timestamp {caught_up_at} yet"
                ));
            }
        }
        for (name, error) in self.sinks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if let Some(e) = error {
                reasons.push(format!("sink {name}: last commit failed: {e}"));
            }
        }
        if self.dead_letter_failing.load(Ordering::Relaxed) {
            reasons.push("the last dead-letter write failed".to_owned());
        }
        let ready = self.ready.load(Ordering::Relaxed);
        let stopping = self.stopping.load(Ordering::Relaxed);
        if stopping {
            reasons.insert(
                0,
                "shutting down: finishing requests in flight and the last commit".to_owned(),
            );
        }
        let status = match (stopping, ready, reasons.is_empty()) {
            (true, _, _) => "stopping",
            (false, false, _) => "catching_up",
            (false, true, true) => "ok",
            (false, true, false) => "degraded",
        };
        Status {
            status,
            reasons,
            behind,
            ready,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catching_up_until_sources_and_views_reach_the_start_watermarks_then_degraded_not_rebuilding() {
        let health = Health::new(Duration::from_secs(3600));
        let a = health.source("t", 0);
        let b = health.source("t", 1);
        a.heard();
        b.heard();
        b.behind(7);
        assert_eq!(health.status(&[("/", Some(5))]).status, "catching_up");
        assert_eq!(health.status(&[("/", Some(5))]).behind, 7);
        a.caught_up(10);
        b.caught_up(20);
        let view_behind = health.status(&[("/", Some(19))]);
        assert_eq!(
            (view_behind.status, view_behind.ready),
            ("catching_up", false),
            "{view_behind:?}"
        );
        assert_eq!(health.status(&[("/", Some(20))]).status, "ok");
        health.sink("sqlite", Some("database is locked".into()));
        let s = health.status(&[("/", Some(20))]);
        assert_eq!(s.status, "degraded");
        assert!(s.reasons[0].contains("database is locked"), "{s:?}");
        health.sink("sqlite", None);
        health.dead_letter(false);
        assert_eq!(health.status(&[]).status, "degraded");
        health.dead_letter(true);
        assert_eq!(health.status(&[]).status, "ok");
        assert_eq!(health.dead_letter_failures(), 1);
    }

    #[test]
    fn a_source_that_never_reached_a_broker_is_not_ok() {
        let health = Health::new(Duration::ZERO);
        health.source("t", 0);
        std::thread::sleep(Duration::from_millis(5));
        let s = health.status(&[("/", None)]);
        assert_eq!(s.status, "catching_up");
        assert!(s.reasons.iter().any(|r| r.contains("no broker reached")), "{s:?}");
    }
}
