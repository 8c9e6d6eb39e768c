//! Reading profiles from any pprof writer and merging repeated runs into one side of the
//! comparison: what each function cost, in the chosen value and in samples.

use std::{
    collections::HashMap,
    io::Read as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use flate2::read::GzDecoder;
use profiler_proto::pprof::Profile;
use prost::Message as _;
use serde::Serialize;

use super::KeyBy;
use crate::export::{self, Frame};

/// A pprof sample type: what a value measures (`cpu`, `samples`, `alloc_space`) and in what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SampleType {
    /// The type's name, `type` in pprof (a Rust keyword).
    #[serde(rename = "type")]
    pub kind: String,
    pub unit: String,
}

impl std::fmt::Display for SampleType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.unit)
    }
}

impl SampleType {
    /// Nanoseconds per unit when the values measure time, so that time can be compared across
    /// writers; None for counts, bytes and the like.
    pub fn nanos_per_unit(&self) -> Option<f64> {
        match self.unit.as_str() {
            "nanoseconds" | "ns" => Some(1.0),
            "microseconds" | "us" => Some(1e3),
            "milliseconds" | "ms" => Some(1e6),
            "seconds" | "s" => Some(1e9),
            _ => None,
        }
    }
}

/// What a function (or finer key) was compared by: its name, and with `--by file|line` where
/// it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Key {
    /// The function's name as the profile gives it (demangled by ours and Go's).
    pub function: String,
    /// The source file, with `--by file` and `--by line` when the profile names one.
    pub file: Option<String>,
    /// The line, with `--by line` when the profile has one.
    pub line: Option<i64>,
}

impl Key {
    fn of(frame: &Frame, by: KeyBy) -> Key {
        let file = (by != KeyBy::Function && !frame.file.is_empty()).then(|| frame.file.clone());
        let line = (by == KeyBy::Line && frame.line > 0).then_some(frame.line);
        Key {
            function: frame.function.clone(),
            file,
            line,
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.function)?;
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, " ({file}:{line})"),
            (Some(file), None) => write!(f, " ({file})"),
            (None, Some(line)) => write!(f, " (line {line})"),
            (None, None) => Ok(()),
        }
    }
}

/// What one key cost on one side: in the chosen value (for shares and time) and in samples
/// (for the significance test, which needs counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Where the key was the leaf.
    pub self_value: i64,
    /// Where the key was anywhere on the stack, once per sample even under recursion.
    pub cumulative_value: i64,
    /// Samples where the key was the leaf.
    pub self_samples: u64,
    /// Samples with the key anywhere on the stack: what the significance test counts.
    pub cumulative_samples: u64,
}

impl Cost {
    fn add(&mut self, other: &Cost) {
        self.self_value += other.self_value;
        self.cumulative_value += other.cumulative_value;
        self.self_samples += other.self_samples;
        self.cumulative_samples += other.cumulative_samples;
    }
}

/// One side of the comparison (base or head): one profile, or several runs merged by adding
/// them up, which is what one longer run would have recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Side {
    /// The files merged into this side, in order.
    pub files: Vec<PathBuf>,
    /// What the values measure; every merged file must agree.
    pub sample_type: SampleType,
    /// The chosen value over all samples: the denominator of every share.
    pub total_value: i64,
    /// Samples over all runs: the n of the significance test.
    pub total_samples: u64,
    /// What each key cost, over all runs.
    pub costs: HashMap<Key, Cost>,
    /// Stacks (function names, root first) and their value, for the differential flame graph.
    /// Process names are left out: a benchmark binary's name changes with every build.
    pub stacks: HashMap<Vec<String>, u64>,
}

impl Side {
    /// Reads and merges `paths`, comparing by `by`, with `sample_type` or the default; a file
    /// larger than `max_size` bytes, or that inflates to more, is refused.
    pub fn load(
        paths: &[PathBuf],
        sample_type: Option<&str>,
        by: KeyBy,
        max_size: u64,
    ) -> Result<Side> {
        let mut merged: Option<Side> = None;
        for path in paths {
            let profile = read_profile(path, max_size)?;
            let side = Side::from_profile(path, &profile, sample_type, by)?;
            match merged.as_mut() {
                Some(merged) => merged.merge(side)?,
                None => merged = Some(side),
            }
        }
        merged.ok_or_else(|| anyhow!("no profile given"))
    }

    /// One profile's costs by key. `path` names the profile in errors.
    pub fn from_profile(
        path: &Path,
        profile: &Profile,
        sample_type: Option<&str>,
        by: KeyBy,
    ) -> Result<Side> {
        let name = path.display();
        let value_index =
            pick_sample_type(profile, sample_type).with_context(|| name.to_string())?;
        let counting = counting(profile, value_index).with_context(|| name.to_string())?;

        // Keys are interned, and each location's keys (innermost first) worked out once: a
        // profile has far more samples than locations.
        let mut keys: Vec<Key> = Vec::new();
        let mut key_ids: HashMap<Key, usize> = HashMap::new();
        let locations: HashMap<u64, Vec<usize>> = export::location_frames(profile)
            .into_iter()
            .map(|(id, frames)| {
                let ids = frames
                    .iter()
                    .rev()
                    .map(|frame| {
                        let key = Key::of(frame, by);
                        *key_ids.entry(key.clone()).or_insert_with(|| {
                            keys.push(key);
                            keys.len() - 1
                        })
                    })
                    .collect();
                (id, ids)
            })
            .collect();

        let mut costs = vec![Cost::default(); keys.len()];
        // The last sample each key was counted in, to count it once per sample.
        let mut seen_in = vec![usize::MAX; keys.len()];
        let (mut total_value, mut total_samples) = (0i64, 0u64);
        for (index, sample) in profile.sample.iter().enumerate() {
            let value = sample.value.get(value_index).copied().unwrap_or(0).max(0);
            let samples = counting.samples(&sample.value);
            total_value += value;
            total_samples += samples;
            let stack = sample
                .location_id
                .iter()
                .filter_map(|id| locations.get(id))
                .flatten();
            for (depth, &key) in stack.enumerate() {
                let cost = &mut costs[key];
                if depth == 0 {
                    cost.self_value += value;
                    cost.self_samples += samples;
                }
                if seen_in[key] != index {
                    seen_in[key] = index;
                    cost.cumulative_value += value;
                    cost.cumulative_samples += samples;
                }
            }
        }

        let mut stacks: HashMap<Vec<String>, u64> = HashMap::new();
        for stack in export::folded_stacks_of(profile, value_index) {
            *stacks.entry(stack.frames).or_default() += stack.count;
        }
        let chosen = &profile.sample_type[value_index];
        Ok(Side {
            files: vec![path.to_owned()],
            sample_type: SampleType {
                kind: text(profile, chosen.r#type).to_owned(),
                unit: text(profile, chosen.unit).to_owned(),
            },
            total_value,
            total_samples,
            costs: keys.into_iter().zip(costs).collect(),
            stacks,
        })
    }

    /// Adds `other`'s runs to this side. Both must measure the same thing.
    pub fn merge(&mut self, other: Side) -> Result<()> {
        if other.sample_type != self.sample_type {
            bail!(
                "{} has sample type {} but {} has {}; pick one both have with --sample-type",
                self.files[0].display(),
                self.sample_type,
                other.files[0].display(),
                other.sample_type
            );
        }
        self.files.extend(other.files);
        self.total_value += other.total_value;
        self.total_samples += other.total_samples;
        for (key, cost) in other.costs {
            self.costs.entry(key).or_default().add(&cost);
        }
        for (stack, value) in other.stacks {
            *self.stacks.entry(stack).or_default() += value;
        }
        Ok(())
    }

    /// How many runs were merged: totals divided by it give the average run.
    pub fn runs(&self) -> usize {
        self.files.len()
    }
}

/// The most a profile may take, read or inflated, unless told otherwise: pprof files of real
/// programs are a few MiB; a gzip bomb is not allowed to take the machine's memory.
pub const DEFAULT_MAX_SIZE: u64 = 128 << 20;

/// Reads a pprof file of at most `max_size` bytes (inflated), gzipped or not, and checks that
/// it is one.
pub fn read_profile(path: &Path, max_size: u64) -> Result<Profile> {
    let file =
        std::fs::File::open(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(max_size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > max_size {
        bail!(
            "{} is larger than {} (--max-size)",
            path.display(),
            size_text(max_size)
        );
    }
    decode_profile_within(&bytes, max_size)
        .with_context(|| format!("{} is not a pprof profile", path.display()))
}

/// Decodes pprof bytes, gunzipping them first when they start with gzip's magic number.
/// Protobuf decodes many short byte strings without complaint, so the result is also checked
/// for what every pprof writer puts there: an empty first string and at least one sample type
/// that every sample has a value for.
pub fn decode_profile(bytes: &[u8]) -> Result<Profile> {
    decode_profile_within(bytes, DEFAULT_MAX_SIZE)
}

/// [`decode_profile`], refusing input that inflates to more than `max_size` bytes.
fn decode_profile_within(bytes: &[u8], max_size: u64) -> Result<Profile> {
    let mut raw = Vec::new();
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        GzDecoder::new(bytes)
            .take(max_size.saturating_add(1))
            .read_to_end(&mut raw)
            .context("cannot gunzip it")?;
        if raw.len() as u64 > max_size {
            bail!(
                "it inflates to more than {} (--max-size)",
                size_text(max_size)
            );
        }
        &raw
    } else {
        bytes
    };
    let profile = Profile::decode(bytes).context("cannot decode it as protobuf")?;
    if profile.string_table.first().map(String::as_str) != Some("") {
        bail!("its string table does not start with the empty string");
    }
    if profile.sample_type.is_empty() {
        bail!("it has no sample types");
    }
    let strings = profile.string_table.len() as i64;
    if profile
        .sample_type
        .iter()
        .any(|t| !(0..strings).contains(&t.r#type) || !(0..strings).contains(&t.unit))
    {
        bail!("a sample type names a string that is not in its string table");
    }
    if let Some(sample) = profile
        .sample
        .iter()
        .find(|s| s.value.len() != profile.sample_type.len())
    {
        bail!(
            "a sample has {} values for {} sample types",
            sample.value.len(),
            profile.sample_type.len()
        );
    }
    Ok(profile)
}

/// A size for people: whole MiB where it is one, else bytes.
pub fn size_text(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// String `index` of the profile's table, empty when out of range.
fn text(profile: &Profile, index: i64) -> &str {
    profile
        .string_table
        .get(index as usize)
        .map_or("", String::as_str)
}

/// The index of the sample type to compare: `wanted` by name, else `cpu`, else the first.
fn pick_sample_type(profile: &Profile, wanted: Option<&str>) -> Result<usize> {
    let kind = |i: usize| text(profile, profile.sample_type[i].r#type);
    let indexes = 0..profile.sample_type.len();
    match wanted {
        Some(wanted) => indexes.clone().find(|&i| kind(i) == wanted).ok_or_else(|| {
            let have: Vec<String> = indexes
                .map(|i| {
                    let unit = text(profile, profile.sample_type[i].unit);
                    format!("{}/{unit}", kind(i))
                })
                .collect();
            anyhow!("no sample type `{wanted}` (it has {})", have.join(", "))
        }),
        None => Ok(indexes.clone().find(|&i| kind(i) == "cpu").unwrap_or(0)),
    }
}

/// How to tell a sample's count, which the significance test needs whatever the chosen value
/// measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counting {
    /// The value at this index counts samples.
    Value(usize),
    /// The chosen value at this index is `period` per sample (a time or bytes per sample).
    Period { index: usize, period: i64 },
}

impl Counting {
    fn samples(self, values: &[i64]) -> u64 {
        let value = |i: usize| values.get(i).copied().unwrap_or(0).max(0);
        match self {
            Counting::Value(i) => value(i) as u64,
            Counting::Period { index, period } => ((value(index) + period / 2) / period) as u64,
        }
    }
}

/// Where the sample counts come from: the chosen value when it is a count; else a `count`
/// sample type (`samples/count` first, as ours and Go's have); else the chosen value divided by
/// the profile's period when that is in the same unit.
fn counting(profile: &Profile, value_index: usize) -> Result<Counting> {
    let unit = |i: usize| text(profile, profile.sample_type[i].unit);
    let kind = |i: usize| text(profile, profile.sample_type[i].r#type);
    if unit(value_index) == "count" {
        return Ok(Counting::Value(value_index));
    }
    let indexes = 0..profile.sample_type.len();
    if let Some(i) = indexes
        .clone()
        .find(|&i| kind(i) == "samples" && unit(i) == "count")
        .or_else(|| indexes.clone().find(|&i| unit(i) == "count"))
    {
        return Ok(Counting::Value(i));
    }
    let period_unit = profile.period_type.as_ref().map(|t| text(profile, t.unit));
    if profile.period > 0 && period_unit == Some(unit(value_index)) {
        return Ok(Counting::Period {
            index: value_index,
            period: profile.period,
        });
    }
    bail!(
        "cannot tell how many samples it holds: no sample type in `count` and no period to \
         divide `{}/{}` by",
        kind(value_index),
        unit(value_index)
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use profiler_proto::pprof::{Function, Line, Location, Sample, ValueType};

    use super::*;

    /// A profile the way Go's runtime/pprof writes one: `samples/count` then `cpu/nanoseconds`,
    /// a 10 ms period, one location per function with its file and line. `stacks` are function
    /// names leaf first, with their sample counts.
    pub(crate) fn go_profile(stacks: &[(&[&str], i64)]) -> Profile {
        let mut profile = Profile {
            string_table: ["", "samples", "count", "cpu", "nanoseconds"]
                .map(String::from)
                .to_vec(),
            sample_type: vec![
                ValueType { r#type: 1, unit: 2 },
                ValueType { r#type: 3, unit: 4 },
            ],
            period_type: Some(ValueType { r#type: 3, unit: 4 }),
            period: 10_000_000,
            ..Default::default()
        };
        let mut ids: HashMap<String, u64> = HashMap::new();
        for (names, count) in stacks {
            let mut location_id = Vec::new();
            for name in *names {
                let next = ids.len() as u64 + 1;
                let id = *ids.entry(name.to_string()).or_insert_with(|| {
                    profile.string_table.push(name.to_string());
                    profile.string_table.push(format!("{name}.go"));
                    let name_index = profile.string_table.len() as i64 - 2;
                    profile.function.push(Function {
                        id: next,
                        name: name_index,
                        system_name: name_index,
                        filename: name_index + 1,
                        ..Default::default()
                    });
                    profile.location.push(Location {
                        id: next,
                        line: vec![Line {
                            function_id: next,
                            line: 10 * next as i64,
                            column: 0,
                        }],
                        ..Default::default()
                    });
                    next
                });
                location_id.push(id);
            }
            profile.sample.push(Sample {
                location_id,
                value: vec![*count, count * 10_000_000],
                label: vec![],
            });
        }
        profile
    }

    fn cost(side: &Side, function: &str) -> Cost {
        side.costs
            .iter()
            .find(|(k, _)| k.function == function)
            .map(|(_, c)| *c)
            .unwrap_or_default()
    }

    #[test]
    fn self_and_cumulative_costs_count_recursion_once() {
        let profile = go_profile(&[
            (&["leaf", "f", "main"], 3),
            (&["f", "f", "main"], 2),
            (&["main"], 5),
        ]);
        let side = Side::from_profile(Path::new("a"), &profile, None, KeyBy::Function).unwrap();
        assert_eq!(side.sample_type.to_string(), "cpu/nanoseconds");
        assert_eq!(side.total_samples, 10);
        assert_eq!(side.total_value, 100_000_000);
        let f = cost(&side, "f");
        assert_eq!((f.self_samples, f.cumulative_samples), (2, 5));
        assert_eq!((f.self_value, f.cumulative_value), (20_000_000, 50_000_000));
        let main = cost(&side, "main");
        assert_eq!((main.self_samples, main.cumulative_samples), (5, 10));
        assert_eq!(
            side.stacks[&vec!["main".to_owned(), "f".into(), "leaf".into()]],
            30_000_000
        );
    }

    #[test]
    fn merging_runs_adds_them_up() {
        let a = go_profile(&[(&["x", "main"], 3), (&["main"], 1)]);
        let b = go_profile(&[(&["y", "main"], 2), (&["x", "main"], 4)]);
        let mut side = Side::from_profile(Path::new("a"), &a, None, KeyBy::Function).unwrap();
        side.merge(Side::from_profile(Path::new("b"), &b, None, KeyBy::Function).unwrap())
            .unwrap();
        assert_eq!(side.runs(), 2);
        assert_eq!(side.total_samples, 10);
        assert_eq!(cost(&side, "x").cumulative_samples, 7);
        assert_eq!(cost(&side, "y").self_samples, 2);
        assert_eq!(cost(&side, "main").cumulative_samples, 10);
        assert_eq!(
            side.stacks[&vec!["main".to_owned(), "x".into()]],
            70_000_000
        );

        // Merging is what one profile with all the samples would give.
        let both = go_profile(&[
            (&["x", "main"], 3),
            (&["main"], 1),
            (&["y", "main"], 2),
            (&["x", "main"], 4),
        ]);
        let one = Side::from_profile(Path::new("a"), &both, None, KeyBy::Function).unwrap();
        assert_eq!(one.costs, side.costs);
        assert_eq!(one.stacks, side.stacks);
    }

    #[test]
    fn merging_different_sample_types_is_refused() {
        let p = go_profile(&[(&["main"], 1)]);
        let mut cpu = Side::from_profile(Path::new("a"), &p, None, KeyBy::Function).unwrap();
        let samples =
            Side::from_profile(Path::new("b"), &p, Some("samples"), KeyBy::Function).unwrap();
        let err = cpu.merge(samples).unwrap_err().to_string();
        assert!(
            err.contains("cpu/nanoseconds") && err.contains("samples/count"),
            "{err}"
        );
    }

    #[test]
    fn finer_keys_carry_file_and_line() {
        let profile = go_profile(&[(&["leaf", "main"], 1)]);
        let side = Side::from_profile(Path::new("a"), &profile, None, KeyBy::Line).unwrap();
        let mut keys: Vec<String> = side.costs.keys().map(Key::to_string).collect();
        keys.sort();
        assert_eq!(keys, ["leaf (leaf.go:10)", "main (main.go:20)"]);
        let side = Side::from_profile(Path::new("a"), &profile, None, KeyBy::File).unwrap();
        assert!(side.costs.keys().any(|k| k.to_string() == "leaf (leaf.go)"));
    }

    #[test]
    fn sample_type_choice() {
        let profile = go_profile(&[(&["main"], 2)]);
        assert_eq!(pick_sample_type(&profile, None).unwrap(), 1);
        assert_eq!(pick_sample_type(&profile, Some("samples")).unwrap(), 0);
        let err = pick_sample_type(&profile, Some("alloc_space")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no sample type `alloc_space` (it has samples/count, cpu/nanoseconds)"
        );
        // pprof-rs: one `cpu/count` type, no period; the values are the counts.
        let mut rs = profile.clone();
        rs.sample_type = vec![ValueType { r#type: 3, unit: 2 }];
        rs.period_type = None;
        rs.period = 0;
        for s in &mut rs.sample {
            s.value.truncate(1);
        }
        assert_eq!(counting(&rs, 0).unwrap(), Counting::Value(0));
        // Only nanoseconds, but a period in nanoseconds: counts are value / period.
        let mut ns = profile;
        ns.sample_type.remove(0);
        for s in &mut ns.sample {
            s.value.remove(0);
        }
        let counting = counting(&ns, 0).unwrap();
        assert_eq!(counting.samples(&[20_000_000]), 2);
        let side = Side::from_profile(Path::new("a"), &ns, None, KeyBy::Function).unwrap();
        assert_eq!(side.total_samples, 2);
    }

    #[test]
    fn what_is_not_pprof_is_refused() {
        assert!(decode_profile(b"").is_err());
        assert!(decode_profile(b"just some text\n").is_err());
        assert!(decode_profile(&[0x1f, 0x8b, 1, 2, 3]).is_err());
        let good = go_profile(&[(&["main"], 2)]);
        let bytes = good.encode_to_vec();
        assert_eq!(decode_profile(&bytes).unwrap(), good);
        let gzipped = export::encode_gzipped(&good).unwrap();
        assert_eq!(decode_profile(&gzipped).unwrap(), good);
        let mut short = good;
        short.sample[0].value.pop();
        assert!(decode_profile(&short.encode_to_vec()).is_err());
        // Inflating past the cap stops there, with the cap named.
        let mut zeros = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut zeros, &vec![0u8; 4 << 20]).unwrap();
        let bomb = zeros.finish().unwrap();
        let err = super::decode_profile_within(&bomb, 1 << 20).unwrap_err();
        assert!(format!("{err:#}").contains("more than 1 MiB"), "{err:#}");
    }
}
