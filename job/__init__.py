"""trainer: fine-tune SANA-Video 2B 480p from one declarative YAML job spec."""

__version__ = "0.1.0"
