//! A local 3-node RabbitMQ cluster for tests of node loss, run by
//! `infra/local/cluster.sh` (the script `make cluster` uses): nodes
//! `c1@localhost`..`c3@localhost` on AMQP ports 5681-5683, beside the shared
//! broker, which is never touched.
//!
//! One test at a time holds the cluster (a file lock across test
//! processes), since tests stop and kill its nodes. A cluster that already
//! runs healthy (e.g. `make cluster`) is reused and left running, with every
//! node the test stopped started again; one the test started is stopped and
//! its data deleted when the [`Cluster`] is dropped, panics included.

use std::collections::BTreeSet;
use std::fs::File;
use std::process::Output;
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};

/// The script that starts, stops and inspects the cluster.
pub const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../infra/local/cluster.sh");

/// Held by the test that uses the cluster.
const LOCK: &str = "/tmp/orderflow-cluster.test.lock";

/// Nodes of the cluster, numbered 1 to 3.
pub const NODES: [u8; 3] = [1, 2, 3];

/// A running 3-node cluster, held by this test. See the module docs.
pub struct Cluster {
    started_here: bool,
    /// Nodes this test stopped or killed and has not started again.
    down: Mutex<BTreeSet<u8>>,
    _lock: Flock<File>,
}

impl Cluster {
    /// Waits for the cluster lock, then reuses a healthy cluster or starts
    /// one (about a minute on 2 cores). Panics with the script's output if
    /// the cluster cannot start (e.g. RabbitMQ not installed, not root).
    pub async fn start() -> Self {
        crate::init_tracing();
        let lock = tokio::task::spawn_blocking(|| {
            let file = File::options().create(true).truncate(false).write(true).open(LOCK).expect("cluster lock file");
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| e).expect("lock the cluster")
        })
        .await
        .expect("lock task");
        let started_here = !run(&["status"]).await.status.success();
        if started_here {
            check(run(&["start"]).await, "start the cluster");
        }
        Self { started_here, down: Mutex::new(BTreeSet::new()), _lock: lock }
    }

    /// The AMQP URL of node `n`.
    pub fn node_url(n: u8) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", Self::amqp_port(n))
    }

    /// The AMQP port of node `n`.
    pub fn amqp_port(n: u8) -> u16 {
        5680 + u16::from(n)
    }

    /// The name of node `n`, e.g. `c1@localhost`.
    pub fn node_name(n: u8) -> String {
        format!("c{n}@localhost")
    }

    /// Every node's URL, comma-separated: the multi-address `AMQP_URL`.
    pub fn amqp_url(&self) -> String {
        NODES.map(Self::node_url).join(",")
    }

    /// Stops node `n` gracefully (`rabbitmqctl stop`): its clients are told
    /// and its queues hand leadership over.
    pub async fn stop_node(&self, n: u8) {
        self.lock_down().insert(n);
        check(run(&["stop-node", &n.to_string()]).await, &format!("stop c{n}"));
    }

    /// Kills node `n`'s Erlang VM with SIGKILL (a crash: no goodbye to
    /// clients or peers). Only that node's own OS pid is signalled.
    pub async fn kill_node(&self, n: u8) {
        self.lock_down().insert(n);
        check(run(&["kill-node", &n.to_string()]).await, &format!("kill c{n}"));
    }

    /// Starts node `n` again with its data; it rejoins the cluster.
    pub async fn start_node(&self, n: u8) {
        check(run(&["start-node", &n.to_string()]).await, &format!("start c{n}"));
        self.lock_down().remove(&n);
    }

    /// True when all three nodes run in one cluster.
    pub async fn healthy(&self) -> bool {
        run(&["status"]).await.status.success()
    }

    /// The node leading quorum queue `queue`, if a running node knows it.
    pub async fn leader(&self, queue: &str) -> Option<u8> {
        let out = run(&["leader", queue]).await;
        if !out.status.success() {
            return None;
        }
        parse_node(String::from_utf8_lossy(&out.stdout).trim())
    }

    /// The nodes holding a replica of quorum queue `queue`.
    pub async fn members(&self, queue: &str) -> Vec<u8> {
        let out = check(run(&["members", queue]).await, &format!("members of {queue}"));
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| parse_node(l.trim())).collect()
    }

    /// Every queue of the cluster whose name starts with `prefix`: leader,
    /// ready and unacknowledged messages, consumers (for a failure report).
    pub async fn queues(&self, prefix: &str) -> String {
        let out = run(&["queues"]).await;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().filter(|l| l.starts_with(prefix)).collect::<Vec<_>>().join("\n")
    }

    fn lock_down(&self) -> std::sync::MutexGuard<'_, BTreeSet<u8>> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let result = if self.started_here {
            std::process::Command::new(SCRIPT).arg("stop").output()
        } else {
            // Not ours: leave it as it was found, every node running.
            let down: Vec<u8> = self.lock_down().iter().copied().collect();
            let mut last = std::process::Command::new(SCRIPT).arg("status").output();
            for n in down {
                last = std::process::Command::new(SCRIPT).args(["start-node", &n.to_string()]).output();
            }
            last
        };
        match result {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("cluster clean-up failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("cluster clean-up failed: {e}"),
        }
    }
}

/// `c2@localhost` -> 2.
fn parse_node(name: &str) -> Option<u8> {
    let n: u8 = name.strip_prefix('c')?.strip_suffix("@localhost")?.parse().ok()?;
    NODES.contains(&n).then_some(n)
}

async fn run(args: &[&str]) -> Output {
    tokio::process::Command::new(SCRIPT)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {SCRIPT} {}: {e}", args.join(" ")))
}

fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "could not {what} ({SCRIPT}): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_node_names() {
        assert_eq!(parse_node("c2@localhost"), Some(2));
        assert_eq!(parse_node("rabbit@localhost"), None);
        assert_eq!(parse_node("c7@localhost"), None);
    }
}
