//! A Keras-style model summary: layer, output shape, parameters; totals and memory.

use std::fmt::Write;

use crate::error::NnError;
use crate::spec::ModelSpec;

/// The summary table of an architecture whose first `frozen` layers are frozen, as Keras'
/// `model.summary()` prints it; worked out from the spec's plan, so it allocates no weights
/// however large the model.
pub fn summary(spec: &ModelSpec, frozen: usize) -> Result<String, NnError> {
    table(spec, frozen, Detail::Keras)
}

/// [`summary`] with a column saying how each layer is computed: the algorithm of each
/// convolution (see [`tensor::ConvAlgorithm`]).
pub fn detailed_summary(spec: &ModelSpec, frozen: usize) -> Result<String, NnError> {
    table(spec, frozen, Detail::ComputedBy)
}

/// The columns of a summary.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Detail {
    /// Keras': layer, output shape, parameters.
    Keras,
    /// And how the layer is computed.
    ComputedBy,
}

fn table(spec: &ModelSpec, frozen: usize, detail: Detail) -> Result<String, NnError> {
    let plan = spec.plan()?;
    let mut rows = Vec::new();
    for (index, layer) in plan.layers.iter().enumerate() {
        let params: usize = layer
            .tensors
            .iter()
            .filter(|t| !t.name.ends_with("num_batches_tracked"))
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        let shape: Vec<String> = std::iter::once("None".to_string())
            .chain(layer.output.iter().map(usize::to_string))
            .collect();
        let mut name = format!("{index} ({})", layer.kind);
        if let (Detail::ComputedBy, Some(algorithm)) = (detail, layer.algorithm) {
            name += &format!(" [{algorithm}]");
        }
        rows.push((
            name,
            format!("({})", shape.join(", ")),
            group_digits(params),
        ));
    }
    let widths = [
        rows.iter()
            .map(|r| r.0.len())
            .max()
            .unwrap_or(0)
            .max("Layer (type)".len()),
        rows.iter()
            .map(|r| r.1.len())
            .max()
            .unwrap_or(0)
            .max("Output Shape".len()),
        rows.iter()
            .map(|r| r.2.len())
            .max()
            .unwrap_or(0)
            .max("Param #".len()),
    ];
    let rule = |c: char| {
        format!(
            "{}\n",
            c.to_string().repeat(widths.iter().sum::<usize>() + 6)
        )
    };
    let mut out = String::new();
    let _ = writeln!(out, "Model: \"{}\"", spec.name);
    out += &rule('=');
    let _ = writeln!(
        out,
        "{:<w0$}   {:<w1$}   {:>w2$}",
        "Layer (type)",
        "Output Shape",
        "Param #",
        w0 = widths[0],
        w1 = widths[1],
        w2 = widths[2]
    );
    out += &rule('=');
    for (name, shape, params) in &rows {
        let _ = writeln!(
            out,
            "{name:<w0$}   {shape:<w1$}   {params:>w2$}",
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        );
    }
    out += &rule('=');
    let counts = plan.counts_with_frozen(frozen);
    let total = counts.trainable + counts.non_trainable;
    for (label, n) in [
        ("Total", total),
        ("Trainable", counts.trainable),
        ("Non-trainable", counts.non_trainable),
    ] {
        let _ = writeln!(
            out,
            "{label} params: {} ({})",
            group_digits(n),
            human_bytes(n * 4)
        );
    }
    Ok(out)
}

/// 225034 -> "225,034".
pub fn group_digits(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes in Keras' units (powers of 1024, two decimals): 900136 -> "879.04 KB".
pub fn human_bytes(bytes: usize) -> String {
    let units = ["B", "KB", "MB", "GB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", units[unit])
}
