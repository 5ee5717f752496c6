use std::process::ExitCode;

fn main() -> ExitCode {
    commons_node::pin_compute_threads();
    match commons_node::cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
