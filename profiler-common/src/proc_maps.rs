//! One line of `/proc/PID/maps`, for the user-side crates that read it (the resolver and the
//! unwind simulator). Written here rather than taken from procfs: procfs 0.18 slices a path that
//! starts with `/SYSV` at bytes 5..13 and panics on a shorter one, and any container can map a
//! file of that name (found by the `proc_maps` fuzz target).

/// `START-END PERMS OFFSET DEV INODE PATH`, the path as the kernel wrote it (a newline in a
/// name is escaped as `\012`, a deleted file ends in ` (deleted)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapsLine<'a> {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    pub offset: u64,
    /// 0 for memory no file backs (anonymous, `[heap]`, `[vdso]`, ...).
    pub inode: u64,
    /// Empty for anonymous memory; `[vdso]`, `[stack]`, ... for the kernel's named regions.
    pub path: &'a [u8],
}

impl MapsLine<'_> {
    /// The kernel's named regions (`[vdso]`, `[heap]`, ...), which are no file.
    pub fn is_special(&self) -> bool {
        self.path.starts_with(b"[")
    }
}

/// Parses one line; `None` for anything that is not a maps line.
pub fn parse_line(line: &[u8]) -> Option<MapsLine<'_>> {
    let mut fields = line.splitn(6, |b| *b == b' ');
    let mut range = fields.next()?.splitn(2, |b| *b == b'-');
    let start = hex(range.next()?)?;
    let end = hex(range.next()?)?;
    let perms = fields.next()?;
    let offset = hex(fields.next()?)?;
    let _device = fields.next()?;
    let inode = decimal(fields.next()?)?;
    let path = fields.next().unwrap_or(&[]);
    let path = &path[path.iter().take_while(|b| **b == b' ').count()..];
    if start > end || perms.len() != 4 {
        return None;
    }
    Some(MapsLine {
        start,
        end,
        executable: perms[2] == b'x',
        offset,
        inode,
        path,
    })
}

fn hex(field: &[u8]) -> Option<u64> {
    if field.is_empty() || field.len() > 16 {
        return None;
    }
    u64::from_str_radix(core::str::from_utf8(field).ok()?, 16).ok()
}

fn decimal(field: &[u8]) -> Option<u64> {
    if field.is_empty() || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    core::str::from_utf8(field).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_as_the_kernel_writes_them() {
        let libc = b"7f1c2a400000-7f1c2a595000 r-xp 00028000 fe:01 1837                       /usr/lib/x86_64-linux-gnu/libc.so.6";
        let line = parse_line(libc).unwrap();
        assert_eq!(
            (line.start, line.end, line.offset),
            (0x7f1c2a400000, 0x7f1c2a595000, 0x28000)
        );
        assert!(line.executable && !line.is_special());
        assert_eq!(
            (line.inode, line.path),
            (1837, &b"/usr/lib/x86_64-linux-gnu/libc.so.6"[..])
        );

        let vdso = parse_line(
            b"7ffd1c9f1000-7ffd1c9f3000 r-xp 00000000 00:00 0                          [vdso]",
        )
        .unwrap();
        assert!(vdso.is_special() && vdso.inode == 0 && vdso.path == b"[vdso]");
        let anon = parse_line(b"7f1c2a000000-7f1c2a021000 rw-p 00000000 00:00 0 ").unwrap();
        assert!(!anon.executable && anon.path.is_empty());
        // A name with spaces, and the short /SYSV name procfs panics on.
        let spaced =
            parse_line(b"1000-2000 r-xp 00000000 fe:01 7 /opt/my app/bin (deleted)").unwrap();
        assert_eq!(spaced.path, b"/opt/my app/bin (deleted)");
        assert_eq!(
            parse_line(b"1000-2000 r-xp 00000000 fe:01 7 /SYSVx")
                .unwrap()
                .path,
            b"/SYSVx"
        );
    }

    #[test]
    fn anything_else_is_refused() {
        for line in [
            &b""[..],
            b"Rss:                 123 kB",
            b"1000 r-xp 00000000 fe:01 7 /bin/x",
            b"2000-1000 r-xp 00000000 fe:01 7 /bin/x",
            b"1000-2000 r-xp 00000000 fe:01 -7 /bin/x",
            b"1000-2000 rx 00000000 fe:01 7 /bin/x",
            b"10000000000000000-2 r-xp 0 fe:01 7 /bin/x",
        ] {
            assert_eq!(parse_line(line), None, "{:?}", core::str::from_utf8(line));
        }
    }
}
