pub use beam_model::*;
