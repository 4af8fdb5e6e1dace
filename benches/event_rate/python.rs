//! The Python systems users would pick instead, run as scripts under the benchmark venv.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::root;

/// Runs one of the Python comparison scripts in `benches/` under the benchmark venv. Each prints
/// `{"seconds": processing time as it measures it, "rss_mb": its peak RSS, "result": {...}}`.
/// Its stderr (Pathway logs every tombstone as a parse error) goes to `log`.
pub(crate) fn python_system(
    script: &str,
    args: &[&str],
    log: &Path,
) -> Result<(f64, Option<f64>, serde_json::Value), String> {
    let py = dirs_python();
    let stderr = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(&py)
        .arg(root().join("benches").join(script))
        .args(args)
        .env("PATHWAY_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("{py}: {e}"))?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{script} exited with {} (its log: {})",
            out.status,
            log.display()
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{script} printed no result: {e}"))?;
    Ok((
        v["seconds"].as_f64().unwrap_or(f64::NAN),
        v["rss_mb"].as_f64(),
        v["result"].clone(),
    ))
}

/// The benchmark venv's python (scripts/bench-deps installs it), else python3.
pub(crate) fn dirs_python() -> String {
    let venv = std::env::var("HOME")
        .map(|h| format!("{h}/.cache/tally/venv-bench/bin/python"))
        .unwrap_or_default();
    if Path::new(&venv).exists() {
        venv
    } else {
        "python3".into()
    }
}
