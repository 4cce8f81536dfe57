//! The processor-service binary.

fn main() -> std::process::ExitCode {
    processor_service::main()
}
