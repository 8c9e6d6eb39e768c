"""Runs a composite GitHub Action's `run` steps locally, the way the runner does, for the tests.

    python3 run_composite_action.py ACTION_YML CONTEXT_JSON

CONTEXT_JSON holds `inputs` (merged over the action's defaults), `github` and `runner` objects.
Each step gets `${{ ... }}` expressions substituted in its `env`, `with` and `run`, its `if`
evaluated, and runs with `bash -e` and the files GitHub Actions provides ($GITHUB_ENV,
$GITHUB_OUTPUT, $GITHUB_STEP_SUMMARY, $GITHUB_ACTION_PATH). `uses` steps are printed, not run.
Only the expression forms the action uses are understood; any other one is an error, so the
action cannot quietly rely on something this runner gets wrong.

Prints one `step: NAME: ran|skipped|failed|uses` line per step; exits 1 if a step failed.
Outputs of the action go to stdout as `output: NAME=VALUE` lines.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

from ruamel.yaml import YAML

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def lookup(path, context):
    """The value of a dotted path such as `inputs.runs` or `steps.compare.outputs.status`."""
    value = context
    for part in path.split("."):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            raise SystemExit(f"unsupported expression: {path}")
        value = value.get(part, "") if isinstance(value, dict) else ""
    return "" if value is None else value


def evaluate(expression, context, failed):
    """A value or a comparison; `always()`, `success()`, `failure()`."""
    expression = expression.strip()
    if expression == "always()":
        return True
    if expression == "success()":
        return not failed
    if expression == "failure()":
        return failed
    match = re.fullmatch(r"([\w.-]+)\s*(==|!=)\s*'([^']*)'", expression)
    if match:
        equal = str(lookup(match[1], context)) == match[3]
        return equal if match[2] == "==" else not equal
    return lookup(expression, context)


def substitute(text, context):
    return EXPRESSION.sub(lambda m: str(evaluate(m[1], context, False)), str(text))


def should_run(step, context, failed):
    condition = step.get("if")
    if condition is None:
        return not failed
    condition = EXPRESSION.sub(lambda m: m[1], str(condition))
    # A condition without a status function implies success(), as on GitHub.
    has_status = re.search(r"\b(always|success|failure|cancelled)\(\)", condition)
    return bool(evaluate(condition, context, failed)) and (has_status or not failed)


def read_pairs(path):
    """NAME=VALUE lines of a $GITHUB_OUTPUT or $GITHUB_ENV file (no multi-line values)."""
    pairs = {}
    with open(path) as f:
        for line in f:
            if "=" in line:
                name, value = line.rstrip("\n").split("=", 1)
                pairs[name] = value
    return pairs


def main():
    action_path, context_path = sys.argv[1:3]
    with open(action_path) as f:
        action = YAML(typ="safe").load(f)
    with open(context_path) as f:
        given = json.load(f)
    assert action["runs"]["using"] == "composite", "not a composite action"
    context = {"github": given.get("github", {}), "runner": given.get("runner", {}), "steps": {}}
    # Defaults may be expressions themselves (`${{ github.token }}`).
    inputs = {}
    for name, spec in action.get("inputs", {}).items():
        if name in given.get("inputs", {}):
            inputs[name] = str(given["inputs"][name])
        elif spec.get("required"):
            raise SystemExit(f"required input {name} not given")
        else:
            inputs[name] = substitute(spec.get("default", ""), context)
    unknown = set(given.get("inputs", {})) - set(inputs)
    if unknown:
        raise SystemExit(f"inputs the action does not declare: {sorted(unknown)}")
    context["inputs"] = inputs

    work = tempfile.mkdtemp(prefix="action-")
    env_file = os.path.join(work, "env")
    summary = given.get("summary") or os.path.join(work, "summary.md")
    open(env_file, "w").close()
    exported = {}
    failed = False
    for index, step in enumerate(action["runs"]["steps"]):
        name = step.get("name", f"step {index}")
        if not should_run(step, context, failed):
            print(f"step: {name}: skipped", flush=True)
            continue
        if "uses" in step:
            with_ = {k: substitute(v, context) for k, v in step.get("with", {}).items()}
            print(f"step: {name}: uses {step['uses']} {json.dumps(with_)}", flush=True)
            continue
        assert step.get("shell") == "bash", f"{name}: composite run steps need shell: bash"
        output_file = os.path.join(work, f"output{index}")
        open(output_file, "w").close()
        env = dict(os.environ)
        env.update(exported)
        env.update(
            GITHUB_ACTION_PATH=os.path.dirname(os.path.abspath(action_path)),
            GITHUB_ENV=env_file,
            GITHUB_OUTPUT=output_file,
            GITHUB_STEP_SUMMARY=summary,
            RUNNER_TEMP=str(context["runner"].get("temp", work)),
            GITHUB_REPOSITORY=str(context["github"].get("repository", "")),
        )
        env.update({k: substitute(v, context) for k, v in step.get("env", {}).items()})
        script = substitute(step["run"], context)
        code = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                              env=env).returncode
        exported.update(read_pairs(env_file))
        if "id" in step:
            context["steps"][step["id"]] = {"outputs": read_pairs(output_file)}
        if code != 0:
            failed = True
        print(f"step: {name}: {'failed' if code else 'ran'}", flush=True)
    for name, spec in action.get("outputs", {}).items():
        print(f"output: {name}={substitute(spec['value'], context)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
