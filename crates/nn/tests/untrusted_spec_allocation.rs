//! A spec's numbers must not size an allocation before they are checked: a model file whose
//! spec claims 60,000 units, and a summary of a model with 100 million parameters, allocate
//! no more than the file itself. Alone in its test binary, because it measures the whole
//! process's allocations.

// A counting global allocator is the one way to observe allocation sizes; it forwards to the
// system allocator unchanged.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use nn::{InputNormalization, ModelInfo, ModelSpec, Sequential, load_model, preset, summary};

struct LargestAllocation;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

#[test]
fn untrusted_sizes_allocate_nothing_before_they_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let model = Sequential::new(preset("two-conv").unwrap(), 1).unwrap();
    let info = ModelInfo {
        normalization: Some(InputNormalization {
            mean: 0.1307,
            std: 0.3081,
        }),
        training: serde_json::Value::Null,
    };
    nn::save_model(&path, &model, &info).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let spec = header["__metadata__"]["spec"]
        .as_str()
        .unwrap()
        .replace("\"units\":128", "\"units\":60000");
    header["__metadata__"]["spec"] = spec.into();
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut mutated = (text.len() as u64).to_le_bytes().to_vec();
    mutated.extend_from_slice(&text);
    mutated.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, &mutated).unwrap();

    LARGEST.store(0, Ordering::Relaxed);
    let error = load_model(&path).unwrap_err().to_string();
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(error.contains("the model expects [60000, 1600]"), "{error}");
    // Reading the 900 KB file is the largest allocation; initialized weights (384 MB) are not.
    assert!(
        largest <= 2 * mutated.len(),
        "largest allocation {largest} bytes for a file of {}",
        mutated.len()
    );

    let wide = ModelSpec::from_json(
        r#"{"name":"wide","input":[1,28,28],"layers":[{"type":"Flatten"},{"type":"Dense","units":125000},{"type":"Dense","units":10}]}"#,
    )
    .unwrap();
    LARGEST.store(0, Ordering::Relaxed);
    let text = summary(&wide, 0).unwrap();
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(text.contains("Total params: 99,375,010"), "{text}");
    assert!(
        largest <= 1 << 16,
        "a summary allocated {largest} bytes at once"
    );
}
