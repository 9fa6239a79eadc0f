//! capy's built-in steps. Reads the job as JSON on stdin; exits 0 on success, 75 for a
//! failure worth retrying, 1 for a permanent one. Never prints a secret.

use std::io::Read as _;
use std::process::ExitCode;

use capy_shared::step::{StepInput, EXIT_TEMPFAIL};
use capy_worker::steps;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut raw = Vec::new();
    if let Err(error) = std::io::stdin().read_to_end(&mut raw) {
        eprintln!("error: reading the job from stdin: {error}");
        return ExitCode::from(EXIT_TEMPFAIL as u8);
    }
    let input: StepInput = match serde_json::from_slice(&raw) {
        Ok(input) => input,
        Err(error) => {
            eprintln!("error: the job on stdin is not valid step input: {error}");
            return ExitCode::from(1);
        }
    };
    println!(
        "{} attempt {} of job {}",
        input.job.job_type, input.job.attempts, input.job.id
    );
    match steps::run(&input).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The last line of stderr becomes the job's error.
            eprintln!("error: {}", error.message);
            if error.transient {
                ExitCode::from(EXIT_TEMPFAIL as u8)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
