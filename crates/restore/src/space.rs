//! Replacing the new process's address space (a copy of torpor's) with the saved one.
//!
//! The new process keeps only its vDSO and vDSO data pages, parked in a hole that is free
//! in the saved layout: torpor runs every system call at a `syscall` instruction inside
//! that vDSO. Everything else is unmapped, the saved mappings are created at their
//! addresses, and the process reads its page data straight from the image file with
//! `pread`, so the data is copied once, by the kernel. Last, the vDSO moves to its saved
//! address, or, when the running kernel's vDSO differs from the saved one, the saved
//! vDSO's entry points are made to jump into the running one.

use torpor_image::model::{self, VmaKind};
use torpor_image::ImageReader;
use torpor_sys::remote::Expect;
use torpor_sys::{args, mem, proc, ptrace, Remote, PAGE};

use crate::batch::Batch;
use crate::lazy::Lazy;
use crate::prepare::Prepared;
use crate::{RestoreError, RestoreOptions, Result};

/// Top of the user address space with 4-level page tables.
const USER_TOP: u64 = 0x7fff_ffff_f000;
/// Lowest address torpor parks anything at.
const LOW: u64 = 0x1_0000;
/// Size of the scratch area used to pass structures to system calls.
pub(crate) const SCRATCH_LEN: u64 = 64 << 10;
/// Largest single pread (the kernel caps one read at 2 GiB minus a page).
const MAX_READ: u64 = 1 << 30;
/// Most page runs one preadv fills (`IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// One of the kernel's vDSO-related mappings in the new process.
#[derive(Debug, Clone)]
struct Special {
    name: String,
    start: u64,
    len: u64,
}

/// The new process during restore, with its parked vDSO and scratch area.
pub(crate) struct Space {
    /// The process's pid as torpor sees it (for ptrace, /proc and its memory).
    pid: i32,
    /// Its pid as it sees itself (for calls it makes), which differs in a new pid
    /// namespace.
    inner: i32,
    remote: Remote,
    specials: Vec<Special>,
    /// The running kernel's vDSO bytes.
    vdso_bytes: Vec<u8>,
    /// Offset of the `syscall` instruction inside the vDSO.
    syscall_off: u64,
    pub scratch: u64,
    /// The page after the scratch area, holding the batch executor.
    pub code: u64,
    /// Its memory, for writing into the scratch area.
    mem: mem::ProcMem,
}

impl Space {
    /// Takes over the stopped new process: unregisters torpor's rseq area, parks the vDSO
    /// where the saved layout has a hole, and unmaps everything else.
    pub fn take(pid: i32, inner: i32, process: &model::Process) -> Result<Self> {
        let step = |what: &str| {
            let step = what.to_string();
            move |source| RestoreError::Step { pid, step, source }
        };
        let maps = proc::maps(pid).map_err(step("read its memory map"))?;
        let specials: Vec<Special> = maps
            .iter()
            .filter(|m| matches!(m.name.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]"))
            .map(|m| Special { name: m.name.clone(), start: m.start, len: m.end - m.start })
            .collect();
        let vdso = specials.iter().find(|s| s.name == "[vdso]").cloned().ok_or_else(|| {
            RestoreError::Vdso { pid, what: "the new process has no vDSO".into() }
        })?;
        let mut vdso_bytes = vec![0u8; vdso.len as usize];
        mem::read_ranges(pid, &[(vdso.start, vdso_bytes.len())], &mut vdso_bytes)
            .map_err(step("read the vDSO"))?;
        let syscall_off = torpor_vdso::find_syscall_insn(&vdso_bytes)
            .map_err(|e| RestoreError::Vdso { pid, what: e.to_string() })?;
        let remote = Remote::new(pid, vdso.start + syscall_off).map_err(step("take over"))?;

        // torpor's own rseq registration would make the kernel write into memory that is
        // about to be replaced.
        if let Some((addr, len, sig)) = ptrace::get_rseq(pid).map_err(step("read rseq"))? {
            remote
                .call("rseq", libc::SYS_rseq, args!(addr, len, 1, sig))
                .map_err(step("unregister torpor's rseq area"))?;
        }

        let mut space = Self {
            pid,
            inner,
            remote,
            specials,
            vdso_bytes,
            syscall_off,
            scratch: 0,
            code: 0,
            mem: mem::ProcMem::open(pid).map_err(step("open its memory"))?,
        };

        // Park the vDSO block, with the scratch area after it, where neither the saved
        // layout nor the current vDSO is.
        let block_start = space.specials.iter().map(|s| s.start).min().unwrap();
        let block_end = space.specials.iter().map(|s| s.start + s.len).max().unwrap();
        let block_len = block_end - block_start;
        let mut busy: Vec<(u64, u64)> = process.vmas.iter().map(|v| (v.start, v.end)).collect();
        busy.push((block_start, block_end));
        let park = find_hole(&busy, block_len + PAGE + SCRATCH_LEN + PAGE)
            .ok_or_else(|| RestoreError::Vdso { pid, what: "no room to park the vDSO".into() })?;
        space.move_specials(|s| park + (s.start - block_start))?;

        // Everything but the parked block goes.
        let r = &space.remote;
        r.call("munmap", libc::SYS_munmap, args!(0, park))
            .map_err(step("unmap torpor's memory"))?;
        let after = park + block_len;
        r.call("munmap", libc::SYS_munmap, args!(after, USER_TOP - after))
            .map_err(step("unmap torpor's memory"))?;

        let scratch = after + PAGE;
        r.call(
            "mmap",
            libc::SYS_mmap,
            args!(
                scratch,
                SCRATCH_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1i64,
                0
            ),
        )
        .map_err(step("map a scratch area"))?;
        space.scratch = scratch;

        // The batch executor, read-only and executable; /proc/PID/mem writes through the
        // protection.
        let code = scratch + SCRATCH_LEN;
        r.call(
            "mmap",
            libc::SYS_mmap,
            args!(
                code,
                PAGE,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1i64,
                0
            ),
        )
        .map_err(step("map the batch executor"))?;
        mem::write_mem(pid, code, &torpor_sys::remote::BATCH_CODE)
            .map_err(step("load the batch executor"))?;
        space.code = code;
        Ok(space)
    }

    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The process's pid in its own pid namespace.
    pub fn inner(&self) -> i32 {
        self.inner
    }

    /// Writes bytes into the scratch area; returns its address.
    pub fn put(&self, bytes: &[u8]) -> Result<u64> {
        assert!(bytes.len() as u64 <= SCRATCH_LEN);
        self.mem.write(self.scratch, bytes).map_err(|source| RestoreError::Step {
            pid: self.pid,
            step: "write into the scratch area".into(),
            source,
        })?;
        Ok(self.scratch)
    }

    /// Runs a system call in the leader, naming `what` in the error.
    pub fn call(&self, what: &str, name: &'static str, nr: i64, a: [u64; 6]) -> Result<u64> {
        self.call_in(&self.remote, what, name, nr, a)
    }

    /// Runs a system call in thread `r` of the process, naming `what` in the error.
    pub fn call_in(
        &self,
        r: &Remote,
        what: &str,
        name: &'static str,
        nr: i64,
        a: [u64; 6],
    ) -> Result<u64> {
        r.call(name, nr, a).map_err(|source| RestoreError::Step {
            pid: self.pid,
            step: what.to_string(),
            source,
        })
    }

    /// Address of the `syscall` instruction remote calls use now.
    pub fn syscall_ip(&self) -> u64 {
        self.remote.syscall_ip()
    }

    /// Moves each vDSO-related mapping to `to(special)`, keeping the remote call
    /// instruction in step.
    fn move_specials(&mut self, to: impl Fn(&Special) -> u64) -> Result<()> {
        // Move in an order that never lands on a block member not yet moved.
        let mut order: Vec<usize> = (0..self.specials.len()).collect();
        let up = self.specials.first().is_some_and(|s| to(s) > s.start);
        order.sort_by_key(|&i| self.specials[i].start);
        if up {
            order.reverse();
        }
        for i in order {
            let s = self.specials[i].clone();
            let dest = to(&s);
            if dest == s.start {
                continue;
            }
            self.call(
                &format!("move {} to {dest:#x}", s.name),
                "mremap",
                libc::SYS_mremap,
                args!(s.start, s.len, s.len, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, dest),
            )?;
            self.specials[i].start = dest;
            if s.name == "[vdso]" {
                self.remote.set_syscall_ip(dest + self.syscall_off);
            }
        }
        Ok(())
    }

    /// Creates every saved mapping, fills it from the image and places the vDSO.
    pub fn rebuild(
        &mut self,
        opts: &RestoreOptions,
        reader: &ImageReader,
        tree: &model::Tree,
        p: &model::Process,
        prep: &Prepared,
        mut lazy: Option<&mut Lazy>,
    ) -> Result<()> {
        // Mappings are made and filled by batches of calls the process runs itself; what
        // must happen between them (SysV attach, advice) flushes the batch first.
        let mut batch = Batch::new(self);
        for v in &p.vmas {
            match &v.kind {
                VmaKind::Vdso { .. } | VmaKind::Vvar { .. } | VmaKind::Vsyscall => continue,
                _ => self.map_vma(tree, v, prep, &mut batch, lazy.as_deref_mut())?,
            }
        }
        self.run(&self.remote, &mut batch)?;
        self.place_vdso(opts, reader, p)
    }

    /// Adds `call` to `batch`, running what the batch holds first when `data` bytes and
    /// the call would not fit.
    fn queue(
        &self,
        batch: &mut Batch,
        data: &[u8],
        call: impl FnOnce(&mut Batch, u64),
    ) -> Result<()> {
        if !batch.has_room(data.len(), 1) {
            self.run(&self.remote, batch)?;
        }
        let at = if data.is_empty() { 0 } else { batch.data(data) };
        call(batch, at);
        Ok(())
    }

    fn map_vma(
        &self,
        tree: &model::Tree,
        v: &model::Vma,
        prep: &Prepared,
        batch: &mut Batch,
        lazy: Option<&mut Lazy>,
    ) -> Result<()> {
        let pid = self.pid;
        if let VmaKind::SysvShm { shmid, .. } = v.kind {
            self.run(&self.remote, batch)?;
            return self.attach_sysv(v, shmid);
        }
        let what = match &v.kind {
            VmaKind::File { file, .. } => tree.files[*file].path.clone(),
            VmaKind::Stack => "stack".into(),
            VmaKind::Anon { heap: true } => "heap".into(),
            _ => "anonymous memory".into(),
        };
        let range = format!("{:#x}-{:#x} ({what})", v.start, v.end);
        let fill = !v.pages.is_empty();
        let prot = v.prot | if fill { model::prot::WRITE } else { 0 };
        let mut flags =
            libc::MAP_FIXED_NOREPLACE | if v.shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
        // Without it a writable reservation larger than memory and swap (a runtime's or a
        // database's terabyte of address space, mapped with MAP_NORESERVE) is refused.
        if v.advice.iter().any(|a| a == "nr") {
            flags |= libc::MAP_NORESERVE;
        }
        let (fd, off) = match &v.kind {
            VmaKind::File { file, offset } => (prep.map_fds[file] as i64, *offset),
            // Shared anonymous memory: the one object every sharer maps.
            _ if v.shmem.is_some() => {
                let shm = v.shmem.unwrap();
                (prep.shmem_fds[&shm.id] as i64, shm.offset)
            }
            VmaKind::Stack => {
                flags |= libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN;
                (-1, 0)
            }
            _ => {
                flags |= libc::MAP_ANONYMOUS;
                (-1, 0)
            }
        };
        // MAP_FIXED_NOREPLACE puts it exactly there or fails.
        self.queue(batch, &[], |b, _| {
            b.call(
                format!("map {range}"),
                "mmap",
                libc::SYS_mmap,
                args!(v.start, v.len(), prot, flags, fd, off),
                Expect::Value(v.start),
            )
        })?;

        // Compressed or encrypted pages, or pages left in parent images, are written by
        // torpor into the mapping once it exists; the process has nothing left to read.
        // A lazy mapping is left to the page server instead, which reads compressed and
        // encrypted page data itself; pages in parent images are beyond it.
        let served =
            lazy.is_some() && crate::lazy::is_lazy(v) && v.pages.iter().all(|r| r.image == 0);
        let mut runs = &v.pages[..];
        let unpack = prep.unpacker.as_ref().filter(|u| !served && u.needed(self.inner, v));
        if let Some(unpacker) = unpack {
            self.run(&self.remote, batch)?;
            let map_err = |source| RestoreError::Map {
                pid,
                start: v.start,
                end: v.end,
                what: what.clone(),
                source,
            };
            unpacker.fill(pid, self.inner, v, &map_err)?;
            runs = &[];
        }

        // The process reads its own pages from the image. Runs stored back to back (zero
        // pages skipped between them leave many short ones) go in one preadv each.
        let source = |run: &model::PageRun| match run.offset {
            Some(o) => (prep.pages_fds[&run.from_pid.unwrap_or(self.inner)], o),
            None => (prep.zero_fd, 0),
        };
        // The pages of a lazy mapping come when first touched (see `lazy`), not now. Its
        // registration needs the mapping made: the batch runs first.
        if let Some(l) = lazy.filter(|_| !runs.is_empty() && crate::lazy::is_lazy(v)) {
            self.run(&self.remote, batch)?;
            if l.register(self, v)? {
                runs = &[];
            }
        }
        let fill_what = format!("fill {range} from the image");
        let mut i = 0;
        while i < runs.len() {
            let (src, start_off) = source(&runs[i]);
            let mut j = i;
            let (mut total, mut next_off) = (0u64, start_off);
            while j < runs.len() && j - i < MAX_IOVECS {
                let run = &runs[j];
                let (s, o) = source(run);
                let len = run.pages * PAGE;
                let follows = s == src && (run.offset.is_none() || o == next_off);
                if j > i && (!follows || total + len > MAX_READ) {
                    break;
                }
                total += len;
                next_off = o + len;
                j += 1;
            }
            let runs = &runs[i..j];
            if runs.len() > 1 {
                let iov: Vec<u8> = runs
                    .iter()
                    .flat_map(|r| [r.addr, r.pages * PAGE])
                    .flat_map(|w| w.to_ne_bytes())
                    .collect();
                // preadv(fd, iov, count, offset low, offset high): on 64 bits the low word
                // holds the whole offset.
                self.queue(batch, &iov, |b, at| {
                    b.call(
                        fill_what.clone(),
                        "preadv",
                        libc::SYS_preadv,
                        args!(src, at, runs.len(), start_off, 0),
                        Expect::Value(total),
                    )
                })?;
            } else {
                let run = &runs[0];
                let (src, mut off) = source(run);
                let (mut addr, mut left) = (run.addr, run.pages * PAGE);
                while left > 0 {
                    let n = left.min(MAX_READ);
                    self.queue(batch, &[], |b, _| {
                        b.call(
                            fill_what.clone(),
                            "pread64",
                            libc::SYS_pread64,
                            args!(src, addr, n, off),
                            Expect::Value(n),
                        )
                    })?;
                    // /dev/zero reads the same offset each time.
                    if run.offset.is_some() {
                        off += n;
                    }
                    addr += n;
                    left -= n;
                }
            }
            i = j;
        }
        if prot != v.prot {
            self.queue(batch, &[], |b, _| {
                b.call(
                    format!("protect {range}"),
                    "mprotect",
                    libc::SYS_mprotect,
                    args!(v.start, v.len(), v.prot),
                    Expect::Success,
                )
            })?;
        }
        if v.advice.iter().all(|a| a == "nr") {
            return Ok(());
        }
        self.run(&self.remote, batch)?;
        let map_err = |source| RestoreError::Map {
            pid,
            start: v.start,
            end: v.end,
            what: what.clone(),
            source,
        };
        let r = &self.remote;
        for a in &v.advice {
            let advice = match a.as_str() {
                "dd" => libc::MADV_DONTDUMP,
                "hg" => libc::MADV_HUGEPAGE,
                "nh" => libc::MADV_NOHUGEPAGE,
                "dc" => libc::MADV_DONTFORK,
                "wf" => libc::MADV_WIPEONFORK,
                "mg" => libc::MADV_MERGEABLE,
                "rr" => libc::MADV_RANDOM,
                "sr" => libc::MADV_SEQUENTIAL,
                "lo" => {
                    r.call("mlock", libc::SYS_mlock, args!(v.start, v.len())).map_err(map_err)?;
                    continue;
                }
                _ => continue,
            };
            // Advice is an optimisation the kernel may refuse (no THP, no KSM); the
            // process works the same without it.
            if let Err(e) = r.call("madvise", libc::SYS_madvise, args!(v.start, v.len(), advice)) {
                tracing::debug!("pid {pid}: madvise {a} on {:#x} refused: {e}", v.start);
            }
        }
        Ok(())
    }

    /// Attaches a SysV segment (already filled) where it was, with its protection.
    fn attach_sysv(&self, v: &model::Vma, shmid: i32) -> Result<()> {
        let pid = self.pid;
        let map_err = |source| RestoreError::Map {
            pid,
            start: v.start,
            end: v.end,
            what: format!("SysV shared memory segment {shmid}"),
            source,
        };
        let mut flags = 0;
        if v.prot & model::prot::WRITE == 0 {
            flags |= libc::SHM_RDONLY;
        }
        if v.prot & model::prot::EXEC != 0 {
            flags |= libc::SHM_EXEC;
        }
        let r = &self.remote;
        let got =
            r.call("shmat", libc::SYS_shmat, args!(shmid, v.start, flags)).map_err(map_err)?;
        if got != v.start {
            return Err(map_err(torpor_sys::Error::Parse {
                what: "shmat".into(),
                line: format!("attached at {got:#x}"),
            }));
        }
        // What shmat cannot say (no access at all, for instance) mprotect can.
        r.call("mprotect", libc::SYS_mprotect, args!(v.start, v.len(), v.prot)).map_err(map_err)?;
        Ok(())
    }

    /// Puts the running kernel's vDSO where the process expects its vDSO.
    fn place_vdso(
        &mut self,
        opts: &RestoreOptions,
        reader: &ImageReader,
        p: &model::Process,
    ) -> Result<()> {
        let pid = self.pid;
        let saved: Vec<&model::Vma> = p
            .vmas
            .iter()
            .filter(|v| matches!(v.kind, VmaKind::Vdso { .. } | VmaKind::Vvar { .. }))
            .collect();
        let Some(saved_vdso) = saved.iter().find(|v| matches!(v.kind, VmaKind::Vdso { .. })) else {
            // A process without a vDSO (it unmapped it) needs none.
            return Ok(());
        };
        let VmaKind::Vdso { content_xxh3, content_file } = &saved_vdso.kind else { unreachable!() };

        // The same vDSO when the code is identical and the data pages have the same names,
        // sizes and distances from it.
        let cur_vdso = self.specials.iter().find(|s| s.name == "[vdso]").unwrap().clone();
        let same_layout = saved.len() == self.specials.len()
            && saved.iter().all(|v| {
                let name = match &v.kind {
                    VmaKind::Vdso { .. } => "[vdso]",
                    VmaKind::Vvar { name } => name.as_str(),
                    _ => unreachable!(),
                };
                self.specials.iter().any(|s| {
                    s.name == name
                        && s.len == v.len()
                        && s.start.wrapping_sub(cur_vdso.start)
                            == v.start.wrapping_sub(saved_vdso.start)
                })
            });
        let same = same_layout && torpor_image::hash_bytes(&self.vdso_bytes) == *content_xxh3;

        if same && !opts.force_vdso_jumps {
            let delta = saved_vdso.start.wrapping_sub(cur_vdso.start);
            return self.move_specials(|s| s.start.wrapping_add(delta));
        }

        // Another kernel's vDSO: a copy of the saved one at its address, each entry point
        // jumping to the same function of the running vDSO, which stays parked.
        tracing::info!("pid {pid}: the running kernel's vDSO differs from the image's; linking");
        let old = reader.read_file(content_file)?;
        if old.len() as u64 != saved_vdso.len() {
            return Err(RestoreError::Vdso { pid, what: "saved vDSO has the wrong size".into() });
        }
        let patches = torpor_vdso::trampolines(&old, &self.vdso_bytes, cur_vdso.start)
            .map_err(|e| RestoreError::Vdso { pid, what: format!("cannot link the vDSOs: {e}") })?;
        let mut code = old;
        for patch in &patches {
            let at = patch.offset as usize;
            code[at..at + patch.bytes.len()].copy_from_slice(&patch.bytes);
        }
        for v in &saved {
            let is_vdso = matches!(v.kind, VmaKind::Vdso { .. });
            let prot = if is_vdso { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
            self.call(
                &format!("map the saved vDSO area at {:#x}", v.start),
                "mmap",
                libc::SYS_mmap,
                args!(
                    v.start,
                    v.len(),
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1i64,
                    0
                ),
            )?;
        }
        mem::write_mem(pid, saved_vdso.start, &code).map_err(|source| RestoreError::Step {
            pid,
            step: "write the linked vDSO".into(),
            source,
        })?;
        self.call(
            "protect the linked vDSO",
            "mprotect",
            libc::SYS_mprotect,
            args!(saved_vdso.start, saved_vdso.len(), libc::PROT_READ | libc::PROT_EXEC),
        )?;
        Ok(())
    }

    /// Removes the scratch area.
    pub fn finish(&self) -> Result<()> {
        self.call(
            "unmap the scratch area",
            "munmap",
            libc::SYS_munmap,
            args!(self.scratch, SCRATCH_LEN + PAGE),
        )
        .map(drop)
    }
}

/// Highest page-aligned address where `len` bytes fit between the `busy` ranges, with a
/// page of space on each side.
fn find_hole(busy: &[(u64, u64)], len: u64) -> Option<u64> {
    let mut b: Vec<(u64, u64)> = busy.to_vec();
    b.sort_unstable();
    let mut top = USER_TOP;
    for &(s, e) in b.iter().rev() {
        if e + PAGE <= top && top - (e + PAGE) >= len + PAGE {
            return Some(top - PAGE - len);
        }
        top = top.min(s);
    }
    (top >= LOW + len + PAGE).then(|| top - PAGE - len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hole_between_mappings() {
        let busy = [(0x10000, 0x20000), (0x7fff_ff00_0000, USER_TOP)];
        let h = find_hole(&busy, 0x3000).unwrap();
        assert!(h + 0x3000 + PAGE <= 0x7fff_ff00_0000);
        assert!(h > 0x20000);
        // Nothing fits: the whole range is busy.
        assert_eq!(find_hole(&[(0, USER_TOP)], 0x1000), None);
    }
}
