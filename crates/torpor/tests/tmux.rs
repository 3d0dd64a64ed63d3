//! A Python REPL in a tmux pane, with a variable set, dumped with `--shell-job` and woken
//! with `restore --shell-job` in another tmux window: the variable is still there and the
//! REPL answers in its new terminal.
//!
//! A whole tmux server, its panes' pseudo-terminals inside the dumped tree, dumped and
//! woken: each pane keeps its terminal's name, its shell its variables and job control.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    kill_stray, proc_exe, run_with_timeout, stderr_of, torpor, wait_pid_gone, READY_TIMEOUT,
    TORPOR_TIMEOUT,
};
use tempfile::TempDir;

/// How long a tmux client command may take.
const TMUX_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the REPL may take to show what was typed into it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// A tmux server of the test's own, on a socket name nobody else uses; killed on drop,
/// with whatever runs in it.
struct Tmux {
    socket: String,
    server: i32,
    /// Processes started in it that must not outlive the test: pid and program.
    strays: Vec<(i32, PathBuf)>,
}

impl Tmux {
    /// Starts the server with one session, NAME, running CMD in a 120x40 window.
    fn start(name: &str, cmd: &str) -> Tmux {
        common::become_subreaper();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let socket = format!("torpor-test-{}-{nanos}", std::process::id());
        let mut t = Tmux { socket, server: 0, strays: Vec::new() };
        t.run(["new-session", "-d", "-s", name, "-x", "120", "-y", "40", cmd]);
        // A pane whose program ends stays, so that the server and what it showed do too.
        t.run(["set-option", "-g", "remain-on-exit", "on"]);
        t.server = t.run(["display-message", "-p", "#{pid}"]).trim().parse().expect("server pid");
        t
    }

    /// Runs a tmux client command against this server and returns its stdout.
    fn run<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&self, args: I) -> String {
        let mut cmd = Command::new("tmux");
        // The server forks from the first client and must inherit nothing but stdio.
        cmd.args(["-L", &self.socket, "-f", "/dev/null"]).args(args).env_remove("TMUX");
        let out: Output = run_with_timeout(cmd, TMUX_TIMEOUT);
        assert!(out.status.success(), "tmux: {}", stderr_of(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What pane TARGET shows, its scrollback included.
    fn screen(&self, target: &str) -> String {
        self.run(["capture-pane", "-p", "-J", "-S", "-200", "-t", target])
    }

    fn send_line(&self, target: &str, text: &str) {
        self.run(["send-keys", "-t", target, "-l", text]);
        self.run(["send-keys", "-t", target, "Enter"]);
    }

    /// Waits until pane TARGET shows a line that is exactly WANT.
    fn wait_for_line(&self, target: &str, want: &str, what: &str) {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let screen = self.screen(target);
            if screen.lines().any(|l| l.trim_end() == want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no line {want:?} in window {target} after {ANSWER_TIMEOUT:?}; it \
                 shows:\n{screen}"
            );
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let mut cmd = Command::new("tmux");
        cmd.args(["-L", &self.socket, "kill-server"]).env_remove("TMUX");
        let _ = run_with_timeout(cmd, TMUX_TIMEOUT);
        for (pid, exe) in &self.strays {
            kill_stray(*pid, exe);
        }
        // The server left its parent when it went into the background, for this
        // subreaper: reap it.
        if self.server > 0 {
            wait_pid_gone(self.server, Duration::from_secs(10));
        }
    }
}

/// Waits until PID runs a program whose file name starts with `python`; returns it.
fn wait_for_python(pid: i32, tmux: &Tmux, target: &str) -> PathBuf {
    wait_for_program(pid, "python", tmux, target)
}

/// Waits until PID runs a program whose file name starts with PREFIX; returns it.
fn wait_for_program(pid: i32, prefix: &str, tmux: &Tmux, target: &str) -> PathBuf {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(exe) = proc_exe(pid) {
            let name = exe.file_name().unwrap_or_default().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                return exe;
            }
        }
        assert!(
            Instant::now() < deadline,
            "pid {pid} is not running {prefix}; window {target} shows:\n{}",
            tmux.screen(target)
        );
        sleep(Duration::from_millis(20));
    }
}

/// Held by each test of this file for its whole run. The kernel hands out the lowest free
/// `/dev/pts` number, so a pair another test opens between a dump and its restore would
/// take the number the restore needs.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_python_repl_in_tmux_wakes_in_another_window_with_its_variables() {
    let _serial = one_at_a_time();
    let images = TempDir::new().expect("image dir");
    let mut tmux = Tmux::start("repl", "python3 -q");
    let pid: i32 = tmux
        .run(["list-panes", "-t", "repl", "-F", "#{pane_pid}"])
        .trim()
        .parse()
        .expect("pane pid");
    let python = wait_for_python(pid, &tmux, "repl");
    tmux.strays.push((pid, python.clone()));
    tmux.send_line("repl", "x = 424242");
    tmux.send_line("repl", "print(x + 1)");
    tmux.wait_for_line("repl", "424243", "the REPL before the dump");

    let out = torpor([
        OsStr::new("dump"),
        OsStr::new(&pid.to_string()),
        OsStr::new("-D"),
        images.path().as_os_str(),
        OsStr::new("--shell-job"),
    ]);
    assert!(out.status.success(), "dump --shell-job of the REPL failed: {}", stderr_of(&out));
    assert!(wait_pid_gone(pid, TORPOR_TIMEOUT), "pid {pid} still runs after the dump");

    // The window keeps showing how restore ended, should it end.
    let restore = format!(
        "{} restore -D {} --shell-job; echo torpor restore exited with $?; sleep 600",
        shell_quote(Path::new(env!("CARGO_BIN_EXE_torpor"))),
        shell_quote(images.path())
    );
    tmux.run(["new-window", "-t", "repl", "-n", "woken", &restore]);
    let woken = "repl:woken";
    assert_eq!(wait_for_python(pid, &tmux, woken), python, "pid {pid} woke as another program");
    tmux.send_line(woken, "print(x*2)");
    tmux.wait_for_line(woken, "848484", "the woken REPL");

    tmux.send_line(woken, "exit()");
    tmux.wait_for_line(woken, "torpor restore exited with 0", "the woken REPL's exit");
}

#[test]
fn a_tmux_server_wakes_with_its_panes_terminals_shell_and_repl() {
    let _serial = one_at_a_time();
    let images = TempDir::new().expect("image dir");
    let mut tmux = Tmux::start("srv", "bash --norc --noprofile");
    tmux.run(["new-window", "-t", "srv", "-n", "py", "python3 -q"]);
    // Pane pid and terminal, of the shell's window then the REPL's.
    let panes: Vec<(i32, String)> = tmux
        .run(["list-panes", "-s", "-t", "srv", "-F", "#{pane_pid} #{pane_tty}"])
        .lines()
        .map(|l| {
            let (pid, tty) = l.split_once(' ').expect("pid and tty");
            (pid.parse().expect("pane pid"), tty.to_string())
        })
        .collect();
    assert_eq!(panes.len(), 2, "two panes: {panes:?}");
    let ((bash, bash_tty), (python, python_tty)) = (panes[0].clone(), panes[1].clone());
    let (shell, repl) = ("srv:0", "srv:py");
    let bash_exe = wait_for_program(bash, "bash", &tmux, shell);
    let python_exe = wait_for_python(python, &tmux, repl);
    tmux.strays.push((bash, bash_exe.clone()));
    tmux.strays.push((python, python_exe.clone()));
    tmux.send_line(shell, "x=4242; echo $((x+1))");
    tmux.wait_for_line(shell, "4243", "the shell before the dump");
    tmux.send_line(repl, "y = 777");
    tmux.send_line(repl, "print(y+1)");
    tmux.wait_for_line(repl, "778", "the REPL before the dump");
    // The clients of the commands above are gone; let the server notice.
    sleep(Duration::from_millis(300));

    let server = tmux.server;
    let out = torpor([
        OsStr::new("dump"),
        OsStr::new(&server.to_string()),
        OsStr::new("-D"),
        images.path().as_os_str(),
    ]);
    assert!(out.status.success(), "dump of the tmux server failed: {}", stderr_of(&out));
    for pid in [server, bash, python] {
        assert!(wait_pid_gone(pid, TORPOR_TIMEOUT), "pid {pid} still runs after the dump");
    }

    let out = torpor([
        OsStr::new("restore"),
        OsStr::new("-D"),
        images.path().as_os_str(),
        OsStr::new("--detach"),
    ]);
    assert!(out.status.success(), "restore of the tmux server failed: {}", stderr_of(&out));
    assert_eq!(proc_exe(bash), Some(bash_exe), "pid {bash} woke as another program");
    assert_eq!(proc_exe(python), Some(python_exe), "pid {python} woke as another program");

    // Same terminals by name, as the programs see them.
    tmux.send_line(shell, "echo $((x*2)); tty");
    tmux.wait_for_line(shell, "8484", "the woken shell");
    tmux.wait_for_line(shell, &bash_tty, "the woken shell's terminal");
    tmux.send_line(repl, "import os; print(y*2, os.ttyname(0))");
    tmux.wait_for_line(repl, &format!("1554 {python_tty}"), "the woken REPL");

    // Job control: Ctrl-C reaches the foreground job through the controlling terminal,
    // and the shell carries on.
    tmux.send_line(shell, "sleep 600");
    sleep(Duration::from_millis(300));
    tmux.run(["send-keys", "-t", shell, "C-c"]);
    tmux.send_line(shell, "echo interrupted-$?");
    tmux.wait_for_line(shell, "interrupted-130", "Ctrl-C in the woken shell");
}

/// WORD quoted for sh.
fn shell_quote(word: &Path) -> String {
    format!("'{}'", word.display().to_string().replace('\'', r"'\''"))
}

/// An interactive bash keeps a copy of its terminal on descriptor 255, besides 0-2; dump
/// `--shell-job` refused it for that copy until the copy was taken as the same terminal.
#[test]
fn an_interactive_bash_wakes_in_another_window_with_its_variables_and_job() {
    let _serial = one_at_a_time();
    let images = TempDir::new().expect("image dir");
    let mut tmux = Tmux::start("sh", "bash --norc --noprofile");
    let pid: i32 =
        tmux.run(["list-panes", "-t", "sh", "-F", "#{pane_pid}"]).trim().parse().expect("pane pid");
    let bash = wait_for_program(pid, "bash", &tmux, "sh");
    tmux.strays.push((pid, bash.clone()));
    tmux.send_line("sh", "x=4242; sleep 600 & echo $((x+1))");
    tmux.wait_for_line("sh", "4243", "the shell before the dump");
    let fd255 = std::fs::read_link(format!("/proc/{pid}/fd/255")).expect("bash's fd 255");
    assert!(fd255.starts_with("/dev/pts/"), "bash's fd 255 is {}", fd255.display());

    let out = torpor([
        OsStr::new("dump"),
        OsStr::new(&pid.to_string()),
        OsStr::new("-D"),
        images.path().as_os_str(),
        OsStr::new("--shell-job"),
    ]);
    assert!(out.status.success(), "dump --shell-job of bash failed: {}", stderr_of(&out));
    assert!(wait_pid_gone(pid, TORPOR_TIMEOUT), "pid {pid} still runs after the dump");

    let restore = format!(
        "{} restore -D {} --shell-job; echo torpor restore exited with $?; sleep 600",
        shell_quote(Path::new(env!("CARGO_BIN_EXE_torpor"))),
        shell_quote(images.path())
    );
    tmux.run(["new-window", "-t", "sh", "-n", "woken", &restore]);
    let woken = "sh:woken";
    assert_eq!(wait_for_program(pid, "bash", &tmux, woken), bash, "pid {pid} woke as another");
    tmux.send_line(woken, "echo $((x*2)) $(jobs | grep -c 'sleep 600')");
    tmux.wait_for_line(woken, "8484 1", "the woken shell, its variable and its job");
    tmux.send_line(woken, "kill %1; exit");
    tmux.wait_for_line(woken, "torpor restore exited with 0", "the woken shell's exit");
}
