//! The loyalty-service binary.

fn main() -> std::process::ExitCode {
    loyalty_service::main()
}
