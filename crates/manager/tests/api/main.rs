//! Manager integration tests against the real local stack (RabbitMQ cluster + Redis).
//! Needs `GPUQ_TEST_AMQP_URLS` and `GPUQ_TEST_REDIS_URL` (scripts/test.sh sets them).

mod dead_letters;
mod engines;
mod helpers;
mod observability;
