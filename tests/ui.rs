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
