"""Pure-torch building blocks: mesh and dims, tensor-parallel plans, pipeline split and schedules,
data-parallel gradient sync and gradient compression. Testable without a Trainer."""
