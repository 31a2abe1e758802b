"""What runs on the driver for one training: Ray start-up and its environment, the checks
before a run, one TorchTrainer (`launch`), and what a rerun of an output folder does
(`rerun`). The driver starts the worker's loop (lfm_ray.worker) by name inside the trainer;
the worker never imports the driver."""
