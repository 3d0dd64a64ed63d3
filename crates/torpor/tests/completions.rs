//! Shell completions, manual pages and `--help` come from the command-line definition and
//! name every command.

mod common;

use common::{stderr_of, torpor};
use tempfile::TempDir;

const COMMANDS: [&str; 8] =
    ["dump", "restore", "verify", "run", "inspect", "check", "completions", "man"];

fn stdout_ok(args: &[&str]) -> String {
    let out = torpor(args);
    assert_eq!(out.status.code(), Some(0), "torpor {args:?}: {}", stderr_of(&out));
    String::from_utf8(out.stdout).expect("UTF-8")
}

#[test]
fn completion_scripts_name_every_command() {
    for (shell, marker) in [
        ("bash", "complete -F _torpor"),
        ("zsh", "#compdef torpor"),
        ("fish", "complete -c torpor"),
    ] {
        let script = stdout_ok(&["completions", shell]);
        assert!(script.contains(marker), "{shell} script lacks {marker:?}");
        for c in COMMANDS {
            assert!(script.contains(c), "{shell} completions do not offer {c}");
        }
        assert!(script.contains("leave-running"), "{shell} completions lack dump's options");
        assert!(!script.contains("__count"), "{shell} completions offer a hidden command");
    }
}

#[test]
fn image_directories_complete_as_directories() {
    let zsh = stdout_ok(&["completions", "zsh"]);
    let dump = zsh.split("(dump)").nth(1).expect("a dump section");
    let dump = dump.split(";;").next().unwrap();
    assert!(dump.contains("--dir") && dump.contains("_files -/"), "{dump}");
    let fish = stdout_ok(&["completions", "fish"]);
    assert!(
        fish.lines().any(|l| l.contains("inspect") && l.contains("__fish_complete_directories")),
        "{fish}"
    );
}

#[test]
fn bash_accepts_the_completion_script() {
    let script = stdout_ok(&["completions", "bash"]);
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("torpor.bash");
    std::fs::write(&path, script).unwrap();
    // Sourcing defines the function; asking bash which function completes torpor proves it.
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p torpor", path.display()))
        .output()
        .expect("run bash");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("_torpor"), "{said}{}", stderr_of(&out));
}

#[test]
fn unknown_shell_is_a_usage_error() {
    let out = torpor(["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("bash"), "the error lists the shells");
}

#[test]
fn man_page_names_every_command_and_has_examples() {
    let page = stdout_ok(&["man"]);
    assert!(page.starts_with(".ie") || page.contains(".TH torpor 1"), "not roff:\n{page}");
    for c in COMMANDS {
        assert!(page.contains(&format!("torpor\\-{c}(1)")), "man page lacks {c}");
    }
    assert!(page.contains(".SH EXAMPLES") && page.contains(".nf"), "{page}");

    let dump = stdout_ok(&["man", "dump"]);
    assert!(dump.contains(".TH torpor-dump 1"), "{dump}");
    assert!(dump.contains("leave\\-running"), "{dump}");

    let out = torpor(["man", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("inspect"), "the error lists the pages");
}

#[test]
fn man_dir_writes_one_page_per_command() {
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("man1");
    stdout_ok(&["man", "--dir", out.to_str().unwrap()]);
    for c in COMMANDS {
        let page = std::fs::read_to_string(out.join(format!("torpor-{c}.1")))
            .unwrap_or_else(|e| panic!("torpor-{c}.1: {e}"));
        assert!(page.contains(&format!(".TH torpor-{c} 1")), "{page}");
    }
    assert!(out.join("torpor.1").exists());
    assert!(!out.join("torpor-__count.1").exists(), "a hidden command got a page");
}

#[test]
fn help_shows_examples_for_each_command() {
    for c in ["dump", "restore", "verify", "run", "inspect", "completions", "man"] {
        let help = stdout_ok(&[c, "--help"]);
        assert!(help.contains("Example"), "`torpor {c} --help` has no examples:\n{help}");
        assert!(help.contains(&format!("torpor {c}")), "{help}");
    }
}
