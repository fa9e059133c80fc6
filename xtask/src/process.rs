//! Child processes that are always stopped: by their guard's `Drop`, by a watchdog when
//! they outlive their time limit, and by the Ctrl-C handler.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// PIDs of every running guarded process, with their names, for the Ctrl-C handler.
static RUNNING: Mutex<BTreeMap<u32, String>> = Mutex::new(BTreeMap::new());

/// Installs the handler that kills every guarded process on Ctrl-C or SIGTERM.
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("xtask: interrupted; stopping child processes");
        kill_all_running();
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")
}

fn kill_all_running() {
    let running = RUNNING.lock().map(|r| r.clone()).unwrap_or_default();
    for (pid, name) in running {
        eprintln!("xtask: killing {name} (pid {pid})");
        kill_pid(pid);
    }
}

fn kill_pid(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is one of our own
    // unreaped children, so it cannot name an unrelated process.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// A running child process, killed by PID and reaped when the guard is dropped, and killed
/// by a watchdog if it is still running after its time limit.
pub struct Guarded {
    child: Child,
    /// Set once the child is reaped, so the watchdog never signals a reused PID.
    reaped: Arc<AtomicBool>,
}

impl Guarded {
    /// Starts `command` as `name`, to be killed after `limit` at the latest.
    pub fn spawn(name: &str, mut command: Command, limit: Duration) -> Result<Self> {
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}: {command:?}"))?;
        let pid = child.id();
        if let Ok(mut running) = RUNNING.lock() {
            running.insert(pid, name.to_string());
        }
        let reaped = Arc::new(AtomicBool::new(false));
        let watchdog_reaped = Arc::clone(&reaped);
        let watchdog_name = name.to_string();
        thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if watchdog_reaped.load(Ordering::SeqCst) {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
            // Hold the registry lock so the guard cannot reap the child in between.
            if let Ok(running) = RUNNING.lock() {
                if !watchdog_reaped.load(Ordering::SeqCst) && running.contains_key(&pid) {
                    eprintln!(
                        "xtask: {watchdog_name} (pid {pid}) ran past its {}s limit; killing it",
                        limit.as_secs()
                    );
                    kill_pid(pid);
                }
            }
        });
        Ok(Guarded { child, reaped })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's exit status if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits up to `timeout` for the child to exit by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the child by PID (if still running) and reaps it; returns its exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let pid = self.child.id();
        // The registry lock orders this against the watchdog (see `spawn`).
        let mut running = RUNNING.lock().ok();
        let status = match self.child.try_wait() {
            Ok(Some(status)) => Some(status),
            _ => {
                kill_pid(pid);
                self.child.wait().ok()
            }
        };
        self.reaped.store(true, Ordering::SeqCst);
        if let Some(running) = running.as_mut() {
            running.remove(&pid);
        }
        status
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if !self.reaped.load(Ordering::SeqCst) {
            self.stop();
        }
    }
}

/// Runs `command` to completion with inherited output; fails on a non-zero status.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    anyhow::ensure!(status.success(), "{command:?} failed: {status}");
    Ok(())
}

/// Runs `command` and returns its standard output; fails on a non-zero status.
pub fn output(command: &mut Command) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{command:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
