"""What runs inside a Ray Train worker: the training loop (`loop`), its checkpoints
(`checkpoint`) and what a worker knows of its group (`distributed`). Nothing here imports the
driver (lfm_ray.driver); the driver hands the loop a config dict and reads back what the
run's contract (lfm_ray.contract) names."""
