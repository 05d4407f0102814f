//! The committed corpus of crafted inputs in `tests/corpus`: mutated model files, architecture
//! specs, images and data directories that the program must refuse. Each line of
//! `expected.tsv` gives an input, the command that reads it and the one-line message it must
//! produce. The binary runs under a 1 GiB address-space limit (RLIMIT_AS, set by `prlimit`), so
//! an allocation sized by an untrusted number would abort it: every case must end with exit
//! code 1 and exactly its message, never a panic or a signal.
//!
//! Provenance: `cargo xtask fuzz-files --model-file <tiny model> --write-corpus
//! crates/cli/tests/corpus` kept the first refused mutants of each kind with the messages the
//! binary gave at the commit that added them; each message was read and names its input and the
//! problem. A change that alters a message regenerates the corpus the same way.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

#[test]
fn every_crafted_input_is_refused_with_its_one_line_message() {
    let dir = corpus();
    let expected = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
    let limited = Command::new("prlimit").arg("--version").output().is_ok();
    if !limited {
        println!("*** SKIPPED the memory limit: no prlimit here; the cases run without it ***");
    }
    let mut kinds = std::collections::BTreeMap::new();
    for line in expected.lines() {
        let [name, command, message] = line.splitn(3, '\t').collect::<Vec<_>>()[..] else {
            panic!("malformed line in expected.tsv: {line}");
        };
        let input = dir.join(name).to_string_lossy().into_owned();
        let args: Vec<String> = command
            .split(' ')
            .map(|a| match a {
                "{input}" => input.clone(),
                "{model}" => dir.join("model.safetensors").to_string_lossy().into_owned(),
                "{digit}" => dir.join("digit.png").to_string_lossy().into_owned(),
                other => other.to_string(),
            })
            .collect();
        let mut run = if limited {
            let mut c = Command::new("prlimit");
            c.arg(format!("--as={}", 1u64 << 30))
                .arg("--")
                .arg(env!("CARGO_BIN_EXE_mnist"));
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_mnist"))
        };
        let output = run
            .args(&args)
            .env("RAYON_NUM_THREADS", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{name}: mnist {command}\n{stderr}"
        );
        assert_eq!(
            stderr.trim_end(),
            message.replace("{input}", &input),
            "{name}: mnist {command}"
        );
        *kinds
            .entry(name.split('-').next().unwrap_or(name))
            .or_insert(0) += 1;
    }
    println!("refused as expected: {kinds:?}");
    assert!(
        kinds.len() >= 4 && kinds.values().all(|&n| n >= 20),
        "{kinds:?}"
    );
}
