pub mod money;
pub mod usage;
