//! Finding the CFI in an ELF image: `.eh_frame` by section or through `PT_GNU_EH_FRAME`,
//! `.debug_frame` in the file or in a separate debug file, and the executable ranges.

use std::borrow::Cow;
use std::io::Read;

use object::elf::PT_GNU_EH_FRAME;
use object::read::elf::ProgramHeader;
use object::{CompressionFormat, Object, ObjectSection, ObjectSegment, SectionKind, SegmentFlags};

use crate::Error;

/// `.eh_frame` data and the address it is loaded at.
pub(crate) struct EhFrame<'data> {
    pub data: Cow<'data, [u8]>,
    pub address: u64,
}

/// An executable `PT_LOAD` segment: its address and the bytes the file holds for it.
pub(crate) struct CodeSegment<'data> {
    pub address: u64,
    pub size: u64,
    pub data: &'data [u8],
}

/// The executable segments, in address order.
pub(crate) fn code_segments<'data>(file: &object::File<'data>) -> Vec<CodeSegment<'data>> {
    let mut segments: Vec<_> = file
        .segments()
        .filter(|segment| match segment.flags() {
            SegmentFlags::Elf { p_flags } => p_flags & object::elf::PF_X != 0,
            _ => false,
        })
        .map(|segment| CodeSegment {
            address: segment.address(),
            size: segment.size(),
            data: segment.data().unwrap_or_default(),
        })
        .collect();
    segments.sort_by_key(|segment| segment.address);
    segments
}

/// `.eh_frame`: the section when section headers exist, else the address `.eh_frame_hdr`
/// (`PT_GNU_EH_FRAME`) points at, read to the end of its segment (gimli stops at the zero
/// terminator). `None` when the file has neither.
pub(crate) fn eh_frame<'data>(
    file: &object::File<'data>,
    data: &'data [u8],
) -> Result<Option<EhFrame<'data>>, Error> {
    if let Some(section) = file.section_by_name(".eh_frame") {
        if section.kind() != SectionKind::UninitializedData {
            return Ok(Some(EhFrame {
                data: section_data(&section)?,
                address: section.address(),
            }));
        }
    }
    let object::File::Elf64(elf) = file else {
        return Err(Error::UnsupportedArchitecture);
    };
    let endian = elf.endian();
    let Some(header) = elf
        .elf_program_headers()
        .iter()
        .find(|header| header.p_type(endian) == PT_GNU_EH_FRAME)
    else {
        return Ok(None);
    };
    let hdr_address = header.p_vaddr(endian);
    let hdr_data = header
        .data(endian, data)
        .map_err(|_| Error::Malformed("PT_GNU_EH_FRAME lies outside the file".into()))?;
    let bases = gimli::BaseAddresses::default().set_eh_frame_hdr(hdr_address);
    let address = gimli::EhFrameHdr::new(hdr_data, gimli::LittleEndian)
        .parse(&bases, 8)
        .and_then(|hdr| hdr.eh_frame_ptr().direct())
        .map_err(|e| Error::Malformed(format!(".eh_frame_hdr: {e}")))?;
    for segment in file.segments() {
        let (start, file_size) = (segment.address(), segment.file_range().1);
        if address >= start && address - start < file_size {
            let bytes = segment
                .data()
                .map_err(|e| Error::Malformed(e.to_string()))?;
            let from = (address - start) as usize;
            return Ok(bytes.get(from..).map(|data| EhFrame {
                data: Cow::Borrowed(data),
                address,
            }));
        }
    }
    Err(Error::Malformed(format!(
        ".eh_frame_hdr points at {address:#x}, outside every file-backed segment"
    )))
}

/// `.debug_frame`, decompressed, or `None`.
pub(crate) fn debug_frame<'data>(
    file: &object::File<'data>,
) -> Result<Option<Cow<'data, [u8]>>, Error> {
    match file.section_by_name(".debug_frame") {
        Some(section) if section.kind() != SectionKind::UninitializedData => {
            Ok(Some(section_data(&section)?))
        }
        _ => Ok(None),
    }
}

/// A section's bytes, inflating `SHF_COMPRESSED` zlib sections (Debian's debug files) here
/// rather than through object's `compression` feature, which would pull in two more crates.
fn section_data<'data>(section: &object::Section<'data, '_>) -> Result<Cow<'data, [u8]>, Error> {
    let compressed = section
        .compressed_data()
        .map_err(|e| Error::Malformed(e.to_string()))?;
    match compressed.format {
        CompressionFormat::None => Ok(Cow::Borrowed(compressed.data)),
        CompressionFormat::Zlib => {
            let mut out = Vec::with_capacity(compressed.uncompressed_size as usize);
            flate2::read::ZlibDecoder::new(compressed.data)
                .read_to_end(&mut out)
                .map_err(|e| Error::Malformed(format!("compressed section: {e}")))?;
            Ok(Cow::Owned(out))
        }
        other => Err(Error::Malformed(format!(
            "section compressed as {other:?}, which is not supported"
        ))),
    }
}

/// `mov $15, %rax; syscall`: the body of every x86-64 `rt_sigreturn` restorer (glibc's and
/// musl's `__restore_rt`). Used to find restorers that come without an `S` FDE (musl).
pub(crate) const SIGRETURN_CODE: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

/// Addresses of every [`SIGRETURN_CODE`] in the executable segments.
pub(crate) fn sigreturn_addresses(segments: &[CodeSegment<'_>]) -> Vec<u64> {
    let finder = memchr::memmem::Finder::new(&SIGRETURN_CODE);
    segments
        .iter()
        .flat_map(|segment| {
            finder
                .find_iter(segment.data)
                .map(|at| segment.address + at as u64)
        })
        .collect()
}

/// The ELF virtual addresses at file offsets `offsets` of the ELF image `data`: what a
/// separate debug file, which has the addresses but not the file layout, is looked up by.
/// `None` where no `PT_LOAD` segment holds the offset (everywhere, if `data` is not ELF).
pub fn virtual_addresses(data: &[u8], offsets: &[u64]) -> Vec<Option<u64>> {
    let Ok(file) = object::File::parse(data) else {
        return vec![None; offsets.len()];
    };
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .map(|segment| {
            let (start, size) = segment.file_range();
            (start, size, segment.address())
        })
        .collect();
    offsets
        .iter()
        .map(|&offset| {
            segments.iter().find_map(|&(start, size, address)| {
                let within = offset.checked_sub(start).filter(|&d| d < size)?;
                address.checked_add(within)
            })
        })
        .collect()
}

/// The load bias of a mapping: what to subtract from a runtime address in the mapping to get the
/// ELF virtual address. `map_start` and `map_offset` are the mapping's address and file offset
/// (from `/proc/PID/maps`). `None` when no `PT_LOAD` segment holds that file offset.
pub fn load_bias(data: &[u8], map_start: u64, map_offset: u64) -> Option<u64> {
    let file = object::File::parse(data).ok()?;
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .map(|segment| {
            let (offset, size) = segment.file_range();
            (segment.address(), offset, size)
        })
        .collect();
    // The mapping starts on a page; the segment may start later in that page. Within a
    // segment, file offset o is at vaddr p_vaddr - p_offset + o (both agree modulo the page).
    // Two segments can share a page of the file (lld's layout: the read-only segment ends
    // in the page where the code segment starts, a page lower in memory), so the segment that
    // starts in the mapping's first page wins over one that merely covers it.
    let starts_here = |&&(_, offset, _): &&(u64, u64, u64)| offset & !0xfff == map_offset;
    let covers = |&&(_, offset, size): &&(u64, u64, u64)| {
        map_offset >= offset & !0xfff && map_offset < offset + size.max(1)
    };
    let (address, offset, _) = segments
        .iter()
        .find(starts_here)
        .or_else(|| segments.iter().find(covers))?;
    let vaddr = address.wrapping_sub(*offset).wrapping_add(map_offset);
    Some(map_start.wrapping_sub(vaddr))
}
