//! Running one attempt's step: a child process in its own process group, the job as
//! JSON on stdin, stdout and stderr captured within a bound, a time limit enforced with
//! SIGTERM then SIGKILL to the whole group.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt as _;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;
use tokio::sync::watch;

/// What to run.
pub struct StepCommand {
    pub program: String,
    pub args: Vec<String>,
    /// The step's whole environment (the worker's own is not inherited: it holds the
    /// control database URL and the secret key).
    pub env: Vec<(String, String)>,
    pub stdin: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
pub struct StepLimits {
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Bytes kept of each of stdout and stderr (head and tail halves).
    pub output_limit: usize,
}

/// Why the worker stops a step early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The job was cancelled or its lease taken over: the outcome is no longer ours.
    LeaseLost,
    /// The worker is shutting down: hand the job back.
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEnd {
    Exited(i32),
    Signaled(i32),
    TimedOut,
    Stopped(StopReason),
}

#[derive(Debug)]
pub struct StepRun {
    pub end: StepEnd,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the step to its end, its time limit, or a stop request.
pub async fn run_step(
    step: StepCommand,
    limits: StepLimits,
    mut stop: watch::Receiver<Option<StopReason>>,
) -> anyhow::Result<StepRun> {
    let mut child = Command::new(&step.program)
        .args(&step.args)
        .env_clear()
        .envs(step.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting step {}", step.program))?;
    let pgid = Pid::from_raw(
        child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .unwrap_or(0),
    );

    let mut stdin = child.stdin.take().context("step stdin")?;
    let input = step.stdin;
    // A step that does not read its input must not block the worker.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let stdout = tokio::spawn(capture(child.stdout.take(), limits.output_limit));
    let stderr = tokio::spawn(capture(child.stderr.take(), limits.output_limit));

    let end = tokio::select! {
        status = child.wait() => {
            let status = status.context("waiting for the step")?;
            match (status.code(), status.signal()) {
                (Some(code), _) => StepEnd::Exited(code),
                (None, signal) => StepEnd::Signaled(signal.unwrap_or(0)),
            }
        }
        () = tokio::time::sleep(limits.timeout) => StepEnd::TimedOut,
        reason = stopped(&mut stop) => StepEnd::Stopped(reason),
    };
    if !matches!(end, StepEnd::Exited(_) | StepEnd::Signaled(_)) {
        let _ = killpg(pgid, Signal::SIGTERM);
        if tokio::time::timeout(limits.kill_grace, child.wait())
            .await
            .is_err()
        {
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = child.wait().await;
        }
    }
    // Whatever the step left behind in its group goes too, so its pipes close.
    let _ = killpg(pgid, Signal::SIGKILL);
    writer.abort();
    let collect = |task: tokio::task::JoinHandle<String>| async move {
        // A grandchild that left the group could hold the pipe open: don't wait forever.
        match tokio::time::timeout(Duration::from_secs(2), task).await {
            Ok(Ok(text)) => text,
            _ => String::from("[output unavailable: the pipe was held open]"),
        }
    };
    Ok(StepRun {
        end,
        stdout: collect(stdout).await,
        stderr: collect(stderr).await,
    })
}

async fn stopped(stop: &mut watch::Receiver<Option<StopReason>>) -> StopReason {
    loop {
        if let Some(reason) = *stop.borrow_and_update() {
            return reason;
        }
        if stop.changed().await.is_err() {
            // Nobody can ask any more.
            return std::future::pending().await;
        }
    }
}

/// Reads a stream to its end, keeping the first and last `limit / 2` bytes.
async fn capture(stream: Option<impl AsyncRead + Unpin>, limit: usize) -> String {
    let Some(mut stream) = stream else {
        return String::new();
    };
    let mut output = BoundedOutput::new(limit);
    let mut buffer = vec![0u8; 16 * 1024];
    while let Ok(n) = stream.read(&mut buffer).await {
        if n == 0 {
            break;
        }
        output.push(&buffer[..n]);
    }
    output.finish()
}

/// Head and tail of a stream, with how much was cut between them.
pub struct BoundedOutput {
    head: Vec<u8>,
    tail: VecDeque<u8>,
    half: usize,
    cut: u64,
}

impl BoundedOutput {
    pub fn new(limit: usize) -> Self {
        Self {
            head: Vec::new(),
            tail: VecDeque::new(),
            half: limit / 2,
            cut: 0,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        let room = self.half.saturating_sub(self.head.len());
        let taken = room.min(bytes.len());
        self.head.extend_from_slice(&bytes[..taken]);
        bytes = &bytes[taken..];
        if bytes.len() > self.half {
            self.cut += (self.tail.len() + bytes.len() - self.half) as u64;
            self.tail.clear();
            bytes = &bytes[bytes.len() - self.half..];
        }
        let overflow = (self.tail.len() + bytes.len()).saturating_sub(self.half);
        self.tail.drain(..overflow);
        self.cut += overflow as u64;
        self.tail.extend(bytes);
    }

    pub fn finish(self) -> String {
        let mut text = String::from_utf8_lossy(&self.head).into_owned();
        if self.cut > 0 {
            text.push_str(&format!("\n[… {} bytes cut …]\n", self.cut));
        }
        let tail: Vec<u8> = self.tail.into_iter().collect();
        text.push_str(&String::from_utf8_lossy(&tail));
        // PostgreSQL text cannot hold NUL.
        text.replace('\0', "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_output_is_kept_whole() {
        let mut output = BoundedOutput::new(100);
        output.push(b"hello ");
        output.push(b"world");
        assert_eq!(output.finish(), "hello world");
    }

    #[test]
    fn long_output_keeps_head_and_tail_and_marks_the_cut() {
        let mut output = BoundedOutput::new(10);
        for chunk in [&b"abc"[..], b"defgh", b"ijklmnop", b"qrstuvwxyz"] {
            output.push(chunk);
        }
        assert_eq!(output.finish(), "abcde\n[… 16 bytes cut …]\nvwxyz");
    }
}
