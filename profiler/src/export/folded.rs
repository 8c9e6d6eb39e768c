//! Stacks of a pprof profile as names, root first: the shape folded files, flame graphs and
//! the summary table all read.

use std::collections::HashMap;

use profiler_proto::pprof::Profile;

/// One stack and its sample count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoldedStack {
    /// The process name (`comm`), empty when the profile has no such label.
    pub process: String,
    /// Frame names, root first.
    pub frames: Vec<String>,
    pub count: u64,
}

impl FoldedStack {
    /// The folded-file line: `process;root;...;leaf count`. A `;` inside a name would split
    /// the frame, so it is replaced.
    pub fn line(&self) -> String {
        let mut line = String::new();
        for name in std::iter::once(&self.process)
            .filter(|p| !p.is_empty())
            .chain(&self.frames)
        {
            if !line.is_empty() {
                line.push(';');
            }
            line.push_str(&name.replace(';', ":"));
        }
        format!("{line} {}", self.count)
    }
}

/// One function on a location's stack, with where in its source the location is: the finer
/// keys of `profiler diff` (`--by file`, `--by line`) need more than the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    /// The function's name; for a location without lines, `binary+0xADDR` (ELF address).
    pub function: String,
    /// The function's source file, empty when the profile does not say.
    pub file: String,
    /// The line in `file`, 0 when unknown.
    pub line: i64,
}

/// The frames of every location by location id, root first (a location holds one frame per
/// inlined function). A location without lines is named after its mapping and offset, so that
/// unsymbolized code still adds up by binary.
pub fn location_frames(profile: &Profile) -> HashMap<u64, Vec<Frame>> {
    let strings = &profile.string_table;
    let text = |i: i64| strings.get(i as usize).map_or("", String::as_str);
    let functions: HashMap<u64, (&str, &str)> = profile
        .function
        .iter()
        .map(|f| (f.id, (text(f.name), text(f.filename))))
        .collect();
    let mappings: HashMap<u64, &str> = profile
        .mapping
        .iter()
        .map(|m| (m.id, text(m.filename)))
        .collect();
    profile
        .location
        .iter()
        .map(|loc| {
            // Lines are innermost first; stacks read root first.
            let mut frames: Vec<Frame> = loc
                .line
                .iter()
                .rev()
                .map(|l| {
                    let (function, file) =
                        functions.get(&l.function_id).copied().unwrap_or_default();
                    Frame {
                        function: function.to_owned(),
                        file: file.to_owned(),
                        line: l.line,
                    }
                })
                .collect();
            if frames.is_empty() {
                // Our profiles hold ELF virtual addresses (see the aggregate stage), what
                // `addr2line -e FILE` takes; other tools' hold runtime addresses, the same
                // thing for non-PIE executables.
                let function = match mappings.get(&loc.mapping_id) {
                    Some(path) => {
                        format!("{}+{:#x}", crate::resolve::basename(path), loc.address)
                    }
                    None => "[unknown]".to_owned(),
                };
                frames.push(Frame {
                    function,
                    file: String::new(),
                    line: 0,
                });
            }
            (loc.id, frames)
        })
        .collect()
}

/// Every stack in `profile` counted by its first value (by its off-CPU time when that is the
/// profile's default sample type), inlined functions expanded, merged by name and sorted.
pub fn folded_stacks(profile: &Profile) -> Vec<FoldedStack> {
    folded_stacks_of(profile, shown_value(profile))
}

/// The value folded stacks, flame graphs and the summary show: off-CPU time in a profile
/// whose default sample type it is, else the first (the sample count in ours).
pub fn shown_value(profile: &Profile) -> usize {
    let text = |i: i64| profile.string_table.get(i as usize).map(String::as_str);
    if text(profile.default_sample_type) != Some(crate::aggregate::OFF_CPU_TYPE) {
        return 0;
    }
    profile
        .sample_type
        .iter()
        .position(|t| t.r#type == profile.default_sample_type)
        .unwrap_or(0)
}

/// Like [`folded_stacks`], counting the sample value at `value_index` (of `sample_type`):
/// profiles from other tools put CPU time at another index than ours.
pub fn folded_stacks_of(profile: &Profile, value_index: usize) -> Vec<FoldedStack> {
    let strings = &profile.string_table;
    let text = |i: i64| strings.get(i as usize).map_or("", String::as_str);
    let locations = location_frames(profile);
    let comm_key = strings.iter().position(|s| s == "comm").map(|i| i as i64);
    let mut merged: HashMap<(String, Vec<String>), u64> = HashMap::new();
    for sample in &profile.sample {
        let process = sample
            .label
            .iter()
            .find(|l| Some(l.key) == comm_key)
            .map_or("", |l| text(l.str))
            .to_owned();
        let mut frames = Vec::new();
        for id in sample.location_id.iter().rev() {
            if let Some(names) = locations.get(id) {
                frames.extend(names.iter().map(|f| f.function.clone()));
            }
        }
        let count = sample.value.get(value_index).copied().unwrap_or(0).max(0) as u64;
        *merged.entry((process, frames)).or_default() += count;
    }
    let mut stacks: Vec<FoldedStack> = merged
        .into_iter()
        .map(|((process, frames), count)| FoldedStack {
            process,
            frames,
            count,
        })
        .collect();
    stacks.sort_by(|a, b| (&a.process, &a.frames).cmp(&(&b.process, &b.frames)));
    stacks
}
