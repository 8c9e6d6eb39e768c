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

/// Every stack in `profile`, inlined functions expanded, merged by name and sorted.
pub fn folded_stacks(profile: &Profile) -> Vec<FoldedStack> {
    let strings = &profile.string_table;
    let text = |i: i64| strings.get(i as usize).map_or("", String::as_str);
    let functions: HashMap<u64, &str> = profile
        .function
        .iter()
        .map(|f| (f.id, text(f.name)))
        .collect();
    let mappings: HashMap<u64, &str> = profile
        .mapping
        .iter()
        .map(|m| (m.id, text(m.filename)))
        .collect();
    let mappings_start: HashMap<u64, (u64, u64)> = profile
        .mapping
        .iter()
        .map(|m| (m.id, (m.memory_start, m.file_offset)))
        .collect();
    let locations: HashMap<u64, Vec<String>> = profile
        .location
        .iter()
        .map(|loc| {
            // Lines are innermost first; folded stacks read root first.
            let mut names: Vec<String> = loc
                .line
                .iter()
                .rev()
                .map(|l| {
                    functions
                        .get(&l.function_id)
                        .copied()
                        .unwrap_or("")
                        .to_owned()
                })
                .collect();
            if names.is_empty() {
                names.push(match mappings.get(&loc.mapping_id) {
                    Some(path) => {
                        let (start, offset) = mappings_start[&loc.mapping_id];
                        let base = crate::resolve::basename(path);
                        format!("[{base}+{:#x}]", loc.address - start + offset)
                    }
                    None => "[unknown]".to_owned(),
                });
            }
            (loc.id, names)
        })
        .collect();
    let comm_key = strings.iter().position(|s| s == "comm").map(|i| i as i64);
    let value_index = 0;
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
                frames.extend(names.iter().cloned());
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
