//! pprof to OTLP profiles (`opentelemetry.proto.profiles.v1development`): one export request
//! per interval (split when it would exceed the request bound), with one `ProfilesDictionary`
//! shared by all its profiles and one `ResourceProfiles` per target.
//!
//! Every dictionary table starts with its zero value, as the spec asks (`string_table[0]` is
//! `""`, index 0 of the others is the empty message), so that index 0 means "unset".
//! Resource attributes follow the OTel semantic conventions and carry the same target labels
//! the Pyroscope push does, minus those that change on every restart (`pid`,
//! `container_id`): Pyroscope's OTLP ingestion turns each string attribute into a series label.

use std::collections::{BTreeMap, HashMap};

use opentelemetry_proto::tonic::{
    collector::profiles::v1development::ExportProfilesServiceRequest,
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    profiles::v1development::{
        Function, KeyValueAndUnit, Line, Link, Location, Mapping, Profile as OtlpProfile,
        ProfilesDictionary, ResourceProfiles, Sample, ScopeProfiles, Stack, ValueType,
    },
    resource::v1::Resource,
};
use profiler_proto::pprof::Profile;
use prost::Message as _;

/// The mapping attribute Pyroscope reads build IDs from.
pub const BUILD_ID_KEY: &str = "process.executable.build_id.gnu";

/// Target label → resource attribute (OTel semantic conventions). Labels not listed keep
/// their name; `SKIPPED` ones are left out.
const RESOURCE_KEYS: &[(&str, &[&str])] = &[
    ("service_name", &["service.name"]),
    ("node", &["k8s.node.name", "host.name"]),
    ("namespace", &["k8s.namespace.name"]),
    ("pod", &["k8s.pod.name"]),
    ("container", &["k8s.container.name"]),
    ("exe", &["process.executable.name"]),
];

/// Labels that are per-process or per-restart (a new series each time), or that OTLP says
/// another way (`__name__` is the sample type).
const SKIPPED: &[&str] = &["__name__", "pid", "container_id"];

/// pprof sample label → sample attribute.
const SAMPLE_KEYS: &[(&str, &str)] = &[
    ("pid", "process.pid"),
    ("tid", "thread.id"),
    ("thread", "thread.name"),
    ("comm", "process.executable.name"),
];

/// One target's interval: its labels and its pprof profile.
pub struct TargetProfile<'a> {
    /// The labels the Pyroscope push sends for this target.
    pub labels: &'a BTreeMap<String, String>,
    /// The profile, as the pprof path built it.
    pub profile: &'a Profile,
}

/// Export requests for `targets`, each at most `max_bytes` encoded unless a single target's
/// profile is larger on its own (it then goes alone).
pub fn requests(
    targets: &[TargetProfile<'_>],
    max_bytes: usize,
) -> Vec<ExportProfilesServiceRequest> {
    if targets.is_empty() {
        return Vec::new();
    }
    let request = request(targets);
    if targets.len() == 1 || request.encoded_len() <= max_bytes {
        return vec![request];
    }
    // Halving keeps each dictionary holding only what its own half uses.
    let (left, right) = targets.split_at(targets.len() / 2);
    let mut out = requests(left, max_bytes);
    out.extend(requests(right, max_bytes));
    out
}

/// One export request holding every target of `targets`.
pub fn request(targets: &[TargetProfile<'_>]) -> ExportProfilesServiceRequest {
    let mut dictionary = Dictionary::new();
    let resource_profiles = targets
        .iter()
        .map(|target| ResourceProfiles {
            resource: Some(Resource {
                attributes: resource_attributes(target.labels),
                ..Default::default()
            }),
            scope_profiles: vec![ScopeProfiles {
                scope: Some(InstrumentationScope {
                    name: "profiler".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                profiles: vec![dictionary.profile(target.profile)],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        })
        .collect();
    ExportProfilesServiceRequest {
        resource_profiles,
        dictionary: Some(dictionary.finish()),
    }
}

/// The resource attributes of a target with `labels`.
pub fn resource_attributes(labels: &BTreeMap<String, String>) -> Vec<KeyValue> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in labels {
        if SKIPPED.contains(&name.as_str()) || value.is_empty() {
            continue;
        }
        match RESOURCE_KEYS.iter().find(|(label, _)| label == name) {
            Some((_, keys)) => {
                for key in *keys {
                    out.insert((*key).to_owned(), value.clone());
                }
            }
            None => {
                out.insert(name.clone(), value.clone());
            }
        }
    }
    // Outside containers a target is one executable, and its service name is that
    // executable's name.
    let in_container = labels.contains_key("container") || labels.contains_key("container_id");
    if !in_container && !out.contains_key("process.executable.name") {
        if let Some(service) = labels.get("service_name").filter(|s| !s.is_empty()) {
            out.insert("process.executable.name".into(), service.clone());
        }
    }
    out.into_iter()
        .map(|(key, value)| KeyValue {
            key,
            value: Some(string_value(value)),
            ..Default::default()
        })
        .collect()
}

fn string_value(value: String) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(value)),
    }
}

/// The request-wide tables, each interned by content.
struct Dictionary {
    strings: HashMap<String, i32>,
    table: ProfilesDictionary,
    functions: HashMap<Function, i32>,
    mappings: HashMap<Mapping, i32>,
    locations: HashMap<(i32, u64, Vec<Line>), i32>,
    stacks: HashMap<Stack, i32>,
    attributes: HashMap<(i32, AttrValue), i32>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum AttrValue {
    Str(String),
    Int(i64),
}

impl Dictionary {
    fn new() -> Self {
        let mut dictionary = Dictionary {
            strings: HashMap::new(),
            table: ProfilesDictionary {
                mapping_table: vec![Mapping::default()],
                location_table: vec![Location::default()],
                function_table: vec![Function::default()],
                link_table: vec![Link::default()],
                string_table: Vec::new(),
                attribute_table: vec![KeyValueAndUnit::default()],
                stack_table: vec![Stack::default()],
            },
            functions: HashMap::from([(Function::default(), 0)]),
            mappings: HashMap::from([(Mapping::default(), 0)]),
            locations: HashMap::new(),
            stacks: HashMap::from([(Stack::default(), 0)]),
            attributes: HashMap::new(),
        };
        dictionary.string("");
        dictionary
    }

    fn finish(self) -> ProfilesDictionary {
        self.table
    }

    fn string(&mut self, text: &str) -> i32 {
        if let Some(&index) = self.strings.get(text) {
            return index;
        }
        let index = self.table.string_table.len() as i32;
        self.table.string_table.push(text.to_owned());
        self.strings.insert(text.to_owned(), index);
        index
    }

    fn attribute(&mut self, key: &str, value: AttrValue) -> i32 {
        let key = self.string(key);
        if let Some(&index) = self.attributes.get(&(key, value.clone())) {
            return index;
        }
        let index = self.table.attribute_table.len() as i32;
        let any = match &value {
            AttrValue::Str(s) => string_value(s.clone()),
            AttrValue::Int(n) => AnyValue {
                value: Some(any_value::Value::IntValue(*n)),
            },
        };
        self.table.attribute_table.push(KeyValueAndUnit {
            key_strindex: key,
            value: Some(any),
            unit_strindex: 0,
        });
        self.attributes.insert((key, value), index);
        index
    }

    fn intern<T: Clone + Eq + std::hash::Hash>(
        map: &mut HashMap<T, i32>,
        table: &mut Vec<T>,
        value: T,
    ) -> i32 {
        if let Some(&index) = map.get(&value) {
            return index;
        }
        let index = table.len() as i32;
        table.push(value.clone());
        map.insert(value, index);
        index
    }

    /// Converts `profile` into this dictionary's terms.
    fn profile(&mut self, profile: &Profile) -> OtlpProfile {
        let text = |i: i64| {
            profile
                .string_table
                .get(usize::try_from(i).unwrap_or(0))
                .map_or("", String::as_str)
        };

        let mut functions = HashMap::new();
        for f in &profile.function {
            let function = Function {
                name_strindex: self.string(text(f.name)),
                system_name_strindex: self.string(text(f.system_name)),
                filename_strindex: self.string(text(f.filename)),
                start_line: f.start_line,
            };
            let index = Self::intern(
                &mut self.functions,
                &mut self.table.function_table,
                function,
            );
            functions.insert(f.id, index);
        }

        let mut mappings = HashMap::new();
        for m in &profile.mapping {
            let build_id = text(m.build_id);
            let attribute_indices = if build_id.is_empty() {
                Vec::new()
            } else {
                vec![self.attribute(BUILD_ID_KEY, AttrValue::Str(build_id.to_owned()))]
            };
            let mapping = Mapping {
                memory_start: m.memory_start,
                memory_limit: m.memory_limit,
                file_offset: m.file_offset,
                filename_strindex: self.string(text(m.filename)),
                attribute_indices,
            };
            let index = Self::intern(&mut self.mappings, &mut self.table.mapping_table, mapping);
            mappings.insert(m.id, index);
        }

        let mut locations = HashMap::new();
        for l in &profile.location {
            let mapping_index = mappings.get(&l.mapping_id).copied().unwrap_or(0);
            let lines: Vec<Line> = l
                .line
                .iter()
                .map(|line| Line {
                    function_index: functions.get(&line.function_id).copied().unwrap_or(0),
                    line: line.line,
                    column: line.column,
                })
                .collect();
            let key = (mapping_index, l.address, lines);
            let index = match self.locations.get(&key) {
                Some(&index) => index,
                None => {
                    let index = self.table.location_table.len() as i32;
                    self.table.location_table.push(Location {
                        mapping_index,
                        address: l.address,
                        lines: key.2.clone(),
                        attribute_indices: Vec::new(),
                    });
                    self.locations.insert(key, index);
                    index
                }
            };
            locations.insert(l.id, index);
        }

        // The sample count is the value OTLP carries; the CPU time follows from the period.
        // Off-CPU time is carried as measured, as Pyroscope's OTLP ingestion names `off_cpu`.
        let off_cpu = profile
            .sample_type
            .iter()
            .position(|t| text(t.r#type) == crate::aggregate::OFF_CPU_TYPE);
        let count_index = off_cpu.unwrap_or_else(|| {
            profile
                .sample_type
                .iter()
                .position(|t| text(t.r#type) == "samples")
                .unwrap_or(0)
        });
        let samples = profile
            .sample
            .iter()
            .map(|s| {
                let stack: Vec<i32> = s
                    .location_id
                    .iter()
                    .map(|id| locations.get(id).copied().unwrap_or(0))
                    .collect();
                let stack_index = Self::intern(
                    &mut self.stacks,
                    &mut self.table.stack_table,
                    Stack {
                        location_indices: stack,
                    },
                );
                let attribute_indices = s
                    .label
                    .iter()
                    .filter_map(|label| {
                        let name = text(label.key);
                        let key = SAMPLE_KEYS
                            .iter()
                            .find(|(pprof, _)| *pprof == name)
                            .map_or(name, |(_, otel)| otel);
                        let value = if label.str != 0 {
                            AttrValue::Str(text(label.str).to_owned())
                        } else {
                            AttrValue::Int(label.num)
                        };
                        (!key.is_empty()).then(|| self.attribute(key, value))
                    })
                    .collect();
                Sample {
                    stack_index,
                    attribute_indices,
                    link_index: 0,
                    values: vec![s.value.get(count_index).copied().unwrap_or(0)],
                    timestamps_unix_nano: Vec::new(),
                }
            })
            .collect();

        let value_type = |dictionary: &mut Self, kind: &str, unit: &str| ValueType {
            type_strindex: dictionary.string(kind),
            unit_strindex: dictionary.string(unit),
        };
        let (sample_type, period_type, period) = match off_cpu {
            Some(_) => (value_type(self, "off_cpu", "nanoseconds"), None, 0),
            None => (
                value_type(self, "samples", "count"),
                Some(value_type(self, "cpu", "nanoseconds")),
                profile.period,
            ),
        };
        OtlpProfile {
            sample_type: Some(sample_type),
            samples,
            time_unix_nano: u64::try_from(profile.time_nanos).unwrap_or(0),
            duration_nano: u64::try_from(profile.duration_nanos).unwrap_or(0),
            period_type,
            period,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use profiler_proto::pprof::{Function, Line, Location, Mapping, Profile, Sample, ValueType};

    use super::*;

    /// A pprof profile of `main -> work` with `count` samples, as the aggregate stage builds.
    fn pprof(binary: &str, count: i64) -> Profile {
        let strings = [
            "",
            "samples",
            "count",
            "cpu",
            "nanoseconds",
            "main",
            "work",
            binary,
            "abc123",
        ];
        Profile {
            sample_type: vec![
                ValueType { r#type: 1, unit: 2 },
                ValueType { r#type: 3, unit: 4 },
            ],
            sample: vec![Sample {
                location_id: vec![2, 1],
                value: vec![count, count * 10_101_010],
                label: vec![],
            }],
            mapping: vec![Mapping {
                id: 1,
                memory_start: 0x1000,
                memory_limit: 0x2000,
                filename: 7,
                build_id: 8,
                ..Default::default()
            }],
            location: vec![
                Location {
                    id: 1,
                    mapping_id: 1,
                    address: 0x1100,
                    line: vec![Line {
                        function_id: 1,
                        line: 3,
                        column: 0,
                    }],
                    is_folded: false,
                },
                Location {
                    id: 2,
                    mapping_id: 1,
                    address: 0x1200,
                    line: vec![Line {
                        function_id: 2,
                        line: 9,
                        column: 0,
                    }],
                    is_folded: false,
                },
            ],
            function: vec![
                Function {
                    id: 1,
                    name: 5,
                    system_name: 5,
                    ..Default::default()
                },
                Function {
                    id: 2,
                    name: 6,
                    system_name: 6,
                    ..Default::default()
                },
            ],
            string_table: strings.iter().map(|s| s.to_string()).collect(),
            time_nanos: 1_700_000_000_000_000_000,
            duration_nanos: 15_000_000_000,
            period_type: Some(ValueType { r#type: 3, unit: 4 }),
            period: 10_101_010,
            ..Default::default()
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn one_dictionary_with_zero_values_shared_by_every_target() {
        let a = pprof("/bin/app", 5);
        let b = pprof("/bin/app", 7);
        let (la, lb) = (
            labels(&[("service_name", "app"), ("node", "n1"), ("pid", "1")]),
            labels(&[("service_name", "app2"), ("node", "n1"), ("pid", "2")]),
        );
        let request = request(&[
            TargetProfile {
                labels: &la,
                profile: &a,
            },
            TargetProfile {
                labels: &lb,
                profile: &b,
            },
        ]);
        let d = request.dictionary.as_ref().unwrap();
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.mapping_table[0], super::Mapping::default());
        assert_eq!(d.location_table[0], super::Location::default());
        assert_eq!(d.function_table[0], super::Function::default());
        assert_eq!(d.link_table[0], Link::default());
        assert_eq!(d.attribute_table[0], KeyValueAndUnit::default());
        assert_eq!(d.stack_table[0], Stack::default());
        // The same functions, mapping and stack are stored once for both targets.
        assert_eq!(d.function_table.len(), 3);
        assert_eq!(d.mapping_table.len(), 2);
        assert_eq!(d.stack_table.len(), 2);
        let strings: std::collections::HashSet<_> = d.string_table.iter().collect();
        assert_eq!(strings.len(), d.string_table.len(), "strings are interned");

        assert_eq!(request.resource_profiles.len(), 2);
        let profile = &request.resource_profiles[1].scope_profiles[0].profiles[0];
        assert_eq!(profile.samples[0].values, vec![7]);
        let text = |i: i32| d.string_table[i as usize].as_str();
        let st = profile.sample_type.unwrap();
        let pt = profile.period_type.unwrap();
        assert_eq!(
            (text(st.type_strindex), text(st.unit_strindex)),
            ("samples", "count")
        );
        assert_eq!(
            (text(pt.type_strindex), text(pt.unit_strindex)),
            ("cpu", "nanoseconds")
        );
        assert_eq!(profile.period, 10_101_010);
        assert_eq!(profile.time_unix_nano, 1_700_000_000_000_000_000);
        assert_eq!(profile.duration_nano, 15_000_000_000);
        // Leaf first, as in pprof.
        let stack = &d.stack_table[profile.samples[0].stack_index as usize];
        let leaf = &d.location_table[stack.location_indices[0] as usize];
        let function = d.function_table[leaf.lines[0].function_index as usize];
        assert_eq!(text(function.name_strindex), "work");
        // The build ID as the attribute Pyroscope reads.
        let mapping = &d.mapping_table[leaf.mapping_index as usize];
        let attribute = &d.attribute_table[mapping.attribute_indices[0] as usize];
        assert_eq!(text(attribute.key_strindex), BUILD_ID_KEY);
        assert_eq!(
            attribute.value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("abc123".into()))
        );
    }

    #[test]
    fn resource_attributes_follow_semantic_conventions_without_per_restart_labels() {
        let pod = labels(&[
            ("__name__", "process_cpu"),
            ("service_name", "shop/web"),
            ("node", "n1"),
            ("namespace", "shop"),
            ("pod", "web-1"),
            ("container", "app"),
            ("container_id", "abcdef"),
            ("team", "payments"),
        ]);
        let got: BTreeMap<String, String> = resource_attributes(&pod)
            .into_iter()
            .map(|kv| match kv.value.unwrap().value {
                Some(any_value::Value::StringValue(s)) => (kv.key, s),
                other => panic!("{other:?}"),
            })
            .collect();
        let want = labels(&[
            ("service.name", "shop/web"),
            ("k8s.node.name", "n1"),
            ("host.name", "n1"),
            ("k8s.namespace.name", "shop"),
            ("k8s.pod.name", "web-1"),
            ("k8s.container.name", "app"),
            ("team", "payments"),
        ]);
        assert_eq!(got, want);
        let host = labels(&[("service_name", "nginx"), ("pid", "7"), ("comm", "nginx")]);
        let keys: Vec<String> = resource_attributes(&host)
            .into_iter()
            .map(|kv| kv.key)
            .collect();
        assert_eq!(keys, ["comm", "process.executable.name", "service.name"]);
    }

    #[test]
    fn an_interval_is_split_below_the_bound_each_with_its_own_dictionary() {
        let profiles: Vec<Profile> = (0..8).map(|i| pprof(&format!("/bin/app{i}"), 1)).collect();
        let label_sets: Vec<_> = (0..8)
            .map(|i| labels(&[("service_name", &format!("s{i}"))]))
            .collect();
        let targets: Vec<_> = profiles
            .iter()
            .zip(&label_sets)
            .map(|(profile, labels)| TargetProfile { labels, profile })
            .collect();
        let whole = request(&targets).encoded_len();
        assert_eq!(requests(&targets, whole).len(), 1);
        let split = requests(&targets, whole / 3);
        assert!(split.len() >= 3, "{} requests", split.len());
        assert!(split.iter().all(|r| r.encoded_len() <= whole / 3));
        let total: usize = split.iter().map(|r| r.resource_profiles.len()).sum();
        assert_eq!(total, 8, "every target once");
        for r in &split {
            assert_eq!(r.dictionary.as_ref().unwrap().string_table[0], "");
        }
    }
}
