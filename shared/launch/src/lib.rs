//! How to start the real servers Tidemark runs on, and how to tell that each
//! answers: the one place that knows their binaries, arguments and readiness.
//! `cargo xtask` runs them detached for the `up` and `test` stacks; the tests'
//! private servers run them as child processes. Neither repeats what is here.

pub mod host;
pub mod servers;
pub mod wait;

pub use host::{
    REAL_TIME_NICE, at_service_priority, cargo_bin, free_port, is_root, postgres_bin_dir,
    prioritized, which, workspace_root,
};
pub use wait::until;
