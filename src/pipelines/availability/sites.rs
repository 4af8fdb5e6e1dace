//! The sites to check, from a TOML file:
//!
//! ```toml
//! [[site]]
//! url = "https://example.com/health"
//! interval = "30s"          # default 30s
//! timeout = "5s"            # default 5s
//! regex = "status.*ok"      # optional: the body must match (regex crate: linear time)
//! status = "200-299"        # optional accepted range, default 200-299
//! id = 7                    # optional: default its position in the file, from 1
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::probe::Expect;

/// One site to check.
#[derive(Clone, Debug)]
pub struct Site {
    /// Its id: what `--shard I/N` divides (`id mod N == I`).
    pub id: u64,
    /// The configured URL: the key of its results, whatever it redirects to.
    pub url: String,
    /// Time between slots.
    pub interval: Duration,
    /// What a check must see.
    pub expect: Expect,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    site: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    url: String,
    id: Option<u64>,
    interval: Option<String>,
    timeout: Option<String>,
    regex: Option<String>,
    status: Option<String>,
}

fn status_range(text: &str) -> Result<(u16, u16), String> {
    let (a, b) = text.split_once('-').unwrap_or((text, text));
    let (a, b): (u16, u16) = (
        a.trim()
            .parse()
            .map_err(|_| format!("status {text:?}: expected like 200-299"))?,
        b.trim()
            .parse()
            .map_err(|_| format!("status {text:?}: expected like 200-299"))?,
    );
    if a > b || !(100..=599).contains(&a) || !(100..=599).contains(&b) {
        return Err(format!("status {text:?}: expected a range within 100-599"));
    }
    Ok((a, b))
}

/// Parses a sites file's text.
pub fn parse(text: &str) -> Result<Vec<Site>, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut sites: Vec<Site> = Vec::new();
    for (i, e) in file.site.into_iter().enumerate() {
        let site = site_of(i, e)?;
        if sites.iter().any(|s| s.id == site.id) {
            return Err(format!("site {} ({}): id {} is used twice", i + 1, site.url, site.id));
        }
        sites.push(site);
    }
    Ok(sites)
}

/// Entry `i` (from 0) checked into a site: its id defaults to `i + 1`.
fn site_of(i: usize, e: Entry) -> Result<Site, String> {
    let at = |m: String| format!("site {} ({}): {m}", i + 1, e.url);
    let uri: http::Uri = e.url.parse().map_err(|err| at(format!("not a URL: {err}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(at("expected an http:// or https:// URL with a host".into()));
    }
    let duration = |v: &Option<String>, default: &str| {
        crate::runtime::clock::parse_duration(v.as_deref().unwrap_or(default)).map_err(&at)
    };
    let interval = duration(&e.interval, "30s")?;
    let timeout = duration(&e.timeout, "5s")?;
    if timeout > interval {
        return Err(at(format!(
            "timeout {timeout:?} is longer than the interval {interval:?}"
        )));
    }
    let regex = e
        .regex
        .as_deref()
        .map(|r| regex::Regex::new(r).map_err(|err| at(format!("regex: {err}"))))
        .transpose()?;
    let status = e
        .status
        .as_deref()
        .map(status_range)
        .transpose()
        .map_err(at)?
        .unwrap_or((200, 299));
    Ok(Site {
        id: e.id.unwrap_or(i as u64 + 1),
        url: e.url,
        interval,
        expect: Expect { status, regex, timeout },
    })
}

/// The table of spec -b: one row per site, checked while `amc_active`. Columns besides `amc_active` are
/// tally's reading of it (the spec names only that one): `amc_id`, `amc_url`, and optional
/// `amc_interval_s`, `amc_timeout_s`, `amc_regex`, `amc_status` (`200-299`), defaults as in the file.
pub const MONITOR_CONFIG_DDL: &str = "CREATE TABLE IF NOT EXISTS {table} (
    amc_id bigint PRIMARY KEY,
    amc_url text NOT NULL,
    amc_active boolean NOT NULL DEFAULT true,
    amc_interval_s integer,
    amc_timeout_s integer,
    amc_regex text,
    amc_status text
)";

/// The active sites of `table` (e.g. `monitoring.availability_monitor_config`). A row that does not check
/// is an error naming it, as in a file. Blocking: call it off an async runtime.
pub fn from_postgres(url: &str, table: &str) -> Result<Vec<Site>, String> {
    if !table.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
        return Err(format!("--sites-table {table:?}: expected schema.table"));
    }
    let mut client =
        postgres::Client::connect(url, postgres::NoTls).map_err(|e| format!("sites from PostgreSQL: {e}"))?;
    let rows = client
        .query(
            &format!(
                "SELECT amc_id, amc_url, amc_interval_s, amc_timeout_s, amc_regex, amc_status FROM {table} \
                 WHERE amc_active ORDER BY amc_id"
            ),
            &[],
        )
        .map_err(|e| format!("sites from {table}: {e}"))?;
    let mut sites = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        let secs = |col: usize| r.get::<_, Option<i32>>(col).map(|s| format!("{s}s"));
        let id: i64 = r.get(0);
        let entry = Entry {
            url: r.get(1),
            id: Some(id.max(0) as u64),
            interval: secs(2),
            timeout: secs(3),
            regex: r.get(4),
            status: r.get(5),
        };
        sites.push(site_of(i, entry).map_err(|e| format!("{table} amc_id {id}: {e}"))?);
    }
    Ok(sites)
}

/// What makes two configurations of a site the same check (a reload restarts a site only if it changed).
pub fn fingerprint(site: &Site) -> String {
    format!(
        "{}|{}|{:?}|{:?}|{:?}|{:?}",
        site.id,
        site.url,
        site.interval,
        site.expect.timeout,
        site.expect.status,
        site.expect.regex.as_ref().map(regex::Regex::as_str)
    )
}

/// Reads a sites file.
pub fn load(path: &Path) -> Result<Vec<Site>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The sites of shard `index` of `count`: `id mod count == index`. Every site is in exactly one shard.
pub fn shard(sites: Vec<Site>, index: u64, count: u64) -> Vec<Site> {
    sites.into_iter().filter(|s| s.id % count.max(1) == index).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sites_file_with_defaults_and_errors_that_say_where() {
        let sites = parse(
            r#"
            [[site]]
            url = "http://127.0.0.1:8080/"
            [[site]]
            url = "https://example.com/health"
            interval = "10s"
            timeout = "2s"
            regex = "ok|fine"
            status = "200-399"
            id = 9
            "#,
        )
        .expect("parses");
        assert_eq!(sites.len(), 2);
        assert_eq!(
            (sites[0].id, sites[0].interval, sites[0].expect.timeout),
            (1, Duration::from_secs(30), Duration::from_secs(5))
        );
        assert_eq!(sites[0].expect.status, (200, 299));
        assert_eq!((sites[1].id, sites[1].expect.status), (9, (200, 399)));
        assert!(sites[1].expect.regex.as_ref().expect("a regex").is_match("all fine"));
        for (bad, says) in [
            ("[[site]]\nurl = \"ftp://x/\"", "http:// or https://"),
            ("[[site]]\nurl = \"http://x/\"\nregex = \"(\"", "regex"),
            (
                "[[site]]\nurl = \"http://x/\"\ninterval = \"1s\"\ntimeout = \"2s\"",
                "longer than the interval",
            ),
            ("[[site]]\nurl = \"http://x/\"\nstatus = \"300-200\"", "within 100-599"),
            (
                "[[site]]\nurl = \"http://x/\"\nid = 1\n[[site]]\nurl = \"http://y/\"\nid = 1",
                "used twice",
            ),
            ("[[site]]\nurl = \"http://x/\"\nretries = 3", "unknown field"),
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_compose_sites_file_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/sites.toml");
        let sites = load(&path).expect("docker/sites.toml is valid");
        assert_eq!(sites.len(), 4);
    }

    #[test]
    fn shards_cover_every_site_once() {
        let text: String = (0..50).map(|i| format!("[[site]]\nurl = \"http://h{i}/\"\n")).collect();
        let sites = parse(&text).expect("parses");
        let a = shard(sites.clone(), 0, 2);
        let b = shard(sites.clone(), 1, 2);
        let mut ids: Vec<u64> = a.iter().chain(&b).map(|s| s.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, sites.iter().map(|s| s.id).collect::<Vec<_>>());
        assert_eq!((a.len(), b.len()), (25, 25));
    }
}
