//! A model's layers as ONNX nodes: one or none per layer, in order, after two nodes that apply
//! the input normalization, and a Softmax that gives the probabilities.

use nn::{InputNormalization, LayerSpec, Sequential};
use tensor::Conv2dDims;

use crate::error::ExportError;
use crate::proto::{
    ATTRIBUTE_FLOAT, ATTRIBUTE_INT, ATTRIBUTE_INTS, AttributeProto, Dimension, DimensionValue,
    FLOAT, GraphProto, NodeProto, TensorProto, TensorShapeProto, TensorTypeProto, TypeProto,
    TypeValue, ValueInfoProto,
};

/// The graph input: float32 pixels in 0..1, `[N, C, H, W]` with a symbolic batch.
pub const INPUT: &str = "input";
/// The scores before any softmax.
pub const LOGITS: &str = "logits";
/// The softmax of the scores.
pub const PROBABILITIES: &str = "probabilities";

/// The graph of `model`, its normalization `(x - mean) / std` first.
pub fn graph(
    model: &Sequential,
    normalization: InputNormalization,
) -> Result<GraphProto, ExportError> {
    let spec = model.spec();
    let plan = spec.plan()?;
    let [c, h, w] = spec.input;
    let mut nodes = vec![
        node(
            "Sub",
            "normalize_mean",
            &[INPUT, "normalization.mean"],
            "centred",
            vec![],
        ),
        node(
            "Div",
            "normalize_std",
            &["centred", "normalization.std"],
            "x0",
            vec![],
        ),
    ];
    let mut initializer = vec![
        tensor("normalization.mean", &[], &[normalization.mean]),
        tensor("normalization.std", &[], &[normalization.std]),
    ];
    model.visit_params(|name, p| {
        initializer.push(tensor(
            name,
            p.value.shape(),
            &p.value.iter().copied().collect::<Vec<_>>(),
        ))
    });
    model.visit_buffers(|name, b| {
        // BatchNorm's batch counter only matters in training.
        if !name.ends_with("num_batches_tracked") {
            initializer.push(tensor(
                name,
                b.shape(),
                &b.iter().copied().collect::<Vec<_>>(),
            ));
        }
    });
    // The value each layer reads, and its shape (one example, no batch axis).
    let mut current = "x0".to_string();
    let mut shape = vec![c, h, w];
    let last = spec.layers.len() - 1;
    for (index, layer) in spec.layers.iter().enumerate() {
        let mut output = format!("x{}", index + 1);
        let name = format!("{index}.{}", layer.name());
        let param = |p: &str| format!("{index}.{p}");
        match *layer {
            LayerSpec::Conv2d {
                filters,
                kernel,
                stride,
                padding,
                bias,
                ..
            } => {
                let dims = Conv2dDims::new(
                    [1, shape[0], shape[1], shape[2]],
                    filters,
                    kernel,
                    stride,
                    padding.into(),
                )?;
                let mut inputs = vec![current.clone(), param("weight")];
                if bias {
                    inputs.push(param("bias"));
                }
                let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                nodes.push(node(
                    "Conv",
                    &name,
                    &inputs,
                    &output,
                    vec![
                        ints("kernel_shape", &kernel),
                        ints("strides", &stride),
                        // ONNX orders pads as all begins, then all ends.
                        ints(
                            "pads",
                            &[dims.pad_top, dims.pad_left, dims.pad_bottom, dims.pad_right],
                        ),
                    ],
                ));
            }
            LayerSpec::MaxPool2d { kernel, stride } | LayerSpec::AvgPool2d { kernel, stride } => {
                let op = if matches!(layer, LayerSpec::MaxPool2d { .. }) {
                    "MaxPool"
                } else {
                    "AveragePool"
                };
                nodes.push(node(
                    op,
                    &name,
                    &[&current],
                    &output,
                    vec![
                        ints("kernel_shape", &kernel),
                        ints("strides", &stride.unwrap_or(kernel)),
                    ],
                ));
            }
            LayerSpec::Flatten => nodes.push(node(
                "Flatten",
                &name,
                &[&current],
                &output,
                vec![int("axis", 1)],
            )),
            LayerSpec::Dense { bias, .. } => {
                let weight = param("weight");
                let bias_name = param("bias");
                let mut inputs = vec![current.as_str(), weight.as_str()];
                if bias {
                    inputs.push(&bias_name);
                }
                // y = x W^T + b, W stored [out, in] as PyTorch's Linear.
                nodes.push(node(
                    "Gemm",
                    &name,
                    &inputs,
                    &output,
                    vec![int("transB", 1)],
                ));
            }
            LayerSpec::ReLU => nodes.push(node("Relu", &name, &[&current], &output, vec![])),
            LayerSpec::LeakyReLU { negative_slope } => nodes.push(node(
                "LeakyRelu",
                &name,
                &[&current],
                &output,
                vec![float("alpha", negative_slope)],
            )),
            LayerSpec::Sigmoid => nodes.push(node("Sigmoid", &name, &[&current], &output, vec![])),
            LayerSpec::Tanh => nodes.push(node("Tanh", &name, &[&current], &output, vec![])),
            // The model's scores are the values before a final Softmax (see
            // `Sequential::forward`); the probabilities below apply it.
            LayerSpec::Softmax if index == last => output.clone_from(&current),
            LayerSpec::Softmax => nodes.push(node(
                "Softmax",
                &name,
                &[&current],
                &output,
                vec![int("axis", 1)],
            )),
            // Dropout is the identity at inference.
            LayerSpec::Dropout { .. } => output.clone_from(&current),
            LayerSpec::BatchNorm2d { eps, .. } | LayerSpec::BatchNorm1d { eps, .. } => {
                let inputs = [
                    current.clone(),
                    param("weight"),
                    param("bias"),
                    param("running_mean"),
                    param("running_var"),
                ];
                let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
                nodes.push(node(
                    "BatchNormalization",
                    &name,
                    &inputs,
                    &output,
                    vec![float("epsilon", eps)],
                ));
            }
        }
        current = output;
        shape.clone_from(&plan.layers[index].output);
    }
    // The last value computed is the logits; name it so.
    nodes.push(node("Identity", "logits", &[&current], LOGITS, vec![]));
    nodes.push(node(
        "Softmax",
        "probabilities",
        &[LOGITS],
        PROBABILITIES,
        vec![int("axis", 1)],
    ));
    let classes = plan.classes();
    Ok(GraphProto {
        node: nodes,
        name: Some(spec.name.clone()),
        initializer,
        doc_string: Some(format!("{spec}")),
        input: vec![value_info(INPUT, &[None, Some(c), Some(h), Some(w)])],
        output: vec![
            value_info(LOGITS, &[None, Some(classes)]),
            value_info(PROBABILITIES, &[None, Some(classes)]),
        ],
    })
}

fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    output: &str,
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: Some(name.to_string()),
        op_type: Some(op.to_string()),
        attribute,
        doc_string: None,
    }
}

fn ints(name: &str, values: &[usize]) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        ints: values.iter().map(|&v| v as i64).collect(),
        r#type: Some(ATTRIBUTE_INTS),
        ..AttributeProto::default()
    }
}

fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        i: Some(value),
        r#type: Some(ATTRIBUTE_INT),
        ..AttributeProto::default()
    }
}

fn float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        f: Some(value),
        r#type: Some(ATTRIBUTE_FLOAT),
        ..AttributeProto::default()
    }
}

/// A float32 constant, row-major little-endian.
fn tensor(name: &str, shape: &[usize], values: &[f32]) -> TensorProto {
    TensorProto {
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(FLOAT),
        name: Some(name.to_string()),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

/// A float32 tensor value's type; `None` for the symbolic batch dimension "N".
fn value_info(name: &str, dims: &[Option<usize>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(size) => DimensionValue::DimValue(*size as i64),
                None => DimensionValue::DimParam("N".into()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(TypeValue::TensorType(TensorTypeProto {
                elem_type: Some(FLOAT),
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: None,
    }
}
