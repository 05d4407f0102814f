//! Neural-network layers with hand-written forward and backward passes, losses, optimizers and
//! model files, built on `tensor`.
