//! docker-compose.yml cannot run here (no Docker engine); this checks what can be checked without one:
//! every image tag is pinned, every mounted file exists, and the usage service is wired to Kafka.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::path::Path;

#[test]
fn compose_file_is_pinned_and_its_files_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("docker-compose.yml")).expect("docker-compose.yml");
    let images: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image:"))
        .map(str::trim)
        .collect();
    assert!(images.len() >= 4, "{images:?}");
    for image in &images {
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            tag.chars().any(|c| c.is_ascii_digit()) && tag != "latest",
            "unpinned image {image}"
        );
    }
    for line in text.lines().map(str::trim).filter(|l| l.starts_with("- ./")) {
        let host = line.trim_start_matches("- ").split(':').next().unwrap();
        assert!(root.join(host).exists(), "mounted file {host} missing");
    }
    assert!(root.join("Dockerfile").exists());
    for needle in [
        "KAFKA_PROCESS_ROLES: broker,controller",
        "--binlog-format=ROW",
        "\"usage\", \"--brokers\", \"kafka:9092\"",
        "12000:12000",
        "./data/rates.sql:/docker-entrypoint-initdb.d/rates.sql:ro",
        "\"rates\", \"--brokers\", \"kafka:9092\", \"--postgres\"",
        "3000:3000",
    ] {
        assert!(text.contains(needle), "docker-compose.yml lacks {needle}");
    }
}
