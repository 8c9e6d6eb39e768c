//! Names for JIT code from perf-map files (`/tmp/perf-PID.map`), which Python's `-X perf`,
//! Node's `--perf-basic-prof` and Java's `jcmd PID Compiler.perfmap` write: one line
//! `START SIZE NAME` (hex numbers) per piece of code, appended as code is made. The file is
//! read incrementally while the process lives, and its entries are kept with the process, so
//! that its last samples are named after it exits.

use std::{
    collections::BTreeMap,
    io::{self, Read as _, Seek as _, SeekFrom},
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use super::process::{is_running, namespace_pid};
use crate::in_root::ProcessRoot;

/// Lines longer than this are not perf-map lines (names are at most a few hundred bytes).
pub const MAX_LINE: usize = 4096;
/// Bytes read per refresh: a huge file is taken in over several drains rather than stalling one.
const READ_BUDGET: u64 = 32 << 20;
/// Entries kept per process (about 12 MiB per 100k entries): V8 logs every stub and
/// recompilation and never deletes a line.
pub const MAX_ENTRIES_PER_PROCESS: usize = 100_000;
/// Entries kept over all processes.
pub const MAX_ENTRIES_TOTAL: usize = 300_000;
/// Bounds of the wait before a missing perf map is looked for again.
const ABSENT_WAIT_MIN: Duration = Duration::from_millis(250);
const ABSENT_WAIT_MAX: Duration = Duration::from_secs(4);

/// What perf-map reading did, since the start; shown in the summary and on /metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PerfMapStats {
    /// Entries held now, over all processes.
    pub entries: usize,
    /// Perf-map files found (a replaced file counts again).
    pub files: u64,
    /// Lines taken in.
    pub lines: u64,
    /// Lines that are not `START SIZE NAME` (or are longer than [`MAX_LINE`]).
    pub malformed: u64,
    /// Lines dropped because a cap on entries was reached.
    pub dropped: u64,
    /// Files read again from the start because they were replaced or shrank.
    pub replaced: u64,
    /// Files that exist but were refused or failed to read (not a regular file, a symlink,
    /// an I/O error).
    pub unreadable: u64,
    /// Reads that ran past `--parse-timeout` or panicked: that process's map is not read again.
    pub abandoned: u64,
}

impl PerfMapStats {
    /// A clause for the record summary, when any perf map was read.
    pub fn describe(&self) -> Option<String> {
        (self.files > 0 || self.unreadable > 0 || self.abandoned > 0).then(|| {
            format!(
                "perf maps: {} files, {} entries (malformed={} dropped={} replaced={} unreadable={} abandoned={})",
                self.files,
                self.entries,
                self.malformed,
                self.dropped,
                self.replaced,
                self.unreadable,
                self.abandoned
            )
        })
    }
}

/// One piece of JIT code.
#[derive(Debug, Clone)]
struct Entry {
    end: u64,
    name: Arc<str>,
}

/// Identity of the file read: a different one means the map was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// The perf map of one process: entries that do not overlap (a later line covering an address
/// replaces what earlier lines said about it), and where reading stopped.
#[derive(Debug, Default)]
pub struct PerfMap {
    entries: BTreeMap<u64, Entry>,
    file: Option<FileId>,
    /// Bytes consumed: everything before is parsed; a partial last line starts here.
    offset: u64,
    /// Inside a line longer than [`MAX_LINE`], skipping to its end.
    skipping: bool,
    /// The process's pid in its own pid namespace, which names its file.
    ns_pid: Option<u32>,
    /// No file was found at `absent_at`: not looked for again before `absent_wait` has passed.
    absent_at: Option<Instant>,
    absent_wait: Duration,
}

impl PerfMap {
    /// A map never read again: the stand-in for one whose read was abandoned.
    pub fn given_up() -> PerfMap {
        PerfMap {
            absent_at: Some(Instant::now()),
            absent_wait: Duration::MAX,
            ..PerfMap::default()
        }
    }

    /// Whether [`PerfMap::refresh`] would look at the file now: not while it was absent or
    /// refused recently, nor ever again for a map given up.
    pub fn due(&self) -> bool {
        self.absent_at
            .is_none_or(|at| at.elapsed() >= self.absent_wait)
    }

    /// The name of the code at `addr`.
    pub fn lookup(&self, addr: u64) -> Option<&Arc<str>> {
        let (_, entry) = self.entries.range(..=addr).next_back()?;
        (addr < entry.end).then_some(&entry.name)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Reads what was appended to the perf map of the process `pid` (host pid) that started at
    /// `start_ns` since the last call, or all of it when the file is new or was replaced.
    /// `room` is how many entries this map may grow by.
    pub fn refresh(&mut self, pid: u32, start_ns: u64, room: usize, stats: &mut PerfMapStats) {
        if !self.due() {
            return;
        }
        let Ok(root) = ProcessRoot::open(pid) else {
            return;
        };
        // Checked after the root is open: had the pid been reused before, this tells.
        let ns_pid = match self.ns_pid {
            Some(p) if is_running(pid, start_ns) => p,
            Some(_) => return,
            None => match namespace_pid(pid, start_ns) {
                Some(p) => *self.ns_pid.insert(p),
                None => return,
            },
        };
        let path = format!("/tmp/perf-{ns_pid}.map");
        match root.open_regular(Path::new(&path)) {
            Ok(file) => {
                self.absent_at = None;
                self.absent_wait = Duration::ZERO;
                if self.read_from(file, room, stats).is_err() {
                    stats.unreadable += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.absent_at = Some(Instant::now());
                self.absent_wait = (self.absent_wait * 2).clamp(ABSENT_WAIT_MIN, ABSENT_WAIT_MAX);
            }
            Err(_) => {
                stats.unreadable += 1;
                // Refused files are not retried at every drain either.
                self.absent_at = Some(Instant::now());
                self.absent_wait = ABSENT_WAIT_MAX;
            }
        }
    }

    /// Takes in the new part of `file` (all of it when it is another file than last time, or
    /// shorter than what was read), up to [`READ_BUDGET`] bytes.
    pub fn read_from(
        &mut self,
        mut file: std::fs::File,
        room: usize,
        stats: &mut PerfMapStats,
    ) -> io::Result<()> {
        let meta = file.metadata()?;
        let id = FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if self.file != Some(id) || meta.len() < self.offset {
            if self.file.is_some() {
                stats.replaced += 1;
            }
            stats.files += 1;
            self.entries.clear();
            self.file = Some(id);
            self.offset = 0;
            self.skipping = false;
        }
        if meta.len() == self.offset {
            return Ok(());
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut reader = file.take(READ_BUDGET);
        let cap = self.entries.len() + room;
        let mut chunk = vec![0u8; 256 << 10];
        // The current line's bytes read so far (at most MAX_LINE).
        let mut line: Vec<u8> = Vec::new();
        let mut position = self.offset;
        loop {
            let n = match reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            position += n as u64;
            let mut rest = &chunk[..n];
            while let Some(newline) = rest.iter().position(|b| *b == b'\n') {
                let piece = &rest[..newline];
                if self.skipping || line.len() + piece.len() > MAX_LINE {
                    stats.malformed += 1;
                    self.skipping = false;
                } else if line.is_empty() {
                    self.take_line(piece, cap, stats);
                } else {
                    line.extend_from_slice(piece);
                    self.take_line(&std::mem::take(&mut line), cap, stats);
                }
                line.clear();
                rest = &rest[newline + 1..];
                self.offset = position - rest.len() as u64;
            }
            if !self.skipping {
                if line.len() + rest.len() > MAX_LINE {
                    self.skipping = true;
                    line.clear();
                } else {
                    line.extend_from_slice(rest);
                }
            }
            if self.skipping {
                // The overlong line's bytes are consumed; its end is looked for from here.
                self.offset = position;
            }
        }
        Ok(())
    }

    /// Adds one line's entry, unless it is malformed or the cap is reached.
    fn take_line(&mut self, line: &[u8], cap: usize, stats: &mut PerfMapStats) {
        match parse_line(line) {
            Some((start, size, name)) => {
                stats.lines += 1;
                if !self.insert(start, start + size, name, cap) {
                    stats.dropped += 1;
                }
            }
            None => stats.malformed += 1,
        }
    }

    /// Adds `[start, end)`, cutting what overlaps it out of earlier entries. False when that
    /// would grow the map past `cap` entries.
    fn insert(&mut self, start: u64, end: u64, name: &str, cap: usize) -> bool {
        let overlapping: Vec<u64> = self
            .entries
            .range(..end)
            .rev()
            .take_while(|(_, e)| e.end > start)
            .map(|(s, _)| *s)
            .collect();
        let mut after = self.entries.len() + 1 - overlapping.len();
        if let (Some(first), Some(last)) = (overlapping.last(), overlapping.first()) {
            after += usize::from(*first < start) + usize::from(self.entries[last].end > end);
        }
        if after > cap {
            return false;
        }
        for s in overlapping {
            let Some(old) = self.entries.remove(&s) else {
                continue;
            };
            if s < start {
                self.entries.insert(
                    s,
                    Entry {
                        end: start,
                        name: old.name.clone(),
                    },
                );
            }
            if old.end > end {
                self.entries.insert(
                    end,
                    Entry {
                        end: old.end,
                        ..old
                    },
                );
            }
        }
        self.entries.insert(
            start,
            Entry {
                end,
                name: Arc::from(name),
            },
        );
        true
    }
}

/// Parses `START SIZE NAME`: hex numbers with or without `0x`, the name the rest of the line
/// (it may hold spaces). `None` for anything else, an empty range, or one past the address space.
pub fn parse_line(line: &[u8]) -> Option<(u64, u64, &str)> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = std::str::from_utf8(line).ok()?;
    let (start, rest) = line.trim_start().split_once([' ', '\t'])?;
    let (size, name) = rest.trim_start().split_once([' ', '\t'])?;
    let name = name.trim();
    let start = hex(start)?;
    let size = hex(size)?;
    if name.is_empty() || size == 0 || start.checked_add(size).is_none() {
        return None;
    }
    Some((start, size, name))
}

fn hex(text: &str) -> Option<u64> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn read(map: &mut PerfMap, path: &std::path::Path, room: usize) -> PerfMapStats {
        let mut stats = PerfMapStats::default();
        map.read_from(std::fs::File::open(path).unwrap(), room, &mut stats)
            .unwrap();
        stats
    }

    #[test]
    fn lines_parse_with_and_without_0x_and_garbage_is_refused() {
        assert_eq!(
            parse_line(b"7f00 10 py::fib:/tmp/work.py"),
            Some((0x7f00, 0x10, "py::fib:/tmp/work.py"))
        );
        assert_eq!(
            parse_line(b"0x7F00 0x10 LazyCompile:*fib /t/a.js:1\r"),
            Some((0x7f00, 0x10, "LazyCompile:*fib /t/a.js:1"))
        );
        for bad in [
            &b""[..],
            b"garbage",
            b"7f00 10",
            b"7f00 10   ",
            b"zz 10 f",
            b"7f00 0 empty",
            b"ffffffffffffffff 2 wraps",
            b"11111111111111111 1 too-long",
            b"0x 10 f",
            b"\xff\xfe 10 f",
        ] {
            assert_eq!(parse_line(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn file_reads_incrementally_with_overlaps_caps_partial_and_replaced_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf-1.map");
        let mut file = std::fs::File::create(&path).unwrap();
        let long = "x".repeat(MAX_LINE + 10);
        write!(
            file,
            "1000 100 old\nnot a line\n{long}\n1040 20 moved\n2000 10 partial-"
        )
        .unwrap();
        let mut map = PerfMap::default();
        let stats = read(&mut map, &path, 100);
        assert_eq!((stats.lines, stats.malformed, stats.files), (2, 2, 1));
        // The later line wins where they overlap; the old entry keeps both sides.
        assert_eq!(map.lookup(0x1000).map(|n| &**n), Some("old"));
        assert_eq!(map.lookup(0x1045).map(|n| &**n), Some("moved"));
        assert_eq!(map.lookup(0x1060).map(|n| &**n), Some("old"));
        assert_eq!(map.lookup(0x1100), None);
        assert_eq!(map.len(), 3);
        // The partial last line waits for its end.
        assert_eq!(map.lookup(0x2000), None);
        write!(file, "name\n3000 10 third\n").unwrap();
        let stats = read(&mut map, &path, 100);
        assert_eq!((stats.lines, stats.malformed, stats.files), (2, 0, 0));
        assert_eq!(map.lookup(0x2005).map(|n| &**n), Some("partial-name"));

        // The cap: no growth past room, counted.
        write!(file, "4000 10 a\n5000 10 b\n").unwrap();
        let stats = read(&mut map, &path, 1);
        assert_eq!((stats.lines, stats.dropped), (2, 1));
        assert!(map.lookup(0x4000).is_some() && map.lookup(0x5000).is_none());

        // An overlong line cut by the end of the file is skipped to its end, later.
        write!(file, "{long}").unwrap();
        read(&mut map, &path, 100);
        write!(file, "yyy\n6000 10 after-long\n").unwrap();
        let stats = read(&mut map, &path, 100);
        assert_eq!((stats.lines, stats.malformed), (1, 1));
        assert!(map.lookup(0x6000).is_some());

        // Replaced (a new inode): read again from the start, old entries gone.
        let replacement = dir.path().join("new");
        std::fs::write(&replacement, "7000 10 fresh\n").unwrap();
        std::fs::rename(&replacement, &path).unwrap();
        let stats = read(&mut map, &path, 100);
        assert_eq!((stats.replaced, stats.lines, map.len()), (1, 1, 1));
        assert_eq!(map.lookup(0x7000).map(|n| &**n), Some("fresh"));
        // Truncated in place (shorter than what was read): read again too.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap()
            .write_all(b"8000 10 g\n")
            .unwrap();
        let stats = read(&mut map, &path, 100);
        assert_eq!((stats.replaced, map.len()), (1, 1));
    }

    #[test]
    fn binary_garbage_costs_no_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("perf-2.map");
        let garbage: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        std::fs::write(&path, garbage).unwrap();
        let mut map = PerfMap::default();
        let stats = read(&mut map, &path, 100);
        assert_eq!(map.len(), 0);
        assert!(stats.malformed > 0 && stats.lines == 0, "{stats:?}");
    }
}
