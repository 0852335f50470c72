"""Configuration of the tiny custom-code model (copied into every folder it is saved to, as on the Hub)."""

from transformers import PretrainedConfig


class TinyCustomConfig(PretrainedConfig):
    model_type = "tiny_custom"

    def __init__(self, vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        super().__init__(**kwargs)
