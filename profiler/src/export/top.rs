//! The functions that cost the most, by self and by cumulative share: the end-of-recording table.

use std::collections::{HashMap, HashSet};

use profiler_proto::pprof::Profile;

use super::folded_stacks;

/// One function's share of the samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopEntry {
    pub name: String,
    /// Samples where the function is the leaf.
    pub self_count: u64,
    /// Samples where the function is anywhere on the stack (counted once per sample).
    pub total_count: u64,
}

/// Functions sorted by self count, then cumulative count, then name; and the sample total.
pub fn top_functions(profile: &Profile) -> (Vec<TopEntry>, u64) {
    let mut entries: HashMap<String, TopEntry> = HashMap::new();
    let mut total = 0;
    for stack in folded_stacks(profile) {
        total += stack.count;
        let mut seen = HashSet::new();
        for name in &stack.frames {
            if seen.insert(name.as_str()) {
                entry(&mut entries, name).total_count += stack.count;
            }
        }
        if let Some(leaf) = stack.frames.last() {
            entry(&mut entries, leaf).self_count += stack.count;
        }
    }
    let mut entries: Vec<TopEntry> = entries.into_values().collect();
    entries.sort_by(|a, b| {
        (b.self_count, b.total_count)
            .cmp(&(a.self_count, a.total_count))
            .then_with(|| a.name.cmp(&b.name))
    });
    (entries, total)
}

fn entry<'a>(entries: &'a mut HashMap<String, TopEntry>, name: &str) -> &'a mut TopEntry {
    entries.entry(name.to_owned()).or_insert_with(|| TopEntry {
        name: name.to_owned(),
        self_count: 0,
        total_count: 0,
    })
}

/// A text table of the `n` most expensive functions.
pub fn top_table(profile: &Profile, n: usize) -> String {
    let (entries, total) = top_functions(profile);
    let share = |count: u64| 100.0 * count as f64 / total.max(1) as f64;
    let mut out = format!("{:>7} {:>7}  function\n", "self%", "total%");
    for entry in entries.iter().take(n) {
        out.push_str(&format!(
            "{:>6.1}% {:>6.1}%  {}\n",
            share(entry.self_count),
            share(entry.total_count),
            entry.name
        ));
    }
    out
}
