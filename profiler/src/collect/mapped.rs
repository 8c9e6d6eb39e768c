//! Part of a `BPF_F_MMAPABLE` array map, mapped into our memory: user space writes values
//! with plain stores instead of a system call per value, and a byte at a time without
//! overwriting the bytes around it that the programs write meanwhile.

use std::{
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::NonNull,
};

const PAGE: usize = 4096;

/// Bytes `begin..end` of an array map's values (and the rest of their pages), mapped shared.
pub(super) struct ArrayWindow {
    ptr: NonNull<u8>,
    bytes: usize,
    /// Byte offset of `ptr` in the array.
    offset: usize,
}

impl ArrayWindow {
    /// Maps the pages that hold bytes `begin..end` of the array behind `fd`. Pages are made
    /// resident as they are touched, so a large window costs only what is written.
    pub(super) fn map(fd: BorrowedFd<'_>, begin: usize, end: usize) -> std::io::Result<Self> {
        let offset = begin / PAGE * PAGE;
        let bytes = end.next_multiple_of(PAGE) - offset;
        // SAFETY: maps part of the array map's values, shared with the kernel, whose mmap takes
        // page offsets within its size; nothing else maps this range while the window lives.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Self { ptr, bytes, offset })
    }

    /// Where byte `at` of the array is, if the window holds `len` bytes from there.
    pub(super) fn at(&self, at: usize, len: usize) -> Option<*mut u8> {
        let from = at.checked_sub(self.offset)?;
        if from.checked_add(len)? > self.bytes {
            return None;
        }
        // SAFETY: within the mapping, checked above.
        Some(unsafe { self.ptr.as_ptr().add(from) })
    }
}

impl Drop for ArrayWindow {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}
