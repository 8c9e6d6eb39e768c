//! Aggregate: folds resolved samples into a pprof profile (profile.proto), interning strings,
//! functions, locations and mappings as the spec asks: string_table[0] is "", ids are non-zero
//! and unique, and identical stacks with identical labels share one sample.

use std::{collections::HashMap, time::SystemTime};

use profiler_proto::pprof::{
    Function, Label, Line as PprofLine, Location, Mapping as PprofMapping, Profile, Sample,
    ValueType,
};

use crate::resolve::{Frame, Mapping, ResolvedSample};

/// Which labels each sample carries.
///
/// Pyroscope turns every string sample label into a series label and splits the profile by
/// it, so profiles meant for it carry none by default; files meant for people carry them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleLabels {
    /// `pid`, `tid` (numbers), `comm` and `thread` (names): `record`'s files.
    All,
    /// None: samples of every process and thread of a series merge.
    None,
    /// The thread's name only, as `thread`: one series per thread name in Pyroscope.
    ThreadNames,
}

/// Which times a profile holds, as its sample types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// `samples/count` and `cpu/nanoseconds` (the default).
    OnCpu,
    /// Those and `offcpu/nanoseconds`, the default sample type (`record --off-cpu`).
    OnAndOffCpu,
    /// `offcpu/nanoseconds` alone (the agent's `offcpu` series, as Grafana Alloy sends it).
    OffCpu,
}

/// Name of the off-CPU sample type (and of its Pyroscope series).
pub const OFF_CPU_TYPE: &str = "offcpu";

/// One profile builder per key (per series in the agent), started and emptied together, with
/// at most `max_keys` keys per interval: samples of any further key fold into one overflow key.
pub struct ProfileSet<K> {
    frequency: u64,
    labels: SampleLabels,
    values: Values,
    builders: std::collections::BTreeMap<K, ProfileBuilder>,
    cap: Option<(usize, K)>,
}

impl<K: Ord + Clone> ProfileSet<K> {
    /// Empty, for samples taken at `frequency` Hz carrying `labels`, without a cap.
    pub fn new(frequency: u64, labels: SampleLabels) -> Self {
        Self {
            frequency,
            labels,
            values: Values::OnCpu,
            builders: Default::default(),
            cap: None,
        }
    }

    /// The times each profile holds (samples of other kinds are left out).
    pub fn with_values(mut self, values: Values) -> Self {
        self.values = values;
        self
    }

    /// At most `max_keys` keys per interval (`overflow` not counted): samples of any other
    /// key go to `overflow`.
    pub fn with_cap(mut self, max_keys: usize, overflow: K) -> Self {
        self.cap = Some((max_keys, overflow));
        self
    }

    /// Adds `sample` to the profile of `key`, or of the overflow key when `key` would be one
    /// too many. Returns true when it went to the overflow key.
    pub fn add(&mut self, key: &K, sample: &ResolvedSample) -> bool {
        let (key, folded) = match &self.cap {
            Some((max, overflow))
                if key != overflow
                    && !self.builders.contains_key(key)
                    && self.builders.len() - usize::from(self.builders.contains_key(overflow))
                        >= *max =>
            {
                (overflow, true)
            }
            _ => (key, false),
        };
        let (frequency, labels, values) = (self.frequency, self.labels, self.values);
        self.builders
            .entry(key.clone())
            .or_insert_with(|| {
                ProfileBuilder::new(frequency)
                    .sample_labels(labels)
                    .values(values)
            })
            .add(std::slice::from_ref(sample));
        folded
    }

    /// Keys holding samples in this interval.
    pub fn len(&self) -> usize {
        self.builders.len()
    }

    /// True when no sample was added in this interval.
    pub fn is_empty(&self) -> bool {
        self.builders.is_empty()
    }

    /// Every profile, each covering exactly `start`..`until` so that consecutive intervals
    /// meet without gap or overlap; leaves the set empty for the next interval.
    pub fn take(&mut self, start: SystemTime, until: SystemTime) -> Vec<(K, Profile)> {
        let duration = until.duration_since(start).unwrap_or_default().as_nanos() as i64;
        std::mem::take(&mut self.builders)
            .into_iter()
            .map(|(key, mut builder)| {
                builder.start = start;
                (key, builder.build(duration))
            })
            .collect()
    }
}

/// Builds one pprof profile from any number of batches of resolved samples.
pub struct ProfileBuilder {
    strings: HashMap<String, i64>,
    string_table: Vec<String>,
    functions: HashMap<(i64, i64), u64>,
    function_table: Vec<Function>,
    /// Resolver mapping id (one per binary) to pprof mapping id.
    mappings: HashMap<u64, u64>,
    mapping_table: Vec<PprofMapping>,
    /// Per pprof mapping: file offset minus address, fixed by the first process seen. Addresses
    /// are ELF virtual addresses (runtime address minus load bias) where the bias is known, so
    /// every process that maps a binary agrees and unnamed frames read as `addr2line` takes
    /// them; other addresses are moved into the first process's space, so that one mapping and
    /// one location serve a binary and a pc in every process.
    mapping_delta: HashMap<u64, i128>,
    /// Order of each pprof mapping in the output: main executables, libraries, the kernel.
    mapping_rank: HashMap<u64, u8>,
    locations: HashMap<(u64, u64), u64>,
    location_table: Vec<Location>,
    /// Per stack and labels: on-CPU sample count, off-CPU nanoseconds.
    samples: HashMap<(Vec<u64>, [i64; 4]), [u64; 2]>,
    labels: SampleLabels,
    values: Values,
    period_ns: i64,
    start: SystemTime,
}

impl ProfileBuilder {
    /// A builder for samples taken at `frequency` Hz, starting now, with every sample label
    /// ([`SampleLabels::All`]).
    pub fn new(frequency: u64) -> Self {
        let mut builder = Self {
            strings: HashMap::new(),
            string_table: Vec::new(),
            functions: HashMap::new(),
            function_table: Vec::new(),
            mappings: HashMap::new(),
            mapping_table: Vec::new(),
            mapping_delta: HashMap::new(),
            mapping_rank: HashMap::new(),
            locations: HashMap::new(),
            location_table: Vec::new(),
            samples: HashMap::new(),
            labels: SampleLabels::All,
            values: Values::OnCpu,
            period_ns: 1_000_000_000 / frequency.max(1) as i64,
            start: SystemTime::now(),
        };
        builder.string("");
        builder
    }

    /// The labels samples carry from now on.
    pub fn sample_labels(mut self, labels: SampleLabels) -> Self {
        self.labels = labels;
        self
    }

    /// The times the profile holds from now on; samples of other kinds are left out.
    pub fn values(mut self, values: Values) -> Self {
        self.values = values;
        self
    }

    /// Number of distinct samples so far.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Total on-CPU sample count so far.
    pub fn total(&self) -> u64 {
        self.samples.values().map(|v| v[0]).sum()
    }

    fn string(&mut self, text: &str) -> i64 {
        if let Some(id) = self.strings.get(text) {
            return *id;
        }
        let id = self.string_table.len() as i64;
        self.string_table.push(text.to_owned());
        self.strings.insert(text.to_owned(), id);
        id
    }

    fn function(&mut self, name: &str, file: Option<&str>) -> u64 {
        let name = self.string(name);
        let file = self.string(file.unwrap_or(""));
        let next = self.function_table.len() as u64 + 1;
        let id = *self.functions.entry((name, file)).or_insert(next);
        if id == next {
            self.function_table.push(Function {
                id,
                name,
                system_name: name,
                filename: file,
                start_line: 0,
            });
        }
        id
    }

    fn mapping(&mut self, mapping: &Mapping) -> u64 {
        if let Some(id) = self.mappings.get(&mapping.id) {
            return *id;
        }
        let id = self.mapping_table.len() as u64 + 1;
        let filename = self.string(&mapping.path);
        let build_id = self.string(&mapping.build_id);
        let (start, end) = elf_range(mapping);
        self.mapping_table.push(PprofMapping {
            id,
            memory_start: start,
            memory_limit: end,
            file_offset: mapping.offset,
            filename,
            build_id,
            // Set once a location in it is named: a mapping nothing named is left for
            // symbolizers that have the binary or its debug info (Pyroscope, `go tool pprof`).
            has_functions: false,
            has_filenames: false,
            has_line_numbers: false,
            has_inline_frames: false,
        });
        self.mappings.insert(mapping.id, id);
        self.mapping_delta
            .insert(id, i128::from(mapping.offset) - i128::from(start));
        let rank = match (mapping.is_main, mapping.is_kernel()) {
            (true, _) => 0,
            (false, false) => 1,
            (false, true) => 2,
        };
        self.mapping_rank.insert(id, rank);
        id
    }

    /// `frame`'s address in the address space of its pprof mapping `id`, which grows to cover
    /// the frame's own mapping.
    fn normalize(&mut self, id: u64, frame: &Frame) -> u64 {
        let Some(mapping) = frame.mapping.as_deref().filter(|m| !m.is_kernel()) else {
            return frame.address;
        };
        let delta = self.mapping_delta[&id];
        let (start, end) = elf_range(mapping);
        let address = frame.address.wrapping_sub(mapping.load_bias);
        let own_delta = i128::from(mapping.offset) - i128::from(start);
        if own_delta == delta {
            self.cover(id, start, end, delta);
            return address;
        }
        let shift = |addr: u64| u64::try_from(i128::from(addr) + own_delta - delta).unwrap_or(0);
        self.cover(id, shift(start), shift(end), delta);
        shift(address)
    }

    /// Widens pprof mapping `id` to `start..end`, keeping file offset minus address at `delta`.
    fn cover(&mut self, id: u64, start: u64, end: u64, delta: i128) {
        let entry = &mut self.mapping_table[id as usize - 1];
        if start < entry.memory_start {
            entry.memory_start = start;
            entry.file_offset = u64::try_from(i128::from(start) + delta).unwrap_or(0);
        }
        entry.memory_limit = entry.memory_limit.max(end);
    }

    fn location(&mut self, frame: &Frame) -> u64 {
        let mapping_id = frame.mapping.as_ref().map_or(0, |m| self.mapping(m));
        let address = if mapping_id == 0 {
            frame.address
        } else {
            self.normalize(mapping_id, frame)
        };
        let key = (mapping_id, address);
        if let Some(id) = self.locations.get(&key) {
            return *id;
        }
        let id = self.location_table.len() as u64 + 1;
        let mut lines = Vec::with_capacity(frame.lines.len());
        for line in frame.lines.iter() {
            let function_id = self.function(&line.function, line.file.as_deref());
            lines.push(PprofLine {
                function_id,
                line: i64::from(line.line),
                column: 0,
            });
        }
        if let Some(m) = mapping_id.checked_sub(1) {
            let mapping = &mut self.mapping_table[m as usize];
            mapping.has_functions |= !frame.lines.is_empty();
            mapping.has_filenames |= frame.lines.iter().any(|l| l.file.is_some());
            mapping.has_line_numbers |= frame.lines.iter().any(|l| l.line != 0);
            mapping.has_inline_frames |= frame.lines.len() > 1;
        }
        self.location_table.push(Location {
            id,
            mapping_id,
            address,
            line: lines,
            is_folded: false,
        });
        self.locations.insert(key, id);
        id
    }

    /// Adds samples, with the labels chosen by [`ProfileBuilder::sample_labels`]; samples that
    /// differ only in labels left out merge.
    pub fn add(&mut self, samples: &[ResolvedSample]) {
        for sample in samples {
            let kept = match self.values {
                Values::OnCpu => !sample.off_cpu,
                Values::OnAndOffCpu => true,
                Values::OffCpu => sample.off_cpu,
            };
            if !kept {
                continue;
            }
            let locations: Vec<u64> = sample.frames.iter().map(|f| self.location(f)).collect();
            let labels = match self.labels {
                SampleLabels::All => [
                    i64::from(sample.pid),
                    i64::from(sample.tid),
                    self.string(&sample.comm),
                    self.string(&sample.thread),
                ],
                SampleLabels::None => [0; 4],
                SampleLabels::ThreadNames => [0, 0, 0, self.string(&sample.thread)],
            };
            self.samples.entry((locations, labels)).or_default()[usize::from(sample.off_cpu)] +=
                sample.count;
        }
    }

    /// The profile as it stands, covering `duration_nanos` of recording.
    pub fn build(&mut self, duration_nanos: i64) -> Profile {
        let samples_type = ValueType {
            r#type: self.string("samples"),
            unit: self.string("count"),
        };
        let cpu_type = ValueType {
            r#type: self.string("cpu"),
            unit: self.string("nanoseconds"),
        };
        let off_cpu_type = ValueType {
            r#type: self.string(OFF_CPU_TYPE),
            unit: self.string("nanoseconds"),
        };
        // Label keys only when samples carry them: an unused string is noise in the table.
        let keys = match self.labels {
            SampleLabels::All => [
                self.string("pid"),
                self.string("tid"),
                self.string("comm"),
                self.string("thread"),
            ],
            SampleLabels::None => [0; 4],
            SampleLabels::ThreadNames => [0, 0, 0, self.string("thread")],
        };
        let mut samples: Vec<Sample> = Vec::with_capacity(self.samples.len());
        let mut entries: Vec<_> = self.samples.iter().collect();
        // Deterministic output: the same input always encodes to the same bytes.
        entries.sort();
        for ((locations, labels), [count, off_cpu]) in entries {
            let label = |key: i64, str: i64, num: i64| Label {
                key,
                str,
                num,
                num_unit: 0,
            };
            samples.push(Sample {
                location_id: locations.clone(),
                value: match self.values {
                    Values::OnCpu => vec![*count as i64, *count as i64 * self.period_ns],
                    Values::OnAndOffCpu => vec![
                        *count as i64,
                        *count as i64 * self.period_ns,
                        *off_cpu as i64,
                    ],
                    Values::OffCpu => vec![*off_cpu as i64],
                },
                label: [
                    label(keys[0], 0, labels[0]),
                    label(keys[1], 0, labels[1]),
                    label(keys[2], labels[2], 0),
                    label(keys[3], labels[3], 0),
                ]
                .into_iter()
                .filter(|l| l.key != 0)
                .collect(),
            });
        }
        let time_nanos = self
            .start
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        // Tools take the first mapping for the main binary (ids are explicit; order is free).
        let mut mapping = self.mapping_table.clone();
        mapping.sort_by_key(|m| self.mapping_rank[&m.id]);
        // Off-CPU values are measured, not sampled: their period is one nanosecond.
        let (sample_type, default_type, period_type, period) = match self.values {
            Values::OnCpu => (
                vec![samples_type, cpu_type],
                cpu_type,
                cpu_type,
                self.period_ns,
            ),
            Values::OnAndOffCpu => (
                vec![samples_type, cpu_type, off_cpu_type],
                off_cpu_type,
                cpu_type,
                self.period_ns,
            ),
            Values::OffCpu => (vec![off_cpu_type], off_cpu_type, off_cpu_type, 1),
        };
        Profile {
            sample_type,
            sample: samples,
            mapping,
            location: self.location_table.clone(),
            function: self.function_table.clone(),
            string_table: self.string_table.clone(),
            drop_frames: 0,
            keep_frames: 0,
            time_nanos,
            duration_nanos,
            period_type: Some(period_type),
            period,
            comment: vec![],
            default_sample_type: default_type.r#type,
            doc_url: 0,
        }
    }
}

/// A mapping's address range in ELF virtual addresses (as mapped when its load bias is 0).
fn elf_range(mapping: &Mapping) -> (u64, u64) {
    (
        mapping.start.wrapping_sub(mapping.load_bias),
        mapping.end.wrapping_sub(mapping.load_bias),
    )
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::Arc};

    use super::{ProfileBuilder, ProfileSet, SampleLabels};
    use crate::resolve::{FileKey, Frame, Line, Mapping, ResolvedSample};

    fn mapping_at(id: u64, path: &str, is_main: bool, start: u64) -> Arc<Mapping> {
        Arc::new(Mapping {
            id,
            start,
            end: start + 0x800,
            offset: 0,
            path: path.into(),
            file: (id != 1).then_some(FileKey {
                dev: 8,
                ino: id,
                size: 1,
                mtime_ns: 0,
            }),
            build_id: format!("b{id}"),
            is_main,
            load_bias: 0,
        })
    }

    fn mapping(id: u64, path: &str, is_main: bool) -> Arc<Mapping> {
        mapping_at(id, path, is_main, 0x1000 * id)
    }

    fn frame(mapping: &Arc<Mapping>, address: u64, names: &[&str]) -> Frame {
        Frame {
            address,
            mapping: Some(mapping.clone()),
            lines: names
                .iter()
                .map(|n| Line {
                    function: Arc::from(*n),
                    file: Some(Arc::from("src.c")),
                    line: 7,
                })
                .collect(),
        }
    }

    fn sample(frames: Vec<Frame>, tid: u32, count: u64) -> ResolvedSample {
        ResolvedSample {
            process: Default::default(),
            pid: 10,
            tid,
            comm: Arc::from("app"),
            thread: Arc::from("worker"),
            frames,
            count,
            off_cpu: false,
        }
    }

    #[test]
    fn follows_the_pprof_spec() {
        let kernel = mapping(1, "[kernel.kallsyms]", false);
        let lib = mapping(2, "/lib/libc.so.6", false);
        let exe = mapping(3, "/bin/app", true);
        let leaf = frame(&lib, 0x2010, &["memcpy"]);
        let inlined = frame(&exe, 0x3020, &["inner", "outer"]);
        let root = frame(&exe, 0x3030, &["main"]);
        let sys = frame(&kernel, 0x1010, &["do_syscall_64"]);

        let mut builder = ProfileBuilder::new(100);
        builder.add(&[
            sample(vec![leaf.clone(), inlined.clone(), root.clone()], 11, 2),
            sample(vec![sys, leaf.clone(), root.clone()], 11, 1),
        ]);
        // The same stack and labels again: merged, not repeated.
        builder.add(&[sample(vec![leaf, inlined, root], 11, 3)]);
        let profile = builder.build(1_000_000_000);

        assert_eq!(profile.string_table[0], "");
        let strings: HashSet<&String> = profile.string_table.iter().collect();
        assert_eq!(
            strings.len(),
            profile.string_table.len(),
            "strings are unique"
        );
        for ids in [
            profile.mapping.iter().map(|m| m.id).collect::<Vec<_>>(),
            profile.location.iter().map(|l| l.id).collect(),
            profile.function.iter().map(|f| f.id).collect(),
        ] {
            assert!(ids.iter().all(|id| *id != 0));
            assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
        }
        assert_eq!(profile.sample.len(), 2);
        let total: i64 = profile.sample.iter().map(|s| s.value[0]).sum();
        assert_eq!(total, 6);
        assert_eq!(profile.period, 10_000_000);
        for s in &profile.sample {
            assert_eq!(s.value[1], s.value[0] * profile.period);
            assert_eq!(s.label.len(), 4);
        }
        let name = |i: i64| profile.string_table[i as usize].as_str();
        // Main binary first, kernel last.
        assert_eq!(name(profile.mapping[0].filename), "/bin/app");
        assert_eq!(
            name(profile.mapping.last().unwrap().filename),
            "[kernel.kallsyms]"
        );
        // Inlined frames: one location, two lines, innermost first.
        let loc = profile.location.iter().find(|l| l.line.len() == 2).unwrap();
        let func = |id: u64| {
            let f = profile.function.iter().find(|f| f.id == id).unwrap();
            name(f.name)
        };
        assert_eq!(func(loc.line[0].function_id), "inner");
        assert_eq!(func(loc.line[1].function_id), "outer");
        assert_eq!(loc.address, 0x3020);
        assert_eq!(name(profile.default_sample_type), "cpu");
        assert_eq!(profile.duration_nanos, 1_000_000_000);
    }

    #[test]
    fn same_address_in_two_mappings_gives_two_locations() {
        let a = mapping(2, "/bin/a", true);
        let b = mapping(3, "/bin/b", true);
        let mut builder = ProfileBuilder::new(99);
        builder.add(&[
            sample(vec![frame(&a, 0x5000, &["f"])], 1, 1),
            sample(vec![frame(&b, 0x5000, &["g"])], 1, 1),
        ]);
        let profile = builder.build(1);
        assert_eq!(profile.location.len(), 2);
        assert_eq!(profile.mapping.len(), 2);
    }

    #[test]
    fn one_binary_in_two_processes_is_one_mapping() {
        // The same binary (same id) loaded at two bases by two processes.
        let first = mapping_at(5, "/bin/app", true, 0x40_0000);
        let second = mapping_at(5, "/bin/app", true, 0x7f00_0000);
        let mut builder = ProfileBuilder::new(99);
        builder.add(&[
            sample(vec![frame(&first, 0x40_0123, &["f"])], 1, 1),
            sample(vec![frame(&second, 0x7f00_0123, &["f"])], 2, 1),
        ]);
        let profile = builder.build(1);
        assert_eq!(profile.mapping.len(), 1);
        assert_eq!(profile.location.len(), 1, "one pc of one binary");
        let m = &profile.mapping[0];
        let loc = &profile.location[0];
        assert_eq!(loc.address - m.memory_start + m.file_offset, 0x123);
    }

    #[test]
    fn unnamed_frames_keep_elf_addresses_and_leave_their_mapping_to_symbolizers() {
        // A PIE loaded at two bases; its text is at ELF address 0x1000, file offset 0x1000.
        let at = |base: u64| {
            let mut m =
                Arc::into_inner(mapping_at(6, "/bin/stripped", true, base + 0x1000)).unwrap();
            m.offset = 0x1000;
            m.load_bias = base;
            Arc::new(m)
        };
        let (first, second) = (at(0x5555_0000_0000), at(0x7f00_0000_0000));
        let lib = mapping(2, "/lib/libc.so.6", false);
        let mut builder = ProfileBuilder::new(99);
        builder.add(&[
            sample(vec![frame(&first, 0x5555_0000_1234, &[])], 1, 1),
            sample(vec![frame(&second, 0x7f00_0000_1234, &[])], 2, 1),
            sample(vec![frame(&lib, 0x2010, &["memcpy"])], 2, 1),
        ]);
        let profile = builder.build(1);
        let name = |i: i64| profile.string_table[i as usize].as_str();
        let stripped = &profile.mapping[0];
        assert_eq!(name(stripped.filename), "/bin/stripped");
        assert_eq!(name(stripped.build_id), "b6");
        assert!(!stripped.has_functions, "nothing in it was named");
        assert_eq!(
            (stripped.memory_start, stripped.file_offset),
            (0x1000, 0x1000)
        );
        assert!(profile.mapping[1].has_functions);
        let unnamed: Vec<_> = profile
            .location
            .iter()
            .filter(|l| l.line.is_empty())
            .collect();
        assert_eq!(unnamed.len(), 1, "one pc of one binary");
        assert_eq!(unnamed[0].address, 0x1234, "the ELF address");
        let folded: Vec<String> = crate::export::folded_stacks(&profile)
            .iter()
            .map(|s| s.line())
            .collect();
        assert!(
            folded.contains(&"app;stripped+0x1234 2".to_owned()),
            "{folded:?}"
        );
    }

    fn label_names(profile: &profiler_proto::pprof::Profile) -> Vec<Vec<&str>> {
        profile
            .sample
            .iter()
            .map(|s| {
                s.label
                    .iter()
                    .map(|l| profile.string_table[l.key as usize].as_str())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn agent_profiles_carry_no_labels_and_merge_processes_and_threads() {
        let exe = mapping(3, "/bin/app", true);
        let stack = vec![frame(&exe, 0x3020, &["work"])];
        let mut other_process = sample(stack.clone(), 12, 4);
        other_process.pid = 11;
        other_process.comm = Arc::from("app2");
        let mut builder = ProfileBuilder::new(99).sample_labels(SampleLabels::None);
        builder.add(&[
            sample(stack.clone(), 11, 2),
            sample(stack, 13, 3),
            other_process,
        ]);
        let profile = builder.build(1);
        assert_eq!(profile.sample.len(), 1, "one stack, one sample");
        assert_eq!(profile.sample[0].value[0], 9);
        assert!(profile.sample[0].label.is_empty());
        for unused in ["pid", "tid", "comm", "thread", "worker", "app"] {
            assert!(
                !profile.string_table.iter().any(|s| s == unused),
                "{unused}"
            );
        }
    }

    #[test]
    fn thread_names_are_the_one_label_when_asked_for() {
        let exe = mapping(3, "/bin/app", true);
        let stack = vec![frame(&exe, 0x3020, &["work"])];
        let mut io = sample(stack.clone(), 12, 1);
        io.thread = Arc::from("io");
        let mut builder = ProfileBuilder::new(99).sample_labels(SampleLabels::ThreadNames);
        builder.add(&[sample(stack.clone(), 11, 2), sample(stack, 13, 3), io]);
        let profile = builder.build(1);
        assert_eq!(profile.sample.len(), 2, "two thread names");
        assert_eq!(label_names(&profile), vec![vec!["thread"]; 2]);
        let name = |i: i64| profile.string_table[i as usize].as_str();
        let mut threads: Vec<(&str, i64)> = profile
            .sample
            .iter()
            .map(|s| (name(s.label[0].str), s.value[0]))
            .collect();
        threads.sort();
        assert_eq!(threads, vec![("io", 1), ("worker", 5)]);
    }

    #[test]
    fn record_profiles_keep_every_label() {
        let exe = mapping(3, "/bin/app", true);
        let mut builder = ProfileBuilder::new(99);
        builder.add(&[sample(vec![frame(&exe, 0x3020, &["work"])], 11, 2)]);
        let profile = builder.build(1);
        assert_eq!(
            label_names(&profile),
            vec![vec!["pid", "tid", "comm", "thread"]]
        );
    }

    #[test]
    fn off_cpu_time_is_its_own_sample_type() {
        let exe = mapping(3, "/bin/app", true);
        let stack = vec![frame(&exe, 0x3020, &["wait"])];
        let mut blocked = sample(stack.clone(), 11, 30_000_000);
        blocked.off_cpu = true;
        let samples = [sample(stack, 11, 2), blocked];
        let name = |p: &profiler_proto::pprof::Profile, i: i64| p.string_table[i as usize].clone();

        let mut both = ProfileBuilder::new(100).values(super::Values::OnAndOffCpu);
        both.add(&samples);
        let profile = both.build(1);
        let types: Vec<String> = profile
            .sample_type
            .iter()
            .map(|t| name(&profile, t.r#type))
            .collect();
        assert_eq!(types, ["samples", "cpu", "offcpu"]);
        assert_eq!(name(&profile, profile.default_sample_type), "offcpu");
        assert_eq!(
            profile.sample.len(),
            1,
            "one stack: on and off CPU in one sample"
        );
        assert_eq!(profile.sample[0].value, [2, 20_000_000, 30_000_000]);

        let mut only = ProfileBuilder::new(100)
            .sample_labels(SampleLabels::None)
            .values(super::Values::OffCpu);
        only.add(&samples);
        let profile = only.build(1);
        let types: Vec<String> = profile
            .sample_type
            .iter()
            .map(|t| name(&profile, t.r#type))
            .collect();
        assert_eq!(types, ["offcpu"]);
        assert_eq!(profile.sample[0].value, [30_000_000]);

        let mut on = ProfileBuilder::new(100);
        on.add(&samples);
        assert_eq!(
            on.build(1).sample[0].value,
            [2, 20_000_000],
            "off-CPU left out"
        );
    }

    #[test]
    fn a_capped_set_folds_extra_keys_into_the_overflow_key() {
        let exe = mapping(3, "/bin/app", true);
        let one = sample(vec![frame(&exe, 0x3020, &["work"])], 11, 1);
        let mut set = ProfileSet::new(99, SampleLabels::None).with_cap(2, "overflow");
        assert!(!set.add(&"a", &one));
        assert!(!set.add(&"b", &one));
        assert!(set.add(&"c", &one), "a third key is one too many");
        assert!(set.add(&"d", &one));
        assert!(!set.add(&"a", &one), "keys already in stay");
        assert!(
            !set.add(&"overflow", &one),
            "the overflow key is not counted"
        );
        let taken = set.take(std::time::SystemTime::now(), std::time::SystemTime::now());
        let keys: Vec<&str> = taken.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec!["a", "b", "overflow"]);
        assert_eq!(taken[2].1.sample[0].value[0], 3);
        // The next interval starts afresh.
        assert!(set.is_empty());
        assert!(!set.add(&"c", &one));
    }
}
