"""DistributedDataParallel: full replicas, gradients all-reduced once per optimizer step."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager as ContextManager

from torch import nn

from train.parallelize import apply_ddp
from train.strategy.base import Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def build(self, gpt_config) -> None:
        self.gpt_config = gpt_config
        model = self.init_model(gpt_config)  # same seed on every rank; DDP also broadcasts rank 0's
        self.apply_transforms(model)
        self._raw = model
        s = self.cfg.strategy
        self.model = apply_ddp(model, self.device, find_unused_parameters=s.find_unused_parameters,
                               bucket_cap_mb=s.bucket_cap_mb) if self.dist.enabled else model
        self.build_optim(model)

    @property
    def raw_model(self) -> nn.Module:
        return self._raw

    def no_sync(self, last: bool) -> ContextManager:
        # accumulate locally on all but the last micro-step: one all-reduce per optimizer step
        if last or not self.dist.enabled:
            return contextlib.nullcontext()
        return self.model.no_sync()
