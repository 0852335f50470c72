"""The tiny custom-code causal LM: an embedding, a few gated MLP blocks, a head (no attention: it only has to be custom)."""

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_tiny import TinyCustomConfig


class TinyBlock(torch.nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden_size)
        self.gate = torch.nn.Linear(hidden_size, 2 * hidden_size)
        self.out = torch.nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.out(torch.nn.functional.silu(self.gate(self.norm(hidden))))


class TinyCustomForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TinyCustomConfig
    base_model_prefix = "body"

    def __init__(self, config: TinyCustomConfig) -> None:
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = torch.nn.ModuleList(TinyBlock(config.hidden_size) for _ in range(config.num_layers))
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_: object) -> CausalLMOutput:
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
