"""The peers a user would pick instead of ours, written the way their documentation shows: transformers
`generate` for decoding and a PyTorch training step (AdamW, autocast, GradScaler). The only benchmark module that
imports torch.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import transformers

from jaxrl_fp16.models.inference import left_pad

__all__ = ["TorchGenerate", "TorchTrainStep", "TORCH_DTYPES"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchGenerate:
    """Batched greedy or sampled decoding with `model.generate` in one dtype; EOS ignored (fixed lengths)."""

    def __init__(self, model_dir: str, dtype: str):
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=TORCH_DTYPES[dtype]).eval()
        self.model.generation_config.eos_token_id = None
        self.pad_id = self.model.config.pad_token_id or 0

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> np.ndarray:
        """Greedy responses [N, max_new_tokens]."""
        ids, mask = (torch.from_numpy(x).long() for x in left_pad(list(prompts), self.pad_id))
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id)
        return out[:, ids.shape[1]:].numpy()


class TorchTrainStep:
    """One optimizer step of causal-LM NLL on a transformers model: FP32 master weights, AdamW, gradient
    clipping, and `torch.autocast` + `GradScaler` for the half dtypes (the recipe of PyTorch's AMP docs)."""

    def __init__(self, model_dir: str, compute: str, *, lr: float, weight_decay: float, max_grad_norm: float):
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
        self.compute = TORCH_DTYPES[compute]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=weight_decay, foreach=True)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 15, enabled=compute == "float16")
        self.max_grad_norm = max_grad_norm

    def loss(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=self.compute, enabled=self.compute != torch.float32):
            logits = self.model(input_ids=tokens, attention_mask=mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok_logp = logp.gather(-1, tokens[:, 1:, None])[..., 0]
        m = mask[:, 1:].float()
        return -(tok_logp * m).sum() / m.sum()

    def step(self, tokens: np.ndarray, mask: np.ndarray) -> float:
        t, m = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(t, m)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(loss.detach())
