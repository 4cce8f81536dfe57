//! `processor-service`, built for the end-to-end tests (same main as the real binary).

fn main() -> std::process::ExitCode {
    processor_service::main()
}
