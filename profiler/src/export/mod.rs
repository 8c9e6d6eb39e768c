//! Export: writes a pprof profile as gzipped protobuf, folded stacks, or an SVG flame graph,
//! and turns profiles into Pyroscope uploads and OTLP export requests.

mod folded;
pub mod otlp;
mod top;

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
    str::FromStr,
};

use anyhow::{bail, Context as _, Result};
use flate2::{write::GzEncoder, Compression};
use profiler_proto::pprof::Profile;
use prost::Message as _;

pub use folded::{
    folded_stacks, folded_stacks_of, location_frames, shown_value, FoldedStack, Frame,
};
pub use top::{top_functions, top_table, TopEntry};

/// An output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Gzipped pprof protobuf.
    Pprof,
    /// One line per stack: `frame;frame;frame count`, root first.
    Folded,
    /// An SVG flame graph drawn by inferno.
    Svg,
}

impl FromStr for Format {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pprof" => Ok(Format::Pprof),
            "folded" => Ok(Format::Folded),
            "svg" => Ok(Format::Svg),
            other => bail!("unknown format `{other}` (expected pprof, folded or svg)"),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Pprof => "pprof",
            Format::Folded => "folded",
            Format::Svg => "svg",
        })
    }
}

impl Format {
    /// The format a path's extension implies: .svg, .folded/.txt, else pprof.
    pub fn from_path(path: &Path) -> Format {
        let name = path.to_string_lossy();
        if name.ends_with(".svg") {
            Format::Svg
        } else if name.ends_with(".folded") || name.ends_with(".txt") {
            Format::Folded
        } else {
            Format::Pprof
        }
    }
}

/// Writes `profile` in `format` to `out` (already opened, so a bad path fails before sampling).
pub fn write(profile: &Profile, format: Format, out: File) -> Result<()> {
    let mut out = BufWriter::new(out);
    match format {
        Format::Pprof => out.write_all(&encode_gzipped(profile)?)?,
        Format::Folded => {
            for stack in folded_stacks(profile) {
                writeln!(out, "{}", stack.line())?;
            }
        }
        Format::Svg => write_svg(profile, &mut out)?,
    }
    out.flush().context("writing the output")?;
    Ok(())
}

/// The profile as gzipped protobuf bytes, as pprof files and Pyroscope expect.
pub fn encode_gzipped(profile: &Profile) -> Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(&profile.encode_to_vec())?;
    Ok(encoder.finish()?)
}

fn write_svg(profile: &Profile, out: &mut impl Write) -> Result<()> {
    let lines: Vec<String> = folded_stacks(profile)
        .into_iter()
        .map(|s| s.line())
        .collect();
    let mut options = inferno::flamegraph::Options::default();
    let (title, unit) = match shown_value(profile) {
        0 => ("CPU profile", "samples"),
        _ => ("Off-CPU time", "ns"),
    };
    options.title = title.into();
    options.count_name = unit.into();
    if lines.is_empty() {
        // inferno refuses an empty input; an empty profile still gets a valid picture.
        options.title = format!("{title} (no samples)");
        let empty = ["[no samples] 1"];
        inferno::flamegraph::from_lines(&mut options, empty.iter().copied(), out)?;
    } else {
        inferno::flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)?;
    }
    Ok(())
}

/// A profile ready for the Pyroscope push queue, covering `from`..`until`.
pub fn upload(
    profile: &Profile,
    labels: &std::collections::BTreeMap<String, String>,
    from: std::time::SystemTime,
    until: std::time::SystemTime,
    frequency: u64,
) -> Result<profiler_push::Upload> {
    Ok(profiler_push::Upload {
        labels: labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        pprof_gz: encode_gzipped(profile)?,
        from,
        until,
        sample_rate: frequency as u32,
    })
}
