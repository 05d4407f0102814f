//! Prints the instruction set the kernels run with here (`avx512`, `avx2` or `baseline`), for
//! CI's log.

fn main() {
    println!("{}", tensor::instruction_set());
}
