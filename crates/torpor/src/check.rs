//! `torpor check`: the kernel features torpor relies on, probed on the running kernel.

use std::path::Path;

use anyhow::Result;

/// One probed feature.
struct Feature {
    name: &'static str,
    why: &'static str,
    required: bool,
    present: bool,
}

/// `PR_TIMER_CREATE_RESTORE_IDS` and its query argument.
const PR_TIMER_CREATE_RESTORE_IDS: libc::c_int = 77;
const PR_TIMER_CREATE_RESTORE_IDS_GET: libc::c_ulong = 2;
/// CAP_CHECKPOINT_RESTORE and CAP_SYS_ADMIN bits.
const CAP_SYS_ADMIN: u32 = 21;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

pub fn run(quiet: bool) -> Result<u8> {
    let me = std::process::id() as i32;
    let status = torpor_sys::proc::status(me).ok();
    let caps = status.as_ref().map_or(0, |s| s.cap_eff);
    let has_cap = |c: u32| caps & (1u64 << c) != 0;

    // SAFETY: each probe is a system call on integers or on a local out-parameter.
    let (mm_map, kcmp, timer_ids) = unsafe {
        let mut size: libc::c_uint = 0;
        let mm_map = libc::prctl(
            libc::PR_SET_MM,
            libc::PR_SET_MM_MAP_SIZE,
            &mut size as *mut libc::c_uint as libc::c_ulong,
            0,
            0,
        ) == 0;
        let kcmp = libc::syscall(libc::SYS_kcmp, me, me, 0, 0, 0) >= 0
            || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS);
        let timer_ids =
            libc::prctl(PR_TIMER_CREATE_RESTORE_IDS, PR_TIMER_CREATE_RESTORE_IDS_GET, 0, 0, 0) >= 0;
        (mm_map, kcmp, timer_ids)
    };
    let xsave = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.split_whitespace().any(|w| w == "xsave"))
        .unwrap_or(false);
    let exists = |p: &str| Path::new(p).exists();

    let features = [
        Feature {
            name: "privilege to choose pids and set mm fields",
            why: "CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, for clone3 set_tid and PR_SET_MM_MAP",
            required: true,
            present: has_cap(CAP_SYS_ADMIN) || has_cap(CAP_CHECKPOINT_RESTORE),
        },
        Feature {
            name: "PR_SET_MM_MAP",
            why: "restores brk, code/data bounds, auxv and the exe link",
            required: true,
            present: mm_map,
        },
        Feature {
            name: "/proc/PID/map_files",
            why: "identifies mapped files, also deleted ones",
            required: true,
            present: exists(&format!("/proc/{me}/map_files")),
        },
        Feature {
            name: "/proc/PID/timers",
            why: "lists POSIX timers (CONFIG_CHECKPOINT_RESTORE)",
            required: true,
            present: exists(&format!("/proc/{me}/timers")),
        },
        Feature {
            name: "kcmp",
            why: "finds descriptors sharing one open file",
            required: true,
            present: kcmp,
        },
        Feature {
            name: "XSAVE",
            why: "saves FPU/SSE/AVX registers",
            required: true,
            present: xsave,
        },
        Feature {
            name: "clone3",
            why: "creates a process with a given pid (Linux 5.5)",
            required: true,
            present: kernel_at_least(5, 5),
        },
        Feature {
            name: "PTRACE_GET_RSEQ_CONFIGURATION",
            why: "saves the rseq area glibc registers (Linux 5.13)",
            required: true,
            present: kernel_at_least(5, 13),
        },
        Feature {
            name: "PR_TIMER_CREATE_RESTORE_IDS",
            why: "recreates POSIX timers with their ids directly (else ids are replayed)",
            required: false,
            present: timer_ids,
        },
    ];
    let mut ok = true;
    for f in &features {
        ok &= f.present || !f.required;
        if !quiet {
            let mark = match (f.present, f.required) {
                (true, _) => "ok     ",
                (false, true) => "MISSING",
                (false, false) => "absent ",
            };
            println!("{mark} {:<38} {}", f.name, f.why);
        }
    }
    if !quiet {
        println!(
            "{}",
            if ok { "torpor can dump and restore here" } else { "torpor cannot work here" }
        );
    }
    Ok(if ok { 0 } else { 1 })
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let rel = torpor_sys::kernel_release();
    let mut it = rel.split(|c: char| !c.is_ascii_digit()).filter_map(|x| x.parse::<u32>().ok());
    let (a, b) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    (a, b) >= (major, minor)
}
