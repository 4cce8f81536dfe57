//! The outbox-relay binary.

fn main() -> std::process::ExitCode {
    outbox_relay::main()
}
