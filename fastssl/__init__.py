"""fastssl: self-supervised visual pretraining built around its data path."""
__version__ = "0.1.0"
