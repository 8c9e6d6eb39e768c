//! The CI action (deploy/ci/action.yml, its steps in profile-diff.sh) and the example workflow:
//! both validate against GitHub's schemas, and the action, run step by step as the runner does
//! (tests/scripts/run_composite_action.py), installs the dist tarball from a URL only when its
//! pinned SHA-256 matches, records a real benchmark on a pull request's merge base and head,
//! and fails on the regression the head brings.
//!
//! check-jsonschema (PyPI, with GitHub's schemas built in) and its ruamel.yaml are installed by
//! `cargo xtask setup`; where they are missing these tests skip, and with CI=true fail.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use profiler_tests::{ship::*, *};

fn deploy_ci() -> PathBuf {
    root().join("deploy/ci")
}

/// `python3 -m check_jsonschema`, or None where it is not installed (skipped, or in CI failed).
fn check_jsonschema() -> Option<Command> {
    let probe = Command::new("python3")
        .args(["-c", "import check_jsonschema"])
        .output();
    if !probe.is_ok_and(|out| out.status.success()) {
        return skip(
            "check-jsonschema is not installed for python3 (`cargo xtask setup` installs it)",
        );
    }
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "check_jsonschema"]);
    Some(cmd)
}

/// Validates `file` against check-jsonschema's built-in `schema`.
fn validate(schema: &str, file: &Path) -> Option<Output> {
    let mut cmd = check_jsonschema()?;
    Some(output(cmd.args(["--builtin-schema", schema]).arg(file)))
}

#[test]
fn action_and_workflow_validate_against_github_schemas() {
    let action = deploy_ci().join("action.yml");
    let workflow = deploy_ci().join("github-actions.yaml");
    for (schema, file) in [
        ("vendor.github-actions", &action),
        ("vendor.github-workflows", &workflow),
    ] {
        let Some(out) = validate(schema, file) else {
            return;
        };
        assert!(
            out.status.success(),
            "{} does not validate against {schema}: {}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The check can fail: a composite step without `shell` is invalid.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("action.yml");
    let text = std::fs::read_to_string(&action).unwrap();
    std::fs::write(&broken, text.replacen("      shell: bash\n", "", 1)).unwrap();
    let out = validate("vendor.github-actions", &broken).unwrap();
    assert!(!out.status.success(), "a step without shell validated");

    // The workflow uses the action instead of building the profiler.
    let workflow = std::fs::read_to_string(&workflow).unwrap();
    assert!(workflow.contains("/deploy/ci@"), "{workflow}");
    assert!(workflow.contains("profiler-sha256:"), "{workflow}");
    assert!(
        !workflow.contains("cargo xtask"),
        "the workflow still builds the profiler"
    );
}

/// A file:// URL of `path`, which curl downloads like any other.
fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

fn sha256(path: &Path) -> String {
    let sum = run_ok(Command::new("sha256sum").arg(path));
    sum.split_whitespace().next().unwrap().to_owned()
}

/// Runs the action with `inputs` (JSON object) under `runner_temp`; returns the runner's exit
/// status, its stdout (step and output lines) and the job summary.
fn run_action(inputs: serde_json::Value, runner_temp: &Path) -> (bool, String, String) {
    let summary = runner_temp.join("summary.md");
    let context = serde_json::json!({
        "inputs": inputs,
        "github": {
            "base_ref": "main",
            "token": "unused",
            "repository": "example/bench",
            "event": {"pull_request": {"number": ""}},
        },
        "runner": {"temp": runner_temp},
        "summary": summary,
    });
    let context_file = runner_temp.join("context.json");
    std::fs::write(&context_file, context.to_string()).unwrap();
    let out = output(
        Command::new("python3")
            .arg(root().join("tests/scripts/run_composite_action.py"))
            .arg(deploy_ci().join("action.yml"))
            .arg(&context_file),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("unsupported expression") && !stderr.contains("Traceback"),
        "the runner could not run the action: {stderr}"
    );
    eprintln!("{stdout}{stderr}");
    let summary = std::fs::read_to_string(summary).unwrap_or_default();
    (out.status.success(), stdout, summary)
}

/// A step's line from the runner: `step: NAME: ran|skipped|failed|uses ...`.
fn step<'a>(stdout: &'a str, name: &str) -> &'a str {
    let prefix = format!("step: {name}: ");
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no step `{name}` in:\n{stdout}"))
}

#[test]
fn install_step_rejects_a_tarball_that_does_not_match_the_pinned_checksum() {
    let Some(tarball) = dist_tarball() else {
        return;
    };
    if check_jsonschema().is_none() {
        return; // ruamel.yaml, which the runner reads the action with, comes with it
    }
    let script = deploy_ci().join("profile-diff.sh");
    let install = |sha: &str, temp: &Path| {
        let env_file = temp.join("env");
        std::fs::write(&env_file, "").unwrap();
        let out = output(
            Command::new(&script)
                .arg("install")
                .env("PROFILER_URL", file_url(&tarball))
                .env("PROFILER_SHA256", sha)
                .env("RUNNER_TEMP", temp)
                .env("GITHUB_ENV", &env_file),
        );
        (out, std::fs::read_to_string(env_file).unwrap())
    };
    let dir = tempfile::tempdir().unwrap();
    let right = sha256(&tarball);
    let wrong = format!(
        "{}{}",
        if right.starts_with('0') { '1' } else { '0' },
        &right[1..]
    );
    let (out, env) = install(&wrong, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a wrong checksum was accepted");
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert!(
        env.is_empty(),
        "PROFILER exported despite the mismatch: {env}"
    );

    let (out, _) = install("latest", dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("64-digit SHA-256"));

    let (out, env) = install(&right.to_uppercase(), dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let binary = env
        .lines()
        .find_map(|line| line.strip_prefix("PROFILER="))
        .expect("PROFILER in $GITHUB_ENV");
    assert!(Path::new(binary).starts_with(dir.path()), "{binary}");
    let version = run_ok(Command::new(binary).arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");

    // Through the action: the first step fails, and nothing is recorded or compared.
    let temp = tempfile::tempdir().unwrap();
    let (ok, stdout, _) = run_action(
        serde_json::json!({
            "profiler-url": file_url(&tarball),
            "profiler-sha256": wrong,
            "command": "true",
        }),
        temp.path(),
    );
    assert!(!ok);
    assert_eq!(step(&stdout, "Download and verify the profiler"), "failed");
    assert_eq!(step(&stdout, "Record the base and the head"), "skipped");
    assert_eq!(step(&stdout, "Compare"), "skipped");
}

/// Runs git with a fixed identity, asserting success.
fn git(dir: &Path, args: &[&str]) -> String {
    run_ok(
        Command::new("git")
            .current_dir(dir)
            .args(["-c", "user.name=test", "-c", "user.email=test@example.com"])
            .args([
                "-c",
                "init.defaultBranch=main",
                "-c",
                "advice.detachedHead=false",
            ])
            .args(args),
    )
}

#[test]
fn action_records_base_and_head_and_fails_on_the_regression() {
    let Some(tarball) = dist_tarball() else {
        return;
    };
    if check_jsonschema().is_none() {
        return;
    }
    let Some(t) = bpf_test() else { return };
    // A project whose benchmark is the test workload, built from source by `prepare`. The pull
    // request makes `light` twice as expensive (3 units to 6 of every 13), which raises its
    // share from 30% to about 46%.
    let origin = t.path("origin");
    std::fs::create_dir(&origin).unwrap();
    let source = std::fs::read_to_string(root().join("tests/workloads/workload.c")).unwrap();
    std::fs::write(origin.join("workload.c"), &source).unwrap();
    git(&origin, &["init", "--quiet"]);
    git(&origin, &["add", "workload.c"]);
    git(&origin, &["commit", "--quiet", "-m", "base"]);
    let head = t.path("head");
    git(
        t.dir.path(),
        &["clone", "--quiet", path_str(&origin), path_str(&head)],
    );
    git(&head, &["checkout", "--quiet", "-b", "pull-request"]);
    let slower = source.replace("#define LIGHT_UNITS 3", "#define LIGHT_UNITS 6");
    assert_ne!(slower, source, "workload.c no longer defines LIGHT_UNITS 3");
    std::fs::write(head.join("workload.c"), slower).unwrap();
    git(&head, &["commit", "--quiet", "-am", "make light slower"]);
    // A commit on main after the branch point: the baseline is the merge base, not main's tip.
    std::fs::write(origin.join("unrelated"), "").unwrap();
    git(&origin, &["add", "unrelated"]);
    git(&origin, &["commit", "--quiet", "-m", "later on main"]);

    let temp = t.path("runner");
    std::fs::create_dir(&temp).unwrap();
    let (ok, stdout, summary) = run_action(
        serde_json::json!({
            "profiler-url": file_url(&tarball),
            "profiler-sha256": sha256(&tarball),
            "working-directory": head,
            "prepare": "gcc -O0 -g -fno-omit-frame-pointer -mno-omit-leaf-frame-pointer -o workload workload.c",
            "command": "./workload shares 1",
            "runs": 2,
            "fail-above": 5,
            "sample-type": "cpu",
        }),
        &temp,
    );
    for name in [
        "Download and verify the profiler",
        "Check out the merge base",
        "Record the base and the head",
        "Compare",
    ] {
        assert_eq!(step(&stdout, name), "ran", "{stdout}");
    }
    // Not a pull request event here: the comment step says so and succeeds.
    assert_eq!(step(&stdout, "Comment on the pull request"), "ran");
    assert!(step(
        &stdout,
        "Upload the flame graph, the report and the profiles"
    )
    .starts_with("uses actions/upload-artifact@v4"));
    assert_eq!(step(&stdout, "Fail on a significant regression"), "failed");
    assert!(!ok, "the action passed a regression");
    assert!(stdout.contains("output: status=1"), "{stdout}");

    let base = temp.join("profile-diff/base");
    assert!(
        !base.join("unrelated").exists(),
        "the base is main's tip, not the merge base"
    );
    let out = temp.join("profile-diff/out");
    for file in ["base1.pb.gz", "base2.pb.gz", "head1.pb.gz", "head2.pb.gz"] {
        assert!(
            has_function(&read_samples(&out.join(file)), "light"),
            "{file} lacks the benchmark's frames"
        );
    }
    parse_svg(&std::fs::read_to_string(out.join("diff.svg")).unwrap());
    // The job summary is the markdown report, with `light` as the regression.
    let regression = summary
        .lines()
        .find(|line| line.starts_with('|') && line.contains("light"))
        .unwrap_or_else(|| panic!("no row for light in the summary:\n{summary}"));
    assert!(regression.contains('+'), "{regression}");
}
