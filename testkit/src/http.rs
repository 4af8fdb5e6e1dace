//! A plain HTTP/1.0 client for loopback, and reading Prometheus text.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// `GET path` over HTTP/1.0: (status, headers, body); status 0 when the server could not be reached or
/// reset the connection.
pub fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new(), String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    // A server that closes its listener resets connections still in its backlog: that is "not reached"
    // too, not a test failure of its own.
    if write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").is_err() {
        return (0, String::new(), String::new());
    }
    let mut raw = String::new();
    if s.read_to_string(&mut raw).is_err() {
        return (0, String::new(), String::new());
    }
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

/// A header's value in a response head as [`http_get`] returns it; names compare case-insensitively (as
/// HTTP says: hyper sends them in lower case).
pub fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The body of a 200 answer to `GET path`.
pub fn http_body(addr: &str, path: &str) -> Option<String> {
    let (status, _, body) = http_get(addr, path);
    (status == 200).then_some(body)
}

/// The sum of every sample of a Prometheus metric whose line starts with `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
