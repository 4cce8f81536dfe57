//! `delete-queues` (behind `make clean-test-data`) deletes the queues it is
//! given over one connection, and goes on past one that is already gone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::process::{Command, Stdio};

use orderflow_broker::lapin::options::QueueDeclareOptions;
use orderflow_broker::lapin::types::FieldTable;
use orderflow_testkit::TestBroker;

#[tokio::test]
async fn the_named_queues_are_deleted_and_a_missing_one_is_passed_over() {
    let broker = TestBroker::new().await;
    let (_conn, channel) = broker.channel().await;
    let prefix = broker.topology.prefix().to_owned();
    let names: Vec<String> = (0..5).map(|k| format!("{prefix}.leftover{k}")).collect();
    for name in &names {
        channel
            .queue_declare(name.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
    }
    let mut input = names.join("\n");
    input.push_str(&format!("\n{prefix}.never-declared\n"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_delete-queues"))
        .env("TEST_AMQP_URL", &broker.amqp_url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}: {stdout}", out.status);
    assert_eq!(stdout.trim(), "deleted 6 queues");
    for name in &names {
        // A refused passive declare closes its channel: one each.
        let (_conn, probe) = broker.channel().await;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        let found = probe.queue_declare(name.as_str().into(), passive, FieldTable::default()).await;
        assert!(found.is_err(), "{name} is still there");
    }
}
