//! Finding a binary's separate debug file, for the unwinder's `.debug_frame` and the
//! symbolizer's DWARF alike. The names come from the binary, which a container controls: a
//! debug link is taken only as a plain file name, and every path next to the binary is opened
//! inside the process's own root by the caller's opener, never on the host.

use std::{
    fs::File,
    io::{self, Read},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use object::Object;

/// The debug directories of a process's root, searched there by build ID and debug link.
pub const ROOT_DEBUG_DIRS: [&str; 2] = ["/usr/lib/debug", "/lib/debug"];

/// Largest debug file read: the symbolizer indexes its DWARF in memory.
pub const MAX_DEBUG_FILE_BYTES: u64 = 1 << 30;

/// Sections by which a file names another file to read: blazesym follows all three by itself,
/// on the host's paths, so a file that has one is never given to it with DWARF enabled.
const LINK_SECTIONS: [&str; 3] = [".gnu_debuglink", ".gnu_debugaltlink", ".debug_sup"];

/// Where a binary's separate debug file may be.
pub struct DebugSearch<'a> {
    /// The binary's path as its process names it: debug links are looked up beside it.
    pub path: &'a Path,
    /// Opens a path inside the process's root (regular files only, without blocking).
    pub open_in_root: &'a dyn Fn(&Path) -> io::Result<File>,
    /// The user's own directories (`--debug-dir`), outside any root.
    pub own_dirs: &'a [PathBuf],
    /// The binary's (device, inode), so that a link to itself is not taken for its debug file.
    pub binary: Option<(u64, u64)>,
}

/// A debug file found for a binary.
#[derive(Debug)]
pub struct DebugFile {
    /// Where it was found (inside the process's root, or in an own directory), for messages.
    pub path: PathBuf,
    pub file: File,
}

/// Whether the ELF file `file` names other files to read (a debug link, a dwz alternate file
/// or a supplementary file).
pub fn links_elsewhere(file: &object::File<'_>) -> bool {
    LINK_SECTIONS
        .iter()
        .any(|name| file.section_by_name(name).is_some())
}

/// The debug link's file name and CRC, when it is a plain file name: a link such as
/// `../../etc/shadow` or `/dev/zero` is ignored.
fn debug_link(binary: &object::File<'_>) -> Option<(String, u32)> {
    let (name, crc) = binary.gnu_debuglink().ok()??;
    let name = std::str::from_utf8(name).ok()?;
    let plain = !name.is_empty() && !name.contains('/') && name != "." && name != "..";
    plain.then(|| (name.to_owned(), crc))
}

/// Finds and opens the separate debug file of `binary`, as GDB looks for one: by build ID
/// under the debug directories, then by debug link beside the binary, in its `.debug/` and
/// under the debug directories. The user's own directories come first. A candidate is taken
/// only if it is not the binary itself and is the same build (equal build IDs, else the debug
/// link's CRC); `None` when nothing qualifies.
pub fn find(binary: &object::File<'_>, search: &DebugSearch<'_>) -> Option<DebugFile> {
    let build_id = binary
        .build_id()
        .ok()
        .flatten()
        .filter(|id| id.len() > 1)
        .map(|id| id.to_vec());
    let link = debug_link(binary);
    let by_id = build_id.as_ref().map(|id| {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        format!(".build-id/{}/{}.debug", &hex[..2], &hex[2..])
    });
    let dir = search.path.parent().unwrap_or(Path::new("/"));
    let relative_dir = dir.strip_prefix("/").unwrap_or(dir);

    // (path, inside the root, found by link)
    let mut candidates: Vec<(PathBuf, bool, bool)> = Vec::new();
    for own in search.own_dirs {
        if let Some(by_id) = &by_id {
            candidates.push((own.join(by_id), false, false));
        }
    }
    for root_dir in ROOT_DEBUG_DIRS {
        if let Some(by_id) = &by_id {
            candidates.push((Path::new(root_dir).join(by_id), true, false));
        }
    }
    if let Some((name, _)) = &link {
        candidates.push((dir.join(name), true, true));
        candidates.push((dir.join(".debug").join(name), true, true));
        for own in search.own_dirs {
            candidates.push((own.join(relative_dir).join(name), false, true));
        }
        for root_dir in ROOT_DEBUG_DIRS {
            candidates.push((
                Path::new(root_dir).join(relative_dir).join(name),
                true,
                true,
            ));
        }
    }
    candidates.into_iter().find_map(|(path, in_root, by_link)| {
        let file = match in_root {
            true => (search.open_in_root)(&path),
            false => open_regular(&path),
        }
        .ok()?;
        let meta = file.metadata().ok()?;
        if search.binary == Some((meta.dev(), meta.ino())) || meta.len() > MAX_DEBUG_FILE_BYTES {
            return None;
        }
        let same_build = match (&build_id, by_link) {
            (Some(ours), _) => {
                // SAFETY: read-only, dropped before returning; a file truncated meanwhile is
                // the SIGBUS guard's to handle.
                let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
                let theirs = object::File::parse(&map[..])
                    .ok()?
                    .build_id()
                    .ok()??
                    .to_vec();
                &theirs == ours
            }
            (None, true) => link
                .as_ref()
                .is_some_and(|(_, crc)| crc_of(&file) == Some(*crc)),
            (None, false) => false,
        };
        same_build.then_some(DebugFile { path, file })
    })
}

/// Opens `path` for reading if it is a regular file, without blocking on a FIFO.
pub fn open_regular(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    match file.metadata()?.is_file() {
        true => Ok(file),
        false => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )),
    }
}

/// The CRC-32 a `.gnu_debuglink` records for the whole of `file`.
fn crc_of(file: &File) -> Option<u32> {
    let mut hasher = crc32fast::Hasher::new();
    let mut reader = file.take(MAX_DEBUG_FILE_BYTES);
    let mut buf = vec![0; 1 << 16];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Some(hasher.finalize()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}
