//! The measured rows and phases, and the report written from them (Markdown, CSV, plots).

use std::process::Command;

use crate::args::Args;
use crate::python::*;
use crate::root;

/// One measured row of the report.
#[derive(Clone, Debug)]
pub(crate) struct Row {
    pub(crate) system: String,
    pub(crate) schemas: String,
    pub(crate) workers: usize,
    pub(crate) events: usize,
    pub(crate) seconds: f64,
    pub(crate) rss_mb: Option<f64>,
    pub(crate) agrees: Option<bool>,
}

impl Row {
    pub(crate) fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

pub(crate) struct Fresh {
    pub(crate) schemas: String,
    pub(crate) workers: usize,
    pub(crate) offered: f64,
    pub(crate) handed: f64,
    pub(crate) delivered: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) ack_p50_ms: f64,
    pub(crate) ack_p99_ms: f64,
    pub(crate) after_p50_ms: f64,
    pub(crate) after_p99_ms: f64,
    /// From tally's histogram over the phase (a bucket's upper bound): timestamp closed -> view shows it.
    pub(crate) publish_p99_ms: f64,
    /// Over the phase: the machine's busy share of all its cores, and the cores tally, the broker and the
    /// harness (background generator, probes and polling) used.
    pub(crate) machine_busy: f64,
    pub(crate) tally_cores: f64,
    pub(crate) broker_cores: f64,
    pub(crate) harness_cores: f64,
}

impl Fresh {
    /// The phase's figures in the CSV's column order.
    pub(crate) fn numbers(&self) -> [f64; 14] {
        [
            self.offered,
            self.handed,
            self.delivered,
            self.p50_ms,
            self.p99_ms,
            self.ack_p50_ms,
            self.ack_p99_ms,
            self.after_p50_ms,
            self.after_p99_ms,
            self.publish_p99_ms,
            self.machine_busy,
            self.tally_cores,
            self.broker_cores,
            self.harness_cores,
        ]
    }
}

pub(crate) fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

pub(crate) fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

pub(crate) fn report(a: &Args, rows: &[Row], fresh: &[Fresh], notes: &[String]) {
    let mut csv = String::from("kind,system,schemas,workers,records,seconds,records_per_s,ratio_to_tally,peak_rss_mb,agrees,offered_per_s,handed_per_s,acknowledged_per_s,p50_ms,p99_ms,ack_p50_ms,ack_p99_ms,after_ack_p50_ms,after_ack_p99_ms,publish_delay_p99_ms_le,machine_busy,tally_cores,broker_cores,harness_cores\n");
    let mut md = format!(
        "# tally event-rate benchmark\n\nOne run, one machine ({} cores), one broker (scripts/broker), the same events for every system. Floors and tally drains: the median of {} interleaved runs (every run in the notes).\n\
         Workload: {} change events ({} running rows, {} organizations, {:.0}% price updates, deletes with tombstones), {} partitions.\n\
         Ratio = records/s divided by tally's end-to-end records/s with the same schema setting and `-w 1`.\n\
         Freshness's background generator: nice {}, linger {} ms, compression {}.\n\
         Command: `cargo bench --bench event_rate -- {}`\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        a.repeat.max(1),
        a.events,
        a.running,
        a.orgs,
        a.updates * 100.0,
        a.partitions,
        a.generator_nice,
        a.generator_linger_ms,
        a.generator_compression,
        std::env::args().skip(1).filter(|x| x != "--bench").map(|x| if x.is_empty() || x.contains(' ') { format!("\"{x}\"") } else { x }).collect::<Vec<_>>().join(" ")
    );
    for mode in ["on", "off"] {
        let group: Vec<&Row> = rows.iter().filter(|r| r.schemas == mode).collect();
        if group.is_empty() {
            continue;
        }
        let tally = group
            .iter()
            .find(|r| r.system.starts_with("tally -w 1"))
            .map_or(f64::NAN, |r| r.rate());
        md.push_str(&format!(
            "## Schemas {mode}\n\n| system | records/s | ratio to tally -w 1 | peak RSS | agrees with ledger |\n|---|---:|---:|---:|---|\n"
        ));
        for r in group {
            let ratio = r.rate() / tally;
            md.push_str(&format!(
                "| {} | {:.0} | {:.2} | {} | {} |\n",
                r.system,
                r.rate(),
                ratio,
                r.rss_mb.map_or("".into(), |m| format!("{m:.0} MB")),
                r.agrees.map_or("n/a", |b| if b { "yes" } else { "**NO**" })
            ));
            csv.push_str(&format!(
                "throughput,\"{}\",{},{},{},{:.3},{:.0},{:.3},{},{},,,,\n",
                r.system,
                r.schemas,
                r.workers,
                r.events,
                r.seconds,
                r.rate(),
                ratio,
                r.rss_mb.map_or(String::new(), |m| format!("{m:.0}")),
                r.agrees.map_or(String::new(), |b| b.to_string())
            ));
        }
        md.push('\n');
        let f: Vec<&Fresh> = fresh.iter().filter(|f| f.schemas == mode).collect();
        if !f.is_empty() {
            md.push_str(
                "Freshness: one probe at a time over background traffic, from handing it to the producer until `GET /` shows it, \
                 and its two parts: until the broker acknowledged it, and from then until visible (tally's fetch, the tick, publishing, \
                 and the 1 ms polling). Background rate offered, handed to the producer, and acknowledged by the broker by the \
                 phase's end (the rest was still queued in the generator). Publish delay: tally's own histogram (bucket bound). \
                 CPU over the phase: the machine's busy share of all cores (generator, broker and tally share them), and the cores \
                 tally, the broker and the harness (background generator, probes, polling) used.\n\n\
                 | workers | offered /s | handed /s | acknowledged /s | p50 | p99 | broker ack p50 / p99 | ack -> visible p50 / p99 | publish delay p99 | machine busy | cores: tally / broker / harness |\n\
                 |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
            );
            for x in f {
                md.push_str(&format!(
                    "| {} | {:.0} | {:.0} | {:.0} | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | ≤ {:.0} ms | {:.0}% | {:.2} / {:.2} / {:.2} |\n",
                    x.workers,
                    x.offered,
                    x.handed,
                    x.delivered,
                    x.p50_ms,
                    x.p99_ms,
                    x.ack_p50_ms,
                    x.ack_p99_ms,
                    x.after_p50_ms,
                    x.after_p99_ms,
                    x.publish_p99_ms,
                    x.machine_busy * 100.0,
                    x.tally_cores,
                    x.broker_cores,
                    x.harness_cores
                ));
                let numbers: Vec<String> = x.numbers().iter().map(|v| format!("{v:.3}")).collect();
                csv.push_str(&format!(
                    "freshness,tally,{},{},,,,,,,{}\n",
                    x.schemas,
                    x.workers,
                    numbers.join(",")
                ));
            }
            md.push('\n');
        }
    }
    md.push_str("Notes:\n");
    for n in notes {
        md.push_str(&format!("- {n}\n"));
    }
    std::fs::write(a.out.join("results.md"), &md).expect("write results.md");
    std::fs::write(a.out.join("results.csv"), &csv).expect("write results.csv");
    let plot = Command::new(dirs_python())
        .arg(root().join("benches/plot.py"))
        .arg(&a.out)
        .status();
    if !plot.is_ok_and(|s| s.success()) {
        eprintln!("bench: no plot (needs matplotlib: scripts/bench-deps)");
    }
    println!("{md}");
}
