"""tune_cnn: train small CNNs many times over with Ray Tune and find out what made the difference."""

__version__ = "0.1.0"
