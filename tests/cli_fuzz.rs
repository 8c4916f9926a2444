//! A property test over the `beam` command line: every subcommand with random values for its
//! options (zero, negative, NaN, infinities, huge, past the context or vocabulary, wrong types,
//! missing or unsuitable files), run as a user would run it. Whatever the arguments, `beam` ends
//! within a time limit with status 0, 1 (our one-line `error: …`) or 2 (clap's usage error), and
//! never panics.
//!
//! Options are drawn one in three, mostly with values of their type (so that most command lines
//! get past clap to beam's own checks), sometimes not. The cases are drawn from a fixed seed (reproducible: a failure prints the whole command);
//! `BEAM_CLI_FUZZ_CASES` runs more of them.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{repo_root, Rng};

/// Values for unsigned integer options: zero, one, around the tiny models' context (128) and
/// kjv-moe's (512), huge, the largest `u64`.
const UINTS: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "7",
    "127",
    "128",
    "129",
    "512",
    "100000",
    "18446744073709551615",
];

/// Values for float options.
const FLOATS: &[&str] = &[
    "0", "-0", "0.5", "1", "1.5", "2", "-1", "NaN", "inf", "-inf", "1e308", "1e-320",
];

/// Values clap itself rejects for a number (tried one time in ten).
const NOT_NUMBERS: &[&str] = &["-1", "abc", "", "1.5", "18446744073709551616", "0x10"];

/// Token id lists.
const IDS: &[&str] = &[
    "1",
    "1,2,3",
    "0",
    "299",
    "300",
    "4294967295",
    "4294967296",
    "-1",
    "1,,2",
    "",
    "a,b",
];

/// Prompts.
const PROMPTS: &[&str] = &["And God said", "", " ", "\u{7}\t", "ñ✓🙂", "\n\n\n"];

/// Models: shipped ones (context 128 and 512; DeepSeek's MLA and FP8), a folder without a model,
/// a missing one.
const MODELS: &[&str] = &[
    "assets/models/tiny-olmoe",
    "assets/models/tiny-deepseek_v3_fp8",
    "assets/models/tiny-qwen3_moe",
    "assets/models/kjv-moe",
    "assets/corpus",
    "/nonexistent",
];

/// Adapters: the one made for kjv-moe (wrong for the tiny models), a non-safetensors file, a
/// missing one.
const ADAPTERS: &[&str] = &[
    "assets/models/kjv-moe/beam-adapter.safetensors",
    "assets/models/kjv-moe/config.json",
    "/nonexistent.safetensors",
];

/// Text for train and eval: the shipped corpus, a JSON file, a missing file.
const DATA: &[&str] = &[
    "assets/corpus/kjv-valid.txt.gz",
    "assets/models/kjv-moe/config.json",
    "/nonexistent.txt",
];

const BACKENDS: &[&str] = &["flex", "ndarray", "wgpu", "cuda", "vulkan"];
const DTYPES: &[&str] = &["f32", "bf16", "f16", "int4"];
const QUANTIZE: &[&str] = &["q8", "q4", "q3"];

fn pick<'a>(rng: &mut Rng, values: &[&'a str]) -> &'a str {
    values[rng.below(values.len())]
}

/// Adds `--name VALUE` with probability 1/3.
fn maybe(rng: &mut Rng, args: &mut Vec<String>, name: &str, values: &[&str]) {
    if rng.below(3) == 0 {
        args.push(format!("--{name}={}", pick(rng, values)));
    }
}

/// Adds `--name N` with probability 1/3: mostly a number of `kind`, sometimes not a number.
fn number(rng: &mut Rng, args: &mut Vec<String>, name: &str, kind: &[&str]) {
    if rng.below(3) == 0 {
        let value = if rng.below(10) == 0 {
            pick(rng, NOT_NUMBERS)
        } else {
            pick(rng, kind)
        };
        args.push(format!("--{name}={value}"));
    }
}

/// One random command line; `SCRATCH` stands for the worker's scratch folder.
fn case(rng: &mut Rng) -> Vec<String> {
    let command = ["info", "logits", "generate", "bench", "eval", "train"][rng.below(6)];
    let mut args = vec![command.to_string()];
    // The model is nearly always a real one so that the options, not the folder, get tested.
    let model = if rng.below(8) == 0 {
        pick(rng, MODELS)
    } else {
        pick(rng, &MODELS[..3])
    };
    args.push(format!("--model={model}"));
    if rng.below(4) == 0 {
        args.push(format!("--backend={}", pick(rng, BACKENDS)));
    }
    match command {
        "train" | "eval" => {
            let data = if rng.below(6) == 0 {
                pick(rng, DATA)
            } else {
                DATA[0]
            };
            args.push(format!("--data={data}"));
            number(rng, &mut args, "seq-len", UINTS);
            number(rng, &mut args, "batch-size", &UINTS[..6]);
        }
        _ => {
            maybe(rng, &mut args, "dtype", DTYPES);
            maybe(rng, &mut args, "quantize", QUANTIZE);
            maybe(rng, &mut args, "beam-adapter", ADAPTERS);
            number(rng, &mut args, "threshold", FLOATS);
        }
    }
    match command {
        "logits" => args.push(format!("--ids={}", pick(rng, IDS))),
        "generate" => {
            if rng.below(2) == 0 {
                args.push(format!("--ids={}", pick(rng, IDS)));
            } else {
                args.push(format!("--prompt={}", pick(rng, PROMPTS)));
            }
            number(rng, &mut args, "max-new-tokens", UINTS);
            number(rng, &mut args, "temperature", FLOATS);
            number(rng, &mut args, "top-p", FLOATS);
            number(rng, &mut args, "seed", UINTS);
            if rng.below(2) == 0 {
                args.push("--json".into());
            }
        }
        "bench" => {
            number(rng, &mut args, "keep", UINTS);
            number(rng, &mut args, "prompt-tokens", UINTS);
            number(rng, &mut args, "new-tokens", UINTS);
            args.push("--json".into());
        }
        "eval" => {
            // A valid token count is evaluated in full (up to the corpus), so it stays small.
            let max_tokens = pick(rng, &["0", "1", "2", "300", "-1", "NaN"]);
            args.push(format!("--max-tokens={max_tokens}"));
            maybe(rng, &mut args, "adapter", ADAPTERS);
            maybe(rng, &mut args, "quantize", QUANTIZE);
            // Each item is four forwards: kept to a few.
            maybe(rng, &mut args, "choice-items", &["0", "1", "2", "-1"]);
            if rng.below(2) == 0 {
                args.push("--json=SCRATCH/eval.json".into());
            }
        }
        "train" => {
            args.push("--out=SCRATCH/run".into());
            // A valid step count runs that many optimiser steps, so it stays small.
            let steps = pick(rng, &["0", "1", "2", "-1", "NaN"]);
            args.push(format!("--steps={steps}"));
            for name in [
                "lr",
                "lambda",
                "target-active-fraction",
                "threshold",
                "init-bias",
            ] {
                number(rng, &mut args, name, FLOATS);
            }
            for name in ["checkpoint-every", "log-every", "seed"] {
                number(rng, &mut args, name, UINTS);
            }
        }
        _ => {}
    }
    args
}

/// Runs `beam args`, killing it after `limit`; `(status code, stderr)` or `None` on a hang.
fn run(args: &[String], limit: Duration) -> Option<(Option<i32>, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_beam"))
        .args(args)
        .current_dir(repo_root())
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run beam");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).ok();
        text
    });
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status.code(), reader.join().unwrap()));
        }
        if start.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn random_command_lines_never_panic_or_hang() {
    let cases: usize = std::env::var("BEAM_CLI_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    let scratch = std::env::temp_dir().join(format!("beam-cli-fuzz-{}", std::process::id()));
    let mut rng = Rng::new(2026);
    let all: Vec<Vec<String>> = (0..cases).map(|_| case(&mut rng)).collect();
    // Two workers, each with its own scratch folder (train's --out, eval's --json).
    // (failures, status codes seen)
    let outcomes: Vec<(Vec<String>, Vec<Option<i32>>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let all = &all;
                let scratch = scratch.join(w.to_string());
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    let mut codes = Vec::new();
                    for args in all.iter().skip(w).step_by(2) {
                        let folder = scratch.display().to_string();
                        let args: Vec<String> =
                            args.iter().map(|a| a.replace("SCRATCH", &folder)).collect();
                        std::fs::remove_dir_all(&scratch).ok();
                        std::fs::create_dir_all(&scratch).unwrap();
                        let shown = format!("beam {}", args.join(" "));
                        match run(&args, Duration::from_secs(120)) {
                            None => failures.push(format!("{shown}: still running after 120 s")),
                            Some((code, stderr)) => {
                                codes.push(code);
                                if stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") {
                                    failures.push(format!("{shown}: panicked: {stderr}"));
                                }
                                match code {
                                    Some(0) | Some(2) => {}
                                    Some(1) => {
                                        let errors: Vec<&str> = stderr
                                            .lines()
                                            .filter(|l| !l.starts_with('[') && !l.starts_with("step "))
                                            .collect();
                                        if errors.len() != 1 || !errors[0].starts_with("error: ") {
                                            failures.push(format!(
                                                "{shown}: exit 1 without one `error:` line: {stderr}"
                                            ));
                                        }
                                    }
                                    other => failures
                                        .push(format!("{shown}: exit status {other:?}: {stderr}")),
                                }
                            }
                        }
                    }
                    (failures, codes)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let failures: Vec<String> = outcomes.iter().flat_map(|o| o.0.clone()).collect();
    let codes: Vec<Option<i32>> = outcomes.iter().flat_map(|o| o.1.clone()).collect();
    let count = |c: i32| codes.iter().filter(|&&x| x == Some(c)).count();
    eprintln!(
        "{cases} command lines: {} ran (exit 0), {} refused by beam (exit 1), {} by clap (exit 2)",
        count(0),
        count(1),
        count(2)
    );
    std::fs::remove_dir_all(&scratch).ok();
    assert!(
        failures.is_empty(),
        "{} of {cases} command lines failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The draw reaches beam's own checks, and real work, not only clap's parser.
    assert!(count(0) >= cases / 10, "too few cases ran");
    assert!(count(1) >= cases / 4, "too few cases reached beam's checks");
}
