//! Binaries are read through memory maps (ours, blazesym's and the table builder's), and a
//! container can truncate a file while we have it mapped: reading past its new end raises
//! SIGBUS, which would end the agent. The guard catches that SIGBUS, puts a page of zeros where
//! the file's page was, and counts it. The parser then reads zeros, which it takes like any
//! other bytes (the parsers are fuzzed), and the caller marks the binary bad when the count
//! moved during its parse ([`Watch`]).

use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Once,
};

static FAULTS: AtomicU64 = AtomicU64::new(0);
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);

/// Installs the SIGBUS handler, once per process.
pub fn install() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: sysconf and sigaction with a handler that only makes async-signal-safe
        // system calls.
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            if page > 0 {
                PAGE_SIZE.store(page as usize, Ordering::Relaxed);
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    });
}

/// Pages of truncated files replaced with zeros since the process started.
pub fn faults() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

/// Tells whether a file was found truncated while one piece of work read it.
pub struct Watch(u64);

impl Watch {
    pub fn start() -> Watch {
        Watch(faults())
    }

    /// Whether a mapped file's page was missing since [`Watch::start`]. Another thread's parse
    /// meanwhile counts too: the cost is one binary marked bad needlessly.
    pub fn truncated(&self) -> bool {
        faults() != self.0
    }
}

extern "C" fn on_sigbus(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo; mmap is a plain system call.
    unsafe {
        if !info.is_null() && (*info).si_code == libc::BUS_ADRERR {
            let page = PAGE_SIZE.load(Ordering::Relaxed);
            let addr = (*info).si_addr() as usize & !(page - 1);
            let zeros = libc::mmap(
                addr as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            );
            if zeros != libc::MAP_FAILED {
                FAULTS.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        // Not a page of a truncated file, or it cannot be mended: die as SIGBUS would.
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::{install, Watch};

    #[test]
    fn a_file_truncated_under_its_map_reads_as_zeros_and_is_noticed() {
        install();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![7u8; 64 << 10]).unwrap();
        // SAFETY: the test's own file; the guard handles the SIGBUS this provokes.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        assert_eq!(map[40 << 10], 7);
        let watch = Watch::start();
        assert!(!watch.truncated());
        file.set_len(4096).unwrap();
        let past_end = std::hint::black_box(&map[..])[40 << 10];
        assert_eq!(past_end, 0);
        assert!(watch.truncated());
        assert_eq!(map[100], 7, "the part still in the file reads as before");
    }
}
