//! Compiled tables on disk, so that an agent restart does not recompile every binary on the node.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use profiler_common::unwind::{UnwindRow, MAX_TABLE_ROWS};

use crate::{BinaryId, TableStats, UnwindTable};

/// Bumped whenever the row layout or what the compiler emits changes, so that stale files are
/// rebuilt rather than trusted.
const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"PRFUNWND";
const ROW_BYTES: usize = 12;
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8;

/// A directory of tables, one file per [`BinaryId`].
#[derive(Clone, Debug)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// Uses (and creates) `dir`.
    pub fn new(dir: &Path) -> io::Result<DiskCache> {
        std::fs::create_dir_all(dir)?;
        Ok(DiskCache {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: &BinaryId) -> PathBuf {
        self.dir
            .join(format!("{}.rows", id.to_string().replace(':', "-")))
    }

    /// The stored table of `id`; `None` when there is none, or it is truncated, corrupt or of
    /// another format version.
    pub fn load(&self, id: &BinaryId) -> Option<UnwindTable> {
        decode(&std::fs::read(self.path(id)).ok()?)
    }

    /// Stores `table` under `id`, atomically (a reader sees the old file or the new one).
    pub fn store(&self, id: &BinaryId, table: &UnwindTable) -> io::Result<()> {
        let path = self.path(id);
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&encode(table))?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    }
}

fn encode(table: &UnwindTable) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + table.rows.len() * ROW_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(ROW_BYTES as u32).to_le_bytes());
    out.extend_from_slice(&table.base.to_le_bytes());
    out.extend_from_slice(&(table.rows.len() as u64).to_le_bytes());
    for row in &table.rows {
        out.extend_from_slice(&row.pc.to_le_bytes());
        out.push(row.kind);
        out.push(row.rbp_rule);
        out.extend_from_slice(&row.rbp_offset.to_le_bytes());
        out.extend_from_slice(&row.cfa_offset.to_le_bytes());
    }
    out
}

fn decode(data: &[u8]) -> Option<UnwindTable> {
    let (header, body) = data.split_at_checked(HEADER_BYTES)?;
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap());
    if &header[..8] != MAGIC || u32_at(8) != FORMAT_VERSION || u32_at(12) != ROW_BYTES as u32 {
        return None;
    }
    let count = u64_at(24);
    if count > MAX_TABLE_ROWS as u64 || body.len() as u64 != count * ROW_BYTES as u64 {
        return None;
    }
    let rows: Vec<UnwindRow> = body
        .chunks_exact(ROW_BYTES)
        .map(|b| UnwindRow {
            pc: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            kind: b[4],
            rbp_rule: b[5],
            rbp_offset: i16::from_le_bytes([b[6], b[7]]),
            cfa_offset: i32::from_le_bytes([b[8], b[9], b[10], b[11]]),
        })
        .collect();
    // Sorted rows are what the search relies on; anything else is corruption.
    if !rows.windows(2).all(|w| w[0].pc < w[1].pc) {
        return None;
    }
    Some(UnwindTable {
        base: u64_at(16),
        rows,
        stats: TableStats {
            from_cache: true,
            ..Default::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> UnwindTable {
        let row = |pc, kind, cfa_offset, rbp_offset| UnwindRow {
            pc,
            kind,
            rbp_rule: 1,
            rbp_offset,
            cfa_offset,
        };
        UnwindTable {
            base: 0x1000,
            rows: vec![row(0, 0, 8, 0), row(4, 2, -70000, -16), row(9, 6, 0, 0)],
            stats: TableStats::default(),
        }
    }

    #[test]
    fn round_trips_and_rejects_damage() {
        let dir = tempfile::tempdir().unwrap();
        let cache = DiskCache::new(dir.path()).unwrap();
        let id = BinaryId::BuildId(vec![0xab, 0xcd].into());
        assert!(cache.load(&id).is_none());
        cache.store(&id, &table()).unwrap();
        let loaded = cache.load(&id).unwrap();
        assert_eq!((loaded.base, &loaded.rows), (0x1000, &table().rows));
        assert!(loaded.stats.from_cache);

        let file = dir.path().join("abcd.rows");
        let bytes = std::fs::read(&file).unwrap();
        let mut truncated = bytes.clone();
        truncated.pop();
        let mut other_version = bytes.clone();
        other_version[8] += 1;
        let mut unsorted = bytes.clone();
        unsorted[HEADER_BYTES + ROW_BYTES] = 0; // second row's pc becomes the first's
        for damaged in [truncated, other_version, unsorted, Vec::new()] {
            std::fs::write(&file, damaged).unwrap();
            assert!(cache.load(&id).is_none());
        }
    }
}
