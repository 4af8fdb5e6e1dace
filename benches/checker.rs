//! The checker's probe against a local target: checks per second one task sustains (one check after the
//! other, a fresh connection each, every phase timed), and its phase timings next to curl's `-w` timings for
//! the same URL. The target answers 200 after `--delay-ms` (default 20 ms), so time to first byte is
//! measurable against both.
//!
//! `cargo bench --bench checker -- [--checks 2000] [--delay-ms 20] [--out FILE]`
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally::pipelines::availability::probe::{resolver_for, tls_config, Expect, Probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut checks = 2000usize;
    let mut delay_ms = 20u64;
    let mut out = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--checks" => checks = it.next().unwrap().parse().unwrap(),
            "--delay-ms" => delay_ms = it.next().unwrap().parse().unwrap(),
            "--out" => out = it.next(),
            "--bench" => {}
            other => panic!("unknown flag {other}"),
        }
    }
    // The target on a thread and runtime of its own; the probe on one runtime thread (one core).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    if delay_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nstatus ok")
                        .await;
                });
            }
        });
    });
    let port: u16 = rx.recv().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(async move {
        let probe = Probe {
            resolver: Arc::new(resolver_for(&["127.0.0.1:9".parse().unwrap()], Duration::from_secs(1))),
            tls: Arc::new(tls_config(&[]).unwrap()),
            max_redirects: 5,
        };
        let expect = Expect {
            status: (200, 299),
            regex: Some(regex::Regex::new("ok").unwrap()),
            timeout: Duration::from_secs(5),
        };
        let url = format!("http://127.0.0.1:{port}/");
        let started = Instant::now();
        let mut rows = Vec::with_capacity(checks);
        for _ in 0..checks {
            let o = probe.check(&url, &expect).await;
            assert_eq!(o.outcome, "up", "{o:?}");
            rows.push(o);
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "tally probe: {checks} checks one after another in {secs:.2} s: {:.0} checks/s with a {delay_ms} ms target",
            checks as f64 / secs
        );
        rows
    });
    let ms = |f: &dyn Fn(&tally::pipelines::availability::probe::Outcome) -> u64| {
        p50(rows.iter().map(|o| f(o) as f64 / 1000.0).collect())
    };
    let tally = [
        ms(&|o| o.connect_us),
        ms(&|o| o.connect_us + o.ttfb_us),
        ms(&|o| o.total_us),
    ];
    // curl: connect, start of transfer (first byte) and total, each measured from the start of the request.
    let runs = 200.min(checks);
    let mut curl: [Vec<f64>; 3] = [Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..runs {
        let o = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{time_connect} %{time_starttransfer} %{time_total}",
            ])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .unwrap();
        let text = String::from_utf8(o.stdout).unwrap();
        for (i, v) in text.split_whitespace().enumerate() {
            curl[i].push(v.parse::<f64>().unwrap() * 1000.0);
        }
    }
    let curl = curl.map(p50);
    println!("p50 ms            tally    curl -w");
    for (i, name) in ["connect", "first byte", "total"].iter().enumerate() {
        println!(
            "{name:<14} {:>8.3} {:>10.3}  ({:+.1}%)",
            tally[i],
            curl[i],
            (tally[i] / curl[i] - 1.0) * 100.0
        );
    }
    if let Some(out) = out {
        let v = serde_json::json!({"checks": checks, "delay_ms": delay_ms, "tally_p50_ms": tally, "curl_p50_ms": curl, "curl_runs": runs});
        std::fs::write(out, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }
}
