//! A userspace walker over captured stacks, with the kernel's search and step
//! (`profiler_common::unwind`), so that tables are tested without BPF.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use profiler_common::unwind::{frame_pointer_step, lookup_pc, step, Regs, StepResult, StopReason};

use crate::{load_bias, Tables, UnwindTable};

/// An executable mapping of the unwound process and the table that covers it.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Runtime address minus ELF virtual address.
    pub bias: u64,
    /// `None` when no table could be built: the walk stops with [`StopReason::NoTable`] there
    /// (or takes a frame-pointer step).
    pub table: Option<Arc<UnwindTable>>,
    pub name: String,
}

/// One frame of an unwound stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    pub address: u64,
    /// A return address (symbolize at address-1) rather than an exact pc (the leaf, and a frame
    /// a signal interrupted).
    pub is_return_address: bool,
}

/// An unwound stack, leaf first, and why the walk ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unwound {
    pub frames: Vec<Frame>,
    pub stop: StopReason,
}

/// Walks from `regs` through `mappings`, reading memory with `read`, for at most `max_frames`
/// frames, as the kernel walker will: find the row (at pc-1 for return addresses), step, repeat.
/// With `frame_pointer_fallback`, a pc that no table covers gets one frame-pointer step.
pub fn unwind(
    mappings: &[Mapping],
    mut regs: Regs,
    mut read: impl FnMut(u64) -> Option<u64>,
    max_frames: usize,
    frame_pointer_fallback: bool,
) -> Unwound {
    let mut frames = Vec::new();
    let mut is_return_address = false;
    loop {
        frames.push(Frame {
            address: regs.rip,
            is_return_address,
        });
        if frames.len() >= max_frames {
            return Unwound {
                frames,
                stop: StopReason::FrameLimit,
            };
        }
        let pc = lookup_pc(regs.rip, is_return_address);
        let mapping = mappings.iter().find(|m| m.start <= pc && pc < m.end);
        let table = mapping.and_then(|m| Some((m, m.table.as_ref()?)));
        let result = match table {
            Some((mapping, table)) => match table.row_for(pc.wrapping_sub(mapping.bias)) {
                Some(row) => step(row, &mut regs, &mut read),
                None => StepResult::Stop(StopReason::NoCfi),
            },
            None => StepResult::Stop(StopReason::NoTable),
        };
        let result = match result {
            StepResult::Stop(reason @ (StopReason::NoTable | StopReason::NoCfi))
                if frame_pointer_fallback =>
            {
                match frame_pointer_step(&mut regs, &mut read) {
                    StepResult::Stop(StopReason::BadFrame) => StepResult::Stop(reason),
                    other => other,
                }
            }
            other => other,
        };
        match result {
            StepResult::Caller => is_return_address = true,
            StepResult::Interrupted => is_return_address = false,
            StepResult::Stop(stop) => return Unwound { frames, stop },
        }
    }
}

/// A line of `/proc/PID/maps`.
#[derive(Clone, Debug)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub executable: bool,
    /// The path, `[vdso]`, `[stack]`, or empty for anonymous memory.
    pub path: String,
}

/// Registers and the top of the stack of a stopped thread, with its mappings: everything the
/// kernel walker sees at a sample.
pub struct Snapshot {
    pub pid: i32,
    pub regs: Regs,
    /// Address of `stack[0]` (the captured rsp).
    pub stack_address: u64,
    pub stack: Vec<u8>,
    pub maps: Vec<MapEntry>,
    /// The vDSO's bytes, read out of the process (it is no file).
    pub vdso: Option<Vec<u8>>,
}

impl Snapshot {
    /// Stops thread `pid` with ptrace (`PTRACE_SEIZE` + `PTRACE_INTERRUPT`, so no signal is
    /// sent), reads its registers, up to `stack_bytes` of its stack from rsp, its mappings and
    /// vDSO, and lets it go on. Needs `CAP_SYS_PTRACE` or the same user under Yama scope 0.
    pub fn capture(pid: i32, stack_bytes: usize) -> io::Result<Snapshot> {
        // Held stopped until everything is read, so registers, stack and maps agree.
        let _stopped = Stopped::new(pid)?;
        // SAFETY: user_regs_struct is plain data, filled by the kernel.
        let mut raw: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: PTRACE_GETREGS writes one user_regs_struct at the given address.
        let rc = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGS,
                pid,
                0,
                &mut raw as *mut libc::user_regs_struct,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let regs = Regs {
            rip: raw.rip,
            rsp: raw.rsp,
            rbp: raw.rbp,
        };
        let maps = read_maps(pid)?;
        let mem = File::open(format!("/proc/{pid}/mem"))?;
        let stack_end = maps
            .iter()
            .find(|m| m.start <= regs.rsp && regs.rsp < m.end)
            .map_or(regs.rsp, |m| m.end);
        let mut stack = vec![0; (stack_end - regs.rsp).min(stack_bytes as u64) as usize];
        mem.read_exact_at(&mut stack, regs.rsp)?;
        let vdso = maps.iter().find(|m| m.path == "[vdso]").and_then(|m| {
            let mut image = vec![0; (m.end - m.start) as usize];
            mem.read_exact_at(&mut image, m.start).ok().map(|_| image)
        });
        Ok(Snapshot {
            pid,
            regs,
            stack_address: regs.rsp,
            stack,
            maps,
            vdso,
        })
    }

    /// The u64 at `address`, if the captured stack holds it.
    pub fn read(&self, address: u64) -> Option<u64> {
        let at = usize::try_from(address.checked_sub(self.stack_address)?).ok()?;
        let bytes = self.stack.get(at..at.checked_add(8)?)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }

    /// The executable mappings with their tables (compiled through `tables`, so each binary
    /// once). A mapping whose table cannot be built is kept without one.
    pub fn mappings(&self, tables: &mut Tables) -> Vec<Mapping> {
        self.maps
            .iter()
            .filter(|m| m.executable)
            .map(|m| {
                let (bias, table) = if m.path == "[vdso]" {
                    let image = self.vdso.as_deref().unwrap_or_default();
                    let table = tables.get_or_build_image(image).ok();
                    (load_bias(image, m.start, m.offset), table)
                } else if m.path.starts_with('/') {
                    let path = PathBuf::from(&m.path);
                    let table = tables.get_or_build(&path).ok().map(|(_, table)| table);
                    (file_bias(&path, m), table)
                } else {
                    (None, None)
                };
                Mapping {
                    start: m.start,
                    end: m.end,
                    bias: bias.unwrap_or(m.start),
                    table: bias.and(table),
                    name: m.path.clone(),
                }
            })
            .collect()
    }

    /// Unwinds the captured stack with the tables.
    pub fn unwind(&self, tables: &mut Tables, max_frames: usize) -> Unwound {
        let mappings = self.mappings(tables);
        unwind(&mappings, self.regs, |a| self.read(a), max_frames, true)
    }
}

fn file_bias(path: &PathBuf, entry: &MapEntry) -> Option<u64> {
    let file = File::open(path).ok()?;
    // SAFETY: read-only map, dropped before returning.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    load_bias(&map, entry.start, entry.offset)
}

/// `/proc/PID/maps`, parsed.
pub fn read_maps(pid: i32) -> io::Result<Vec<MapEntry>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(text.lines().filter_map(parse_map_line).collect())
}

fn parse_map_line(line: &str) -> Option<MapEntry> {
    let line = profiler_common::proc_maps::parse_line(line.as_bytes())?;
    Some(MapEntry {
        start: line.start,
        end: line.end,
        offset: line.offset,
        executable: line.executable,
        path: String::from_utf8_lossy(line.path).into_owned(),
    })
}

/// A thread held in ptrace-stop; detached (and so resumed) on drop.
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> io::Result<Stopped> {
        // SAFETY: plain ptrace requests on a pid; no memory is passed.
        unsafe {
            if libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            let stopped = Stopped(pid);
            if libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut status = 0;
            if libc::waitpid(pid, &mut status, libc::__WALL) != pid {
                return Err(io::Error::last_os_error());
            }
            Ok(stopped)
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: detaching a tracee this thread attached.
        unsafe {
            libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_maps_lines() {
        let line = "7f1c2a400000-7f1c2a595000 r-xp 00028000 fe:01 1837 /usr/lib/x86_64-linux-gnu/libc.so.6";
        let entry = parse_map_line(line).unwrap();
        assert_eq!(
            (entry.start, entry.end, entry.offset),
            (0x7f1c2a400000, 0x7f1c2a595000, 0x28000)
        );
        assert!(entry.executable);
        assert_eq!(entry.path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        let anon = parse_map_line("7ffd1000-7ffd2000 rw-p 00000000 00:00 0 ").unwrap();
        assert!(!anon.executable);
        assert_eq!(anon.path, "");
    }
}
