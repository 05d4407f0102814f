//! A header that lies about its size must not make the reader allocate what it claims.
//! Alone in its test binary, because it measures the whole process's allocations.

// A counting global allocator is the one way to observe allocation sizes; it forwards to the
// system allocator unchanged.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

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
fn a_header_claiming_terabytes_allocates_at_most_a_few_megabytes() {
    // u8 images: 2^32-1 x 28 x 28, about 3.4 TB claimed, in a 30-byte file; and the same inside gzip.
    let mut lying = vec![0, 0, 0x08, 3];
    for dim in [u32::MAX, 28, 28] {
        lying.extend_from_slice(&dim.to_be_bytes());
    }
    lying.resize(30, 7);
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(&lying).unwrap();
    let gzipped = encoder.finish().unwrap();

    let start = std::time::Instant::now();
    LARGEST.store(0, Ordering::Relaxed);
    assert!(mnist_data::read_idx(lying.as_slice()).is_err());
    assert!(mnist_data::read_idx(gzipped.as_slice()).is_err());
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest <= 4 << 20, "largest allocation was {largest} bytes");
    assert!(start.elapsed().as_secs() < 5, "took {:?}", start.elapsed());
}
