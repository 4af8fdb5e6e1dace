//! `/ui` in a real browser (Debian's headless Chromium, installed by scripts/browser): the page renders the
//! view as a table, and text from Kafka stays text.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{produce, Broker, Rec};

/// The page's DOM after its script ran (a few seconds of the page's own time).
fn rendered_dom(url: &str) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=3000",
            "--dump-dom",
            url,
        ])
        .output()
        .expect("run chromium (scripts/browser install)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn food_page_shows_keys_from_kafka_as_text_never_markup() {
    let broker = Broker::start();
    broker.create_topic("message", 1);
    let foods = [
        "apple",
        "apple",
        r#"<img src=x onerror="document.title='pwned'">"#,
        "<b>bold</b>",
    ];
    let records: Vec<Rec> = foods
        .iter()
        .map(|f| Rec {
            partition: 0,
            key: None,
            value: Some(serde_json::json!({ "food": f }).to_string().into_bytes()),
            headers: vec![],
        })
        .collect();
    produce(&broker, "message", &records);
    let dir = common::temp_dir("ui-food");
    let (db, dl) = (dir.join("data.db"), dir.join("dead-letter.jsonl"));
    let tally = common::spawn_tally(&[
        "food",
        "--brokers",
        &broker.addr,
        "--sqlite",
        db.to_str().unwrap(),
        "--dead-letter",
        dl.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !tally.get("/aggregated").2.contains("bold") {
        assert!(Instant::now() < deadline, "tally never counted the events");
        std::thread::sleep(Duration::from_millis(50));
    }

    let dom = rendered_dom(&format!("http://{}/ui", tally.http));
    // A key rendered as markup would have run its onerror handler and renamed the page.
    assert!(dom.contains("<title>tally · food counts</title>"), "{dom}");
    assert!(dom.contains("<tr><th>food</th><th>count</th></tr>"), "{dom}");
    assert!(
        dom.contains("<tr><td>&lt;b&gt;bold&lt;/b&gt;</td><td>1</td></tr>"),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<tr><td>&lt;img src=x onerror="document.title='pwned'"&gt;</td><td>1</td></tr>"#),
        "{dom}"
    );
    assert!(dom.contains("<tr><td>apple</td><td>2</td></tr>"), "{dom}");
    let table = dom
        .split(r#"<table id="t">"#)
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .unwrap();
    assert!(!table.contains("<img") && !table.contains("<b>"), "{table}");
}

#[test]
fn usage_page_renders_the_demo_view_by_organization() {
    // The demo needs no services: its own in-process broker and simulator.
    let mut tally = common::spawn_tally(&["demo", "--interval-ms", "20"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let view = loop {
        let (status, _, body) = tally.get("/");
        // Until tally has caught up with its topic the view answers 503 with its progress, not the view.
        let view: serde_json::Map<String, serde_json::Value> = if status == 200 {
            serde_json::from_str(&body).unwrap_or_default()
        } else {
            Default::default()
        };
        if !view.is_empty() {
            break view;
        }
        assert!(Instant::now() < deadline, "the demo view stayed empty");
        std::thread::sleep(Duration::from_millis(100));
    };
    let dom = rendered_dom(&format!("http://{}/ui", tally.http));
    assert!(dom.contains("<title>tally · usage per organization</title>"), "{dom}");
    assert!(
        dom.contains("<tr><th>organization</th><th>started</th><th>running</th><th>billing</th></tr>"),
        "{dom}"
    );
    // Organizations only grow in the demo, so every one seen before the page loaded is in its table.
    for org in view.keys() {
        assert!(dom.contains(&format!("<tr><td>{org}</td>")), "{org} missing from {dom}");
    }
    // The demo stops its simulator and then its broker, and exits 0.
    let (status, _) = tally.terminate();
    assert!(status.success(), "demo exited with {status}");
}

#[test]
fn availability_page_shows_state_strip_uptime_and_phases_with_names_as_text() {
    // The views alone (no PostgreSQL), over results on the real broker: one site whose "URL" is markup.
    let broker = Broker::start();
    broker.create_topic("website_availability", 1);
    let evil = r#"https://x.test/<img src=x onerror="document.title='pwned'">"#;
    let t0: i64 = 1_614_556_800_000;
    let records: Vec<Rec> = (0..60)
        .flat_map(|k| {
            [("https://ok.test/", k % 20 == 7), (evil, k >= 50)].map(|(url, down)| {
                let value = serde_json::json!({
                    "site_id": 1, "url": url, "scheduled_at_ms": t0 + k * 30_000, "interval_ms": 30_000,
                    "outcome": if down { "down" } else { "up" },
                    "error_class": if down { Some("tls_expired") } else { None },
                    "dns_us": 300, "connect_us": 500, "tls_us": 4_000, "ttfb_us": 9_000, "transfer_us": 200,
                    "total_us": 14_000,
                });
                Rec {
                    partition: 0,
                    key: Some(url.as_bytes().to_vec()),
                    value: Some(value.to_string().into_bytes()),
                    headers: vec![],
                }
            })
        })
        .collect();
    produce(&broker, "website_availability", &records);
    let dir = common::temp_dir("ui-availability");
    let dl = dir.join("dead-letter.jsonl");
    let tally = common::spawn_tally(&[
        "availability",
        "--views-only",
        "--brokers",
        &broker.addr,
        "--dead-letter",
        dl.to_str().unwrap(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, body) = tally.get("/availability");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if status == 200 && v[evil]["uptime"]["7d"]["down"] == 10 && v["https://ok.test/"]["uptime"]["7d"]["up"] == 57 {
            break;
        }
        assert!(Instant::now() < deadline, "the views never showed every result: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let dom = rendered_dom(&format!("http://{}/ui", tally.http));
    assert!(dom.contains("<title>tally · availability</title>"), "{dom}");
    assert!(dom.contains("2 sites, 1 down"), "{dom}");
    // The markup site is a cell of text; had it been parsed, its onerror would have renamed the page.
    assert!(
        dom.contains(r#"<td class="site">https://x.test/&lt;img src=x onerror="document.title='pwned'"&gt;</td>"#),
        "{dom}"
    );
    assert!(dom.contains(r#"<span class="state st-down">down</span>"#), "{dom}");
    assert!(dom.contains(r#"<span class="state st-up">up</span>"#), "{dom}");
    // The strip: 50 cells per site, a failure's hover text names its slot and class.
    assert_eq!(dom.matches(r#"<span class="c-"#).count(), 100, "{dom}");
    assert!(
        dom.contains(r#"<span class="c-down" title="2021-03-01T00:25:00.000Z down · tls_expired"></span>"#),
        "{dom}"
    );
    // Uptime 24 h with its counts: 57 of 60 for ok.test; the p95 bar has one segment per timed phase.
    assert!(dom.contains("95.000% (57/60)"), "{dom}");
    for phase in ["dns", "connect", "tls", "ttfb", "transfer"] {
        assert!(
            dom.contains(&format!(r#"<span class="p-{phase}" title="{phase} p95 "#)),
            "{phase}: {dom}"
        );
    }
    // ttfb's p95 (9 ms of 14) is the widest segment.
    assert!(dom.contains(r#"title="ttfb p95 9.21 ms" style="width: 64."#), "{dom}");
    assert!(!dom.contains("<img"), "{dom}");
}

#[test]
fn availability_demo_checks_its_own_targets_without_services() {
    let mut tally = common::spawn_tally(&["demo", "availability"]);
    let deadline = Instant::now() + Duration::from_secs(90);
    // Six built-in sites; wait until each has been checked twice.
    let v = loop {
        let (status, _, body) = tally.get("/availability");
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        let checked = v
            .values()
            .filter(|s| s["strip"].as_array().is_some_and(|a| a.len() >= 2))
            .count();
        if status == 200 && checked == 6 {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the demo never checked all six sites: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let class = |suffix: &str| {
        let (_, s) = v.iter().find(|(u, _)| u.ends_with(suffix)).unwrap();
        (
            s["state"].as_str().unwrap().to_owned(),
            s["last"]["error_class"].clone(),
        )
    };
    assert_eq!(class("/ok"), ("up".into(), serde_json::Value::Null));
    assert_eq!(class("/broken"), ("down".into(), "http_status".into()));
    assert_eq!(class("/wrong-body"), ("down".into(), "body_mismatch".into()));
    // The slow target sleeps 300 ms before its headers: its first byte is timed after that.
    let (_, slow) = v.iter().find(|(u, _)| u.ends_with("/slow")).unwrap();
    assert!(slow["latency_us"]["ttfb"]["p50"].as_i64().unwrap() >= 300_000, "{slow}");
    // The sixth site is a closed port (its URL's path is "/").
    let refused = v
        .iter()
        .find(|(u, _)| u.splitn(4, '/').nth(3) == Some(""))
        .map(|(_, s)| s["last"]["error_class"].clone());
    assert_eq!(refused, Some("connect_refused".into()));
    let dom = rendered_dom(&format!("http://{}/ui", tally.http));
    assert!(dom.contains("6 sites, "), "{dom}");
    let (status, _) = tally.terminate();
    assert!(status.success(), "demo exited with {status}");
}
