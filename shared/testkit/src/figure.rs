//! The figures of RELIABILITY.md's rows, and the switch for heavier variants.

use std::path::PathBuf;

/// Records the figure of a fault row of `RELIABILITY.md` (`"R4"`, …): printed to the
/// test's output, and appended to `<stack>/figures/<row>.txt`, which
/// `cargo xtask test` prints as a table after the suite.
pub fn figure(row: &str, text: impl std::fmt::Display) {
    let line = format!("{row} {text}");
    println!("{line}");
    let dir = match std::env::var_os("TIDEMARK_TEST_FIGURES") {
        Some(dir) => PathBuf::from(dir),
        None => tidemark_launch::workspace_root().join(".tidemark/test/figures"),
    };
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{row}.txt")))?;
        // One write per line: concurrent tests never interleave within one.
        file.write_all(format!("{text}\n").as_bytes())
    });
    if let Err(e) = written {
        eprintln!("could not record the {row} figure: {e}");
    }
}

/// Whether the heavier fault variants run (`cargo xtask test --heavy`, which sets
/// `TIDEMARK_TEST_HEAVY=1`): longer outages, more kills, more property cases.
pub fn heavy() -> bool {
    std::env::var("TIDEMARK_TEST_HEAVY").is_ok_and(|v| v == "1")
}
