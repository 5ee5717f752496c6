use std::process::ExitCode;

fn main() -> ExitCode {
    match commons_node::cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
