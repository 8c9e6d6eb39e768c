//! Symbolization through blazesym, with one cache entry per binary (keyed by device and inode)
//! and per address, so each binary is parsed once however many processes map it.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use blazesym::symbolize::{
    source::{Elf, Kernel, Source},
    Input, Symbolized, Symbolizer,
};

use super::{
    demangle::demangle,
    gopclntab::{Corrupt, GoLine, GoTable},
    process::FileKey,
};

/// The soonest /proc/kallsyms is copied again for kernel addresses it did not name.
const KALLSYMS_REFRESH: Duration = Duration::from_secs(30);

/// Largest file (a binary or its separate debug file) the symbolizer parses: blazesym builds
/// its DWARF indices in memory, so one huge file could take the agent's whole memory limit.
const MAX_SYMBOLIZED_BYTES: u64 = 1 << 30;

/// Binaries left unnamed on purpose, by reason: their frames show as `file+0xADDR`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkippedBinaries {
    /// Over [`MAX_SYMBOLIZED_BYTES`] (the binary or its debug file).
    pub too_large: u64,
    /// A parser (blazesym, gimli, or our Go table reader) panicked on it: caught, and the
    /// binary is not parsed again.
    pub panics: u64,
}

/// One function in a frame: where an address is, or where an inlined call was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub function: Arc<str>,
    pub file: Option<Arc<str>>,
    /// 0 when unknown.
    pub line: u32,
}

/// The functions at one address, innermost inlined function first, the real function last:
/// pprof's order. Empty when the address could not be symbolized.
pub type Lines = Arc<[Line]>;

/// A binary kept open for as long as its samples may need it, so that it symbolizes after
/// the process exits or the file is deleted or replaced.
struct Object {
    file: File,
    build_id: String,
    /// Separate debug info found by build ID (`DIR/.build-id/xx/rest.debug`), which blazesym
    /// only follows by itself when the binary carries a debug link.
    debug_file: Option<PathBuf>,
    /// The binary itself, opened once, to translate file offsets for `debug_file`.
    translator: Option<blazesym::helper::ElfResolver>,
    /// The binary mapped read-only, for its program headers and Go's `.gopclntab`.
    map: Option<memmap2::Mmap>,
    /// Go's function table, when the binary has one (names stripped Go binaries).
    go: Option<GoTable>,
    addrs: HashMap<u64, Lines>,
    /// Not parsed (too large, or a parser panicked on it): its addresses stay unnamed.
    skipped: bool,
    /// Its path, for messages.
    name: Box<str>,
}

impl Object {
    /// The path blazesym opens: our own descriptor, valid as long as `file` is.
    fn path(&self) -> PathBuf {
        fd_path(&self.file)
    }
}

/// Symbol look-ups and their caches.
pub struct Symbols {
    symbolizer: Symbolizer,
    debug_dirs: Vec<PathBuf>,
    objects: HashMap<FileKey, Object>,
    kernel: HashMap<u64, Lines>,
    strings: HashMap<Box<str>, Arc<str>>,
    /// A copy of /proc/kallsyms: blazesym caches parsed files by modification time, and the
    /// /proc file's changes on every read, which made it parse all kernel symbols every time.
    kallsyms: Option<File>,
    /// When the copy was taken: it is taken again when kernel addresses go unnamed (a module or
    /// BPF program loaded since), no sooner than `kallsyms_wait` after the last copy.
    kallsyms_at: Option<Instant>,
    /// Starts at [`KALLSYMS_REFRESH`] and doubles (up to an hour) each time a new copy names
    /// nothing more, so addresses no copy names do not cost a parse every time.
    kallsyms_wait: Duration,
    /// Kernel symbols have a symbolizer of their own, replaced with each copy: blazesym has no
    /// way to evict a kallsyms file it parsed.
    kernel_symbolizer: Symbolizer,
    /// Copies of /proc/kallsyms taken, the first included.
    pub kallsyms_reads: u64,
    empty: Lines,
    /// Go function tables found corrupt, and look-ups in them that met corrupt data.
    pub go_errors: u64,
    /// Look-ups answered from the cache.
    pub hits: u64,
    /// Look-ups that went to blazesym.
    pub misses: u64,
    /// Binaries not symbolized, by reason.
    pub skipped: SkippedBinaries,
}

impl Symbols {
    /// `debug_dirs` are searched for separate debug info (by build ID and debug link), in
    /// addition to blazesym's defaults (/usr/lib/debug, /lib/debug).
    pub fn new(debug_dirs: &[PathBuf]) -> Self {
        let mut dirs: Vec<PathBuf> = debug_dirs.to_vec();
        dirs.extend([PathBuf::from("/usr/lib/debug"), PathBuf::from("/lib/debug")]);
        let symbolizer = Symbolizer::builder()
            .enable_demangling(false)
            .enable_code_info(true)
            .enable_inlined_fns(true)
            .set_debug_dirs(Some(&dirs))
            .build();
        Self {
            symbolizer,
            debug_dirs: dirs,
            objects: HashMap::new(),
            kernel: HashMap::new(),
            strings: HashMap::new(),
            kallsyms: None,
            kallsyms_at: None,
            kallsyms_wait: KALLSYMS_REFRESH,
            kernel_symbolizer: Symbolizer::new(),
            kallsyms_reads: 0,
            empty: Arc::from(Vec::new()),
            go_errors: 0,
            hits: 0,
            misses: 0,
            skipped: SkippedBinaries::default(),
        }
    }

    /// Whether the binary `key` is already open.
    pub fn has_object(&self, key: &FileKey) -> bool {
        self.objects.contains_key(key)
    }

    /// Keeps `file` (the binary with this key, `name` in messages) open for later
    /// symbolization. A file over [`MAX_SYMBOLIZED_BYTES`], or one a parser panics on, is kept
    /// as skipped: counted, named in one line, and never parsed again.
    pub fn add_object(&mut self, key: FileKey, file: File, name: &Path) {
        // SAFETY: read-only; blazesym and the unwinder map the same binaries alike.
        let map = unsafe { memmap2::Mmap::map(&file) }.ok();
        let size = file.metadata().map_or(0, |m| m.len());
        let mut object = Object {
            file,
            build_id: String::new(),
            debug_file: None,
            translator: None,
            map,
            go: None,
            addrs: HashMap::new(),
            skipped: false,
            name: name.display().to_string().into(),
        };
        if size > MAX_SYMBOLIZED_BYTES {
            skip(&mut self.skipped, &mut object, Skip::TooLarge("it"));
        } else {
            let debug_dirs = &self.debug_dirs;
            let parsed = guarded(|| open_object(&mut object, debug_dirs));
            match parsed {
                Some(Ok(())) => {}
                Some(Err(Corrupt)) => self.go_errors += 1,
                None => skip(&mut self.skipped, &mut object, Skip::Panic),
            }
            let debug_size = object
                .debug_file
                .as_ref()
                .and_then(|path| std::fs::metadata(path).ok())
                .map_or(0, |m| m.len());
            if debug_size > MAX_SYMBOLIZED_BYTES {
                skip(
                    &mut self.skipped,
                    &mut object,
                    Skip::TooLarge("its debug file"),
                );
            }
        }
        self.objects.insert(key, object);
    }

    /// Runtime address minus ELF virtual address in a mapping of binary `key` that starts at
    /// `start`, at file offset `offset`; `None` when the binary is not open or no segment
    /// holds that offset.
    pub fn load_bias(&self, key: &FileKey, start: u64, offset: u64) -> Option<u64> {
        let map = self.objects.get(key)?.map.as_deref()?;
        profiler_unwind::load_bias(map, start, offset)
    }

    /// Whether an open binary has the hex build ID `id`.
    pub fn has_build_id(&self, id: &str) -> bool {
        self.objects.values().any(|o| o.build_id == id)
    }

    /// Hex build ID of binary `key`, or an empty string when it has none or is not open.
    pub fn build_id(&self, key: &FileKey) -> String {
        self.objects
            .get(key)
            .map(|o| o.build_id.clone())
            .unwrap_or_default()
    }

    /// Whether `offset` in binary `key` is cached; counts the hit or miss.
    pub fn is_cached(&mut self, key: &FileKey, offset: u64) -> bool {
        let cached = self
            .objects
            .get(key)
            .is_none_or(|o| o.addrs.contains_key(&offset));
        self.count(cached)
    }

    /// Whether kernel address `addr` is cached; counts the hit or miss.
    pub fn is_kernel_cached(&mut self, addr: u64) -> bool {
        let cached = self.kernel.contains_key(&addr);
        self.count(cached)
    }

    /// Counts a look-up as a hit or a miss and passes `cached` through.
    fn count(&mut self, cached: bool) -> bool {
        if cached {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
        cached
    }

    /// Symbolizes file offsets of binary `key` into the cache. A skipped binary's offsets are
    /// cached unnamed; a parser panic here skips the binary from now on.
    pub fn load_file_offsets(&mut self, key: &FileKey, offsets: &[u64]) {
        let Some(object) = self.objects.get_mut(key) else {
            return;
        };
        let named = match object.skipped {
            true => None,
            false => {
                let (symbolizer, strings, empty, go_errors) = (
                    &self.symbolizer,
                    &mut self.strings,
                    &self.empty,
                    &mut self.go_errors,
                );
                let object = &*object;
                guarded(|| symbolize_object(symbolizer, object, offsets, strings, empty, go_errors))
            }
        };
        let mut lines = named.unwrap_or_else(|| {
            skip(&mut self.skipped, object, Skip::Panic);
            Vec::new()
        });
        lines.resize(offsets.len(), self.empty.clone());
        for (offset, lines) in offsets.iter().zip(lines) {
            object.addrs.insert(*offset, lines);
        }
    }

    /// Symbolizes kernel addresses into the cache, from a copy of /proc/kallsyms, taken again
    /// when addresses go unnamed and the copy is old enough (see `kallsyms_wait`).
    pub fn load_kernel(&mut self, addrs: &[u64]) {
        if self.kallsyms_at.is_none() {
            self.refresh_kallsyms();
        }
        let mut results = symbolize_kernel(&self.kernel_symbolizer, self.kallsyms.as_ref(), addrs);
        let named = |results: &[Symbolized<'_>]| {
            results
                .iter()
                .filter(|r| matches!(r, Symbolized::Sym(_)))
                .count()
        };
        let before = named(&results);
        let due = self
            .kallsyms_at
            .is_some_and(|at| at.elapsed() >= self.kallsyms_wait);
        if before < addrs.len() && due {
            self.refresh_kallsyms();
            results = symbolize_kernel(&self.kernel_symbolizer, self.kallsyms.as_ref(), addrs);
            self.kallsyms_wait = if named(&results) > before {
                KALLSYMS_REFRESH
            } else {
                (self.kallsyms_wait * 2).min(Duration::from_secs(3600))
            };
        }
        let lines: Vec<Lines> = (0..addrs.len())
            .map(|i| {
                results
                    .get(i)
                    .map(|r| to_lines(r, &mut self.strings, &self.empty))
                    .unwrap_or_else(|| self.empty.clone())
            })
            .collect();
        for (addr, lines) in addrs.iter().zip(lines) {
            self.kernel.insert(*addr, lines);
        }
    }

    /// Takes a new copy of /proc/kallsyms; addresses the old one left unnamed are looked up
    /// again when next sampled.
    fn refresh_kallsyms(&mut self) {
        self.kernel_symbolizer = Symbolizer::builder().enable_demangling(false).build();
        self.kallsyms = kallsyms_snapshot();
        self.kallsyms_at = Some(Instant::now());
        self.kallsyms_reads += 1;
        self.kernel.retain(|_, lines| !lines.is_empty());
    }
}

/// Why a binary is not symbolized.
#[derive(Clone, Copy)]
enum Skip {
    /// This file (the binary, or its debug file) is over [`MAX_SYMBOLIZED_BYTES`].
    TooLarge(&'static str),
    /// A parser panicked on it.
    Panic,
}

/// Marks `object` skipped, counts it by reason and says so in one line, once.
fn skip(skipped: &mut SkippedBinaries, object: &mut Object, reason: Skip) {
    if object.skipped {
        return;
    }
    object.skipped = true;
    let why = match reason {
        Skip::TooLarge(what) => {
            skipped.too_large += 1;
            format!("{what} is larger than 1 GiB")
        }
        Skip::Panic => {
            skipped.panics += 1;
            "a parser panicked on it".to_owned()
        }
    };
    eprintln!(
        "warning: not symbolizing {}: {why}; its frames show as file+0xADDR",
        object.name
    );
}

/// The functions at each of `offsets` in `object`, from its symbols and DWARF (or its debug
/// file's), then from Go's table for what those left unnamed.
fn symbolize_object(
    symbolizer: &Symbolizer,
    object: &Object,
    offsets: &[u64],
    strings: &mut HashMap<Box<str>, Arc<str>>,
    empty: &Lines,
    go_errors: &mut u64,
) -> Vec<Lines> {
    let results = match &object.debug_file {
        Some(debug_file) => {
            // The debug file has the binary's addresses but not its file layout: translate
            // file offsets to virtual ones through the binary's program headers.
            let virt = to_virtual_offsets(object.translator.as_ref(), offsets);
            let source = Source::Elf(Elf::new(debug_file));
            let mut results = symbolizer
                .symbolize(&source, Input::VirtOffset(&virt))
                .unwrap_or_default();
            for (result, addr) in results.iter_mut().zip(&virt) {
                if *addr == 0 {
                    *result = Symbolized::Unknown(blazesym::symbolize::Reason::InvalidFileOffset);
                }
            }
            results
        }
        None => {
            let source = Source::Elf(Elf::new(object.path()));
            symbolizer
                .symbolize(&source, Input::FileOffset(offsets))
                .unwrap_or_default()
        }
    };
    let mut lines: Vec<Lines> = results
        .iter()
        .map(|result| to_lines(result, strings, empty))
        .collect();
    lines.resize(offsets.len(), empty.clone());
    if let (Some(go), Some(map)) = (&object.go, object.map.as_deref()) {
        // Go's own table names what the symbol table and DWARF (stripped) did not.
        for (lines, offset) in lines.iter_mut().zip(offsets) {
            if !lines.is_empty() {
                continue;
            }
            match go.lookup(map, go.virtual_address(*offset)) {
                Ok(Some(found)) => *lines = go_lines(&found, strings),
                Ok(None) => {}
                Err(Corrupt) => *go_errors += 1,
            }
        }
    }
    lines
}

/// Reads what symbolizing `object` needs up front: its Go function table, build ID and, by
/// that, separate debug info. `Err` for a corrupt Go table (the rest is still read).
fn open_object(object: &mut Object, debug_dirs: &[PathBuf]) -> Result<(), Corrupt> {
    let go = object.map.as_deref().map(GoTable::parse);
    object.build_id = blazesym::helper::read_elf_build_id(&object.path())
        .ok()
        .flatten()
        .map(|id| hex(&id))
        .unwrap_or_default();
    if object.build_id.len() > 2 {
        let (head, rest) = object.build_id.split_at(2);
        object.debug_file = debug_dirs
            .iter()
            .map(|dir| {
                dir.join(".build-id")
                    .join(head)
                    .join(format!("{rest}.debug"))
            })
            .find(|path| path.exists());
        if object.debug_file.is_some() {
            // No debug dirs: only the program headers are wanted, not the debug info.
            object.translator = blazesym::helper::ElfResolver::open_with_debug_dirs(
                object.path(),
                Vec::<PathBuf>::new(),
            )
            .ok();
        }
    }
    match go {
        Some(Ok(table)) => {
            object.go = table;
            Ok(())
        }
        Some(Err(Corrupt)) => Err(Corrupt),
        None => Ok(()),
    }
}

/// Runs one binary's parsing; `None` when it panicked. A parser's panic (ours or a
/// dependency's) costs that binary its names, never the profiler.
fn guarded<T>(parse: impl FnOnce() -> T) -> Option<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(parse)).ok()
}

/// Kernel addresses symbolized by `symbolizer` from the kallsyms copy `kallsyms`.
fn symbolize_kernel<'a>(
    symbolizer: &'a Symbolizer,
    kallsyms: Option<&File>,
    addrs: &[u64],
) -> Vec<Symbolized<'a>> {
    {
        let kallsyms = match kallsyms {
            Some(file) => blazesym::MaybeDefault::Some(fd_path(file)),
            None => blazesym::MaybeDefault::Default,
        };
        let kernel = Kernel {
            kallsyms,
            vmlinux: blazesym::MaybeDefault::None,
            // kallsyms holds run-time addresses; no KASLR offset applies (and /proc/kcore, from
            // which blazesym would read one, may not exist).
            kaslr_offset: Some(0),
            debug_syms: false,
            ..Default::default()
        };
        symbolizer
            .symbolize(&Source::Kernel(kernel), Input::AbsAddr(addrs))
            .unwrap_or_default()
    }
}

impl Symbols {
    /// The cached functions at `offset` in binary `key` (empty when unknown).
    pub fn file_lines(&self, key: &FileKey, offset: u64) -> Lines {
        self.objects
            .get(key)
            .and_then(|o| o.addrs.get(&offset))
            .cloned()
            .unwrap_or_else(|| self.empty.clone())
    }

    /// The cached functions at kernel address `addr` (empty when unknown).
    pub fn kernel_lines(&self, addr: u64) -> Lines {
        self.kernel
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| self.empty.clone())
    }

    /// Closes every binary whose key is not in `keep`, with its cached symbols.
    /// blazesym's own caches of those binaries are evicted too, so memory follows the binaries
    /// in use, not every binary ever seen.
    pub fn retain_objects(&mut self, keep: &std::collections::HashSet<FileKey>) {
        use blazesym::symbolize::evict::{Elf as EvictElf, Evict};
        let gone: Vec<FileKey> = self
            .objects
            .keys()
            .filter(|key| !keep.contains(key))
            .copied()
            .collect();
        for key in gone {
            let Some(object) = self.objects.remove(&key) else {
                continue;
            };
            // Evict while the descriptor is still open: its number will be reused.
            for path in std::iter::once(object.path()).chain(object.debug_file.clone()) {
                let _ = self.symbolizer.evict(&Evict::Elf(EvictElf::new(path)));
            }
        }
    }

    /// Number of binaries open.
    pub fn objects(&self) -> usize {
        self.objects.len()
    }
}

/// A path to an open file that stays valid for as long as the file is open.
fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// /proc/kallsyms copied into an unnamed temporary file (on disk, so it does not count towards
/// our memory), else into an anonymous in-memory file when no temporary directory is writable
/// (a read-only root filesystem); `None` when /proc/kallsyms cannot be read.
fn kallsyms_snapshot() -> Option<File> {
    use std::os::fd::FromRawFd as _;
    let mut source = File::open("/proc/kallsyms").ok()?;
    let mut copy = tempfile::tempfile().ok().or_else(|| {
        // SAFETY: memfd_create returns a new descriptor that nothing else owns.
        let fd = unsafe { libc::memfd_create(c"kallsyms".as_ptr(), libc::MFD_CLOEXEC) };
        (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
    })?;
    std::io::copy(&mut source, &mut copy).ok()?;
    Some(copy)
}

/// Virtual offsets of `offsets` in `binary`; 0 where an offset maps to no segment.
fn to_virtual_offsets(binary: Option<&blazesym::helper::ElfResolver>, offsets: &[u64]) -> Vec<u64> {
    use blazesym::symbolize::TranslateFileOffset as _;
    let Some(binary) = binary else {
        return vec![0; offsets.len()];
    };
    offsets
        .iter()
        .map(|off| {
            binary
                .file_offset_to_virt_offset(*off)
                .ok()
                .flatten()
                .unwrap_or(0)
        })
        .collect()
}

fn intern(strings: &mut HashMap<Box<str>, Arc<str>>, text: &str) -> Arc<str> {
    if let Some(s) = strings.get(text) {
        return s.clone();
    }
    let s: Arc<str> = Arc::from(text);
    strings.insert(Box::from(text), s.clone());
    s
}

fn to_lines(
    result: &Symbolized<'_>,
    strings: &mut HashMap<Box<str>, Arc<str>>,
    empty: &Lines,
) -> Lines {
    let Symbolized::Sym(sym) = result else {
        return empty.clone();
    };
    let mut lines = Vec::with_capacity(sym.inlined.len() + 1);
    let mut line = |name: &str, info: Option<&blazesym::symbolize::CodeInfo<'_>>| Line {
        function: intern(strings, &demangle(name)),
        file: info.map(|info| {
            let path = info.to_path();
            intern(strings, &path.to_string_lossy())
        }),
        line: info.and_then(|info| info.line).unwrap_or(0),
    };
    for inlined in sym.inlined.iter().rev() {
        lines.push(line(&inlined.name, inlined.code_info.as_ref()));
    }
    lines.push(line(&sym.name, sym.code_info.as_deref()));
    Arc::from(lines)
}

/// Lines from Go's table, which are already in pprof's order and need no demangling.
fn go_lines(found: &[GoLine<'_>], strings: &mut HashMap<Box<str>, Arc<str>>) -> Lines {
    found
        .iter()
        .map(|l| Line {
            function: intern(strings, l.function),
            file: l.file.map(|f| intern(strings, f)),
            line: l.line,
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The running kernel's build ID, from the ELF notes in /sys/kernel/notes.
pub fn kernel_build_id() -> String {
    let Ok(notes) = std::fs::read("/sys/kernel/notes") else {
        return String::new();
    };
    let mut rest = notes.as_slice();
    const NT_GNU_BUILD_ID: u32 = 3;
    let word = |b: &[u8]| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    let align = |n: usize| n.div_ceil(4) * 4;
    while rest.len() >= 12 {
        let (namesz, descsz, kind) = (
            word(rest) as usize,
            word(&rest[4..]) as usize,
            word(&rest[8..]),
        );
        let desc_start = 12 + align(namesz);
        let end = desc_start + align(descsz);
        if rest.len() < desc_start + descsz {
            break;
        }
        if kind == NT_GNU_BUILD_ID && rest[12..12 + namesz].starts_with(b"GNU") {
            return hex(&rest[desc_start..desc_start + descsz]);
        }
        rest = rest.get(end..).unwrap_or_default();
    }
    String::new()
}

/// The file name at the end of `path`, for frames no symbol covers.
pub fn basename(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use std::{fs::File, path::Path};

    use super::{guarded, skip, Skip, Symbols};

    #[inline(never)]
    #[unsafe(no_mangle)]
    pub extern "C" fn symbol_cache_target(x: u64) -> u64 {
        x.wrapping_mul(31).rotate_left(7)
    }

    /// File offset of `addr` in this test binary, from /proc/self/maps.
    fn self_file_offset(addr: u64) -> (super::FileKey, u64) {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        for line in maps.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (start, end) = fields[0].split_once('-').unwrap();
            let (start, end) = (
                u64::from_str_radix(start, 16).unwrap(),
                u64::from_str_radix(end, 16).unwrap(),
            );
            if (start..end).contains(&addr) {
                let offset = u64::from_str_radix(fields[2], 16).unwrap();
                let key = super::FileKey::of(std::path::Path::new("/proc/self/exe")).unwrap();
                return (key, addr - start + offset);
            }
        }
        panic!("address not mapped");
    }

    /// Symbols holding this test binary, its key and the file offset of
    /// `symbol_cache_target`.
    fn symbols_with_self() -> (Symbols, super::FileKey, u64) {
        let (key, offset) = self_file_offset(symbol_cache_target as *const () as u64);
        let mut symbols = Symbols::new(&[]);
        symbols.add_object(
            key,
            File::open("/proc/self/exe").unwrap(),
            Path::new("/proc/self/exe"),
        );
        (symbols, key, offset)
    }

    #[test]
    fn a_parser_panic_skips_that_binary_once_and_counts_it() {
        assert_eq!(guarded(|| 7), Some(7));
        // The panic hook still prints its line; the boundary turns the panic into None.
        assert_eq!(guarded(|| -> u32 { panic!("a parser bug") }), None);

        let (mut symbols, key, offset) = symbols_with_self();
        let object = symbols.objects.get_mut(&key).unwrap();
        skip(&mut symbols.skipped, object, Skip::Panic);
        skip(&mut symbols.skipped, object, Skip::Panic);
        assert_eq!(symbols.skipped.panics, 1, "counted once per binary");
        // A skipped binary's addresses are cached unnamed, without parsing it.
        symbols.load_file_offsets(&key, &[offset]);
        assert!(symbols.is_cached(&key, offset));
        assert!(symbols.file_lines(&key, offset).is_empty());
    }

    #[test]
    fn symbolizes_once_then_answers_from_the_cache() {
        std::hint::black_box(symbol_cache_target(3));
        let (mut symbols, key, offset) = symbols_with_self();
        assert!(
            !symbols.build_id(&key).is_empty(),
            "the test binary has a build ID"
        );

        assert!(!symbols.is_cached(&key, offset));
        symbols.load_file_offsets(&key, &[offset]);
        let lines = symbols.file_lines(&key, offset);
        assert_eq!(
            lines.last().unwrap().function.as_ref(),
            "symbol_cache_target"
        );
        assert!(
            lines.last().unwrap().line > 0,
            "DWARF line numbers: {lines:?}"
        );

        assert!(symbols.is_cached(&key, offset));
        assert_eq!((symbols.hits, symbols.misses), (1, 1));
        // An unknown binary is reported as cached (nothing to look up) and yields no lines.
        let unknown = super::FileKey { ino: 1, ..key };
        assert!(symbols.file_lines(&unknown, offset).is_empty());
    }

    #[test]
    fn kernel_addresses_symbolize_from_kallsyms() {
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        let Some(addr) = kallsyms.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let _kind = f.next()?;
            (f.next()? == "schedule" && addr != 0).then_some(addr)
        }) else {
            eprintln!("skipped: kernel addresses are hidden (not root)");
            return;
        };
        let mut symbols = Symbols::new(&[]);
        symbols.load_kernel(&[addr + 1]);
        assert_eq!(
            symbols
                .kernel_lines(addr + 1)
                .last()
                .unwrap()
                .function
                .as_ref(),
            "schedule"
        );
    }
}
