//! Prometheus `relabel_config` semantics over a plain label map.
//!
//! Users already know how to shape labels with Prometheus relabeling (keep
//! only some namespaces, copy `__meta_kubernetes_pod_label_*` labels, rename
//! things), so the profiler accepts the same rules instead of inventing its
//! own language. The behaviour follows Prometheus' `model/relabel` package:
//!
//! * regexes are fully anchored (`^(?s:REGEX)$`), so `foo` does not match
//!   `foobar`, and `.` matches newlines;
//! * `source_labels` values are joined with `separator` (missing labels count
//!   as empty strings);
//! * `$1`, `$name`, `${1}`, `${name}` and `$$` in `replacement` and
//!   `target_label` expand like Go's `Regexp.Expand`: a reference takes the
//!   longest run of letters, digits and `_`, so `$1x` is the group named `1x`
//!   (which does not exist, so it expands to nothing), not group 1 followed by
//!   `x`; write `${1}x` for that;
//! * a `replace` whose result is empty deletes the target label, and one whose
//!   expanded `target_label` is not a valid label name does nothing.
//!
//! Differences from Prometheus: only the six actions below exist (no
//! `hashmod`, `lowercase`, `uppercase`, `keepequal`, `dropequal`); action names
//! must be lowercase; Rust's `regex` crate is used instead of Go's RE2, so
//! `\d`, `\w`, `\s` and `\b` are Unicode-aware rather than ASCII-only; label
//! names are checked against the classic `[a-zA-Z_][a-zA-Z0-9_]*` rule.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use anyhow::{bail, Context};
use regex::{Captures, Regex};
use serde::Deserialize;

/// What a relabeling rule does. Names as in Prometheus, lowercase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Match `regex` against the joined source values; on a match, set
    /// `target_label` to the expanded `replacement` (or delete it if that is
    /// empty). No match: no change.
    #[default]
    Replace,
    /// Drop the target unless `regex` matches the joined source values.
    Keep,
    /// Drop the target if `regex` matches the joined source values.
    Drop,
    /// For every label whose *name* matches `regex`, add a copy named by the
    /// expanded `replacement` (the original stays).
    Labelmap,
    /// Delete every label whose name matches `regex`.
    Labeldrop,
    /// Delete every label whose name does not match `regex`.
    Labelkeep,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Replace => "replace",
            Action::Keep => "keep",
            Action::Drop => "drop",
            Action::Labelmap => "labelmap",
            Action::Labeldrop => "labeldrop",
            Action::Labelkeep => "labelkeep",
        }
    }
}

/// One Prometheus `relabel_config` entry, as written in the configuration
/// file. Unknown keys are rejected so that a typo (`target-label`) is an
/// error instead of a silently ignored rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelabelConfig {
    /// Labels whose values are joined (with `separator`) into the string the
    /// regex is matched against. Not used by the `label*` actions.
    #[serde(default)]
    pub source_labels: Vec<String>,
    /// Joins the source values; `;` when absent.
    pub separator: Option<String>,
    /// The regex, implicitly anchored at both ends; `(.*)` when absent.
    pub regex: Option<String>,
    /// The label `replace` writes; may contain `$1`-style references.
    /// Required for `replace`.
    pub target_label: Option<String>,
    /// What `replace` and `labelmap` write; `$1` when absent.
    pub replacement: Option<String>,
    /// What to do; `replace` when absent.
    #[serde(default)]
    pub action: Action,
}

/// A list of relabeling rules, checked and compiled once so that applying
/// them per sample costs no parsing.
#[derive(Debug, Clone)]
pub struct Relabeler {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    source_labels: Vec<String>,
    separator: String,
    regex: Regex,
    target_label: String,
    replacement: String,
    action: Action,
}

const DEFAULT_SEPARATOR: &str = ";";
const DEFAULT_REGEX: &str = "(.*)";
const DEFAULT_REPLACEMENT: &str = "$1";

impl Relabeler {
    /// Checks and compiles `configs`, in order. An empty list gives a
    /// relabeler that keeps every label set unchanged.
    ///
    /// # Errors
    ///
    /// Fails, naming the rule as `relabel_configs[i]` (0-based) and the
    /// problem, when a regex does not compile, when `replace` has no (or an
    /// invalid) `target_label`, when the `replacement` of `labelmap` cannot
    /// form a label name, or when `labeldrop`/`labelkeep` set fields they
    /// would ignore.
    pub fn new(configs: &[RelabelConfig]) -> anyhow::Result<Relabeler> {
        let rules = configs
            .iter()
            .enumerate()
            .map(|(i, config)| {
                Rule::compile(config).with_context(|| {
                    format!("relabel_configs[{i}] (action {})", config.action.name())
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Relabeler { rules })
    }

    /// Applies every rule in order to `labels`, editing it in place.
    ///
    /// Returns `false` when a `keep` or `drop` rule rejects the label set: the
    /// caller should then drop the target (sample, process) entirely. Later
    /// rules are not run in that case and `labels` is left as it was at that
    /// point. Returns `true` otherwise, including when nothing changed.
    pub fn apply(&self, labels: &mut BTreeMap<String, String>) -> bool {
        self.rules.iter().all(|rule| rule.apply(labels))
    }

    /// Whether there are no rules (then [`Relabeler::apply`] never changes
    /// anything), so callers can skip building labels only rules would use.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

impl Rule {
    fn compile(config: &RelabelConfig) -> anyhow::Result<Rule> {
        let pattern = config.regex.as_deref().unwrap_or(DEFAULT_REGEX);
        // Compile the user's pattern alone first so errors point into what
        // they wrote, not into the anchoring wrapper.
        if let Err(err) = Regex::new(pattern) {
            bail!("invalid regex {pattern:?}: {}", one_line(&err.to_string()));
        }
        let regex = Regex::new(&format!("^(?s:{pattern})$"))
            .with_context(|| format!("invalid regex {pattern:?}"))?;

        let target_label = config.target_label.clone().unwrap_or_default();
        match config.action {
            Action::Replace => {
                if target_label.is_empty() {
                    bail!("replace requires target_label");
                }
                if !is_valid_label_template(&target_label) {
                    bail!("target_label {target_label:?} is not a valid label name");
                }
            }
            Action::Labelmap => {
                let replacement = config.replacement.as_deref().unwrap_or(DEFAULT_REPLACEMENT);
                if !is_valid_label_template(replacement) {
                    bail!("replacement {replacement:?} is not a valid label name");
                }
            }
            Action::Labeldrop | Action::Labelkeep => {
                let extra = [
                    (!config.source_labels.is_empty(), "source_labels"),
                    (config.target_label.is_some(), "target_label"),
                    (config.separator.is_some(), "separator"),
                    (config.replacement.is_some(), "replacement"),
                ];
                if let Some((_, field)) = extra.iter().find(|(set, _)| *set) {
                    bail!(
                        "{} uses only regex, but {field} is set",
                        config.action.name()
                    );
                }
            }
            Action::Keep | Action::Drop => {}
        }

        Ok(Rule {
            source_labels: config.source_labels.clone(),
            separator: config
                .separator
                .clone()
                .unwrap_or_else(|| DEFAULT_SEPARATOR.to_owned()),
            regex,
            target_label,
            replacement: config
                .replacement
                .clone()
                .unwrap_or_else(|| DEFAULT_REPLACEMENT.to_owned()),
            action: config.action,
        })
    }

    /// Returns false when the label set must be dropped.
    fn apply(&self, labels: &mut BTreeMap<String, String>) -> bool {
        match self.action {
            Action::Replace => {
                let value = self.source_value(labels);
                let Some(caps) = self.regex.captures(&value) else {
                    return true;
                };
                let target = expand(&self.target_label, &caps);
                if !is_valid_label_name(&target) {
                    return true;
                }
                let result = expand(&self.replacement, &caps);
                if result.is_empty() {
                    labels.remove(&target);
                } else {
                    labels.insert(target, result);
                }
                true
            }
            Action::Keep => self.regex.is_match(&self.source_value(labels)),
            Action::Drop => !self.regex.is_match(&self.source_value(labels)),
            Action::Labelmap => {
                let mapped: Vec<(String, String)> = labels
                    .iter()
                    .filter_map(|(name, value)| {
                        let caps = self.regex.captures(name)?;
                        Some((expand(&self.replacement, &caps), value.clone()))
                    })
                    .collect();
                for (name, value) in mapped {
                    if name.is_empty() {
                        continue;
                    }
                    if value.is_empty() {
                        labels.remove(&name);
                    } else {
                        labels.insert(name, value);
                    }
                }
                true
            }
            Action::Labeldrop => {
                labels.retain(|name, _| !self.regex.is_match(name));
                true
            }
            Action::Labelkeep => {
                labels.retain(|name, _| self.regex.is_match(name));
                true
            }
        }
    }

    fn source_value(&self, labels: &BTreeMap<String, String>) -> String {
        let values: Vec<&str> = self
            .source_labels
            .iter()
            .map(|name| labels.get(name).map_or("", String::as_str))
            .collect();
        values.join(&self.separator)
    }
}

/// The classic Prometheus label name rule.
fn is_valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A label name, possibly built from `$1`/`${name}` references: Prometheus'
/// check for `target_label` (replace) and `replacement` (labelmap).
fn is_valid_label_template(template: &str) -> bool {
    static TEMPLATE: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"^(?:(?:[a-zA-Z_]|\$(?:\{[0-9A-Za-z_]+\}|[0-9A-Za-z_]+))+[0-9A-Za-z_]*)+$")
            .expect("static regex")
    });
    if template.contains('$') {
        TEMPLATE.is_match(template)
    } else {
        is_valid_label_name(template)
    }
}

/// Go's `extract` accepts Unicode letters (category L), decimal digits (Nd)
/// and `_` in a reference name.
static REFERENCE_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\A[\p{L}\p{Nd}_]+").expect("static regex"));

/// Expands `$1`, `${1}`, `$name`, `${name}` and `$$` in `template` exactly as
/// Go's `Regexp.Expand` does (which is what Prometheus uses). The regex
/// crate's own `Captures::expand` differs in the corners: it reads `$01` as
/// group 1 (Go: a group named `01`, i.e. nothing) and only knows ASCII names.
fn expand(template: &str, caps: &Captures<'_>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        rest = &rest[dollar + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            out.push('$');
            rest = after;
            continue;
        }
        match extract_reference(rest) {
            Some((name, after)) => {
                rest = after;
                match group_number(name) {
                    Some(n) => out.push_str(caps.get(n).map_or("", |m| m.as_str())),
                    None => out.push_str(caps.name(name).map_or("", |m| m.as_str())),
                }
            }
            // Malformed ("$", "${", "${x", "$-"): the '$' is literal text.
            None => out.push('$'),
        }
    }
    out.push_str(rest);
    out
}

/// Parses `name` or `{name}` at the start of `s`; returns the name and what
/// follows the reference.
fn extract_reference(s: &str) -> Option<(&str, &str)> {
    let (braced, s) = match s.strip_prefix('{') {
        Some(inner) => (true, inner),
        None => (false, s),
    };
    let name = REFERENCE_NAME.find(s)?.as_str();
    let mut after = &s[name.len()..];
    if braced {
        after = after.strip_prefix('}')?;
    }
    Some((name, after))
}

/// A reference is a group number when it is all ASCII digits, has no
/// leading zero (except "0" itself) and is below 10^8 — Go's rules.
fn group_number(name: &str) -> Option<usize> {
    if !name.bytes().all(|b| b.is_ascii_digit()) || name.len() > 8 {
        return None;
    }
    if name.len() > 1 && name.starts_with('0') {
        return None;
    }
    name.parse().ok()
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn rule(action: Action) -> RelabelConfig {
        RelabelConfig {
            action,
            ..RelabelConfig::default()
        }
    }

    fn relabel(
        configs: &[RelabelConfig],
        input: &[(&str, &str)],
    ) -> Option<BTreeMap<String, String>> {
        let relabeler = Relabeler::new(configs).expect("valid rules");
        let mut set = labels(input);
        relabeler.apply(&mut set).then_some(set)
    }

    #[test]
    fn replace_with_defaults_copies_the_value() {
        let config = RelabelConfig {
            source_labels: vec!["__meta_kubernetes_namespace".into()],
            target_label: Some("namespace".into()),
            ..RelabelConfig::default()
        };
        let out = relabel(&[config], &[("__meta_kubernetes_namespace", "prod")]).unwrap();
        assert_eq!(out.get("namespace").map(String::as_str), Some("prod"));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn replace_joins_sources_with_separator_and_expands_groups() {
        let config = RelabelConfig {
            source_labels: vec!["namespace".into(), "pod".into()],
            separator: Some("/".into()),
            regex: Some("(.+)/(.+)-[a-z0-9]{5}".into()),
            target_label: Some("workload".into()),
            replacement: Some("${1}.$2".into()),
            ..RelabelConfig::default()
        };
        let out = relabel(&[config], &[("namespace", "prod"), ("pod", "web-7d4b9")]).unwrap();
        assert_eq!(out["workload"], "prod.web");
    }

    #[test]
    fn replace_default_separator_is_semicolon() {
        let config = RelabelConfig {
            source_labels: vec!["a".into(), "b".into(), "missing".into()],
            target_label: Some("joined".into()),
            ..RelabelConfig::default()
        };
        let out = relabel(&[config], &[("a", "1"), ("b", "2")]).unwrap();
        assert_eq!(out["joined"], "1;2;");
    }

    #[test]
    fn replace_without_match_changes_nothing() {
        let config = RelabelConfig {
            source_labels: vec!["a".into()],
            regex: Some("x(.*)".into()),
            target_label: Some("b".into()),
            ..RelabelConfig::default()
        };
        let out = relabel(&[config], &[("a", "yes"), ("b", "old")]).unwrap();
        assert_eq!(out, labels(&[("a", "yes"), ("b", "old")]));
    }

    #[test]
    fn replace_with_empty_result_deletes_the_target() {
        let config = RelabelConfig {
            source_labels: vec!["missing".into()],
            target_label: Some("b".into()),
            ..RelabelConfig::default()
        };
        let out = relabel(&[config], &[("b", "old")]).unwrap();
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn replace_target_label_is_expanded_and_validated() {
        let config = RelabelConfig {
            source_labels: vec!["kv".into()],
            regex: Some("(.+)=(.*)".into()),
            target_label: Some("tag_$1".into()),
            replacement: Some("$2".into()),
            ..RelabelConfig::default()
        };
        let out = relabel(std::slice::from_ref(&config), &[("kv", "team=core")]).unwrap();
        assert_eq!(out["tag_team"], "core");
        // "tag_bad-name" is not a label name: the rule does nothing.
        let out = relabel(&[config], &[("kv", "bad-name=x")]).unwrap();
        assert_eq!(out, labels(&[("kv", "bad-name=x")]));
    }

    #[test]
    fn regex_is_fully_anchored() {
        let keep = RelabelConfig {
            source_labels: vec!["ns".into()],
            regex: Some("prod".into()),
            action: Action::Keep,
            ..RelabelConfig::default()
        };
        assert!(relabel(std::slice::from_ref(&keep), &[("ns", "prod")]).is_some());
        assert!(relabel(std::slice::from_ref(&keep), &[("ns", "production")]).is_none());
        assert!(relabel(std::slice::from_ref(&keep), &[("ns", "preprod")]).is_none());
        // Alternation is anchored as a whole, not just its first branch.
        let keep_alt = RelabelConfig {
            regex: Some("a|b".into()),
            ..keep.clone()
        };
        assert!(relabel(std::slice::from_ref(&keep_alt), &[("ns", "b")]).is_some());
        assert!(relabel(std::slice::from_ref(&keep_alt), &[("ns", "xb")]).is_none());
        assert!(relabel(&[keep_alt], &[("ns", "ax")]).is_none());
        // '.' matches a newline, as with Prometheus' (?s:...).
        let dot = RelabelConfig {
            regex: Some("a.b".into()),
            ..keep
        };
        assert!(relabel(&[dot], &[("ns", "a\nb")]).is_some());
    }

    #[test]
    fn keep_and_drop() {
        let keep = RelabelConfig {
            source_labels: vec!["namespace".into()],
            regex: Some("kube-.*|monitoring".into()),
            action: Action::Keep,
            ..RelabelConfig::default()
        };
        assert!(relabel(std::slice::from_ref(&keep), &[("namespace", "kube-system")]).is_some());
        assert!(relabel(std::slice::from_ref(&keep), &[("namespace", "default")]).is_none());
        // A missing source label is the empty string, which "kube-.*" does not match.
        assert!(relabel(&[keep], &[]).is_none());

        let drop = RelabelConfig {
            action: Action::Drop,
            source_labels: vec!["namespace".into()],
            regex: Some("kube-.*".into()),
            ..RelabelConfig::default()
        };
        assert!(relabel(std::slice::from_ref(&drop), &[("namespace", "kube-system")]).is_none());
        assert!(relabel(&[drop], &[("namespace", "default")]).is_some());
    }

    #[test]
    fn keep_with_default_regex_keeps_everything() {
        assert!(relabel(&[rule(Action::Keep)], &[("a", "b")]).is_some());
        // And drop with the default regex drops everything.
        assert!(relabel(&[rule(Action::Drop)], &[("a", "b")]).is_none());
    }

    #[test]
    fn drop_stops_later_rules() {
        let drop = RelabelConfig {
            source_labels: vec!["a".into()],
            action: Action::Drop,
            regex: Some("x".into()),
            ..RelabelConfig::default()
        };
        let set = RelabelConfig {
            source_labels: vec!["a".into()],
            target_label: Some("later".into()),
            ..RelabelConfig::default()
        };
        let relabeler = Relabeler::new(&[drop, set]).unwrap();
        let mut input = labels(&[("a", "x")]);
        assert!(!relabeler.apply(&mut input));
        assert!(!input.contains_key("later"));
    }

    #[test]
    fn labelmap_copies_kubernetes_pod_labels() {
        let config = RelabelConfig {
            regex: Some("__meta_kubernetes_pod_label_(.+)".into()),
            action: Action::Labelmap,
            ..RelabelConfig::default()
        };
        let out = relabel(
            &[config],
            &[
                ("__meta_kubernetes_pod_label_app_kubernetes_io_name", "web"),
                ("__meta_kubernetes_pod_label_team", "core"),
                ("__meta_kubernetes_pod_labelpresent_team", "true"),
                ("__meta_kubernetes_namespace", "prod"),
            ],
        )
        .unwrap();
        assert_eq!(out["app_kubernetes_io_name"], "web");
        assert_eq!(out["team"], "core");
        // Originals stay, and labelpresent_* does not match the anchored regex.
        assert_eq!(out["__meta_kubernetes_pod_label_team"], "core");
        assert!(!out.contains_key("present_team"));
        assert_eq!(out.len(), 6);
    }

    #[test]
    fn labelmap_with_custom_replacement() {
        let config = RelabelConfig {
            regex: Some("k8s_(.+)".into()),
            replacement: Some("kube_${1}".into()),
            action: Action::Labelmap,
            ..RelabelConfig::default()
        };
        let out = relabel(&[config], &[("k8s_pod", "p"), ("other", "o")]).unwrap();
        assert_eq!(
            out,
            labels(&[("k8s_pod", "p"), ("kube_pod", "p"), ("other", "o")])
        );
    }

    #[test]
    fn labeldrop_and_labelkeep() {
        let input = [
            ("__meta_x", "1"),
            ("__meta_y", "2"),
            ("job", "j"),
            ("pod", "p"),
        ];
        let drop = RelabelConfig {
            regex: Some("__meta_.*".into()),
            action: Action::Labeldrop,
            ..RelabelConfig::default()
        };
        assert_eq!(
            relabel(&[drop], &input).unwrap(),
            labels(&[("job", "j"), ("pod", "p")])
        );

        let keep = RelabelConfig {
            regex: Some("job|__meta_x".into()),
            action: Action::Labelkeep,
            ..RelabelConfig::default()
        };
        assert_eq!(
            relabel(&[keep], &input).unwrap(),
            labels(&[("__meta_x", "1"), ("job", "j")])
        );
    }

    #[test]
    fn go_style_expansion() {
        let regex = Regex::new("^(?s:(?P<first>a)(b)?(c))$").unwrap();
        let caps = regex.captures("ac").unwrap();
        let cases = [
            ("$1", "a"),
            ("${1}", "a"),
            ("$first", "a"),
            ("${first}", "a"),
            ("$1x", ""),     // group named "1x": none
            ("${1}x", "ax"), // group 1 then "x"
            ("$2", ""),      // did not participate
            ("$3", "c"),
            ("$9", ""),     // out of range
            ("$01", ""),    // leading zero: a name, not group 1
            ("$0", "ac"),   // the whole match
            ("$$1", "$1"),  // escaped dollar
            ("$", "$"),     // lone dollar is literal
            ("${1", "${1"), // unclosed brace is literal
            ("${}", "${}"), // empty name is literal
            ("a-$1-b", "a-a-b"),
            ("$1.$3", "a.c"),
            ("$1-$3", "a-c"),
            ("$first_", ""), // "_" belongs to the name
            ("$1é", ""),     // Unicode letters belong to the name in Go
        ];
        for (template, want) in cases {
            assert_eq!(expand(template, &caps), want, "template {template:?}");
        }
    }

    #[test]
    fn bad_regex_is_an_error_naming_the_rule() {
        let good = RelabelConfig {
            source_labels: vec!["a".into()],
            target_label: Some("b".into()),
            ..RelabelConfig::default()
        };
        let bad = RelabelConfig {
            regex: Some("(unclosed".into()),
            action: Action::Keep,
            ..RelabelConfig::default()
        };
        let err = Relabeler::new(&[good, bad]).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("relabel_configs[1]"), "{message}");
        assert!(message.contains("invalid regex \"(unclosed\""), "{message}");
        assert!(!message.contains('\n'), "one line: {message}");
    }

    #[test]
    fn replace_without_target_label_is_an_error() {
        let err = Relabeler::new(&[rule(Action::Replace)]).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("relabel_configs[0]"), "{message}");
        assert!(message.contains("requires target_label"), "{message}");

        let invalid = RelabelConfig {
            target_label: Some("not-a-label".into()),
            ..RelabelConfig::default()
        };
        let message = format!("{:#}", Relabeler::new(&[invalid]).unwrap_err());
        assert!(message.contains("not a valid label name"), "{message}");
    }

    #[test]
    fn invalid_label_templates_are_errors() {
        let labelmap = RelabelConfig {
            regex: Some("__meta_(.+)".into()),
            replacement: Some("meta-$1".into()),
            action: Action::Labelmap,
            ..RelabelConfig::default()
        };
        let message = format!("{:#}", Relabeler::new(&[labelmap]).unwrap_err());
        assert!(message.contains("relabel_configs[0]"), "{message}");
        assert!(
            message.contains("\"meta-$1\" is not a valid label name"),
            "{message}"
        );

        let replace = RelabelConfig {
            target_label: Some("${1}-x".into()),
            ..RelabelConfig::default()
        };
        assert!(Relabeler::new(&[replace]).is_err());
        for ok in ["$1", "${1}_x", "tag_$name", "_$1$2"] {
            let replace = RelabelConfig {
                target_label: Some(ok.into()),
                ..RelabelConfig::default()
            };
            Relabeler::new(&[replace]).unwrap_or_else(|e| panic!("{ok}: {e:#}"));
        }
    }

    #[test]
    fn labeldrop_rejects_ignored_fields() {
        let config = RelabelConfig {
            source_labels: vec!["a".into()],
            action: Action::Labeldrop,
            ..RelabelConfig::default()
        };
        let message = format!("{:#}", Relabeler::new(&[config]).unwrap_err());
        assert!(message.contains("labeldrop uses only regex"), "{message}");
    }

    #[test]
    fn empty_relabeler_keeps_everything() {
        let relabeler = Relabeler::new(&[]).unwrap();
        assert!(relabeler.is_empty());
        let mut set = labels(&[("a", "b")]);
        assert!(relabeler.apply(&mut set));
        assert_eq!(set, labels(&[("a", "b")]));
    }

    #[test]
    fn deserializes_with_defaults_and_rejects_unknown_fields() {
        #[derive(Deserialize)]
        struct File {
            relabel_configs: Vec<RelabelConfig>,
        }
        let json = r#"{"relabel_configs": [
            {"source_labels": ["a"], "target_label": "b"},
            {"regex": "__meta_(.+)", "action": "labelmap"},
            {"source_labels": ["ns"], "regex": "kube-.*", "action": "drop"}
        ]}"#;
        let file: File = k8s_openapi::serde_json::from_str(json).unwrap();
        assert_eq!(file.relabel_configs[0].action, Action::Replace);
        assert_eq!(file.relabel_configs[0].separator, None);
        assert_eq!(file.relabel_configs[1].action, Action::Labelmap);
        assert!(file.relabel_configs[1].source_labels.is_empty());
        assert_eq!(file.relabel_configs[2].action, Action::Drop);
        Relabeler::new(&file.relabel_configs).unwrap();

        let typo = r#"{"source_labels": ["a"], "target-label": "b"}"#;
        let err = k8s_openapi::serde_json::from_str::<RelabelConfig>(typo).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let bad_action = r#"{"action": "hashmod"}"#;
        assert!(k8s_openapi::serde_json::from_str::<RelabelConfig>(bad_action).is_err());
    }
}
