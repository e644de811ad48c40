//! Graceful shutdown: one token, cancelled on SIGTERM or SIGINT.

use tokio_util::sync::CancellationToken;

/// A token cancelled when the process receives SIGTERM or SIGINT (Ctrl-C).
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => tracing::info!(signal = "SIGINT", "Shutting down"),
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "Shutting down"),
        }
        trigger.cancel();
    });
    token
}
