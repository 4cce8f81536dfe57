//! Connecting through a list of broker addresses, against the real broker:
//! a dead address is passed over, and connections move on round the list.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use orderflow_broker::{BrokerError, connect};
use orderflow_testkit::{FaultProxy, infra};

/// An address where nothing listens: a port bound and released.
async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

#[tokio::test]
async fn a_dead_first_address_is_passed_over_for_the_live_second() {
    let live = infra().await.amqp_url.clone();
    let proxy = FaultProxy::for_url(&live).await;
    let list = format!("{},{}", closed_port_url().await, proxy.url_through(&live));
    // Whichever address this process starts at, every connection ends up
    // on the live one.
    for _ in 0..3 {
        let conn = connect(&list, "test-failover").await.expect("connects through the second address");
        assert!(conn.status().connected());
        conn.close(200, "bye".into()).await.unwrap();
    }
    assert_eq!(proxy.accepted_connections(), 3);
}

#[tokio::test]
async fn every_address_dead_names_them_all() {
    let (a, b) = (closed_port_url().await, closed_port_url().await);
    let err = connect(&format!("{a},{b}"), "test-dead").await.unwrap_err();
    let BrokerError::Unreachable { url, reason } = &err else { panic!("{err}") };
    assert_eq!(url, &format!("{},{}", a.replace(":guest@", ":***@"), b.replace(":guest@", ":***@")));
    assert_eq!(reason.matches("127.0.0.1").count(), 2, "{reason}");
    assert!(!err.to_string().contains("guest:guest"), "{err}");
}

#[tokio::test]
async fn a_bad_address_is_a_configuration_error_not_an_outage() {
    let err = connect("amqp://guest:guest@127.0.0.1:5672/%2f,127.0.0.1:5673", "test-bad").await.unwrap_err();
    assert!(matches!(err, BrokerError::Address(_)), "{err}");
    assert!(err.to_string().starts_with("broker address 2 of 2 (127.0.0.1:5673) is not an AMQP URL"), "{err}");
}

#[tokio::test]
async fn connections_spread_over_the_nodes_and_a_lost_one_moves_on() {
    let live = infra().await.amqp_url.clone();
    let (p1, p2) = (FaultProxy::for_url(&live).await, FaultProxy::for_url(&live).await);
    let list = format!("{},{}", p1.url_through(&live), p2.url_through(&live));
    let first = connect(&list, "test-spread-1").await.unwrap();
    let second = connect(&list, "test-spread-2").await.unwrap();
    // One each: a process's connections do not all land on the first node.
    assert_eq!((p1.accepted_connections(), p2.accepted_connections()), (1, 1));

    // The node of the last connection goes away: the next connection (a
    // reconnect) is made to the other without first trying it.
    p2.cut();
    orderflow_testkit::eventually(
        "the connection through the cut node is lost",
        std::time::Duration::from_secs(10),
        || {
            let lost = !second.status().connected();
            async move { lost }
        },
    )
    .await;
    let again = connect(&list, "test-spread-3").await.unwrap();
    assert_eq!(p1.accepted_connections(), 2);
    assert_eq!(p2.refused_connections(), 0, "the lost node was tried before the other");
    // And the one after that tries the cut node, is refused, and moves on.
    let fourth = connect(&list, "test-spread-4").await.unwrap();
    assert_eq!((p1.accepted_connections(), p2.refused_connections()), (3, 1));
    for c in [first, again, fourth] {
        c.close(200, "bye".into()).await.unwrap();
    }
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// lapin keeps 32 frames of receive and of send buffer per connection,
/// zero-filled: at RabbitMQ's default frame size (128 KiB) 8 MiB resident
/// per connection, and each consumer has a connection. Connections ask for
/// `FRAME_MAX` unless the URL says otherwise, and stay small.
#[tokio::test]
async fn connections_negotiate_small_frames_and_stay_small_in_memory() {
    let url = infra().await.amqp_url.clone();
    let before = resident_kib();
    let mut conns = Vec::new();
    for _ in 0..4 {
        let conn = connect(&url, "test-frames").await.unwrap();
        assert_eq!(conn.configuration().frame_max(), orderflow_broker::FRAME_MAX);
        conns.push(conn);
    }
    let grown_mib = (resident_kib().saturating_sub(before)) as f64 / 1024.0;
    assert!(grown_mib < 8.0, "4 connections took {grown_mib:.1} MiB resident");
    // A frame size in the URL wins.
    let sep = if url.contains('?') { '&' } else { '?' };
    let own = connect(&format!("{url}{sep}frame_max=65536"), "test-frames").await.unwrap();
    assert_eq!(own.configuration().frame_max(), 65536);
    conns.push(own);
    for conn in conns {
        conn.close(200, "bye".into()).await.unwrap();
    }
}
