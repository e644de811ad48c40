//! docker-compose.yml cannot be started here (no Docker engine); it is validated
//! with `docker-compose config -q` and checked for pinned images and every service.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn compose_file_is_valid() {
    let out = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config", "-q"])
        .current_dir(root())
        .output()
        .expect("docker-compose is installed by `cargo xtask test`");
    assert!(
        out.status.success(),
        "docker-compose config failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_image_is_pinned_and_every_service_is_there() {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let images: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image:"))
        .map(str::trim)
        .collect();
    assert!(images.len() >= 8, "{images:?}");
    for image in &images {
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest",
            "image {image} is not pinned to a version"
        );
    }
    for wanted in [
        "postgres:",
        "redis:",
        "clickhouse/clickhouse-server:",
        "minio/minio:",
        "prom/prometheus:",
        "prom/alertmanager:",
        "grafana/grafana:",
    ] {
        assert!(
            images.iter().any(|i| i.starts_with(wanted)),
            "no {wanted} image"
        );
    }
    for service in ["ingest", "speed", "compactor", "serving", "generator"] {
        assert!(
            text.contains(&format!("command: [\"tidemark-{service}\", \"serve\"]")),
            "service {service} missing"
        );
    }
}
