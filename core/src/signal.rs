//! Ctrl-C and SIGTERM, for the binaries that run until told to stop (the
//! control plane, the agent, `weirctl watch` and `register --keep-alive`).

/// Resolves on Ctrl-C or, on Unix, SIGTERM. When SIGTERM cannot be listened
/// for, says so and waits for Ctrl-C alone.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
