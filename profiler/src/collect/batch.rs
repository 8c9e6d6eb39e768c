//! Whole-map reads of BPF hash maps in batches: one bpf(2) call per chunk of entries.
//!
//! aya 0.14 reads a hash map entry by entry: next key, lookup and delete, a system call each.
//! At 99 Hz on a node of 200 processes those calls were a quarter of the agent's CPU. The
//! kernel's batch commands (5.6+) read, and read and delete, a bucket range at a time.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    maps::{HashMap, IterableMap as _, MapData},
    Pod,
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Bytes of keys and values one call moves at most: a buffer this size is what a read costs.
const CHUNK_BYTES: usize = 64 * 1024;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf(command: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid `bpf_attr.batch` of the size passed; the buffers it points to
    // are owned by the caller and sized for `count` entries of the map's key and value size.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn map_fd<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>) -> u32 {
    map.map().fd().as_fd().as_raw_fd() as u32
}

/// `n` values of a plain-data type.
fn zeroed<T: Pod>(n: usize) -> Vec<T> {
    // SAFETY: aya's `Pod` types are plain data read from and written to maps as bytes: every
    // bit pattern, zero included, is a value.
    vec![unsafe { std::mem::zeroed::<T>() }; n]
}

/// Calls `visit` with every entry of `map`, and deletes each entry read when `delete` is set.
/// Entries added or changed meanwhile may or may not be seen: the same as an entry-by-entry
/// read. The key and value types are the map's own, checked when aya made the `HashMap`.
pub fn for_each<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    delete: bool,
    visit: impl FnMut(&K, &V),
) -> io::Result<()> {
    let chunk = CHUNK_BYTES / (size_of::<K>() + size_of::<V>());
    for_each_in_chunks(map, delete, chunk, visit)
}

/// [`for_each`] with buffers of `chunk` entries to begin with.
fn for_each_in_chunks<K: Pod, V: Pod>(
    map: &HashMap<MapData, K, V>,
    delete: bool,
    chunk: usize,
    mut visit: impl FnMut(&K, &V),
) -> io::Result<()> {
    let command = if delete {
        BPF_MAP_LOOKUP_AND_DELETE_BATCH
    } else {
        BPF_MAP_LOOKUP_BATCH
    };
    let mut chunk = chunk.max(1);
    let mut keys = zeroed::<K>(chunk);
    let mut values = zeroed::<V>(chunk);
    // The kernel's position token for hash maps is a bucket index (u32); 8 bytes leave room.
    let mut position: Option<u64> = None;
    let mut next: u64 = 0;
    loop {
        let mut attr = BatchAttr {
            in_batch: position.as_ref().map_or(0, |p| p as *const u64 as u64),
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map_fd(map),
            ..Default::default()
        };
        let result = bpf(command, &mut attr);
        let read = (attr.count as usize).min(chunk);
        for (key, value) in keys[..read].iter().zip(&values[..read]) {
            visit(key, value);
        }
        match result {
            Ok(()) => position = Some(next),
            // ENOENT: past the last bucket; what this call returned was the rest. (A position
            // past the end would also give ENOENT, with no count written, but a call that
            // succeeds stops at a bucket it could not take, never past the end.)
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            // ENOSPC: the next bucket holds more entries than the buffer.
            Err(err) if err.raw_os_error() == Some(libc::ENOSPC) && read == 0 => {
                chunk *= 2;
                keys = zeroed(chunk);
                values = zeroed(chunk);
            }
            Err(err) => return Err(err),
        }
    }
}

/// Deletes `keys` from `map`; keys no longer there are passed over.
pub fn delete<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, mut keys: &[K]) -> io::Result<()> {
    while !keys.is_empty() {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
            map_fd: map_fd(map),
            ..Default::default()
        };
        let result = bpf(BPF_MAP_DELETE_BATCH, &mut attr);
        let done = (attr.count as usize).min(keys.len());
        match result {
            Ok(()) if done == 0 => break,
            Ok(()) => keys = &keys[done..],
            // The kernel stops at the first key it cannot delete and says how many it did.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                keys = &keys[(done + 1).min(keys.len())..]
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd as _, OwnedFd};

    use aya::maps::Map;

    use super::*;

    /// A new BPF hash map from u64 to [u64; 4] with fixed bucket hashing (`BPF_F_ZERO_SEED`),
    /// or None outside CI where BPF is not allowed.
    fn hash_map(max_entries: u32) -> Option<HashMap<MapData, u64, [u64; 4]>> {
        #[repr(C)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        let attr = CreateAttr {
            map_type: 1, // BPF_MAP_TYPE_HASH
            key_size: 8,
            value_size: 32,
            max_entries,
            map_flags: 1 << 6, // BPF_F_ZERO_SEED
        };
        // SAFETY: BPF_MAP_CREATE reads `attr` only; the fd returned is ours.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                0, // BPF_MAP_CREATE
                &attr as *const CreateAttr,
                size_of::<CreateAttr>(),
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            assert!(
                std::env::var_os("CI").is_none(),
                "creating a BPF map must work in CI: {err}"
            );
            eprintln!("skipped: cannot create a BPF map ({err})");
            return None;
        }
        // SAFETY: the kernel just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let map = Map::HashMap(MapData::from_fd(fd).unwrap());
        Some(HashMap::try_from(map).unwrap())
    }

    fn filled(entries: u64) -> Option<HashMap<MapData, u64, [u64; 4]>> {
        let mut map = hash_map(entries as u32)?;
        for key in 0..entries {
            map.insert(key, [key, key * 2, key * 3, !key], 0).unwrap();
        }
        Some(map)
    }

    fn read(map: &HashMap<MapData, u64, [u64; 4]>, delete: bool, chunk: usize) -> Vec<u64> {
        let mut keys = Vec::new();
        for_each_in_chunks(map, delete, chunk, |key, value| {
            assert_eq!(*value, [*key, key * 2, key * 3, !key]);
            keys.push(*key);
        })
        .unwrap();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn reads_every_entry_over_many_calls_and_leaves_them() {
        let Some(map) = filled(5000) else { return };
        // 64 KiB chunks are 1638 entries here: four calls.
        let mut keys = Vec::new();
        for_each(&map, false, |key, _| keys.push(*key)).unwrap();
        keys.sort_unstable();
        assert_eq!(keys, (0..5000).collect::<Vec<_>>());
        assert_eq!(read(&map, false, 100), (0..5000).collect::<Vec<_>>());
        assert_eq!(map.keys().count(), 5000);
    }

    #[test]
    fn a_read_that_deletes_empties_the_map() {
        let Some(map) = filled(3000) else { return };
        assert_eq!(read(&map, true, 700), (0..3000).collect::<Vec<_>>());
        assert_eq!(map.keys().count(), 0);
        assert!(read(&map, true, 700).is_empty());
    }

    #[test]
    fn a_bucket_larger_than_the_buffer_grows_it() {
        // 64 entries in 64 buckets: with fixed hashing some bucket holds two or more, which a
        // one-entry buffer cannot take (ENOSPC).
        let Some(map) = filled(64) else { return };
        assert_eq!(read(&map, true, 1), (0..64).collect::<Vec<_>>());
    }

    #[test]
    fn deletes_the_keys_given_and_passes_over_missing_ones() {
        let Some(map) = filled(100) else { return };
        let gone: Vec<u64> = (0..100).filter(|k| k % 3 == 0).chain([500, 501]).collect();
        let mut order = gone.clone();
        order.swap(10, 34); // a missing key in the middle
        delete(&map, &order).unwrap();
        let left = read(&map, false, 1000);
        assert_eq!(left, (0..100).filter(|k| k % 3 != 0).collect::<Vec<_>>());
    }
}
