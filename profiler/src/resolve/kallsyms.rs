//! Kernel function names from a copy of /proc/kallsyms, kept as a compact index over the copy.
//!
//! blazesym's kallsyms resolver holds every symbol's name in memory: 7.5 MiB of the agent's heap
//! for this kernel's 122,000 symbols, a fifth of its whole RSS budget. Here only each symbol's
//! address and where its line starts in the copy are kept (12 bytes a symbol); the few names a
//! profile needs are read from the copy when first looked up, and cached by the caller.

use std::{
    fs::File,
    io::{self, BufRead, BufReader, Seek},
    os::unix::fs::FileExt,
};

/// Longest kallsyms line read back: a symbol name is at most 512 bytes (`KSYM_NAME_LEN`).
const MAX_LINE: usize = 1024;

/// A copy of /proc/kallsyms and its symbols sorted by address.
pub struct Kallsyms {
    copy: File,
    /// Symbol start addresses, ascending.
    addrs: Vec<u64>,
    /// Where each symbol's line starts in `copy`, in the order of `addrs`.
    lines: Vec<u32>,
}

impl Kallsyms {
    /// Copies /proc/kallsyms into an unnamed temporary file and indexes it. `None` when it
    /// cannot be read, or names nothing (addresses hidden from us by `kptr_restrict`).
    pub fn snapshot() -> Option<Kallsyms> {
        let mut copy = tempfile::tempfile().ok().or_else(memfd)?;
        let mut source = File::open("/proc/kallsyms").ok()?;
        io::copy(&mut source, &mut copy).ok()?;
        let index = Kallsyms::index(copy).ok()?;
        (!index.addrs.is_empty()).then_some(index)
    }

    /// Indexes `copy`, a file in kallsyms' format (`ADDR TYPE NAME [MODULE]` a line).
    pub fn index(mut copy: File) -> io::Result<Kallsyms> {
        copy.rewind()?;
        let mut symbols: Vec<(u64, u32)> = Vec::new();
        let mut reader = BufReader::new(&copy);
        let mut line = Vec::new();
        let mut at: u64 = 0;
        loop {
            line.clear();
            let read = reader.read_until(b'\n', &mut line)?;
            if read == 0 {
                break;
            }
            let start = u32::try_from(at).map_err(|_| io::Error::other("kallsyms over 4 GiB"))?;
            at += read as u64;
            let addr = line
                .split(|b| *b == b' ')
                .next()
                .and_then(|hex| std::str::from_utf8(hex).ok())
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            if let Some(addr) = addr.filter(|a| *a != 0) {
                symbols.push((addr, start));
            }
        }
        symbols.sort_unstable();
        Ok(Kallsyms {
            copy,
            addrs: symbols.iter().map(|s| s.0).collect(),
            lines: symbols.iter().map(|s| s.1).collect(),
        })
    }

    /// The function `addr` is in: the nearest symbol at or below it, when that symbol is code
    /// (a data symbol there means `addr` is past the end of any function).
    pub fn function(&self, addr: u64) -> Option<String> {
        let index = self.addrs.partition_point(|a| *a <= addr).checked_sub(1)?;
        let mut buf = [0u8; MAX_LINE];
        let read = self
            .copy
            .read_at(&mut buf, u64::from(self.lines[index]))
            .ok()?;
        let line = buf[..read].split(|b| *b == b'\n').next()?;
        let line = std::str::from_utf8(line).ok()?;
        let mut fields = line.split_ascii_whitespace();
        let (_addr, kind, name) = (fields.next()?, fields.next()?, fields.next()?);
        matches!(kind, "t" | "T" | "w" | "W").then(|| name.to_owned())
    }
}

/// An anonymous in-memory file, where no temporary directory is writable.
fn memfd() -> Option<File> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: memfd_create returns a new descriptor that nothing else owns.
    let fd = unsafe { libc::memfd_create(c"kallsyms".as_ptr(), libc::MFD_CLOEXEC) };
    (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
}

/// The address of the running kernel's `schedule`, from /proc/kallsyms itself; `None` when
/// addresses are hidden from us (not root).
#[cfg(test)]
pub(super) fn schedule_address() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/kallsyms").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let addr = u64::from_str_radix(f.next()?, 16).ok()?;
        (f.nth(1)? == "schedule" && addr != 0).then_some(addr)
    })
}

#[cfg(test)]
mod tests {
    use std::{
        fs::File,
        io::{Read, Seek, Write},
    };

    use super::{schedule_address, Kallsyms};

    fn file_with(text: &[u8]) -> std::io::Result<File> {
        let mut file = tempfile::tempfile()?;
        file.write_all(text)?;
        Ok(file)
    }

    fn contents(mut file: &File) -> String {
        let mut text = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut text).unwrap();
        text
    }

    const SAMPLE: &str = "\
ffffffff81000000 T _stext
ffffffff81001000 t helper
ffffffffc0002000 t mod_fn\t[some_mod]
ffffffff81002000 T schedule
ffffffff82000000 D some_data
0000000000000000 A fixed_percpu_data
ffffffffc0001000 t bpf_prog_6deef7357e7b4530_sd_fw_ingress\t[bpf]
garbage line
ffffffff81003000";

    fn index() -> Kallsyms {
        Kallsyms::index(file_with(SAMPLE.as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn names_the_nearest_function_at_or_below() {
        let k = index();
        assert_eq!(k.addrs.len(), 7, "every line with an address, out of order");
        assert_eq!(k.function(0xffffffff81002000).as_deref(), Some("schedule"));
        assert_eq!(k.function(0xffffffff81002abc).as_deref(), Some("schedule"));
        assert_eq!(k.function(0xffffffff81001fff).as_deref(), Some("helper"));
        assert_eq!(k.function(0xffffffffc0002010).as_deref(), Some("mod_fn"));
        assert_eq!(
            k.function(0xffffffffc0001008).as_deref(),
            Some("bpf_prog_6deef7357e7b4530_sd_fw_ingress")
        );
    }

    #[test]
    fn no_name_below_the_first_symbol_past_data_or_on_a_short_line() {
        let k = index();
        assert_eq!(k.function(0xffffffff80000000), None);
        assert_eq!(k.function(0xffffffff82000010), None, "a data symbol");
        assert_eq!(
            k.function(0xffffffff81003004),
            None,
            "a line without a type"
        );
        assert!(contents(&k.copy).starts_with("ffffffff81000000"));
    }

    #[test]
    fn hidden_addresses_index_nothing() {
        let hidden = "0000000000000000 T _stext\n0000000000000000 T schedule\n";
        let k = Kallsyms::index(file_with(hidden.as_bytes()).unwrap()).unwrap();
        assert!(k.addrs.is_empty());
        assert_eq!(k.function(0x1000), None);
    }

    #[test]
    fn the_running_kernel_names_schedule() {
        let Some(k) = Kallsyms::snapshot() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "kallsyms must be readable in CI"
            );
            eprintln!("skipped: kernel addresses are hidden (not root)");
            return;
        };
        let schedule = schedule_address().unwrap();
        assert_eq!(k.function(schedule + 1).as_deref(), Some("schedule"));
    }
}
