//! The simulator unwinding real running processes: registers and stack captured with ptrace,
//! walked with the tables and the shared step, named with the binaries' symbols.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

use common::*;
use profiler_common::unwind::StopReason;
use profiler_unwind::simulate::{Snapshot, Unwound};
use profiler_unwind::{Options, Tables};

/// A child killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(out: &mut BufReader<ChildStdout>, expected: &str) {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim_end(), expected);
}

/// Each frame named `binary:function` (`?` where the binary has no symbol for it).
fn names(snapshot: &Snapshot, unwound: &Unwound, tables: &mut Tables) -> Vec<String> {
    let mappings = snapshot.mappings(tables);
    let mut symbols = std::collections::HashMap::new();
    unwound
        .frames
        .iter()
        .map(|frame| {
            let pc = frame.address - frame.is_return_address as u64;
            let Some(mapping) = mappings.iter().find(|m| m.start <= pc && pc < m.end) else {
                return format!("{:#x}", frame.address);
            };
            let binary = Path::new(&mapping.name)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string();
            if !mapping.name.starts_with('/') {
                return binary;
            }
            let symbols = symbols
                .entry(mapping.name.clone())
                .or_insert_with(|| Symbols::of(Path::new(&mapping.name)));
            let name = symbols.name(pc.wrapping_sub(mapping.bias)).unwrap_or("?");
            format!("{binary}:{name}")
        })
        .collect()
}

/// Captures and unwinds `pid` once its leaf is `leaf`: the line a test waits for is printed
/// just before the process reaches the loop it is captured in, so early captures are retried.
/// The function names of the frames in `binary` (a `binary:` prefix), in stack order.
fn functions_in<'a>(names: &'a [String], binary: &str) -> Vec<&'a str> {
    names
        .iter()
        .filter_map(|n| n.strip_prefix(binary))
        .collect()
}

fn unwind(pid: u32, leaf: &str) -> (Unwound, Vec<String>) {
    unwind_at_most(pid, leaf, 127)
}

fn unwind_at_most(pid: u32, leaf: &str, max_frames: usize) -> (Unwound, Vec<String>) {
    let mut tables = Tables::new(Options::default());
    // Up to 5 s: CI runs tests side by side on two cores.
    for _ in 0..250 {
        let snapshot =
            Snapshot::capture(pid as i32, 512 * 1024).expect("ptrace the child (needs root)");
        let unwound = snapshot.unwind(&mut tables, max_frames);
        let names = names(&snapshot, &unwound, &mut tables);
        if names[0].ends_with(leaf) {
            eprintln!("{:?}: {names:#?}", unwound.stop);
            return (unwound, names);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{pid} never reached {leaf}");
}

/// Starts `command` with its stdout piped and waits for its "ready" line.
fn start(command: &mut Command) -> (Running, BufReader<ChildStdout>) {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let child = Running(child);
    wait_for(&mut out, "ready");
    (child, out)
}

fn start_frames(args: &[&str]) -> (Running, BufReader<ChildStdout>) {
    start(Command::new(frames()).args(args))
}

/// The test program's frames from its leaf down, as frames.c calls them.
const CHAIN: [&str; 7] = [
    "leaf",
    "big_frame",
    "level3",
    "level2",
    "level1",
    "main",
    "_start",
];

#[test]
fn unwinds_a_frameless_process_to_main_and_start() {
    let (child, _out) = start_frames(&[]);
    let (unwound, names) = unwind(child.0.id(), ":leaf");
    assert_eq!(functions_in(&names, "frames:"), CHAIN, "{names:?}");
    assert_eq!(unwound.stop, StopReason::EndOfStack, "{names:?}");
    assert!(!unwound.frames[0].is_return_address);
    assert!(unwound.frames[1..].iter().all(|f| f.is_return_address));
    // main and _start are joined by libc's start code, unwound from libc's table.
    let main = names.iter().position(|n| n == "frames:main").unwrap();
    assert!(names[main + 1].starts_with("libc.so.6:"), "{names:?}");
}

#[test]
fn unwinds_through_a_signal_frame() {
    let (child, mut out) = start_frames(&[]);
    // Interrupt the leaf, not the write of "ready".
    unwind(child.0.id(), ":leaf");
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(child.0.id() as i32, libc::SIGUSR1) }, 0);
    wait_for(&mut out, "handler");
    let (unwound, names) = unwind(child.0.id(), ":handler_spin");
    let ours = functions_in(&names, "frames:");
    assert_eq!(ours[..2], ["handler_spin", "on_signal"], "{names:?}");
    assert_eq!(ours[2..], CHAIN, "{names:?}");
    assert_eq!(unwound.stop, StopReason::EndOfStack, "{names:?}");
    // on_signal returns into libc's __restore_rt, whose signal row yields the interrupted leaf at
    // its exact pc (not a return address).
    let handler = names.iter().position(|n| n == "frames:on_signal").unwrap();
    assert!(names[handler + 1].starts_with("libc.so.6:"), "{names:?}");
    assert_eq!(names[handler + 2], "frames:leaf");
    assert!(!unwound.frames[handler + 2].is_return_address);
}

#[test]
fn unwinds_out_of_the_vdso() {
    let (child, _out) = start_frames(&["vdso"]);
    // The table of the vDSO comes from its image, read out of the process.
    let (unwound, names) = unwind(child.0.id(), "[vdso]");
    let ours = functions_in(&names, "frames:");
    assert_eq!(ours, ["vdso_loop", "main", "_start"], "{names:?}");
    assert_eq!(unwound.stop, StopReason::EndOfStack, "{names:?}");
}

#[test]
fn unwinds_python_to_py_runmain() {
    let Some(python) = required(PYTHON) else {
        return;
    };
    let loop_forever = "print('ready', flush=True)\nwhile True: pass";
    let (child, _out) = start(Command::new(python).args(["-c", loop_forever]));
    let (unwound, names) = unwind(child.0.id(), "_PyEval_EvalFrameDefault");
    assert!(
        names.iter().any(|n| n == "python3.11:Py_RunMain"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.contains("_PyEval_EvalFrameDefault")),
        "{names:?}"
    );
    assert_eq!(unwound.stop, StopReason::EndOfStack, "{names:?}");
}

#[test]
fn unwinds_a_go_program_from_its_debug_frame() {
    let (child, _out) = start(&mut Command::new(go_binary()));
    let (unwound, names) = unwind(child.0.id(), ":main.spin");
    let ours = functions_in(&names, "spin-go:");
    assert_eq!(
        ours,
        [
            "main.spin",
            "main.main",
            "runtime.main",
            "runtime.goexit.abi0"
        ],
        "{names:?}"
    );
    assert_eq!(unwound.stop, StopReason::EndOfStack, "{names:?}");
}

#[test]
fn deep_recursion_stops_at_the_frame_limit_with_the_first_frames_right() {
    let (child, _out) = start_frames(&["deep"]);
    let (unwound, names) = unwind(child.0.id(), ":leaf");
    assert_eq!(unwound.stop, StopReason::FrameLimit);
    assert_eq!(names.len(), 127);
    assert!(
        names[1..].iter().all(|n| n == "frames:recurse"),
        "{names:?}"
    );
    // With room for all of it, the same stack ends cleanly below main.
    let (unwound, names) = unwind_at_most(child.0.id(), ":leaf", 400);
    assert_eq!(unwound.stop, StopReason::EndOfStack, "{names:?}");
    let recursions = names.iter().filter(|n| *n == "frames:recurse").count();
    assert_eq!(recursions, 301);
    assert!(names.iter().any(|n| n == "frames:main"));
}

#[test]
fn falls_back_to_frame_pointers_where_no_cfi_covers() {
    // No CFI for the program's own functions (only crt's), but frame pointers in all of them:
    // each of its frames is one frame-pointer step, then libc's table takes over again.
    let flags = [
        "-fno-omit-frame-pointer",
        "-fno-asynchronous-unwind-tables",
        "-fno-unwind-tables",
        "-g0",
    ];
    let binary = frames_binary("frames-fp-only", &flags);
    let table = profiler_unwind::build_from_path(&binary, &Options::default()).unwrap();
    let (leaf, _) = Symbols::of(&binary).find("leaf").unwrap();
    let row = table.row_for(leaf).unwrap();
    assert_eq!(row.kind, profiler_common::unwind::kind::NO_CFI);

    let (child, _out) = start(&mut Command::new(binary));
    let (unwound, names) = unwind(child.0.id(), ":leaf");
    // gcc builds no frame for leaf (it never returns), so rbp still holds big_frame's frame and
    // the first step lands in its caller: the gap of frame pointers the tables close.
    let expected: Vec<&str> = CHAIN.into_iter().filter(|f| *f != "big_frame").collect();
    assert_eq!(
        functions_in(&names, "frames-fp-only:"),
        expected,
        "{names:?}"
    );
    assert_eq!(unwound.stop, StopReason::EndOfStack, "{names:?}");
}

#[test]
fn unwinds_a_callback_through_libc_qsort() {
    let (child, _out) = start_frames(&["qsort"]);
    let (unwound, names) = unwind(child.0.id(), ":leaf");
    let ours = functions_in(&names, "frames:");
    assert_eq!(
        ours,
        [
            "leaf",
            "compare_then_spin",
            "sort_numbers",
            "main",
            "_start"
        ],
        "{names:?}"
    );
    // Between the comparator and its caller: qsort's own frames, from libc's table.
    let comparator = names
        .iter()
        .position(|n| n == "frames:compare_then_spin")
        .unwrap();
    assert!(names[comparator + 1].starts_with("libc.so.6:"), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("libc.so.6:qsort")),
        "{names:?}"
    );
    assert_eq!(unwound.stop, StopReason::EndOfStack, "{names:?}");
}
