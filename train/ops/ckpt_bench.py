"""How long a checkpoint holds the training loop, synchronous vs ``checkpoint.async_save=true``:
``python -m train.ops.ckpt_bench [hydra overrides] [--dir DIR] [--repeat N]``, e.g. ``model=gpt2-124m``.

One process builds the engine of the given config, takes one optimizer step (so AdamW's state exists), then
times ``Checkpointer.save`` both ways into ``DIR`` (default: a temp dir): the stall is what the loop waits
for (staging to CPU memory + the small synchronous files for async), and for async also the time until the
background write is complete. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_dir

    from train.checkpoint import Checkpointer
    from train.config import resolve
    from train.distributed import init_distributed
    from train.main import CONF_DIR
    from train.parallel import build_engine

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=["train.device=cpu", *args.overrides])
    spec = resolve(cfg, 1)
    engine = build_engine(cfg, spec, init_distributed(cfg.train.device))
    t = cfg.train
    x = torch.randint(0, spec.gpt_config.vocab_size, (t.micro_batch_size, t.seq_len))
    engine.micro_step(x, x, last=True)
    engine.step()
    out: dict = {"model": cfg.model.preset, "n_params": engine.n_params, "strategy": cfg.strategy.name}
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        for mode in ("sync", "async"):
            run_dir = Path(root) / mode
            ck = Checkpointer(engine, run_dir, model_config=spec.gpt_config.to_dict(), precision=cfg.precision.name,
                              keep_last=1, is_main=True, async_save=mode == "async")
            stalls, totals = [], []
            for i in range(args.repeat):
                t0 = time.perf_counter()
                ck.save(i + 1, {"trainer": {"step": i + 1}})
                stalls.append(time.perf_counter() - t0)
                ck.wait()
                totals.append(time.perf_counter() - t0)
            out[f"{mode}_stall_s"] = round(min(stalls), 3)
            out[f"{mode}_complete_s"] = round(min(totals), 3)
            out["checkpoint_mb"] = round(sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*")
                                             if f.is_file()) / 2**20, 1)
    out["stall_ratio_sync_over_async"] = round(out["sync_stall_s"] / max(out["async_stall_s"], 1e-9), 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
