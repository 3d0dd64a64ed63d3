//! Series of system calls that a task being restored runs in one go.
//!
//! A remote call costs a few ptrace requests and two context switches; restoring a
//! process with thousands of mappings or threads made tens of thousands of them. A batch
//! collects calls and the structures they point to, writes them into the scratch area with
//! one write, and lets the task run them all with the small executor of
//! [`torpor_sys::remote::BATCH_CODE`]. The first call whose result is not the one expected
//! ends the batch and becomes the error, named as the call would have been alone.

use torpor_sys::remote::{batch_entry, Expect, BATCH_ENTRY};
use torpor_sys::Remote;

use crate::space::{Space, SCRATCH_LEN};
use crate::{RestoreError, Result};

/// One call waiting in a batch.
struct Call {
    nr: i64,
    name: &'static str,
    args: [u64; 6],
    expect: Expect,
    /// The step it is, for the message if it fails.
    what: String,
}

/// Calls and their data, laid out for the scratch area at `base`: the data first, the
/// table of calls after it.
pub(crate) struct Batch {
    base: u64,
    data: Vec<u8>,
    calls: Vec<Call>,
}

impl Batch {
    /// An empty batch for the scratch area of `s`.
    pub fn new(s: &Space) -> Self {
        Self { base: s.scratch, data: Vec::new(), calls: Vec::new() }
    }

    /// Whether `data` more bytes and `calls` more calls still fit in the scratch area.
    pub fn has_room(&self, data: usize, calls: usize) -> bool {
        let table = self.data.len().next_multiple_of(8) + data.next_multiple_of(8);
        (table + (self.calls.len() + calls) * BATCH_ENTRY) as u64 <= SCRATCH_LEN
    }

    /// Adds bytes a call will point to; returns the address they will have.
    pub fn data(&mut self, bytes: &[u8]) -> u64 {
        let at = self.data.len().next_multiple_of(8);
        self.data.resize(at, 0);
        self.data.extend_from_slice(bytes);
        self.base + at as u64
    }

    /// Overwrites data added before at address `at` (for structures that point into
    /// themselves, whose address must be known first).
    pub fn set_data(&mut self, at: u64, bytes: &[u8]) {
        let off = (at - self.base) as usize;
        self.data[off..off + bytes.len()].copy_from_slice(bytes);
    }

    /// Adds a call; `what` names the step in an error.
    pub fn call(
        &mut self,
        what: impl Into<String>,
        name: &'static str,
        nr: i64,
        args: [u64; 6],
        expect: Expect,
    ) {
        self.calls.push(Call { nr, name, args, expect, what: what.into() });
    }
}

impl Space {
    /// Runs the calls of `batch` in task `r` of this process, then empties the batch.
    pub fn run(&self, r: &Remote, batch: &mut Batch) -> Result<()> {
        if batch.calls.is_empty() {
            batch.data.clear();
            return Ok(());
        }
        let table_off = batch.data.len().next_multiple_of(8);
        let mut bytes = std::mem::take(&mut batch.data);
        bytes.resize(table_off, 0);
        for c in &batch.calls {
            bytes.extend_from_slice(&batch_entry(c.nr, c.args, c.expect));
        }
        assert!(bytes.len() as u64 <= SCRATCH_LEN, "a batch larger than the scratch area");
        self.put(&bytes)?;
        let table = batch.base + table_off as u64;
        let calls = std::mem::take(&mut batch.calls);
        let stop = r.run_batch(self.code, table, calls.len()).map_err(|source| {
            RestoreError::Step { pid: self.pid(), step: "run a batch of calls".into(), source }
        })?;
        let Some(stop) = stop else { return Ok(()) };
        let c = &calls[stop.index];
        let source = if (-4095..0).contains(&stop.result) {
            torpor_sys::Error::Remote {
                tid: r.tid(),
                call: c.name,
                source: std::io::Error::from_raw_os_error(-stop.result as i32),
            }
        } else {
            torpor_sys::Error::Parse {
                what: c.name.into(),
                line: format!("returned {:#x}, not {:?}", stop.result, c.expect),
            }
        };
        Err(RestoreError::Step { pid: self.pid(), step: c.what.clone(), source })
    }
}
