//! orderflow processor-service: the pipeline stages.
//!
//! Each stage is its own consumer with its own queue and inbox, chained by
//! events: [`inventory`] reserves stock for `order.created`, [`payment`]
//! charges `inventory.reserved` by deterministic rules, [`shipping`] ships
//! `payment.authorized`. Compensations (a declined payment, a cancelled
//! order) give stock and money back. Stock bookkeeping (on hand + reserved
//! + shipped = received) is a CHECK constraint, so it holds at every commit.

pub mod api;
pub mod app;
pub mod catalog;
pub mod config;
pub mod inventory;
pub mod payment;
pub mod schema;
pub mod shipping;
pub mod store;

pub use app::{MIGRATIONS, build};
pub use config::Config;
