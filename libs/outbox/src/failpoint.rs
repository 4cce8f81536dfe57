//! Failpoints for fault tests, compiled only with the `failpoints` feature
//! (which the end-to-end tests' builds turn on; shipped binaries, built per
//! package, never have it).

use std::sync::OnceLock;

/// True when the failpoint `name` is listed in `ORDERFLOW_FAILPOINTS`
/// (comma-separated), read once per process.
///
/// Fault tests use it to stop a real binary at an exact moment (e.g. after
/// publishing, before marking rows published) — something a SIGKILL at a
/// random time only hits by luck. Unset, it costs one atomic load.
pub fn failpoint(name: &str) -> bool {
    static ACTIVE: OnceLock<Vec<String>> = OnceLock::new();
    ACTIVE
        .get_or_init(|| {
            std::env::var("ORDERFLOW_FAILPOINTS")
                .map(|v| v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
                .unwrap_or_default()
        })
        .iter()
        .any(|f| f == name)
}
