//! `torpor man`: manual pages made from the command-line definition, so they always
//! describe the options this binary takes.
//!
//! `clap_mangen` renders each section; the examples each command shows after `--help`
//! become an EXAMPLES section in no-fill mode, where `man` keeps their lines and columns.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use clap::CommandFactory;
use clap_mangen::Man;

use crate::Cli;

/// The page of the command NAME (`None` for `torpor` itself).
fn page(cmd: &clap::Command) -> Result<Vec<u8>> {
    let man = Man::new(cmd.clone());
    let mut w = Vec::new();
    man.render_title(&mut w)?;
    man.render_name_section(&mut w)?;
    man.render_synopsis_section(&mut w)?;
    man.render_description_section(&mut w)?;
    man.render_options_section(&mut w)?;
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut w)?;
    }
    if let Some(after) = cmd.get_after_long_help().or_else(|| cmd.get_after_help()) {
        writeln!(w, ".SH EXAMPLES\n.nf")?;
        let after = after.to_string();
        // The section heading says it already.
        let mut lines = after.lines().peekable();
        if lines.peek().is_some_and(|l| l.starts_with("Example")) {
            lines.next();
        }
        for line in lines {
            writeln!(w, "{}", roff_escape(line))?;
        }
        writeln!(w, ".fi")?;
    }
    if cmd.get_version().is_some() {
        man.render_version_section(&mut w)?;
    }
    Ok(w)
}

/// `line` as literal roff text: backslashes and hyphens escaped, and a leading control
/// character neutralised.
fn roff_escape(line: &str) -> String {
    let s = line.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// Every page: `torpor.1` and one `torpor-COMMAND.1` per visible command.
pub fn pages() -> Result<Vec<(String, Vec<u8>)>> {
    let mut root = Cli::command().disable_help_subcommand(true);
    root.build();
    let mut out = vec![("torpor.1".to_string(), page(&root)?)];
    for sub in root.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_display_name().unwrap_or(sub.get_name()).to_string();
        out.push((format!("{name}.1"), page(sub)?));
    }
    Ok(out)
}

pub fn run(command: Option<&str>, dir: Option<&Path>) -> Result<u8> {
    let pages = pages()?;
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
        for (name, bytes) in &pages {
            let path = dir.join(name);
            std::fs::write(&path, bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        return Ok(0);
    }
    let want = match command {
        None => "torpor.1".to_string(),
        Some(c) => format!("torpor-{c}.1"),
    };
    let Some((_, bytes)) = pages.iter().find(|(n, _)| *n == want) else {
        let names: Vec<&str> = pages
            .iter()
            .filter_map(|(n, _)| n.strip_prefix("torpor-")?.strip_suffix(".1"))
            .collect();
        bail!(
            "no command {:?}; `torpor man` has a page for each of: {}",
            command.unwrap_or_default(),
            names.join(", ")
        );
    };
    // A reader that stops early (`torpor man | head`) is not an error.
    let _ = std::io::stdout().lock().write_all(bytes);
    Ok(0)
}
