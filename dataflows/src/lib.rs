pub mod food_counts;
pub mod money;
pub mod usage;
