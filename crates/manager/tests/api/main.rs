//! Manager integration tests against the real local stack (RabbitMQ cluster + Redis).
//! Needs `GPUQ_TEST_AMQP_URLS` and `GPUQ_TEST_REDIS_URL` (scripts/test.sh sets them).

// Test scenarios read as one story from top to bottom: exempt from the workspace's
// 100-line limit on functions (clippy::too_many_lines), which holds for everything else.
#![allow(clippy::too_many_lines)]

mod credentials;
mod dead_letters;
mod engines;
mod helpers;
mod observability;
