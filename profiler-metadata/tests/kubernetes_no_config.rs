//! `watch_pods` without any Kubernetes configuration.
//!
//! Kept in its own test binary with a single test because it changes the
//! process environment (`HOME`, `KUBECONFIG`, `KUBERNETES_SERVICE_*`), which
//! must not race with other tests reading it.

use profiler_metadata::kubernetes::watch_pods;

#[tokio::test]
async fn no_configuration_at_all_is_one_clear_error() {
    let home = tempfile::tempdir().expect("empty home");
    std::env::set_var("HOME", home.path());
    std::env::remove_var("KUBECONFIG");
    std::env::remove_var("KUBERNETES_SERVICE_HOST");
    std::env::remove_var("KUBERNETES_SERVICE_PORT");

    let err = watch_pods("node-a", None).await.unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.starts_with("no Kubernetes configuration"),
        "{message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
}
