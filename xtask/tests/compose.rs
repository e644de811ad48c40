//! docker-compose.yml cannot be started here (no Docker engine); it is validated
//! with `docker-compose config -q` and checked for pinned images and every service.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn compose_file_is_valid() {
    compose(&["config", "-q"]);
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

/// `docker-compose -f docker-compose.yml <args>`'s output; fails on an error.
fn compose(args: &[&str]) -> String {
    let out = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml"])
        .args(args)
        .current_dir(root())
        .output()
        .expect("docker-compose is installed by `cargo xtask test`");
    assert!(
        out.status.success(),
        "docker-compose {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The real-time path (Redis and the speed consumer, in both topologies) gets the
/// cores first on a shared host, as `cargo xtask up` starts it (nice -10): four
/// times the default CPU weight; nothing else has more than the default.
#[test]
fn the_real_time_path_has_the_larger_cpu_weight() {
    let rendered = compose(&["--profile", "cluster", "config"]);
    let mut service = "";
    let mut weighted = Vec::new();
    for line in rendered.lines() {
        if let Some(name) = line
            .strip_prefix("  ")
            .and_then(|l| l.strip_suffix(':'))
            .filter(|l| !l.starts_with(' '))
        {
            service = name;
        }
        if let Some(shares) = line.trim().strip_prefix("cpu_shares:") {
            weighted.push((
                service.to_owned(),
                shares.trim().trim_matches('"').to_owned(),
            ));
        }
    }
    weighted.sort();
    let expected: Vec<(String, String)> = ["redis", "redis-replica", "speed", "speed-1", "speed-2"]
        .iter()
        .map(|s| ((*s).to_owned(), "4096".to_owned()))
        .collect();
    assert_eq!(weighted, expected);
}

/// Issue 22: the profile `cluster` validates and holds the topology past one
/// machine, configured as the tests on loopback run it; without the profile none
/// of it starts.
#[test]
fn the_cluster_profile_is_valid_and_holds_the_topology() {
    let services = compose(&["--profile", "cluster", "config", "--services"]);
    let services: Vec<&str> = services.lines().collect();
    let cluster = [
        "clickhouse-keeper",
        "clickhouse-1a",
        "clickhouse-1b",
        "clickhouse-2a",
        "clickhouse-2b",
        "redis-replica",
        "sentinel",
        "cluster-init",
        "ingest-1",
        "ingest-2",
        "serving-1",
        "serving-2",
        "speed-1",
        "speed-2",
        "compactor-1",
        "compactor-2",
        "haproxy",
    ];
    for wanted in cluster {
        assert!(
            services.contains(&wanted),
            "no service {wanted}: {services:?}"
        );
    }
    // Each starts only with the profile (`config --services` lists every service
    // whatever the profile: each one's rendered block must name it).
    let rendered = compose(&["config"]);
    let lines: Vec<&str> = rendered.lines().collect();
    for service in cluster {
        let at = lines
            .iter()
            .position(|l| *l == format!("  {service}:"))
            .unwrap_or_else(|| panic!("{service} is not rendered"));
        // Up to the next service (or the next top-level key).
        let next = |l: &&str| {
            let key = l.strip_prefix("  ").unwrap_or(l);
            !key.starts_with(' ') && key.ends_with(':') && !key.contains(' ')
        };
        let block: Vec<&str> = lines[at + 1..]
            .iter()
            .take_while(|l| !next(l))
            .copied()
            .collect();
        assert!(
            block
                .windows(2)
                .any(|w| w[0].trim() == "profiles:" && w[1].trim() == "- cluster"),
            "{service} starts without the profile: {block:?}"
        );
    }

    let config = compose(&["--profile", "cluster", "config"]);
    // Every Tidemark service of the profile reads the batch view on both shards,
    // follows the Sentinel and keeps to the cluster's own databases.
    let tidemark = cluster
        .iter()
        .filter(|s| s.contains('-') && !s.starts_with("clickhouse") && !s.starts_with("redis"))
        .filter(|s| !["cluster-init"].contains(s))
        .count()
        + 1; // cluster-keys
    for setting in [
        "TIDEMARK_CLICKHOUSE__SHARDS: http://clickhouse-1a:8123|http://clickhouse-1b:8123,\
         http://clickhouse-2a:8123|http://clickhouse-2b:8123",
        "TIDEMARK_CLICKHOUSE__URL: http://clickhouse-1a:8123",
        "TIDEMARK_CLICKHOUSE__CLUSTER: tidemark",
        "TIDEMARK_CLICKHOUSE__DATABASE: tidemark_cluster",
        "TIDEMARK_REDIS__SENTINELS: redis://sentinel:26379",
        "TIDEMARK_POSTGRES__URL: postgres://tidemark:tidemark@postgres:5432/tidemark_cluster",
    ] {
        assert_eq!(
            config.matches(setting).count(),
            tidemark,
            "{setting} in each of the profile's {tidemark} Tidemark services"
        );
    }
    // The four ClickHouse servers know the cluster (one anchor) as
    // TIDEMARK_CLICKHOUSE__SHARDS names it: shards in order, replicas in order, the
    // writer first; each names its own shard, replica and host, and Keeper
    // coordinates them. HAProxy checks /readyz, retries a failed request and
    // balances over both instances. (Multi-line commands are checked in the file:
    // `config` renders them escaped.)
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    assert_eq!(
        config.matches("entrypoint.sh").count(),
        4,
        "every replica runs the anchor"
    );
    let shards = tidemark_platform::config::ClickHouseConfig {
        shards: "http://clickhouse-1a:8123|http://clickhouse-1b:8123,\
                 http://clickhouse-2a:8123|http://clickhouse-2b:8123"
            .into(),
        ..Default::default()
    };
    let mut at = 0;
    for (s, replicas) in shards.replica_urls().iter().enumerate() {
        let hosts: Vec<&str> = replicas
            .iter()
            .map(|url| url.trim_start_matches("http://").trim_end_matches(":8123"))
            .collect();
        let line = format!(
            "<shard><internal_replication>true</internal_replication>{}</shard>",
            hosts
                .iter()
                .map(|h| format!("<replica><host>{h}</host><port>9000</port></replica>"))
                .collect::<String>()
        );
        let found = text[at..]
            .find(&line)
            .unwrap_or_else(|| panic!("remote_servers lacks, in order, {line}"));
        at += found + line.len();
        for (r, host) in hosts.iter().enumerate() {
            let macros = format!(
                "CLICKHOUSE_SHARD: \"{}\", CLICKHOUSE_REPLICA: \"{}\", CLICKHOUSE_HOST: {host}",
                s + 1,
                ["a", "b"][r]
            );
            assert!(text.contains(&macros), "{host} lacks `{macros}`");
        }
    }
    for line in [
        "<zookeeper><node><host>clickhouse-keeper</host><port>9181</port></node></zookeeper>",
        "<macros><shard>$${CLICKHOUSE_SHARD}</shard><replica>$${CLICKHOUSE_REPLICA}</replica></macros>",
        "exec clickhouse-keeper --config-file=/tmp/keeper.xml",
    ] {
        assert!(text.contains(line), "docker-compose.yml lacks `{line}`");
    }
    let haproxy = tidemark_launch::servers::haproxy::DEFAULTS
        .lines()
        .map(|line| line.trim().to_owned())
        .chain(
            [
                ("ingest-1", 8081),
                ("ingest-2", 8081),
                ("serving-1", 8082),
                ("serving-2", 8082),
            ]
            .iter()
            .flat_map(|(name, port)| {
                tidemark_launch::servers::haproxy::server_lines(name, &format!("{name}:{port}"))
                    .lines()
                    .map(|line| line.trim().to_owned())
                    .collect::<Vec<_>>()
            }),
        );
    for line in haproxy.chain(["sentinel monitor tidemark redis 6379 1".to_owned()]) {
        assert!(text.contains(&line), "docker-compose.yml lacks `{line}`");
    }
}

/// The compose profile's HAProxy configuration is one HAProxy accepts (the
/// packaged 2.6; the image runs 2.8). Its services' names do not resolve here:
/// `init-addr none` starts it without them.
#[test]
fn the_cluster_profile_haproxy_configuration_is_valid() {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let (_, rest) = text
        .split_once("cat > /tmp/haproxy.cfg <<'CFG'\n")
        .expect("the haproxy service writes its configuration");
    let (config, _) = rest
        .split_once("        CFG\n")
        .expect("the configuration ends");
    let config: String = config
        .lines()
        .map(|line| format!("{}\n", line.strip_prefix("        ").unwrap_or(line)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let haproxy = tidemark_launch::which("haproxy").expect("haproxy is installed");
    let out = Command::new(haproxy)
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "haproxy -c: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
