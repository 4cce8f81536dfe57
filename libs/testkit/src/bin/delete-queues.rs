//! `make clean-test-data`: deletes the queues named on standard input (one
//! per line) over one AMQP connection to `TEST_AMQP_URL` (default: the
//! local broker). `rabbitmqctl delete_queue` starts an Erlang node per call,
//! about a second per queue: a broker littered with a thousand leftover test
//! queues took half an hour to clean.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::BufRead;
use std::process::ExitCode;

use orderflow_broker::lapin::options::QueueDeleteOptions;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let url = std::env::var("TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let conn = match orderflow_broker::connect(&url, "delete-queues").await {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("delete-queues: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut deleted, mut failed) = (0usize, 0usize);
    let mut channel = None;
    for name in std::io::stdin().lock().lines().map_while(Result::ok) {
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        // A refused delete closes the channel: open another for the next.
        if channel.is_none() {
            match conn.create_channel().await {
                Ok(c) => channel = Some(c),
                Err(e) => {
                    eprintln!("delete-queues: cannot open a channel: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        let Some(ch) = &channel else { continue };
        match ch.queue_delete(name.into(), QueueDeleteOptions::default()).await {
            Ok(_) => deleted += 1,
            Err(e) => {
                eprintln!("delete-queues: {name}: {e}");
                failed += 1;
                channel = None;
            }
        }
    }
    let _ = conn.close(200, "done".into()).await;
    println!("deleted {deleted} queues{}", if failed > 0 { format!(", {failed} failed") } else { String::new() });
    if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
