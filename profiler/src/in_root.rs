//! Files inside a process's own root (its container's filesystem). A plain path through
//! /proc/PID/root follows the container's absolute symlinks on the host, so a container could
//! make the profiler read any host file: paths are resolved with `openat2(RESOLVE_IN_ROOT)`
//! instead, which keeps every step, symlinks and `..` included, inside that root.

use std::{fs::File, io, os::fd::OwnedFd, path::Path};

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// The root directory of one process, held open so that files are resolved against it.
pub struct ProcessRoot {
    dir: OwnedFd,
}

impl ProcessRoot {
    /// Opens the root of process `pid` (as the host's pid namespace numbers it).
    pub fn open(pid: u32) -> io::Result<ProcessRoot> {
        Self::at(Path::new(&format!("/proc/{pid}/root")))
    }

    /// Takes the directory `dir` as a root.
    pub fn at(dir: &Path) -> io::Result<ProcessRoot> {
        let dir = rustix::fs::open(
            dir,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(ProcessRoot { dir })
    }

    /// Opens `path` (absolute or not, taken as inside the root) for reading, only if it is a
    /// regular file. Non-blocking, so that a FIFO planted there cannot hang the caller; a
    /// symlink as the last component is refused (`ELOOP`), and so are /proc magic links.
    pub fn open_regular(&self, path: &Path) -> io::Result<File> {
        let relative = path.strip_prefix("/").unwrap_or(path);
        let fd = rustix::fs::openat2(
            &self.dir,
            relative,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        )?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        Ok(file)
    }
}

/// Opens regular files inside `root` (see [`ProcessRoot::open_regular`]); with no root (it
/// could not be opened: the process is gone), every open fails as not found.
pub fn opener(root: Option<ProcessRoot>) -> impl Fn(&Path) -> io::Result<File> {
    move |path| match &root {
        Some(root) => root.open_regular(path),
        None => Err(io::ErrorKind::NotFound.into()),
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::symlink, path::Path};

    use super::ProcessRoot;

    #[test]
    fn opens_regular_files_only_and_refuses_symlinks_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "x").unwrap();
        let link = dir.path().join("link");
        symlink(&file, &link).unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain mkfifo on a path of our own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

        let root = ProcessRoot::open(std::process::id()).unwrap();
        assert!(root.open_regular(&file).is_ok());
        assert!(root.open_regular(&link).is_err(), "a symlink is followed");
        // Would block forever without O_NONBLOCK (no writer); refused as not regular.
        assert!(root.open_regular(&fifo).is_err());
        assert!(root.open_regular(Path::new("/no/such/file")).is_err());

        // A "container" whose /data is an absolute symlink to a host directory: resolved in
        // the container's root, it leads nowhere rather than to the host's file.
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("secret"), "host").unwrap();
        let container = ProcessRoot::at(dir.path()).unwrap();
        symlink(host.path(), dir.path().join("data")).unwrap();
        assert!(container.open_regular(Path::new("/data/secret")).is_err());
        std::fs::create_dir_all(dir.path().join(host.path().strip_prefix("/").unwrap())).unwrap();
        std::fs::write(
            dir.path()
                .join(host.path().strip_prefix("/").unwrap())
                .join("secret"),
            "inside",
        )
        .unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut container.open_regular(Path::new("/data/secret")).unwrap(),
            &mut text,
        )
        .unwrap();
        assert_eq!(text, "inside");
    }
}
