#!/usr/bin/env bash
# The steps of the profile-diff action (action.yml beside this file), one subcommand each, so
# that they can be run and tested outside GitHub Actions. Inputs come in environment variables;
# results go where GitHub Actions reads them ($GITHUB_ENV, $GITHUB_OUTPUT, $GITHUB_STEP_SUMMARY).
#
#   install   PROFILER_URL PROFILER_SHA256 -> downloads, verifies, unpacks; PROFILER=... in $GITHUB_ENV
#   base      BASE_REF HEAD_DIR BASE_DIR   -> a worktree of the merge base of HEAD and origin/BASE_REF
#   record    PROFILER BASE_DIR HEAD_DIR COMMAND [PREPARE] RUNS FREQUENCY OUT_DIR
#   compare   PROFILER RUNS FAIL_ABOVE SAMPLE_TYPE OUT_DIR -> OUT_DIR/diff.{md,svg}, status output
#   comment   OUT_DIR PR_NUMBER GH_TOKEN   -> the report as a pull-request comment
set -euo pipefail

fail() {
    echo "::error::$*" >&2
    exit 1
}

# The directory the profiler is unpacked into, and the tarball's name there.
install_dir() { echo "${RUNNER_TEMP:-/tmp}/profiler"; }

install() {
    : "${PROFILER_URL:?the profiler-url input is required}"
    local sha256="${PROFILER_SHA256:-}"
    # Only a checksum pinned in the workflow proves anything: one fetched from the same place as
    # the tarball would be replaced along with it.
    [[ "$sha256" =~ ^[0-9a-fA-F]{64}$ ]] ||
        fail "profiler-sha256 must be the tarball's 64-digit SHA-256 (from the release's SHA256SUMS), got '$sha256'"
    local dir tarball
    dir=$(install_dir)
    rm -rf "$dir"
    mkdir -p "$dir"
    tarball="$dir/profiler.tar.gz"
    curl --fail --silent --show-error --location --retry 3 --output "$tarball" "$PROFILER_URL" ||
        fail "could not download $PROFILER_URL"
    echo "${sha256,,}  $tarball" | sha256sum --check --strict --quiet ||
        fail "checksum mismatch: $PROFILER_URL is not the tarball whose SHA-256 is $sha256"
    tar -xzf "$tarball" -C "$dir"
    local binary
    binary=$(find "$dir" -mindepth 2 -maxdepth 2 -type f -name profiler -perm -u+x | head -n 1)
    [[ -n "$binary" ]] || fail "no profiler binary in $PROFILER_URL"
    "$binary" --version
    echo "PROFILER=$binary" >>"${GITHUB_ENV:?}"
}

base() {
    : "${BASE_REF:?base-ref is empty: run on pull_request, or set base-ref}"
    local head_dir="${HEAD_DIR:-.}" base_dir="${BASE_DIR:?}"
    git -C "$head_dir" fetch --no-tags --quiet origin "$BASE_REF" ||
        fail "could not fetch $BASE_REF from origin"
    local merge_base
    merge_base=$(git -C "$head_dir" merge-base FETCH_HEAD HEAD) ||
        fail "no merge base of HEAD and $BASE_REF: check out with fetch-depth: 0"
    rm -rf "$base_dir"
    git -C "$head_dir" worktree add --detach "$base_dir" "$merge_base"
}

# Runs "$@" as root: the profiler needs BPF.
as_root() {
    if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi
}

record() {
    local runs="${RUNS:-1}" frequency="${FREQUENCY:-499}" out
    out=$(realpath -m "${OUT_DIR:?}") # the runs cd into the checkouts
    [[ "$runs" =~ ^[1-9][0-9]*$ ]] || fail "runs must be a positive number, got '$runs'"
    : "${COMMAND:?the command input is required}" "${PROFILER:?run the install step first}"
    mkdir -p "$out"
    # Build (or whatever PREPARE does) outside the recording, so the profile holds the
    # benchmarks, not the compiler.
    if [[ -n "${PREPARE:-}" ]]; then
        (cd "${BASE_DIR:?}" && bash -c "$PREPARE")
        (cd "${HEAD_DIR:?}" && bash -c "$PREPARE")
    fi
    # Base and head take turns, so a machine that slows down over time weighs on both alike.
    # record writes the profile even when the command fails, and exits with its code.
    # The benchmark runs as the invoking user, with their PATH and HOME, under the root profiler.
    local bench=(bash -c "$COMMAND")
    if [[ $(id -u) != 0 ]]; then
        bench=(sudo -u "$(id -un)" env "PATH=$PATH" "HOME=$HOME" "${bench[@]}")
    fi
    local i side dir
    for ((i = 1; i <= runs; i++)); do
        for side in base head; do
            if [[ $side == base ]]; then dir=$BASE_DIR; else dir=$HEAD_DIR; fi
            echo "::group::$side, run $i of $runs"
            (cd "$dir" && as_root "$PROFILER" record -F "$frequency" -o "$out/$side$i.pb.gz" -- "${bench[@]}")
            echo "::endgroup::"
        done
    done
}

# RUNS files OUT_DIR/SIDE1.pb.gz,...,OUT_DIR/SIDEn.pb.gz as one comma-separated argument.
runs_of() {
    local side=$1 list="" i
    for ((i = 1; i <= ${RUNS:-1}; i++)); do
        list+="${list:+,}$OUT_DIR/$side$i.pb.gz"
    done
    echo "$list"
}

compare() {
    : "${PROFILER:?run the install step first}" "${OUT_DIR:?}"
    local args=(diff "$(runs_of base)" "$(runs_of head)" --format markdown --svg "$OUT_DIR/diff.svg")
    if [[ -n "${FAIL_ABOVE:-}" ]]; then args+=(--fail-above "$FAIL_ABOVE"); fi
    if [[ -n "${SAMPLE_TYPE:-}" ]]; then args+=(--sample-type "$SAMPLE_TYPE"); fi
    local status=0
    "$PROFILER" "${args[@]}" >"$OUT_DIR/diff.md" || status=$?
    echo "status=$status" >>"${GITHUB_OUTPUT:?}"
    echo "report=$OUT_DIR/diff.md" >>"$GITHUB_OUTPUT"
    # 0: nothing rose significantly by more than fail-above points; 1: something did (the
    # action fails after commenting); anything else is an error, e.g. 2 for bad input.
    if ((status > 1)); then
        fail "profiler diff failed with exit code $status"
    fi
    cat "$OUT_DIR/diff.md" >>"${GITHUB_STEP_SUMMARY:?}"
}

comment() {
    [[ -n "${PR_NUMBER:-}" ]] || {
        echo "not a pull request: the report is in the job summary only"
        return 0
    }
    # A fork's pull request gets a read-only token: the job summary still has the report.
    gh pr comment "$PR_NUMBER" --repo "${GITHUB_REPOSITORY:?}" --body-file "${OUT_DIR:?}/diff.md" ||
        echo "::warning::could not comment on pull request $PR_NUMBER (a fork's read-only token?); the report is in the job summary"
}

case "${1:-}" in
install | base | record | compare | comment) "$1" ;;
*) fail "usage: $0 install|base|record|compare|comment" ;;
esac
