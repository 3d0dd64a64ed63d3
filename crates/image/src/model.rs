//! The records of an image: what torpor knows about each process.
//!
//! Every record is a plain serde struct. Decoding ignores fields it does not know, so an
//! older torpor can read a newer image of the same major format version, and a field added
//! later carries `#[serde(default)]` so that older images still decode.
//!
//! Addresses and lengths are in bytes, pids and tids are as the dumped processes saw them
//! (in their pid namespace), and indices count from zero.

use serde::{Deserialize, Serialize};

/// The process tree of an image: `tree.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tree {
    /// The pid given to `torpor dump`.
    pub root_pid: i32,
    /// Every process of the tree, parents before children.
    pub processes: Vec<Process>,
    /// Files referred to by mappings and descriptors, by index.
    pub files: Vec<FileInfo>,
    /// Children that had exited and were not yet reaped by their parent.
    #[serde(default)]
    pub zombies: Vec<Zombie>,
    /// The tree ran in its own pid namespace (started by `torpor run`), whose first
    /// process is the root; pids are those inside it.
    #[serde(default)]
    pub pid_ns: bool,
    /// Name of the firewall rules holding back the peers of the saved TCP connections
    /// until the restore (see `torpor_sys::netlock`), if any were set.
    #[serde(default)]
    pub net_lock: Option<String>,
    /// Pseudo-terminal pairs whose master and slave are both open inside the tree.
    #[serde(default)]
    pub ptys: Vec<Pty>,
}

/// A pseudo-terminal pair held inside the tree (a terminal multiplexer's panes, a
/// program run under `script` or `expect`): what the kernel keeps for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pty {
    /// The slave's number N, `/dev/pts/N`, which programs remember.
    pub index: u32,
    /// The slave's modes.
    pub termios: Termios,
    /// The window size.
    pub winsize: Winsize,
    /// The slave is locked (`TIOCGPTLCK`: `unlockpt` not called yet).
    pub locked: bool,
    /// The master is in packet mode (`TIOCPKT`).
    pub packet: bool,
    /// The slave is in exclusive mode (`TIOCEXCL`).
    pub exclusive: bool,
    /// The session whose controlling terminal the slave is (its leader's pid), if any.
    pub session: Option<i32>,
    /// The slave's foreground process group, when it has one in the tree.
    pub foreground: Option<i32>,
    /// Image file with the bytes the slave side wrote and the master has not read yet.
    #[serde(default)]
    pub output: Option<String>,
    /// Image file with the bytes written to the master that programs on the slave side
    /// have not read yet (saved in non-canonical mode only).
    #[serde(default)]
    pub input: Option<String>,
}

/// A terminal's modes, the kernel's `struct termios2`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Termios {
    /// Input modes (`c_iflag`).
    pub iflag: u32,
    /// Output modes (`c_oflag`).
    pub oflag: u32,
    /// Control modes (`c_cflag`).
    pub cflag: u32,
    /// Local modes (`c_lflag`).
    pub lflag: u32,
    /// Line discipline (`c_line`).
    pub line: u8,
    /// Control characters (`c_cc`), 19 bytes, hex.
    pub cc: String,
    /// Input speed in bits per second.
    pub ispeed: u32,
    /// Output speed in bits per second.
    pub ospeed: u32,
}

/// A terminal's window size, `struct winsize`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Winsize {
    /// Rows of characters.
    pub rows: u16,
    /// Columns of characters.
    pub cols: u16,
    /// Width in pixels.
    pub xpixel: u16,
    /// Height in pixels.
    pub ypixel: u16,
}

/// A process that has exited and waits for its parent to reap it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Zombie {
    /// Its pid.
    pub pid: i32,
    /// Its parent, which has not reaped it.
    pub ppid: i32,
    /// Its process group.
    pub pgid: i32,
    /// Its session.
    pub sid: i32,
    /// The wait status its parent will read (exit code in bits 8-15, or the signal).
    pub exit_status: i32,
    /// Its name (`comm`).
    #[serde(default)]
    pub comm: String,
}

/// One process: its threads, memory, descriptors and everything the kernel keeps for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Process {
    /// Process id (the thread group id).
    pub pid: i32,
    /// Parent's pid.
    pub ppid: i32,
    /// Process group id.
    pub pgid: i32,
    /// Session id.
    pub sid: i32,
    /// Command line, for messages and `inspect` only.
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// User and group ids and capabilities.
    pub creds: Creds,
    /// Resource limits, one per resource the kernel reported.
    pub rlimits: Vec<Rlimit>,
    /// File mode creation mask (`umask`), permission bits.
    pub umask: u32,
    /// Working directory, an absolute path.
    pub cwd: String,
    /// Root directory (`chroot`), an absolute path.
    pub root: String,
    /// Execution domain and flags (`personality(2)`).
    pub personality: u32,
    /// Signal sent when the parent dies (`PR_SET_PDEATHSIG`), 0 for none.
    pub pdeath_signal: i32,
    /// `PR_GET_DUMPABLE`.
    pub dumpable: i32,
    /// Layout of the address space as the kernel records it.
    pub mm: MmFields,
    /// Memory mappings, in increasing address order.
    pub vmas: Vec<Vma>,
    /// Name of the page data file inside the image directory.
    pub pages_file: String,
    /// How the page file is stored when it is compressed: the frame index. `None` for a
    /// raw page file, whose bytes are the page data themselves.
    #[serde(default)]
    pub page_frames: Option<PageFrames>,
    /// Image file with the xxh3-64 of every page of the process's page runs with data,
    /// in address order (8 bytes little-endian each), so that a later dump over this
    /// image can tell which pages changed. `None` in images written before it existed.
    #[serde(default)]
    pub page_hashes: Option<String>,
    /// Signal actions, indexed by signal number minus one (1..=64).
    pub sigactions: Vec<SigAction>,
    /// Signals queued to the whole process, oldest first.
    pub shared_pending: Vec<SigInfo>,
    /// The three `setitimer` timers.
    pub itimers: ITimers,
    /// Timers made by `timer_create`.
    pub posix_timers: Vec<PosixTimer>,
    /// Open file descriptions, shared by the descriptors that point at them.
    pub open_files: Vec<OpenFile>,
    /// Descriptor table.
    pub fds: Vec<Fd>,
    /// File locks the process holds (`flock`, POSIX `fcntl` and open file description
    /// locks), each to be taken again through one of its descriptors.
    #[serde(default)]
    pub file_locks: Vec<FileLock>,
    /// The seccomp filters its threads run under, oldest first, beyond those `torpor
    /// dump` itself ran under (which the woken process inherits from `torpor restore`).
    #[serde(default)]
    pub seccomp: Vec<SeccompFilter>,
    /// The first thread is the thread group leader.
    pub threads: Vec<Thread>,
    /// With `--shell-job`: the terminal modes (`struct termios`, hex) of the terminal on
    /// its standard descriptors, given to the terminal it wakes in.
    #[serde(default)]
    pub termios: Option<String>,
    /// The control groups the process was in, one per hierarchy, as `/proc/PID/cgroup`
    /// lists them. Empty in images written before they were saved.
    #[serde(default)]
    pub cgroups: Vec<Cgroup>,
    /// Process attributes set by `prctl` and `/proc` that most processes leave at their
    /// defaults; format 6.
    #[serde(default)]
    pub attrs: ProcessAttrs,
}

/// Process attributes that most processes leave at their defaults (all `false` or 0).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessAttrs {
    /// `PR_SET_CHILD_SUBREAPER`: orphaned descendants are handed to it, not to init.
    #[serde(default)]
    pub child_subreaper: bool,
    /// `PR_SET_THP_DISABLE`: no transparent huge pages for its memory.
    #[serde(default)]
    pub thp_disabled: bool,
    /// `/proc/PID/oom_score_adj`, -1000 to 1000.
    #[serde(default)]
    pub oom_score_adj: i32,
}

impl ProcessAttrs {
    /// Whether every attribute is at its default.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A process's control group in one hierarchy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cgroup {
    /// The hierarchy's controllers as `/proc/PID/cgroup` names them (`cpu,cpuacct`,
    /// `name=systemd`); empty for the unified (version 2) hierarchy.
    pub controllers: String,
    /// The group's path from the hierarchy's root, as the dumping torpor saw it.
    pub path: String,
}

/// Credentials: real, effective, saved and filesystem ids, groups and capability sets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Creds {
    /// Real, effective, saved and filesystem user ids, in that order.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem group ids, in that order.
    pub gids: [u32; 4],
    /// Supplementary group ids.
    pub groups: Vec<u32>,
    /// Inheritable capability set, one bit per capability number.
    pub cap_inheritable: u64,
    /// Permitted capability set.
    pub cap_permitted: u64,
    /// Effective capability set.
    pub cap_effective: u64,
    /// Bounding set.
    pub cap_bounding: u64,
    /// Ambient capability set.
    pub cap_ambient: u64,
    /// `PR_SET_NO_NEW_PRIVS` is set.
    pub no_new_privs: bool,
}

/// One resource limit.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rlimit {
    /// The `RLIMIT_*` number.
    pub resource: u32,
    /// Soft limit, in the resource's unit; `u64::MAX` is unlimited.
    pub soft: u64,
    /// Hard limit, in the resource's unit; `u64::MAX` is unlimited.
    pub hard: u64,
}

/// The fields `PR_SET_MM_MAP` sets, plus the executable and the auxiliary vector.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MmFields {
    /// Start of the program text.
    pub start_code: u64,
    /// End of the program text.
    pub end_code: u64,
    /// Start of the initialized data.
    pub start_data: u64,
    /// End of the initialized data.
    pub end_data: u64,
    /// Where the heap began.
    pub start_brk: u64,
    /// Current program break.
    pub brk: u64,
    /// Stack pointer the kernel set up at `exec` (where `argc` lies).
    pub start_stack: u64,
    /// Start of the argument strings.
    pub arg_start: u64,
    /// End of the argument strings.
    pub arg_end: u64,
    /// Start of the environment strings.
    pub env_start: u64,
    /// End of the environment strings.
    pub env_end: u64,
    /// The auxiliary vector as `/proc/PID/auxv` gives it: type and value words in turn.
    pub auxv: Vec<u64>,
    /// Index into [`Tree::files`] of the executable (`/proc/PID/exe`).
    pub exe_file: usize,
}

/// Protection bits of a mapping, as `mmap` takes them.
pub mod prot {
    /// `PROT_READ`.
    pub const READ: u32 = 1;
    /// `PROT_WRITE`.
    pub const WRITE: u32 = 2;
    /// `PROT_EXEC`.
    pub const EXEC: u32 = 4;
}

/// One memory mapping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Vma {
    /// First address, page-aligned.
    pub start: u64,
    /// Address after the last byte, page-aligned.
    pub end: u64,
    /// [`prot`] bits.
    pub prot: u32,
    /// `MAP_SHARED` rather than `MAP_PRIVATE`.
    pub shared: bool,
    /// What backs the mapping.
    pub kind: VmaKind,
    /// Kernel flags from `smaps` VmFlags that torpor restores with `madvise` or `mlock`
    /// (two-letter codes such as `dd`, `hg`, `nh`, `lo`, `wf`, `dc`).
    #[serde(default)]
    pub advice: Vec<String>,
    /// Runs of pages stored in the image (or known to be zero), in address order.
    #[serde(default)]
    pub pages: Vec<PageRun>,
    /// For shared anonymous memory: the memory object, the same in every process that
    /// shares it. Each page of it is stored once, with the first mapping that has it.
    #[serde(default)]
    pub shmem: Option<ShmemRef>,
}

impl Vma {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the mapping covers no byte.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// What backs a mapping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum VmaKind {
    /// Anonymous memory (including the heap when `heap` is set).
    Anon {
        /// The mapping is the `[heap]` that `brk` grows.
        #[serde(default)]
        heap: bool,
    },
    /// A stack that grows down (`MAP_GROWSDOWN`).
    Stack,
    /// A file mapped at `offset`; `file` indexes [`Tree::files`].
    File {
        /// Index into [`Tree::files`].
        file: usize,
        /// Byte offset in the file of the mapping's first byte.
        offset: u64,
    },
    /// The kernel's vDSO. Its bytes are kept so restore can tell whether the running
    /// kernel's vDSO is the same one.
    Vdso {
        /// xxh3-128 of the vDSO's bytes, in hex.
        content_xxh3: String,
        /// The image file holding those bytes.
        content_file: String,
    },
    /// One of the kernel's vDSO data areas (`[vvar]`, `[vvar_vclock]`), by name.
    Vvar {
        /// The name `/proc/PID/maps` shows, brackets included.
        name: String,
    },
    /// An attached SysV shared memory segment.
    SysvShm {
        /// Its id, which programs keep.
        shmid: i32,
        /// Its key (0 for `IPC_PRIVATE`).
        key: i32,
        /// Its size in bytes.
        size: u64,
        /// Permission bits.
        mode: u32,
        /// Owner and group.
        uid: u32,
        /// Group.
        gid: u32,
        /// Marked for removal (`IPC_RMID`) while still attached.
        removed: bool,
    },
    /// The fixed legacy `[vsyscall]` page; nothing to restore.
    Vsyscall,
}

/// Where a shared anonymous mapping sits in its memory object.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShmemRef {
    /// Identity of the object (its inode when dumped).
    pub id: u64,
    /// Byte offset of the mapping's first page in the object.
    pub offset: u64,
}

/// The frame index of a compressed page file.
///
/// The page data (what a raw page file would hold, and what [`PageRun::offset`] counts
/// in) is cut into pieces of `frame_len` bytes, the last one possibly shorter; each piece
/// is one independent zstd frame, and the frames lie back to back in the page file. So
/// any byte range of the page data is found and decompressed without reading the rest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageFrames {
    /// Bytes of page data per frame, a multiple of 4096.
    pub frame_len: u64,
    /// Total bytes of page data (a multiple of 4096).
    pub data_len: u64,
    /// Size in bytes of each frame in the file, in order.
    pub frames: Vec<u32>,
}

/// A run of consecutive pages of a mapping.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageRun {
    /// Address of the first page.
    pub addr: u64,
    /// Number of 4 KiB pages.
    pub pages: u64,
    /// Offset of the data in the process's page data, or `None` for pages that are all
    /// zero but must still be written (private file mappings, where the file would
    /// otherwise show through). For a raw page file this is a byte offset in the file;
    /// for a compressed one, in its data before compression (see [`PageFrames`]).
    pub offset: Option<u64>,
    /// The process whose page file holds the data, when it is not this one's: memory
    /// shared copy-on-write after fork is stored once. `None` for the process's own.
    #[serde(default)]
    pub from_pid: Option<i32>,
    /// Which image of an incremental chain holds the data: 0 this one, 1 its parent, 2
    /// the parent's parent, and so on. `offset` and `from_pid` are then that image's.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub image: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A file referred to by the image, with what identifies its content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileInfo {
    /// Absolute path when dumped (without the kernel's " (deleted)" suffix).
    pub path: String,
    /// Device of the filesystem holding it (`st_dev`).
    pub dev: u64,
    /// Inode number (`st_ino`).
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// `st_mode`: file type and permission bits.
    pub mode: u32,
    /// xxh3-128 of the content, when torpor hashed it (mapped files and small files).
    pub content_xxh3: Option<String>,
    /// For a file deleted while open or mapped: the image file holding its content.
    pub saved_content: Option<String>,
    /// For a memfd: its name (without the `/memfd:` prefix) and seals (`F_GET_SEALS`).
    /// Restore makes a memfd holding the saved content.
    #[serde(default)]
    pub memfd: Option<Memfd>,
}

/// What makes a memfd a memfd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Memfd {
    /// The name given to `memfd_create`.
    pub name: String,
    /// Its seals (`F_SEAL_*`).
    pub seals: u32,
}

/// An open file description, which one or more descriptors share.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OpenFile {
    /// `open` flags without `O_CLOEXEC` (which belongs to the descriptor).
    pub flags: i32,
    /// File position in bytes.
    pub pos: u64,
    /// What is open.
    pub kind: OpenFileKind,
    /// Identity of this open file description in the whole tree: descriptors of several
    /// processes with the same non-zero id share one description (one offset, one pipe
    /// end). 0 when only this process uses it.
    #[serde(default)]
    pub id: u64,
}

/// What an open file description refers to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OpenFileKind {
    /// A regular file; `file` indexes [`Tree::files`].
    Regular {
        /// Index into [`Tree::files`].
        file: usize,
    },
    /// A file of `/proc`, reopened by path once the restored processes exist (it may be
    /// one of theirs); its content is the kernel's, so it has no identity to check.
    ProcFile {
        /// Absolute path.
        path: String,
    },
    /// A directory, reopened by path.
    Directory {
        /// Absolute path.
        path: String,
    },
    /// A character device reopened by path (`/dev/null`, `/dev/tty`, a terminal).
    CharDevice {
        /// Absolute path.
        path: String,
        /// Device number (`st_rdev`), to check the path still names the same device.
        rdev: u64,
    },
    /// One end of a pipe whose both ends are inside the tree.
    Pipe {
        /// Inode of the pipe: both ends have the same.
        ino: u64,
        /// The write end (else the read end).
        write: bool,
        /// Buffer size (`F_GETPIPE_SZ`).
        size: u32,
        /// Image file holding the bytes written and not yet read, if any. The same for
        /// both ends.
        data: Option<String>,
        /// For a named pipe (FIFO): its path. Its ends may be opened by anyone.
        #[serde(default)]
        path: Option<String>,
    },
    /// The master of a pseudo-terminal pair of the tree ([`Tree::ptys`]); one open file
    /// description per pair.
    PtyMaster {
        /// The pair's slave number.
        index: u32,
    },
    /// The slave `/dev/pts/N` of a pseudo-terminal pair of the tree, reopened from its
    /// master.
    PtySlave {
        /// The pair's slave number.
        index: u32,
    },
    /// A pipe or socket connected to something outside the tree, on a standard
    /// descriptor; restore connects it to its own descriptor `fd` (`--inherit-stdio`).
    Inherited {
        /// The descriptor of `torpor restore` to use.
        fd: i32,
    },
    /// A TCP or UDP socket over IPv4 or IPv6: listening, bound, or (UDP) connected.
    Inet {
        /// `AF_INET` or `AF_INET6`.
        family: i32,
        /// `SOCK_STREAM` or `SOCK_DGRAM`.
        sock_type: i32,
        /// `IPPROTO_TCP` or `IPPROTO_UDP`.
        protocol: i32,
        /// Bound address, raw `sockaddr` bytes in hex; empty when unbound.
        local: String,
        /// Connected peer (UDP), raw `sockaddr` bytes in hex.
        peer: Option<String>,
        /// Listening (TCP), with this backlog.
        listen_backlog: Option<i32>,
        /// Socket options to set again.
        options: Vec<SockOpt>,
        /// Image file with the datagrams queued for reading (UDP), as 4-byte lengths and
        /// bytes.
        queue: Option<String>,
        /// An established TCP connection's state, saved with `TCP_REPAIR`.
        #[serde(default)]
        tcp: Option<TcpState>,
        /// Buffer sizes.
        #[serde(default)]
        buffers: Option<SockBuffers>,
        /// A TCP socket whose connection has ended (state `CLOSE` after a reset, a
        /// timeout or both FINs), kept open by the program: it reads end-of-file and
        /// cannot send. Restored as a new socket shut down both ways.
        #[serde(default)]
        ended: bool,
    },
    /// An eventfd.
    EventFd {
        /// Its counter.
        count: u64,
        /// `EFD_SEMAPHORE` mode.
        semaphore: bool,
    },
    /// A signalfd.
    SignalFd {
        /// The signals it reads.
        mask: u64,
    },
    /// A timerfd.
    TimerFd {
        /// Its clock (`CLOCK_MONOTONIC`...).
        clock: i32,
        /// Expirations not yet read.
        ticks: u64,
        /// `timerfd_settime` flags (`TFD_TIMER_ABSTIME`, `TFD_TIMER_CANCEL_ON_SET`).
        settime_flags: u32,
        /// Time left until the next expiration, 0 when disarmed.
        value_ns: u64,
        /// Reload interval.
        interval_ns: u64,
    },
    /// An inotify instance and its watches.
    Inotify {
        /// Watches in the order of their descriptors.
        watches: Vec<InotifyWatch>,
    },
    /// An epoll instance and what is registered in it.
    Epoll {
        /// Registrations, by descriptor number in the process that holds the epoll.
        targets: Vec<EpollTarget>,
    },
    /// A unix socket that is not connected: bound to a path or an abstract name, possibly
    /// listening, or neither.
    UnixBound {
        /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
        sock_type: i32,
        /// Absolute path, `@name` for an abstract address, empty when unbound.
        name: String,
        /// Listening, with this backlog.
        listen_backlog: Option<i32>,
        /// Mode of the socket file of a path.
        file_mode: u32,
        /// Owner of the socket file.
        file_uid: u32,
        /// Group of the socket file.
        file_gid: u32,
        /// Image file with the datagrams queued for reading (4-byte length and bytes).
        queue: Option<String>,
        /// Socket options to set again (credentials passing).
        #[serde(default)]
        options: Vec<SockOpt>,
        /// Buffer sizes.
        #[serde(default)]
        buffers: Option<SockBuffers>,
        /// `queue` holds two records per datagram: the sender's address (a raw
        /// `sockaddr_un`, empty for an unbound sender), then the datagram. Else one, the
        /// datagram.
        #[serde(default)]
        queue_senders: bool,
    },
    /// One end of a pair of connected unix sockets, both inside the tree.
    UnixPair {
        /// Inode of this socket.
        ino: u64,
        /// Inode of the other end.
        peer: u64,
        /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
        sock_type: i32,
        /// Image file holding the bytes queued for this end to read, if any.
        queue: Option<String>,
        /// This end's address: the name of the listener it was accepted from, or empty.
        #[serde(default)]
        name: String,
        /// Socket options to set again (credentials passing).
        #[serde(default)]
        options: Vec<SockOpt>,
        /// Buffer sizes.
        #[serde(default)]
        buffers: Option<SockBuffers>,
    },
    /// A unix socket connected to a peer outside the tree that the user named as external
    /// (`dump --external unix:...`). Restore makes a new socket and connects it to the
    /// peer's address: a stream or seqpacket server sees a new client. Nothing was queued
    /// for reading (dump refuses that); what it had sent and the peer had not read stays
    /// with the peer.
    UnixExternal {
        /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
        sock_type: i32,
        /// This socket's own address: absolute path, `@name`, or empty when unbound.
        #[serde(default)]
        name: String,
        /// Mode of the socket file of a path.
        #[serde(default)]
        file_mode: u32,
        /// Owner of the socket file.
        #[serde(default)]
        file_uid: u32,
        /// Group of the socket file.
        #[serde(default)]
        file_gid: u32,
        /// The peer's address: absolute path or `@name`.
        peer_name: String,
        /// Socket options to set again (credentials passing).
        #[serde(default)]
        options: Vec<SockOpt>,
        /// Buffer sizes.
        #[serde(default)]
        buffers: Option<SockBuffers>,
    },
}

/// A socket's buffer sizes as `getsockopt(SO_RCVBUF)` and `getsockopt(SO_SNDBUF)` give
/// them: twice what a program passes to `setsockopt`, the kernel's allowance for its own
/// bookkeeping.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SockBuffers {
    /// Receive buffer, bytes.
    pub rcvbuf: u32,
    /// Send buffer, bytes.
    pub sndbuf: u32,
}

/// What an established TCP connection needs to carry on without its peer noticing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TcpState {
    /// Sequence number after the last byte written (`write_seq`).
    pub send_seq: u32,
    /// Sequence number of the next byte expected (`rcv_nxt`).
    pub recv_seq: u32,
    /// Image file with the bytes written but not acknowledged.
    pub send_queue: Option<String>,
    /// Image file with the bytes received but not read.
    pub recv_queue: Option<String>,
    /// Length of the send queue in bytes.
    pub send_len: u32,
    /// Length of the receive queue in bytes.
    pub recv_len: u32,
    /// Negotiated maximum segment size.
    pub mss: u32,
    /// Window scale for sending.
    pub snd_wscale: u8,
    /// Window scale for receiving.
    pub rcv_wscale: u8,
    /// Window scaling was negotiated.
    pub wscale: bool,
    /// Timestamps were negotiated.
    pub timestamps: bool,
    /// Selective acknowledgements were negotiated.
    pub sack: bool,
    /// `struct tcp_repair_window`: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
    /// The connection's current TCP timestamp.
    pub timestamp: u32,
    /// Which ends have sent their FIN. `send_seq` counts this end's FIN once it is
    /// queued, `recv_seq` the peer's once it is received; `send_len` and `recv_len` count
    /// bytes of data only.
    #[serde(default)]
    pub state: TcpConnState,
    /// The program shut down reading (`shutdown(SHUT_RD)`) without the peer's FIN:
    /// reading ends with end-of-file once the queued bytes are read.
    #[serde(default)]
    pub read_shut: bool,
}

/// The state of a TCP connection torpor can save: established, or closing on one side or
/// both, as the kernel names them.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TcpConnState {
    /// Both ends may send.
    #[default]
    Established,
    /// This end has shut down its sending side; the peer has not acknowledged the FIN.
    FinWait1,
    /// This end has shut down its sending side and the peer has acknowledged the FIN.
    FinWait2,
    /// The peer has shut down its sending side.
    CloseWait,
    /// The peer shut down first, then this end; its FIN is not acknowledged.
    LastAck,
    /// Both ends shut down at once; this end's FIN is not acknowledged.
    Closing,
}

impl TcpConnState {
    /// The state for the kernel's `TCP_*` state number, if it is one torpor saves.
    pub fn from_kernel(state: u8) -> Option<TcpConnState> {
        Some(match state {
            1 => TcpConnState::Established,
            4 => TcpConnState::FinWait1,
            5 => TcpConnState::FinWait2,
            8 => TcpConnState::CloseWait,
            9 => TcpConnState::LastAck,
            11 => TcpConnState::Closing,
            _ => return None,
        })
    }

    /// The kernel's `TCP_*` number of the state.
    pub fn kernel(self) -> u8 {
        match self {
            TcpConnState::Established => 1,
            TcpConnState::FinWait1 => 4,
            TcpConnState::FinWait2 => 5,
            TcpConnState::CloseWait => 8,
            TcpConnState::LastAck => 9,
            TcpConnState::Closing => 11,
        }
    }

    /// This end has queued its FIN (it cannot send any more).
    pub fn fin_sent(self) -> bool {
        matches!(
            self,
            TcpConnState::FinWait1
                | TcpConnState::FinWait2
                | TcpConnState::LastAck
                | TcpConnState::Closing
        )
    }

    /// This end's FIN is queued and not yet acknowledged by the peer.
    pub fn fin_unacked(self) -> bool {
        matches!(self, TcpConnState::FinWait1 | TcpConnState::LastAck | TcpConnState::Closing)
    }

    /// The peer's FIN has been received (reading ends with end-of-file).
    pub fn fin_received(self) -> bool {
        matches!(self, TcpConnState::CloseWait | TcpConnState::LastAck | TcpConnState::Closing)
    }
}

/// One socket option: `setsockopt(level, name, value)`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SockOpt {
    /// `SOL_SOCKET`, `IPPROTO_TCP`, `IPPROTO_IP`, `IPPROTO_IPV6`.
    pub level: i32,
    /// The option.
    pub name: i32,
    /// Its value as `getsockopt` gave it, hex.
    pub value: String,
}

/// One inotify watch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InotifyWatch {
    /// Its watch descriptor, as the program knows it.
    pub wd: i32,
    /// The watched file or directory.
    pub path: String,
    /// The event mask and flags.
    pub mask: u32,
}

/// One registration in an epoll instance.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct EpollTarget {
    /// The registered descriptor number.
    pub fd: i32,
    /// The event mask (`EPOLLIN`, `EPOLLET`...).
    pub events: u32,
    /// The user data returned with events.
    pub data: u64,
    /// Inode of the registered file, to check `fd` still names it.
    pub ino: u64,
}

/// A descriptor number and the open file description it points at.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fd {
    /// Descriptor number.
    pub fd: i32,
    /// `FD_CLOEXEC` is set.
    pub cloexec: bool,
    /// Index into [`Process::open_files`].
    pub open_file: usize,
}

/// A lock held on a file, as `/proc/PID/fdinfo` lists it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct FileLock {
    /// A descriptor of the process through which the lock is taken again.
    pub fd: i32,
    /// Which kind of lock.
    pub kind: LockKind,
    /// An exclusive (write) lock, else shared (read).
    pub write: bool,
    /// First byte locked (`flock` locks: 0).
    pub start: u64,
    /// Last byte locked, or `None` for up to the end of the file, however long.
    pub end: Option<u64>,
}

/// A seccomp filter program.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeccompFilter {
    /// Its `struct sock_filter` instructions (8 bytes each), hex.
    pub code: String,
    /// Installed with `SECCOMP_FILTER_FLAG_LOG`.
    #[serde(default)]
    pub log: bool,
}

/// The kinds of file lock.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum LockKind {
    /// `flock`: the whole file, held by the open file description.
    Flock,
    /// `fcntl(F_SETLK)`: a byte range, held by the process.
    Posix,
    /// `fcntl(F_OFD_SETLK)`: a byte range, held by the open file description.
    Ofd,
}

/// The kernel's `struct sigaction` for one signal.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigAction {
    /// Handler address, or 0 (`SIG_DFL`) or 1 (`SIG_IGN`).
    pub handler: u64,
    /// `SA_*` flags.
    pub flags: u64,
    /// `sa_restorer` address (used with `SA_RESTORER`).
    pub restorer: u64,
    /// Signals blocked while the handler runs, bit `n - 1` for signal `n`.
    pub mask: u64,
}

/// A queued signal: the raw 128-byte `siginfo_t`, hex-encoded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SigInfo {
    /// Signal number.
    pub signo: i32,
    /// The 128 bytes of `siginfo_t` as 256 hex digits.
    pub raw: String,
}

/// One interval timer: time left and reload value, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ITimer {
    /// Time until the next expiry, in microseconds; 0 when disarmed.
    pub value_us: u64,
    /// Reload value after an expiry, in microseconds; 0 for a one-shot timer.
    pub interval_us: u64,
}

/// The three timers of `setitimer`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ITimers {
    /// `ITIMER_REAL`: wall-clock time, `SIGALRM`.
    pub real: ITimer,
    /// `ITIMER_VIRTUAL`: user CPU time, `SIGVTALRM`.
    pub virt: ITimer,
    /// `ITIMER_PROF`: user and system CPU time, `SIGPROF`.
    pub prof: ITimer,
}

/// A POSIX timer made by `timer_create`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PosixTimer {
    /// Timer id the process knows it by.
    pub id: i32,
    /// `CLOCK_*` id it measures.
    pub clock: i32,
    /// `SIGEV_SIGNAL`, `SIGEV_NONE`, `SIGEV_THREAD_ID` (with the flag bits as the kernel
    /// reports them).
    pub notify: i32,
    /// Signal sent on expiry.
    pub signo: i32,
    /// `sigev_value` delivered with the signal.
    pub sigval: u64,
    /// Thread notified with `SIGEV_THREAD_ID`.
    pub notify_tid: i32,
    /// Time until the next expiry, in nanoseconds; 0 when disarmed.
    pub value_ns: u64,
    /// Reload value after an expiry, in nanoseconds; 0 for a one-shot timer.
    pub interval_ns: u64,
    /// Expirations not yet delivered; informational.
    #[serde(default)]
    pub overrun: i32,
}

/// One thread: its registers and per-thread kernel state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Thread {
    /// Thread id.
    pub tid: i32,
    /// Thread name (`/proc/PID/task/TID/comm`), at most 15 bytes.
    pub comm: String,
    /// General-purpose registers.
    pub regs: Regs,
    /// The `NT_X86_XSTATE` register set (the XSAVE area), hex-encoded.
    pub xsave: String,
    /// Blocked signal mask.
    pub blocked: u64,
    /// Signals queued to this thread only, oldest first.
    pub pending: Vec<SigInfo>,
    /// Alternate signal stack (`sigaltstack`).
    pub altstack: AltStack,
    /// Registered restartable-sequences area, if any.
    pub rseq: Option<Rseq>,
    /// Head of the robust futex list (`set_robust_list`), 0 for none.
    pub robust_list: u64,
    /// Size in bytes of the robust list head.
    pub robust_list_len: u64,
    /// Address the kernel clears and wakes at thread exit (`set_tid_address`), 0 for none.
    pub clear_child_tid: u64,
    /// Nice value (`setpriority`).
    #[serde(default)]
    pub nice: i32,
    /// Scheduling policy (`SCHED_*`, with `SCHED_RESET_ON_FORK` if set).
    #[serde(default)]
    pub sched_policy: i32,
    /// Static priority of a real-time policy, 0 otherwise.
    #[serde(default)]
    pub sched_priority: i32,
    /// The CPUs it may run on (`sched_setaffinity`), as 64-bit words of a bit mask, when
    /// it was restricted to fewer than the machine's online CPUs; format 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Vec<u64>>,
    /// Its I/O priority (`ioprio_set` value: class in bits 13-15, level below) when one
    /// was set; format 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ioprio: Option<u16>,
    /// Its timer slack in nanoseconds (`PR_SET_TIMERSLACK`, `/proc/PID/timerslack_ns`)
    /// when not the default of 50 µs; format 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timer_slack_ns: Option<u64>,
}

/// An alternate signal stack, as `sigaltstack` takes it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AltStack {
    /// Lowest address of the stack.
    pub sp: u64,
    /// `SS_*` flags (`SS_DISABLE` when there is none).
    pub flags: i32,
    /// Size in bytes.
    pub size: u64,
}

/// A registered restartable-sequences area.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Rseq {
    /// Address of the thread's `struct rseq`.
    pub addr: u64,
    /// Length in bytes it was registered with.
    pub len: u32,
    /// Signature given at registration.
    pub signature: u32,
}

/// The general-purpose registers, in the kernel's `user_regs_struct` order (x86_64).
#[allow(missing_docs)] // each field is the register of that name
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_external_decodes_with_only_what_it_cannot_do_without() {
        let k: OpenFileKind = serde_json::from_str(
            r#"{"type": "unix_external", "sock_type": 1, "peer_name": "/run/app.sock"}"#,
        )
        .expect("decode");
        let OpenFileKind::UnixExternal { sock_type, name, peer_name, options, buffers, .. } = &k
        else {
            panic!("decoded as {k:?}");
        };
        assert_eq!((*sock_type, name.as_str(), peer_name.as_str()), (1, "", "/run/app.sock"));
        assert!(options.is_empty() && buffers.is_none());
        let again: OpenFileKind =
            serde_json::from_str(&serde_json::to_string(&k).unwrap()).expect("round trip");
        assert_eq!(again, k);
    }
}
