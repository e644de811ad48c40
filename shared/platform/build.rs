//! Embeds `migrations/clickhouse/*.sql` so the runner ships inside every binary,
//! and rebuilds when a Postgres migration is added (`sqlx::migrate!` embeds those,
//! but cargo would not notice a new file on its own).

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let postgres = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/postgres");
    println!("cargo:rerun-if-changed={}", postgres.display());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/clickhouse");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("migrations/clickhouse exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    let mut out = String::from("&[\n");
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let version: u32 = name
            .split('_')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}: migration files are named NNNN_description.sql"));
        println!("cargo:rerun-if-changed={}", path.display());
        writeln!(
            out,
            "    ({version}, {name:?}, include_str!({:?})),",
            path.canonicalize().unwrap().display().to_string()
        )
        .unwrap();
    }
    out.push(']');
    let target = Path::new(&std::env::var("OUT_DIR").unwrap()).join("clickhouse_migrations.rs");
    std::fs::write(target, out).unwrap();
}
