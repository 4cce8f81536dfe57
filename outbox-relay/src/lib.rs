//! `outbox-relay`: the relay daemon that publishes one service database's
//! outbox to RabbitMQ (run it as a sidecar next to the service), and the
//! operator commands that inspect and repair it.

pub mod catalog;
pub mod cli;
pub mod console;
mod describe;
mod dlq;
mod ops;
mod output;
mod run;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command, DlqCommand, ManArgs};

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // Completions and man pages need no runtime, logs or services.
    match &cli.command {
        Command::Completions(args) => return completions(args.shell),
        Command::Man(args) => return man(args),
        // Operator commands ask the broker about queues that may not exist
        // (a passive declare), and the broker answers by closing that
        // channel, which lapin logs as an error: expected here, not news.
        Command::Run(_) => {}
        _ if !cli.log.log_filter.contains("lapin::channel") => cli.log.log_filter.push_str(",lapin::channel=off"),
        _ => {}
    }
    // The relay's logs and the operator commands' diagnostics go to stderr:
    // stdout is what `status`, `replay` and `dlq` print for people and scripts.
    let _telemetry = match orderflow_telemetry::init(&cli.log, orderflow_telemetry::LogTo::Stderr, "outbox-relay") {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("outbox-relay: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Status(args) => ops::status(args).await,
            Command::Replay(args) => ops::replay(args).await,
            Command::Replays(args) => ops::replays(args).await,
            Command::Dlq(DlqCommand::List(args)) => dlq::list(args).await,
            Command::Dlq(DlqCommand::Show(args)) => dlq::show(args).await,
            Command::Dlq(DlqCommand::Requeue(args)) => dlq::requeue(args).await,
            Command::Describe(args) => describe::describe(args).await,
            Command::Completions(_) | Command::Man(_) => Ok(()),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `outbox-relay completions <shell>`: the script on stdout.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "outbox-relay", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// `outbox-relay man`: the main page on stdout, or every page into a directory.
fn man(args: &ManArgs) -> ExitCode {
    let cmd = Cli::command();
    let written = match &args.out_dir {
        Some(dir) => std::fs::create_dir_all(dir).and_then(|()| clap_mangen::generate_to(cmd, dir)),
        None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout()),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        // `outbox-relay man | head`.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox-relay: cannot write the man page: {e}");
            ExitCode::FAILURE
        }
    }
}
