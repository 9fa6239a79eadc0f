//! Running one attempt's step: a child process in its own process group, the job as
//! JSON on stdin, stdout and stderr captured within a bound, a time limit enforced with
//! SIGTERM then SIGKILL to the whole group.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt as _;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
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
    /// Scrubbed from the captured output as it streams, before it is cut.
    pub secrets: Vec<String>,
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
    /// The job's lease was taken over: the outcome is no longer ours.
    LeaseLost,
    /// The job was cancelled: record it so.
    Cancelled,
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
    let mut command = Command::new(&step.program);
    command
        .args(&step.args)
        .env_clear()
        .envs(step.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    die_with_worker(&mut command);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting step {}", step.program))?;
    // The step leads its own process group, whose id is its pid.
    let pgid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw)
        .context("the step exited before it could be watched")?;

    let mut stdin = child.stdin.take().context("step stdin")?;
    let input = step.stdin;
    // A step that does not read its input must not block the worker.
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let stdout = Capture::start(child.stdout.take(), limits.output_limit, &step.secrets);
    let stderr = Capture::start(child.stderr.take(), limits.output_limit, &step.secrets);

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
    // Whatever the step left behind in its group goes too, so its pipes close. The
    // leader is reaped, but the kernel does not hand out a pid that is still the id of
    // a live process group, so this reaches only the step's leftovers (if any).
    let _ = killpg(pgid, Signal::SIGKILL);
    writer.abort();
    Ok(StepRun {
        end,
        stdout: stdout.finish().await,
        stderr: stderr.finish().await,
    })
}

/// The step gets SIGKILL if the worker dies (SIGKILL, OOM), so it cannot run on while
/// its job is rescued and run again elsewhere. (The kernel sends it when the thread
/// that spawned the step ends: a runtime thread, which lives as long as the worker.)
#[allow(unsafe_code)]
fn die_with_worker(command: &mut Command) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
    // parent; it runs in the child between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

/// A stream being read into a [`BoundedOutput`], secrets scrubbed on the way in.
struct Capture {
    output: Arc<Mutex<BoundedOutput>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Capture {
    fn start(
        stream: Option<impl AsyncRead + Unpin + Send + 'static>,
        limit: usize,
        secrets: &[String],
    ) -> Self {
        let output = Arc::new(Mutex::new(BoundedOutput::new(limit)));
        let mut redactor = StreamRedactor::new(secrets);
        let sink = output.clone();
        let reader = tokio::spawn(async move {
            let Some(mut stream) = stream else { return };
            let mut buffer = vec![0u8; 16 * 1024];
            while let Ok(n) = stream.read(&mut buffer).await {
                if n == 0 {
                    break;
                }
                let clean = redactor.feed(&buffer[..n]);
                lock(&sink).push(&clean);
            }
            let rest = redactor.finish();
            lock(&sink).push(&rest);
        });
        Self { output, reader }
    }

    /// What was captured; a grandchild that left the group could hold the pipe open,
    /// so this waits at most two seconds for the end of the stream.
    async fn finish(mut self) -> String {
        let ended = tokio::time::timeout(Duration::from_secs(2), &mut self.reader)
            .await
            .is_ok();
        self.reader.abort();
        let mut output = std::mem::replace(&mut *lock(&self.output), BoundedOutput::new(0));
        if !ended {
            output.push(b"\n[output truncated: the pipe was held open after the step ended]\n");
        }
        output.finish()
    }
}

fn lock(output: &Mutex<BoundedOutput>) -> std::sync::MutexGuard<'_, BoundedOutput> {
    output.lock().unwrap_or_else(|e| e.into_inner())
}

/// Replaces secrets in a byte stream, also those split across reads: the last
/// (longest secret − 1) bytes are held back until the next read.
pub struct StreamRedactor {
    secrets: Vec<Vec<u8>>,
    carry: Vec<u8>,
    keep: usize,
}

const REDACTED: &[u8] = b"[redacted]";

impl StreamRedactor {
    pub fn new(secrets: &[String]) -> Self {
        let secrets: Vec<Vec<u8>> = secrets
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec())
            .collect();
        let keep = secrets.iter().map(Vec::len).max().unwrap_or(1) - 1;
        Self {
            secrets,
            carry: Vec::new(),
            keep,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.carry.extend_from_slice(bytes);
        let mut text = std::mem::take(&mut self.carry);
        for secret in &self.secrets {
            text = replace_all(&text, secret);
        }
        let split = text.len().saturating_sub(self.keep);
        self.carry = text.split_off(split);
        text
    }

    pub fn finish(&mut self) -> Vec<u8> {
        let mut text = std::mem::take(&mut self.carry);
        for secret in &self.secrets {
            text = replace_all(&text, secret);
        }
        text
    }
}

fn replace_all(haystack: &[u8], needle: &[u8]) -> Vec<u8> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return haystack.to_vec();
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(REDACTED);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
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
    fn secrets_split_across_reads_are_redacted() {
        let mut redactor = StreamRedactor::new(&["s3cretpassword".to_string(), String::new()]);
        let mut out = Vec::new();
        for chunk in [
            &b"pw=s3cr"[..],
            b"etpass",
            b"word and again s3cretpassword",
            b"!",
        ] {
            out.extend(redactor.feed(chunk));
        }
        out.extend(redactor.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "pw=[redacted] and again [redacted]!"
        );
    }

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
