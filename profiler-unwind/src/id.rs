//! The identity of a binary: what unwind tables (and symbols) are keyed by.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use object::Object;

/// Which binary a table belongs to, so that one libc is compiled once for every process that
/// maps it, whatever path or mount namespace each sees it through.
///
/// The GNU build ID when the file has one; otherwise the file's (device, inode, size, mtime),
/// which changes when the file is replaced or rewritten in place.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BinaryId {
    /// The bytes of the `NT_GNU_BUILD_ID` note.
    BuildId(Box<[u8]>),
    /// A file without a build ID.
    File {
        dev: u64,
        ino: u64,
        size: u64,
        /// Modification time, in nanoseconds since the epoch.
        mtime_ns: i64,
    },
    /// A mapping of CPython's perf trampolines, `len` bytes long: its table comes from their
    /// fixed layout, not from a file, and is the same for every process with that layout.
    CpythonTrampolines {
        layout: crate::trampoline::Layout,
        len: u64,
    },
}

impl BinaryId {
    /// The identity of the ELF file at `path`. Fails only when the file cannot be opened or
    /// stat'ed; a file that is not ELF, or has no build ID, is identified by its metadata.
    pub fn of_path(path: &Path) -> std::io::Result<BinaryId> {
        let file = std::fs::File::open(path)?;
        // SAFETY: the map is read-only and dropped before returning; a concurrent truncation
        // would at worst fault this read, as for every other profiler reading binaries.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        BinaryId::of_file(&file, &map)
    }

    /// The identity of an open file whose bytes are `data`, so that the identity and the table
    /// built from `data` describe the same version of a file that may be replaced meanwhile.
    pub fn of_file(file: &std::fs::File, data: &[u8]) -> std::io::Result<BinaryId> {
        if let Some(id) = build_id(data) {
            return Ok(BinaryId::BuildId(id));
        }
        let meta = file.metadata()?;
        Ok(BinaryId::File {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        })
    }

    /// The build ID of an ELF image already in memory (the vDSO), `None` when it has none.
    pub fn of_image(data: &[u8]) -> Option<BinaryId> {
        build_id(data).map(BinaryId::BuildId)
    }
}

/// The GNU build ID of an ELF image, from its note sections or, with section headers stripped,
/// its `PT_NOTE` segments.
pub(crate) fn build_id(data: &[u8]) -> Option<Box<[u8]>> {
    let file = object::File::parse(data).ok()?;
    file.build_id().ok().flatten().map(Into::into)
}

impl fmt::Display for BinaryId {
    /// Build IDs in lower-case hex (as `.build-id/` paths and pprof spell them); files as
    /// `dev:ino:size:mtime`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BinaryId::BuildId(bytes) => bytes.iter().try_for_each(|b| write!(f, "{b:02x}")),
            BinaryId::File {
                dev,
                ino,
                size,
                mtime_ns,
            } => write!(f, "{dev:x}:{ino}:{size}:{mtime_ns}"),
            BinaryId::CpythonTrampolines { layout, len } => {
                write!(f, "cpython-trampolines:{}:{len}", layout.code_size)
            }
        }
    }
}
