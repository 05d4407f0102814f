//! Prints the Keras-style summary of every preset: `cargo run -p nn --example summary`.

fn main() -> Result<(), nn::NnError> {
    for name in nn::PRESETS {
        let spec =
            nn::preset(name).ok_or_else(|| nn::NnError::Spec(format!("no preset {name}")))?;
        println!("{}", nn::summary(&spec, 0)?);
    }
    Ok(())
}
