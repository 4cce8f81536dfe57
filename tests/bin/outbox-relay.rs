//! `outbox-relay`, built for the end-to-end tests (same main as the real binary).

fn main() -> std::process::ExitCode {
    outbox_relay::main()
}
