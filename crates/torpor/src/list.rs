//! `torpor list DIR`: the images in a directory, one line each.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::human;
use crate::registry::age;

/// One image found; the fields `torpor list --json` prints.
#[derive(Debug, Serialize)]
struct Row {
    /// The image directory.
    path: String,
    root_pid: Option<i32>,
    /// The tree ran in its own pid namespace (`torpor run`); `root_pid` is its pid there.
    pid_namespace: bool,
    processes: usize,
    /// The root process's command line.
    command: Vec<String>,
    /// Bytes of all its files.
    bytes: u64,
    created_unix: Option<u64>,
    /// No fault found in its manifest, records or file list (an encrypted image's records
    /// are not read: listing has no key).
    complete: bool,
    /// The image is encrypted: its processes and command are not shown.
    encrypted: bool,
    /// The first fault found, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|es| {
            es.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Whether DIR looks like an image, complete or not: it holds a manifest or records.
fn is_image(dir: &Path) -> bool {
    dir.join(torpor_image::MANIFEST).exists() || dir.join(torpor_image::TREE).exists()
}

/// Whether PATH is a single-file image or an executable carrying one.
fn is_single(path: &Path) -> bool {
    path.is_file() && matches!(crate::single::source(path), Ok(Some(_)))
}

fn row(dir: PathBuf) -> Row {
    // The records only: a single file's page data is neither read nor checked here.
    let (p, bytes) = match is_single(&dir) {
        true => (
            crate::single::read_partial(&dir, false).unwrap_or_else(|e| {
                torpor_image::PartialImage {
                    dir: dir.clone(),
                    manifest: None,
                    tree: None,
                    problems: vec![torpor_image::ImageError::Corrupt {
                        path: dir.clone(),
                        why: format!("{e:#}"),
                    }],
                }
            }),
            std::fs::metadata(&dir).map_or(0, |m| m.len()),
        ),
        false => (torpor_image::read_partial(&dir), dir_bytes(&dir)),
    };
    // Without a key an encrypted image shows only its manifest, which is no fault.
    let encrypted = p.manifest.as_ref().is_some_and(|m| m.encryption.is_some());
    let problems: Vec<_> = p
        .problems
        .iter()
        .filter(|e| !matches!(e, torpor_image::ImageError::Encrypted { .. }))
        .collect();
    let root = p.tree.as_ref().and_then(|t| t.processes.first());
    let command = root.map(|r| r.cmdline.clone()).unwrap_or_default();
    let command = match (command.is_empty(), root.and_then(|r| r.threads.first())) {
        (true, Some(t)) => vec![format!("[{}]", t.comm)],
        _ => command,
    };
    Row {
        root_pid: p.manifest.as_ref().map(|m| m.root_pid).or(p.tree.as_ref().map(|t| t.root_pid)),
        pid_namespace: p.tree.as_ref().is_some_and(|t| t.pid_ns),
        processes: p.tree.as_ref().map_or(0, |t| t.processes.len()),
        command,
        bytes,
        created_unix: p.manifest.as_ref().map(|m| m.created_unix),
        complete: problems.is_empty(),
        encrypted,
        problem: problems.first().map(|e| e.to_string()),
        path: dir.display().to_string(),
    }
}

pub fn run(dir: &Path, json: bool) -> Result<u8> {
    let mut dirs = Vec::new();
    if is_image(dir) || is_single(dir) {
        dirs.push(dir.to_path_buf());
    } else {
        let entries = std::fs::read_dir(dir).with_context(|| {
            format!("cannot read {} (give the directory that holds the images)", dir.display())
        })?;
        for e in entries.flatten() {
            let path = e.path();
            if (path.is_dir() && is_image(&path)) || is_single(&path) {
                dirs.push(path);
            }
        }
    }
    let mut rows: Vec<Row> = dirs.into_iter().map(row).collect();
    rows.sort_by(|a, b| (a.created_unix, &a.path).cmp(&(b.created_unix, &b.path)));

    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    if rows.is_empty() {
        println!(
            "no image in {} (images are the directories `torpor dump -D` made and the \
             files `torpor dump -o` made)",
            dir.display()
        );
        return Ok(0);
    }
    let width = rows.iter().map(|r| r.path.chars().count()).max().unwrap_or(5).clamp(5, 48);
    println!(
        "{:<width$} {:>8} {:>5} {:>10}  {:<25}  COMMAND",
        "IMAGE", "PID", "PROCS", "SIZE", "CREATED"
    );
    for r in &rows {
        let created = match r.created_unix {
            Some(t) => format!(
                "{} ({} ago)",
                crate::inspect::rfc3339(t).get(..16).unwrap_or_default().replace('T', " "),
                age(t)
            ),
            None => "?".into(),
        };
        let what = match &r.problem {
            Some(p) => format!("DAMAGED: {p}"),
            None if r.encrypted => {
                "(encrypted: `torpor inspect --encrypt-key FILE` shows it)".into()
            }
            None => crate::inspect::command_text(&r.command),
        };
        println!(
            "{:<width$} {:>8} {:>5} {:>10}  {:<25}  {what}",
            r.path,
            match (r.root_pid, r.pid_namespace) {
                (Some(p), true) => format!("ns:{p}"),
                (Some(p), false) => p.to_string(),
                (None, _) => "?".into(),
            },
            r.processes,
            human(r.bytes),
            created
        );
    }
    Ok(0)
}
