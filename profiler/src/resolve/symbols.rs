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
    source::{Elf, Source},
    Input, Symbolized, Symbolizer,
};

use profiler_unwind::{debug_file, DebugSearch};

use super::{
    demangle::demangle,
    gopclntab::{Corrupt, GoLine, GoTable},
    kallsyms::Kallsyms,
    process::FileKey,
};
use crate::{
    deadline::{self, Outcome},
    in_root::{self, ProcessRoot},
    truncation,
};

/// The soonest /proc/kallsyms is copied again for kernel addresses it did not name.
const KALLSYMS_REFRESH: Duration = Duration::from_secs(30);

/// Largest binary the symbolizer parses: blazesym builds its DWARF indices in memory, so one
/// huge file could take the agent's whole memory limit. A larger debug file is not used.
const MAX_SYMBOLIZED_BYTES: u64 = profiler_unwind::debug_file::MAX_DEBUG_FILE_BYTES;

/// How long a binary's parsed symbols are kept after its last look-up that missed the cache.
/// Once its hot addresses are cached, the parse (blazesym's indices, and its pages of the file
/// mapped) is memory the agent keeps for nothing: it is dropped, and parsed again should a new
/// address come, at most once per this period per binary.
pub const DEFAULT_SYMBOLS_IDLE: Duration = Duration::from_secs(60);

/// Binaries left unnamed on purpose, by reason: their frames show as `file+0xADDR`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SkippedBinaries {
    /// Over [`MAX_SYMBOLIZED_BYTES`].
    pub too_large: u64,
    /// A parser (blazesym, gimli, or our Go table reader) panicked on it: caught, and the
    /// binary is not parsed again.
    pub panics: u64,
    /// The file was truncated while mapped (see [`crate::truncation`]).
    pub truncated: u64,
    /// Parsing it took longer than `--parse-timeout` (see [`crate::deadline`]).
    pub timeouts: u64,
    /// blazesym could not read it at all, and it has no Go table.
    pub parse_errors: u64,
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
    /// `None` only in the stand-in for a binary whose parse was lost (see `Symbols::settle`).
    file: Option<File>,
    build_id: String,
    /// Whether blazesym may read the binary's DWARF: not when the binary names other files
    /// (a debug link, a dwz file), which blazesym would open on the host's paths.
    dwarf: bool,
    /// Its separate debug file, found by us inside the process's root (blazesym is never
    /// left to follow a link), and whether blazesym may read its DWARF.
    debug: Option<(File, bool)>,
    /// The binary mapped read-only, for its program headers and Go's `.gopclntab`.
    map: Option<memmap2::Mmap>,
    /// Go's function table, when the binary has one (names stripped Go binaries).
    go: Option<GoTable>,
    addrs: HashMap<u64, Lines>,
    /// Not parsed (too large, or a parser panicked on it): its addresses stay unnamed.
    skipped: bool,
    /// Its path, for messages.
    name: Box<str>,
    /// Its own symbolizer, which moves with it to the thread that parses it.
    symbolizer: OwnSymbolizer,
    /// When `symbolizer` last parsed or looked up something; `None` while it holds nothing.
    used_at: Option<Instant>,
    /// Not opened yet, because the parse threads were saturated when it came
    /// (`deadline::saturated`): opened with its first look-up, inside this root.
    pending: Option<Option<ProcessRoot>>,
}

impl Object {
    fn new(file: Option<File>, map: Option<memmap2::Mmap>, name: &str) -> Object {
        Object {
            file,
            build_id: String::new(),
            dwarf: false,
            debug: None,
            map,
            go: None,
            addrs: HashMap::new(),
            skipped: false,
            name: name.into(),
            symbolizer: OwnSymbolizer::new(),
            used_at: None,
            pending: None,
        }
    }
}

/// A blazesym symbolizer for one binary. Parsing runs on a thread of its own, with a deadline
/// (`crate::deadline`), and blazesym's `Symbolizer` is not `Send` only for the `Rc`s it keeps.
struct OwnSymbolizer(Symbolizer);

// SAFETY: every `Rc` inside a `Symbolizer` is created by it and stays inside it (what it returns
// borrows from it and is turned into owned lines before the call that got it ends), and the
// symbolizer moves only whole, with its `Object`, to one thread at a time: all clones of each
// `Rc` move together and are never used from two threads.
unsafe impl Send for OwnSymbolizer {}

impl OwnSymbolizer {
    fn new() -> OwnSymbolizer {
        OwnSymbolizer(
            Symbolizer::builder()
                .enable_demangling(false)
                .enable_code_info(true)
                .enable_inlined_fns(true)
                // A binary is keyed by its identity and read through our own descriptor: it
                // never changes under a key, so checking it on every look-up would only cost a
                // stat.
                .enable_auto_reload(false)
                // Links are never followed by blazesym (see `Object::dwarf`).
                .set_debug_dirs(Some(Vec::<PathBuf>::new()))
                .build(),
        )
    }
}

/// Symbol look-ups and their caches.
pub struct Symbols {
    /// The user's own directories of debug files (`--debug-dir`).
    debug_dirs: Vec<PathBuf>,
    /// Longest one binary's parse may take (`--parse-timeout`).
    parse_timeout: Duration,
    objects: HashMap<FileKey, Object>,
    kernel: HashMap<u64, Lines>,
    strings: HashMap<Box<str>, Arc<str>>,
    /// A copy of /proc/kallsyms, indexed: the /proc file changes with every module or BPF
    /// program load, and reading it whole for every batch would cost a parse each time.
    kallsyms: Option<Kallsyms>,
    /// When the copy was taken: it is taken again when kernel addresses go unnamed (a module or
    /// BPF program loaded since), no sooner than `kallsyms_wait` after the last copy.
    kallsyms_at: Option<Instant>,
    /// Starts at [`KALLSYMS_REFRESH`] and doubles (up to an hour) each time a new copy names
    /// nothing more, so addresses no copy names do not cost a parse every time.
    kallsyms_wait: Duration,
    /// Parsed symbols unused this long are dropped (see [`DEFAULT_SYMBOLS_IDLE`]).
    idle: Duration,
    /// Parses dropped for being idle.
    pub released: u64,
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
    /// `debug_dirs` are searched for separate debug info (by build ID and debug link) before
    /// the process root's own /usr/lib/debug and /lib/debug.
    pub fn new(debug_dirs: &[PathBuf]) -> Self {
        Self {
            debug_dirs: debug_dirs.to_vec(),
            parse_timeout: deadline::DEFAULT,
            objects: HashMap::new(),
            kernel: HashMap::new(),
            strings: HashMap::new(),
            kallsyms: None,
            kallsyms_at: None,
            kallsyms_wait: KALLSYMS_REFRESH,
            idle: DEFAULT_SYMBOLS_IDLE,
            released: 0,
            kallsyms_reads: 0,
            empty: Arc::from(Vec::new()),
            go_errors: 0,
            hits: 0,
            misses: 0,
            skipped: SkippedBinaries::default(),
        }
    }

    /// Parses of one binary taking longer than `timeout` are abandoned and the binary skipped.
    pub fn set_parse_timeout(&mut self, timeout: Duration) {
        self.parse_timeout = timeout;
    }

    /// Parsed symbols unused for `idle` are dropped by [`Symbols::release_idle`].
    pub fn set_idle(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// Drops every parse not used for the idle period: the binaries stay open and their cached
    /// addresses stay named; only a new address parses the binary again.
    pub fn release_idle(&mut self) {
        let idle = self.idle;
        for object in self.objects.values_mut() {
            if object.used_at.is_some_and(|at| at.elapsed() >= idle) {
                object.symbolizer = OwnSymbolizer::new();
                object.used_at = None;
                self.released += 1;
            }
        }
    }

    /// Whether the binary `key` is already open.
    pub fn has_object(&self, key: &FileKey) -> bool {
        self.objects.contains_key(key)
    }

    /// Keeps `file` (the binary with this key, at `name` in its process's `root`) open for
    /// later symbolization; its debug file is looked for now, inside `root` (and in the
    /// `--debug-dir`s). A file over [`MAX_SYMBOLIZED_BYTES`], or one whose parse panics, runs
    /// past the deadline or meets a truncated file, is kept as skipped: counted, named in one
    /// line, and never parsed again.
    pub fn add_object(&mut self, key: FileKey, file: File, name: &Path, root: Option<ProcessRoot>) {
        // SAFETY: read-only; a file truncated under it is the SIGBUS guard's to handle.
        let map = unsafe { memmap2::Mmap::map(&file) }.ok();
        let size = file.metadata().map_or(0, |m| m.len());
        let name = name.display().to_string();
        let mut object = Object::new(Some(file), map, &name);
        if size > MAX_SYMBOLIZED_BYTES {
            skip(&mut self.skipped, &mut object, Skip::TooLarge);
            self.objects.insert(key, object);
            return;
        }
        // Cheap and needed at once (for the mappings of the process being read): on this thread.
        if let Some(elf) = object
            .map
            .as_deref()
            .and_then(|map| object::File::parse(map).ok())
        {
            use object::Object as _;
            object.build_id = elf.build_id().ok().flatten().map(hex).unwrap_or_default();
        }
        if deadline::saturated() {
            object.pending = Some(root);
            self.objects.insert(key, object);
            return;
        }
        let own_dirs = self.debug_dirs.clone();
        let watch = truncation::Watch::start();
        let outcome = deadline::run(self.parse_timeout, move || {
            let opened = open_object(&mut object, root, &own_dirs, key);
            (object, opened)
        });
        let (object, opened) = self.settle(outcome, &watch, &name);
        if let Some(Err(Corrupt)) = opened {
            self.go_errors += 1;
        }
        self.objects.insert(key, object);
    }

    /// The object back from a parse on another thread, with what the parse returned; or, when
    /// the parse panicked or ran past the deadline, a stand-in marked skipped (the object itself
    /// stays with the abandoned thread). A parse that met a truncated file skips the object.
    fn settle<T>(
        &mut self,
        outcome: Outcome<(Object, T)>,
        watch: &truncation::Watch,
        name: &str,
    ) -> (Object, Option<T>) {
        let (mut object, result, reason) = match outcome {
            Outcome::Done((object, result)) => (object, Some(result), None),
            Outcome::Panicked => (Object::new(None, None, name), None, Some(Skip::Panic)),
            Outcome::TimedOut => (Object::new(None, None, name), None, Some(Skip::Timeout)),
        };
        let reason = match watch.truncated() {
            true => Some(Skip::Truncated),
            false => reason,
        };
        match reason {
            Some(reason) => {
                skip(&mut self.skipped, &mut object, reason);
                (object, None)
            }
            None => (object, result),
        }
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

    /// Symbolizes file offsets of binary `key` into the cache, on a thread of its own with a
    /// deadline. A skipped binary's offsets are cached unnamed; a parse that panics, runs late
    /// or meets a truncated file skips the binary from now on.
    pub fn load_file_offsets(&mut self, key: &FileKey, offsets: &[u64]) {
        let Some(object) = self.objects.remove(key) else {
            return;
        };
        if !object.skipped && deadline::saturated() {
            // Nothing cached: looked up again at the next drain, when a thread may be free.
            self.objects.insert(*key, object);
            return;
        }
        let (mut object, mut lines) = match object.skipped {
            true => (object, Vec::new()),
            false => {
                let strings = std::mem::take(&mut self.strings);
                let (wanted, empty) = (offsets.to_vec(), self.empty.clone());
                let (own_dirs, name) = (self.debug_dirs.clone(), object.name.to_string());
                let key = *key;
                let watch = truncation::Watch::start();
                let outcome = deadline::run(self.parse_timeout, move || {
                    let (mut object, mut strings) = (object, strings);
                    let mut go_errors = 0;
                    if let Some(root) = object.pending.take() {
                        if open_object(&mut object, root, &own_dirs, key).is_err() {
                            go_errors += 1;
                        }
                    }
                    let lines =
                        symbolize_object(&object, &wanted, &mut strings, &empty, &mut go_errors);
                    (object, (lines, strings, go_errors))
                });
                match self.settle(outcome, &watch, &name) {
                    (object, Some((Some(lines), strings, go_errors))) => {
                        self.strings = strings;
                        self.go_errors += go_errors;
                        (object, lines)
                    }
                    (mut object, Some((None, strings, _))) => {
                        self.strings = strings;
                        skip(&mut self.skipped, &mut object, Skip::ParseError);
                        (object, Vec::new())
                    }
                    // The interned names went with the parse: the cache starts again.
                    (object, None) => (object, Vec::new()),
                }
            }
        };
        lines.resize(offsets.len(), self.empty.clone());
        for (offset, lines) in offsets.iter().zip(lines) {
            object.addrs.insert(*offset, lines);
        }
        if !object.skipped {
            object.used_at = Some(Instant::now());
        }
        self.objects.insert(*key, object);
    }

    /// Symbolizes kernel addresses into the cache, from a copy of /proc/kallsyms, taken again
    /// when addresses go unnamed and the copy is old enough (see `kallsyms_wait`).
    pub fn load_kernel(&mut self, addrs: &[u64]) {
        if self.kallsyms_at.is_none() {
            self.refresh_kallsyms();
        }
        let functions = |kallsyms: &Option<Kallsyms>| -> Vec<Option<String>> {
            addrs
                .iter()
                .map(|addr| kallsyms.as_ref()?.function(*addr))
                .collect()
        };
        let mut names = functions(&self.kallsyms);
        let before = names.iter().flatten().count();
        let due = self
            .kallsyms_at
            .is_some_and(|at| at.elapsed() >= self.kallsyms_wait);
        if before < addrs.len() && due {
            self.refresh_kallsyms();
            names = functions(&self.kallsyms);
            self.kallsyms_wait = if names.iter().flatten().count() > before {
                KALLSYMS_REFRESH
            } else {
                (self.kallsyms_wait * 2).min(Duration::from_secs(3600))
            };
        }
        for (addr, name) in addrs.iter().zip(names) {
            let lines = match name {
                Some(name) => Arc::from(vec![Line {
                    function: intern(&mut self.strings, &demangle(&name)),
                    file: None,
                    line: 0,
                }]),
                None => self.empty.clone(),
            };
            self.kernel.insert(*addr, lines);
        }
    }

    /// Takes a new copy of /proc/kallsyms; addresses the old one left unnamed are looked up
    /// again when next sampled.
    fn refresh_kallsyms(&mut self) {
        self.kallsyms = Kallsyms::snapshot();
        self.kallsyms_at = Some(Instant::now());
        self.kallsyms_reads += 1;
        self.kernel.retain(|_, lines| !lines.is_empty());
    }
}

/// Why a binary is not symbolized.
#[derive(Clone, Copy)]
enum Skip {
    /// The binary is over [`MAX_SYMBOLIZED_BYTES`].
    TooLarge,
    /// A parser panicked on it.
    Panic,
    /// It was truncated while mapped.
    Truncated,
    /// Its parse ran past `--parse-timeout`.
    Timeout,
    /// blazesym could not read it (and it has no Go table).
    ParseError,
}

/// Marks `object` skipped, counts it by reason and says so in one line, once.
fn skip(skipped: &mut SkippedBinaries, object: &mut Object, reason: Skip) {
    if object.skipped {
        return;
    }
    object.skipped = true;
    let why = match reason {
        Skip::TooLarge => {
            skipped.too_large += 1;
            "it is larger than 1 GiB".to_owned()
        }
        Skip::Panic => {
            skipped.panics += 1;
            "a parser panicked on it".to_owned()
        }
        Skip::Truncated => {
            skipped.truncated += 1;
            "it was truncated while being read".to_owned()
        }
        Skip::Timeout => {
            skipped.timeouts += 1;
            "parsing it took longer than --parse-timeout".to_owned()
        }
        Skip::ParseError => {
            skipped.parse_errors += 1;
            "it is not an ELF file the symbolizer can read".to_owned()
        }
    };
    eprintln!(
        "warning: not symbolizing {}: {why}; its frames show as file+0xADDR",
        object.name
    );
}

/// The functions at each of `offsets` in `object`, from its symbols and DWARF (or its debug
/// file's), then from Go's table for what those left unnamed. `None` when blazesym cannot read
/// the file at all and there is no Go table either: a parse error.
fn symbolize_object(
    object: &Object,
    offsets: &[u64],
    strings: &mut HashMap<Box<str>, Arc<str>>,
    empty: &Lines,
    go_errors: &mut u64,
) -> Option<Vec<Lines>> {
    let symbolizer = &object.symbolizer.0;
    let results = match (&object.debug, object.map.as_deref()) {
        (Some((debug, dwarf)), Some(map)) => {
            // The debug file has the binary's addresses but not its file layout: translate
            // file offsets to virtual ones through the binary's program headers.
            let virt: Vec<u64> = profiler_unwind::virtual_addresses(map, offsets)
                .into_iter()
                .map(|addr| addr.unwrap_or(0))
                .collect();
            let mut source = Elf::new(fd_path(debug));
            source.debug_syms = *dwarf;
            let mut results = symbolizer.symbolize(&Source::Elf(source), Input::VirtOffset(&virt));
            for (result, addr) in results.iter_mut().flatten().zip(&virt) {
                if *addr == 0 {
                    *result = Symbolized::Unknown(blazesym::symbolize::Reason::InvalidFileOffset);
                }
            }
            results
        }
        _ => {
            let Some(file) = &object.file else {
                return Some(vec![empty.clone(); offsets.len()]);
            };
            let mut source = Elf::new(fd_path(file));
            source.debug_syms = object.dwarf;
            symbolizer.symbolize(&Source::Elf(source), Input::FileOffset(offsets))
        }
    };
    if results.is_err() && object.go.is_none() {
        return None;
    }
    let mut lines: Vec<Lines> = results
        .unwrap_or_default()
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
    Some(lines)
}

/// Reads what symbolizing `object` (binary `key`) needs up front: its Go function table,
/// whether blazesym may read its DWARF, and its separate debug file, looked for inside `root`
/// and in `own_dirs`. `Err` for a corrupt Go table (the rest is still read).
fn open_object(
    object: &mut Object,
    root: Option<ProcessRoot>,
    own_dirs: &[PathBuf],
    key: FileKey,
) -> Result<(), Corrupt> {
    let open_in_root = in_root::opener(root);
    let path = PathBuf::from(&*object.name);
    let search = DebugSearch {
        path: &path,
        open_in_root: &open_in_root,
        own_dirs,
        binary: Some((key.dev, key.ino)),
    };
    let Some(map) = object.map.as_deref() else {
        return Ok(());
    };
    let go = GoTable::parse(map);
    let elf = object::File::parse(map);
    // What is not ELF to `object` names no other file either: blazesym may try its DWARF.
    object.dwarf = !elf.as_ref().is_ok_and(debug_file::links_elsewhere);
    if let Ok(elf) = elf {
        object.debug = debug_file::find(&elf, &search).map(|found| {
            // SAFETY: read-only, dropped before returning.
            let dwarf = unsafe { memmap2::Mmap::map(&found.file) }.is_ok_and(|debug| {
                !object::File::parse(&debug[..])
                    .is_ok_and(|debug| debug_file::links_elsewhere(&debug))
            });
            (found.file, dwarf)
        });
    }
    match go {
        Ok(table) => {
            object.go = table;
            Ok(())
        }
        Err(Corrupt) => Err(Corrupt),
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

    /// Closes every binary whose key is not in `keep`, with its cached symbols and its
    /// symbolizer's, so memory follows the binaries in use, not every binary ever seen.
    pub fn retain_objects(&mut self, keep: &std::collections::HashSet<FileKey>) {
        self.objects.retain(|key, _| keep.contains(key));
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

    use super::{skip, Skip, Symbols};
    use crate::in_root::ProcessRoot;

    #[inline(never)]
    #[unsafe(no_mangle)]
    pub extern "C" fn symbol_cache_target(x: u64) -> u64 {
        x.wrapping_mul(31).rotate_left(7)
    }

    #[inline(never)]
    #[unsafe(no_mangle)]
    pub extern "C" fn symbol_reparse_target(x: u64) -> u64 {
        x.wrapping_mul(17).rotate_right(5)
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
            ProcessRoot::open(std::process::id()).ok(),
        );
        (symbols, key, offset)
    }

    #[test]
    fn a_parser_panic_skips_that_binary_once_and_counts_it() {
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
    fn an_idle_parse_is_dropped_and_its_names_stay() {
        std::hint::black_box(symbol_reparse_target(3));
        let (mut symbols, key, offset) = symbols_with_self();
        let (_, later) = self_file_offset(symbol_reparse_target as *const () as u64);
        let function = |symbols: &Symbols, offset| {
            let lines = symbols.file_lines(&key, offset);
            lines.last().map(|l| l.function.to_string())
        };
        symbols.set_idle(std::time::Duration::from_secs(3600));
        symbols.load_file_offsets(&key, &[offset]);
        symbols.release_idle();
        assert_eq!(symbols.released, 0, "a parse in use is kept");

        symbols.set_idle(std::time::Duration::ZERO);
        symbols.release_idle();
        symbols.release_idle();
        assert_eq!(symbols.released, 1, "released once, until parsed again");
        assert!(symbols.objects[&key].used_at.is_none());
        assert_eq!(
            function(&symbols, offset).as_deref(),
            Some("symbol_cache_target"),
            "cached names outlive the parse"
        );
        // A new address parses the binary again.
        symbols.load_file_offsets(&key, &[later]);
        assert_eq!(
            function(&symbols, later).as_deref(),
            Some("symbol_reparse_target")
        );
        assert!(symbols.objects[&key].used_at.is_some());
    }

    /// A C binary with DWARF (`dir/app`, function `target_fn`) and its debug file split off
    /// (`dir/app.debug`), the binary stripped of debug info and given a debug link named
    /// `link` (with the right CRC); returns the binary and `target_fn`'s file offset.
    fn split_binary(dir: &Path, link: &str) -> (std::path::PathBuf, u64) {
        use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
        let run = |cmd: &mut std::process::Command| {
            let status = cmd.status().unwrap();
            assert!(status.success(), "{cmd:?}");
        };
        let source = dir.join("app.c");
        std::fs::write(
            &source,
            "int target_fn(int x) { return x * 3 + 1; }\nint main(int c, char **v) { return target_fn(c); }\n",
        )
        .unwrap();
        let full = dir.join("app.full");
        run(std::process::Command::new("gcc")
            .args(["-g", "-O0", "-o"])
            .arg(&full)
            .arg(&source));
        let debug = dir.join("app.debug");
        run(std::process::Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(&full)
            .arg(&debug));
        let crc = crc32fast::hash(&std::fs::read(&debug).unwrap());
        let mut section = link.as_bytes().to_vec();
        section.push(0);
        section.resize(section.len().div_ceil(4) * 4, 0);
        section.extend(crc.to_le_bytes());
        let section_file = dir.join("link.bin");
        std::fs::write(&section_file, section).unwrap();
        let app = dir.join("app");
        run(std::process::Command::new("objcopy")
            .arg("--strip-debug")
            .arg(format!(
                "--add-section=.gnu_debuglink={}",
                section_file.display()
            ))
            .arg(&full)
            .arg(&app));
        let data = std::fs::read(&app).unwrap();
        let elf = object::File::parse(&data[..]).unwrap();
        let addr = elf
            .symbols()
            .find(|s| s.name() == Ok("target_fn"))
            .unwrap()
            .address();
        let offset = elf
            .segments()
            .find_map(|seg| {
                let (start, size) = seg.file_range();
                (addr >= seg.address() && addr < seg.address() + size)
                    .then(|| start + addr - seg.address())
            })
            .unwrap();
        (app, offset)
    }

    /// `target_fn`'s lines in `app`, opened as a process whose root is `root` would have it
    /// at `/usr/bin/app`.
    fn lines_in_root(app: &Path, offset: u64, root: &Path) -> super::Lines {
        let root = ProcessRoot::at(root).ok();
        let file = File::open(app).unwrap();
        let key = super::FileKey::of_metadata(&file.metadata().unwrap());
        let mut symbols = Symbols::new(&[]);
        symbols.add_object(key, file, Path::new("/usr/bin/app"), root);
        symbols.load_file_offsets(&key, &[offset]);
        symbols.file_lines(&key, offset)
    }

    #[test]
    fn a_debug_link_is_followed_inside_the_process_root_only() {
        let host = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let bin_dir = root.path().join("usr/bin");
        std::fs::create_dir_all(&bin_dir).unwrap();

        // A plain link, its debug file beside the binary in the process's root: lines.
        let (app, offset) = split_binary(host.path(), "app.debug");
        std::fs::copy(host.path().join("app.debug"), bin_dir.join("app.debug")).unwrap();
        let lines = lines_in_root(&app, offset, root.path());
        assert_eq!(lines.last().unwrap().function.as_ref(), "target_fn");
        assert!(lines.last().unwrap().line > 0, "{lines:?}");

        // The same debug file only on the host, named by an absolute link: blazesym would
        // open it there by itself; we never let it, so only the symbol table names it.
        std::fs::remove_file(bin_dir.join("app.debug")).unwrap();
        let host_debug = host.path().join("app.debug");
        let (app, offset) = split_binary(host.path(), host_debug.to_str().unwrap());
        let lines = lines_in_root(&app, offset, root.path());
        assert_eq!(lines.last().unwrap().function.as_ref(), "target_fn");
        assert_eq!(
            lines.last().unwrap().line,
            0,
            "a host file was read: {lines:?}"
        );

        // A plain link whose `.debug/` is a symlink to the host's directory: resolved in the
        // root, it leads nowhere.
        let (app, offset) = split_binary(host.path(), "app.debug");
        std::os::unix::fs::symlink(host.path(), bin_dir.join(".debug")).unwrap();
        let lines = lines_in_root(&app, offset, root.path());
        assert_eq!(
            lines.last().unwrap().line,
            0,
            "a host file was read: {lines:?}"
        );
    }

    #[test]
    fn a_debug_link_to_the_binary_itself_is_not_taken_for_its_debug_file() {
        let dir = tempfile::tempdir().unwrap();
        let (app, offset) = split_binary(dir.path(), "app");
        let bin_dir = dir.path().join("usr/bin");
        std::fs::create_dir_all(&bin_dir).unwrap();
        std::fs::hard_link(&app, bin_dir.join("app")).unwrap();
        let file = File::open(&app).unwrap();
        let elf_data = std::fs::read(&app).unwrap();
        let elf = object::File::parse(&elf_data[..]).unwrap();
        let open = ProcessRoot::at(dir.path()).unwrap();
        let meta = std::os::unix::fs::MetadataExt::ino(&file.metadata().unwrap());
        let search = profiler_unwind::DebugSearch {
            path: Path::new("/usr/bin/app"),
            open_in_root: &|path: &Path| open.open_regular(path),
            own_dirs: &[],
            binary: Some((
                std::os::unix::fs::MetadataExt::dev(&file.metadata().unwrap()),
                meta,
            )),
        };
        // Same build ID, so only the identity check keeps it out.
        assert!(profiler_unwind::debug_file::find(&elf, &search).is_none());
        let lines = lines_in_root(&app, offset, dir.path());
        assert_eq!(lines.last().unwrap().function.as_ref(), "target_fn");
    }

    #[test]
    fn a_file_the_symbolizer_cannot_read_is_skipped_as_a_parse_error_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-elf");
        std::fs::write(&path, b"#!/bin/sh\necho this is not an ELF file\n").unwrap();
        let file = File::open(&path).unwrap();
        let key = super::FileKey::of_metadata(&file.metadata().unwrap());
        let mut symbols = Symbols::new(&[]);
        symbols.add_object(key, file, &path, None);
        symbols.load_file_offsets(&key, &[4]);
        symbols.load_file_offsets(&key, &[8]);
        assert_eq!(symbols.skipped.parse_errors, 1, "{:?}", symbols.skipped);
        assert!(symbols.file_lines(&key, 8).is_empty());
    }

    #[test]
    fn a_binary_truncated_while_mapped_is_skipped_and_counted() {
        crate::truncation::install();
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy");
        std::fs::copy("/proc/self/exe", &copy).unwrap();
        std::hint::black_box(symbol_cache_target(3));
        let (_, offset) = self_file_offset(symbol_cache_target as *const () as u64);
        let file = File::open(&copy).unwrap();
        let key = super::FileKey::of_metadata(&file.metadata().unwrap());
        let mut symbols = Symbols::new(&[]);
        symbols.add_object(key, file, &copy, ProcessRoot::open(std::process::id()).ok());
        symbols.load_file_offsets(&key, &[offset]);
        assert_eq!(
            symbols
                .file_lines(&key, offset)
                .last()
                .unwrap()
                .function
                .as_ref(),
            "symbol_cache_target"
        );
        // Cut to its first page while we (and blazesym) have it mapped.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // Another function's DWARF is read from pages that are gone.
        let (_, other) = self_file_offset(crate::truncation::faults as *const () as u64);
        symbols.load_file_offsets(&key, &[other]);
        assert_eq!(symbols.skipped.truncated, 1, "{:?}", symbols.skipped);
        assert!(symbols.file_lines(&key, other).is_empty());
        // Skipped from now on: no parse, no count.
        symbols.load_file_offsets(&key, &[other + 1]);
        assert_eq!(symbols.skipped.truncated, 1);
    }

    #[test]
    fn kernel_addresses_symbolize_from_kallsyms() {
        let Some(addr) = super::super::kallsyms::schedule_address() else {
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
