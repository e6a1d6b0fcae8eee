"""From a model source to bytes on disk: base checkpoints, calibration data, quantization methods."""
