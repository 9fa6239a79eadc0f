//! The thread that starts and stops one private server of a test process. It lives as
//! long as the process: the server is spawned with a parent-death signal
//! ([`die_with_parent`]), which the kernel sends when the *thread* that spawned it
//! ends, so the server goes down with the test process and not before.

use std::process::{Child, Command};
use std::sync::mpsc;

use anyhow::Context as _;
use nix::sys::signal::Signal;

enum Control {
    Start,
    Stop,
    Reply(mpsc::Sender<Result<(), String>>),
}

/// Starts and stops one server, from its own thread.
pub(crate) struct Supervisor {
    what: &'static str,
    commands: mpsc::Sender<Control>,
}

impl Supervisor {
    /// A supervisor of `what` (named in errors) whose server `spawn` starts and
    /// `stop_signal` stops; the server is not started yet.
    pub(crate) fn new(
        what: &'static str,
        stop_signal: Signal,
        spawn: impl Fn() -> anyhow::Result<Child> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let (commands, received) = mpsc::channel::<Control>();
        std::thread::Builder::new()
            .name(format!("capy-test-{what}"))
            .spawn(move || run(received, stop_signal, spawn))
            .with_context(|| format!("starting the {what} supervisor thread"))?;
        Ok(Self { what, commands })
    }

    /// Starts the server unless it runs.
    pub(crate) fn start(&self) -> anyhow::Result<()> {
        self.control(Control::Start)
    }

    /// Stops the server (its stop signal) and waits for it to exit.
    pub(crate) fn stop(&self) -> anyhow::Result<()> {
        self.control(Control::Stop)
    }

    fn control(&self, command: Control) -> anyhow::Result<()> {
        let gone = || anyhow::anyhow!("the {} supervisor is gone", self.what);
        let (reply, answer) = mpsc::channel();
        self.commands.send(command).map_err(|_| gone())?;
        self.commands
            .send(Control::Reply(reply))
            .map_err(|_| gone())?;
        answer
            .recv()
            .map_err(|_| gone())?
            .map_err(anyhow::Error::msg)
    }
}

fn run(
    received: mpsc::Receiver<Control>,
    stop_signal: Signal,
    spawn: impl Fn() -> anyhow::Result<Child>,
) {
    let mut child: Option<Child> = None;
    let mut last: Result<(), String> = Ok(());
    for command in received {
        match command {
            Control::Start if child.is_none() => match spawn() {
                Ok(c) => {
                    child = Some(c);
                    last = Ok(());
                }
                Err(e) => last = Err(format!("{e:#}")),
            },
            Control::Start => last = Ok(()),
            Control::Stop => {
                if let Some(mut c) = child.take() {
                    let pid = nix::unistd::Pid::from_raw(c.id() as i32);
                    let _ = nix::sys::signal::kill(pid, stop_signal);
                    let _ = c.wait();
                }
                last = Ok(());
            }
            Control::Reply(reply) => {
                let _ = reply.send(std::mem::replace(&mut last, Ok(())));
            }
        }
    }
}

/// Has the kernel send `signal` to the command's process when the thread that spawns
/// it ends.
#[allow(unsafe_code)]
pub(crate) fn die_with_parent(command: &mut Command, signal: Signal) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
    // the parent; it runs in the child between fork and exec.
    unsafe {
        command
            .pre_exec(move || nix::sys::prctl::set_pdeathsig(signal).map_err(std::io::Error::from));
    }
}
